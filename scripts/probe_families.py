"""Builds every tiny family and reports what the project's loader, warm-up and a 1-step call make of it."""

from __future__ import annotations

import argparse
import inspect
import pathlib
import sys
import tempfile
import time
import warnings
from typing import Any

import PIL.Image
import torch

from autopipeline_server.calls import warm_up
from autopipeline_server.cli import configure_logging
from autopipeline_server.domain import Task
from autopipeline_server.pipelines import load_model
from autopipeline_server.settings import ModelSpec
from autopipeline_server.tiny import FAMILIES, build_tiny_checkpoint

SIZE = 64


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 110 else text[:107] + "..."


def _one_step(pipe: Any) -> tuple[int, int]:
    """One denoising step of text-to-image straight through the pipe; returns the image size."""
    named = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {
        "prompt": "a tiny red cube",
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": 1,
        "generator": torch.Generator("cpu").manual_seed(0),
    }
    if "prior_num_inference_steps" in named:
        kwargs["prior_num_inference_steps"] = 2  # UnCLIPScheduler divides by steps - 1
    if "controlnet" in pipe.components:
        kwargs["image"] = PIL.Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    size: tuple[int, int] = pipe(**kwargs).images[0].size
    return size


def probe(family: str, root: pathlib.Path) -> list[str]:
    started = time.perf_counter()
    path = build_tiny_checkpoint(family, root / family, seed=0)
    built = time.perf_counter() - started
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    row = [family, f"{built:.2f}s / {size / 1e6:.2f} MB"]
    try:
        model = load_model(ModelSpec(family, str(path)), dtype=torch.float32, allow_pickle=False)
    except Exception as err:
        return [*row, f"no: {_short(err)}", "-", "-", "-", "-"]
    tasks = ", ".join(f"{task.value} ({pipe.pipeline_class})" for task, pipe in model.tasks.items())
    first = next(iter(model.tasks.values()), None)
    default = "-" if first is None else "{}x{} /{}".format(*first.default_size, first.size_multiple)
    row += ["yes", tasks or "none", default]
    target = model.tasks.get(Task.TEXT_TO_IMAGE)
    if target is None:
        row.append("not offered")
    else:
        try:
            row.append(f"yes {_one_step(target.pipe)}")
        except Exception as err:
            row.append(f"no: {_short(err)}")
    started = time.perf_counter()
    try:
        warm_up(model)
        row.append(f"yes ({time.perf_counter() - started:.1f}s)")
    except Exception as err:
        row.append(f"no: {_short(err)}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("families", nargs="*", default=list(FAMILIES), help="default: all")
    args = parser.parse_args()
    configure_logging("ERROR")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    header = [
        "family",
        "build / size",
        "load_model",
        "tasks offered",
        "default size / multiple",
        "1-step text-to-image",
        "warm_up",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            print("| " + " | ".join(probe(family, pathlib.Path(tmp))) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
