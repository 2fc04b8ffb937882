"""Latency of one small text-to-image request through the server versus the pipeline called directly.

Usage: python benchmarks/latency.py [--family sd15] [--requests 50] [--steps 4] [--size 64]
Prints median and p95 wall time for both paths and the overhead the server adds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch
from diffusers import AutoPipelineForText2Image

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.settings import ModelSpec, Settings
from autopipeline_server.tiny import build_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import ServerThread


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny_checkpoint(args.family, Path(tmp) / args.family)
        pipe = AutoPipelineForText2Image.from_pretrained(checkpoint, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)

        def direct(seed: int) -> None:
            pipe(
                "a lighthouse",
                num_inference_steps=args.steps,
                width=args.size,
                height=args.size,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil",
            )

        timings: dict[str, list[float]] = {"direct": [], "served": []}

        def measure(name: str, fn: Callable[[int], None]) -> None:
            fn(0)  # warm this path
            for i in range(args.requests):
                started = time.perf_counter()
                fn(i)
                timings[name].append(time.perf_counter() - started)

        # The direct baseline runs before the server exists: torch on two threads of one process
        # keeps both OpenMP pools spinning on a 2-core machine and would slow both paths.
        measure("direct", direct)
        server = ServerThread(
            Settings(models=(ModelSpec("tiny", str(checkpoint)),), host="127.0.0.1", port=0)
        )
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.AutoPipelineServiceStub(channel)

                def served(seed: int) -> None:
                    request = pb.GenerateRequest(
                        task=pb.TASK_TEXT_TO_IMAGE,
                        prompt="a lighthouse",
                        num_inference_steps=args.steps,
                        width=args.size,
                        height=args.size,
                        seed=seed,
                    )
                    events = list(stub.Generate(request))
                    assert events[-1].HasField("completed")

                measure("served", served)
        finally:
            server.stop()
    print(
        f"{args.family}, {args.size}x{args.size}, {args.steps} steps, {args.requests} requests per phase, CPU"
    )
    for name, values in timings.items():
        print(
            f"  {name:7s} median {statistics.median(values) * 1000:7.1f} ms   "
            f"p95 {percentile(values, 0.95) * 1000:7.1f} ms"
        )
    overhead = statistics.median(timings["served"]) - statistics.median(timings["direct"])
    print(f"  server overhead (median): {overhead * 1000:.1f} ms")


if __name__ == "__main__":
    main()
