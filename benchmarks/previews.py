"""Cost of one preview per family: the linear latent-to-RGB projection against a full autoencoder decode."""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

import torch

from autopipeline_server.cli import configure_logging
from autopipeline_server.domain import Task
from autopipeline_server.pipelines import load_model
from autopipeline_server.previews import Previewer, latent_format
from autopipeline_server.settings import ModelSpec
from autopipeline_server.tiny import build_tiny_checkpoint


def _latents(pipe: object, size: int) -> torch.Tensor:
    vae = getattr(pipe, "vae", None)
    channels = int(vae.config.latent_channels) if vae is not None else 4
    return torch.randn(1, channels, size // 8, size // 8)


def _median_ms(previewer: Previewer, latents: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        previewer(latents)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", default="sd15,sdxl,sd3,flux,z-image")
    parser.add_argument("--source", action="append", default=[], help="NAME=PATH of a real checkpoint")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    configure_logging("ERROR")
    warnings.simplefilter("ignore")
    print("| model | latent format | linear (ms) | full decode (ms) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sources = [ModelSpec.parse(text) for text in args.source]
        for family in filter(None, args.families.split(",")):
            sources.append(ModelSpec(family, str(build_tiny_checkpoint(family, pathlib.Path(tmp) / family))))
        for spec in sources:
            model = load_model(spec, dtype=torch.float32, allow_pickle=False)
            pipe = model.tasks[Task.TEXT_TO_IMAGE].pipe
            latents = _latents(pipe, args.size)
            fmt = latent_format(pipe.vae.config)
            linear = _median_ms(Previewer(pipe, args.size, args.size), latents, args.repeats) if fmt else None
            decode = _median_ms(Previewer(pipe, args.size, args.size, mode="decode"), latents, args.repeats)
            shown = "-" if linear is None else f"{linear:.2f}"
            print(f"| {spec.name} | {fmt.name if fmt else '-'} | {shown} | {decode:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
