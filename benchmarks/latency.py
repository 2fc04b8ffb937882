"""Latency of one small text-to-image request through the server versus the pipeline called directly.

Usage: python benchmarks/latency.py [--family sd15] [--requests 50] [--steps 4] [--size 64]
Prints median and p95 wall time for both paths, the overhead the server adds (and served/direct),
and the time from sending a request to its first event (the `queued` event).

The server runs as its own process, as in production, and the direct calls run in another child
process: torch called from two threads of one process keeps two OpenMP pools competing for the
cores (on 2 cores the second thread ran several times slower), and an in-process server would
share the client's GIL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve import build_checkpoint, server_process


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def direct_timings(checkpoint: Path, requests: int, steps: int, size: int) -> list[float]:
    """Wall times of direct pipeline calls, measured in this (child) process."""
    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(checkpoint, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    timings = []
    for i in range(requests + 1):
        started = time.perf_counter()
        pipe(
            "a lighthouse",
            num_inference_steps=steps,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(i),
            output_type="pil",
        )
        timings.append(time.perf_counter() - started)
    return timings[1:]  # the first call warms up


def served_timings(checkpoint: Path, requests: int, steps: int, size: int) -> tuple[list[float], list[float]]:
    """Wall times of requests through a served process, and each one's time to its first event."""
    timings, first_events = [], []
    with server_process("--model", f"tiny={checkpoint}") as target, grpc.insecure_channel(target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        for i in range(requests + 1):
            request = pb.GenerateRequest(
                task=pb.TASK_TEXT_TO_IMAGE,
                prompt="a lighthouse",
                num_inference_steps=steps,
                width=size,
                height=size,
                seed=i,
            )
            started = time.perf_counter()
            events = []
            for event in stub.Generate(request):
                if not events:
                    first_events.append(time.perf_counter() - started)
                events.append(event)
            timings.append(time.perf_counter() - started)
            assert events[-1].HasField("completed")
    return timings[1:], first_events[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--direct-in", type=Path, help=argparse.SUPPRESS)  # the child process's mode
    args = parser.parse_args()
    if args.direct_in:
        print(json.dumps(direct_timings(args.direct_in, args.requests, args.steps, args.size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(args.family, Path(tmp) / args.family)
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--direct-in", str(checkpoint)],
            check=True,
            capture_output=True,
            text=True,
        )
        served, first_events = served_timings(checkpoint, args.requests, args.steps, args.size)
        timings = {"direct": json.loads(child.stdout.strip().splitlines()[-1]), "served": served}
    print(
        f"{args.family}, {args.size}x{args.size}, {args.steps} steps, {args.requests} requests per path, CPU"
    )
    for name, values in timings.items():
        print(
            f"  {name:7s} median {statistics.median(values) * 1000:7.1f} ms   "
            f"p95 {percentile(values, 0.95) * 1000:7.1f} ms"
        )
    overhead = statistics.median(timings["served"]) - statistics.median(timings["direct"])
    ratio = statistics.median(timings["served"]) / statistics.median(timings["direct"])
    print(f"  server overhead (median): {overhead * 1000:.1f} ms; served/direct {ratio:.3f}")
    print(
        f"  time to first event: median {statistics.median(first_events) * 1000:.2f} ms, "
        f"p95 {percentile(first_events, 0.95) * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
