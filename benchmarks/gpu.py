"""GPU benchmark: direct diffusers vs this server, eager and compiled, on full-size random-weight checkpoints.

Builds SD 1.5- and SDXL-architecture checkpoints offline (the real configs, random weights scaled down
so float16 stays finite, in-memory tokenizers as in tiny.py), then prints one table: direct eager,
served eager and served compiled (p50/p95, time to first event, first step), images/s with 1/8/16
clients with batching off and on against the direct batched ceiling, cold start with an empty and a
warm compile cache, and GPU memory.

    python benchmarks/gpu.py                      # CUDA, both architectures (aims at < 8 min on an H100)
    python benchmarks/gpu.py --tiny --device cpu  # smoke test: tiny checkpoint, small numbers
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from _serve import build_checkpoint, server_process

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

FULL = {  # family: (size, steps)
    "sd15": (512, 25),
    "sdxl": (1024, 20),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------ full-size checkpoints


def build_full_checkpoint(family: str, out: Path) -> Path:
    """The real SD 1.5 / SDXL architectures, random weights (built in a child: this process has no torch)."""
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import gpu; gpu._build_full({family!r}, {str(out)!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def _build_full(family: str, out: str) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from autopipeline_server import tiny

    torch.manual_seed(0)
    vocab = tiny._vocab()

    def text(hidden: int, layers: int, heads: int, projection: bool) -> Any:
        config = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=vocab[tiny._BOS], eos_token_id=vocab[tiny._EOS], pad_token_id=vocab[tiny._EOS],
        )  # fmt: skip
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024 if family == "sdxl" else 512,
        force_upcast=family == "sdxl",
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )
    if family == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        pipe: Any = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text(768, 12, 12, False), tokenizer=tiny._tokenizer(),
            scheduler=PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    skip_prk_steps=True, steps_offset=1),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae,
            text_encoder=text(768, 12, 12, False), text_encoder_2=text(1280, 32, 20, True),
            tokenizer=tiny._tokenizer(), tokenizer_2=tiny._tokenizer(pad_token="!"),
            scheduler=EulerDiscreteScheduler(
                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                steps_offset=1, timestep_spacing="leading",
            ),
            image_encoder=None, feature_extractor=None,
        )  # fmt: skip
    with torch.no_grad():  # default initialisation overflows float16 across dozens of blocks
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for parameter in module.parameters():
                    if parameter.dim() >= 2:
                        parameter.mul_(0.5)
    pipe.save_pretrained(out, safe_serialization=True)


# --------------------------------------------------------------------------------------- measuring


def direct(
    checkpoint: Path, device: str, size: int, steps: int, requests: int, batch: int
) -> dict[str, float]:
    """Direct diffusers in a child process: p50/p95 of one image, and images/s at `batch` per call."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import gpu, json; "
        f"print(json.dumps(gpu._direct({str(checkpoint)!r}, {device!r}, "
        f"{size}, {steps}, {requests}, {batch})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _direct(
    checkpoint: str, device: str, size: int, steps: int, requests: int, batch: int
) -> dict[str, float]:
    import torch
    from diffusers import AutoPipelineForText2Image

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(checkpoint, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def run(n: int) -> float:
        started = time.perf_counter()
        pipe(["a lighthouse"] * n, num_inference_steps=steps, width=size, height=size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    run(1)
    singles = [run(1) for _ in range(requests)]
    run(batch)
    batched = [run(batch) for _ in range(max(2, requests // 4))]
    return {
        "p50": statistics.median(singles),
        "p95": percentile(singles, 0.95),
        "ceiling": batch / statistics.median(batched),
        "memory": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0,
    }


def _one(
    stub: pb_grpc.AutoPipelineServiceStub, size: int, steps: int, seed: int
) -> tuple[float, float, float]:
    """(total, time to first event, time to first progress step) of one request."""
    request = pb.GenerateRequest(
        task=pb.TASK_TEXT_TO_IMAGE,
        prompt="a lighthouse",
        num_inference_steps=steps,
        width=size,
        height=size,
        seed=seed,
    )
    started = time.perf_counter()
    first = first_step = 0.0
    for event in stub.Generate(request):
        now = time.perf_counter() - started
        first = first or now
        if event.HasField("progress") and not first_step:
            first_step = now
    return time.perf_counter() - started, first, first_step


def served(checkpoint: Path, args: argparse.Namespace, size: int, steps: int, *flags: str) -> dict[str, Any]:
    """Starts a server with `flags`; latency of one client, then images/s with several clients."""
    began = time.perf_counter()
    with server_process("--model", f"m={checkpoint}", "--device", args.device, *flags) as target:
        cold = time.perf_counter() - began
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            _one(stub, size, steps, 0)
            runs = [_one(stub, size, steps, i) for i in range(args.requests)]
            throughput = {
                clients: _throughput(stub, size, steps, clients, args.requests) for clients in args.clients
            }
            model = stub.Inspect(pb.InspectRequest()).models[0]
    return {
        "p50": statistics.median(r[0] for r in runs),
        "p95": percentile([r[0] for r in runs], 0.95),
        "ttfe": statistics.median(r[1] for r in runs),
        "first_step": statistics.median(r[2] for r in runs),
        "throughput": throughput,
        "cold": cold,
        "mode": model.acceleration.mode,
        "compile": model.acceleration.compile_time.ToTimedelta().total_seconds(),
        "cache_hits": model.acceleration.cache_hits,
        "eager_calls": model.acceleration.eager_calls,
    }


def _throughput(
    stub: pb_grpc.AutoPipelineServiceStub, size: int, steps: int, clients: int, requests: int
) -> float:
    per_client = max(1, requests // clients) if clients > 1 else requests
    done = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        for i in range(per_client):
            _one(stub, size, steps, index * 1000 + i)
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints, 64x64, 4 steps (a smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--clients", default="1,8,16")
    parser.add_argument("--batch", type=int, default=8, help="max batch size when batching is on")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            size, steps = (64, 4) if args.tiny else FULL[family]
            out = Path(tmp) / family
            checkpoint = build_checkpoint(family, out) if args.tiny else build_full_checkpoint(family, out)
            cache = str(Path(tmp) / f"cache-{family}")
            shapes = f"{size}x{size}"
            base = direct(checkpoint, args.device, size, steps, args.requests, args.batch)
            eager = served(checkpoint, args, size, steps, "--acceleration", "off")
            batching = ("--max-batch-size", str(args.batch), "--max-batch-delay-ms", "20")
            eager_b = served(checkpoint, args, size, steps, "--acceleration", "off", *batching)
            compiled_cold = served(
                checkpoint, args, size, steps, "--acceleration", "compile", "--compile-shapes", shapes,
                "--compile-cache-dir", cache, *batching,
            )  # fmt: skip
            compiled_warm = served(
                checkpoint, args, size, steps, "--acceleration", "compile", "--compile-shapes", shapes,
                "--compile-cache-dir", cache, *batching,
            )  # fmt: skip
            label = f"{family} {size}x{size} {steps} steps"
            rows.append(
                (
                    label,
                    "direct eager",
                    *_ms(base["p50"], base["p95"]),
                    "",
                    "",
                    f"{base['ceiling']:.2f} (batch {args.batch})",
                    "",
                    f"{base['memory']:.1f}",
                )
            )
            for name, result in (
                ("served eager", eager),
                ("served eager, batching", eager_b),
                ("served compiled, cold cache", compiled_cold),
                ("served compiled, warm cache", compiled_warm),
            ):
                rows.append((
                    label, f"{name} [{result['mode']}]", *_ms(result["p50"], result["p95"]),
                    f"{result['ttfe'] * 1000:.1f}", f"{result['first_step'] * 1000:.1f}",
                    " / ".join(f"{c}:{v:.2f}" for c, v in result["throughput"].items()),
                    f"{result['cold']:.1f} (compile {result['compile']:.1f}, hits {result['cache_hits']})",
                    "",
                ))  # fmt: skip
    header = (
        "model",
        "path",
        "p50 ms",
        "p95 ms",
        "TTFE ms",
        "1st step ms",
        "images/s by clients",
        "start s",
        "GiB",
    )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(f"device {args.device}; served batching: max {args.batch}, delay 20 ms")
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def _ms(*seconds: float) -> tuple[str, ...]:
    return tuple(f"{s * 1000:.1f}" for s in seconds)


if __name__ == "__main__":
    main()
