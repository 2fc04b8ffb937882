"""Throughput of the server under N concurrent clients, batching off and on, against the direct-call ceiling.

Usage: python benchmarks/throughput.py [--family sd15] [--clients 1 4 16] [--requests 8] [--steps 4]

Every client sends compatible 64x64 text-to-image requests back to back (prompts and seeds differ).
For each client count and batching mode it prints images per second, p50/p95 latency, the time to
the first event and to `started`, and the served/ceiling ratio, where the ceiling is the same
pipeline called directly in-process with the batch size the server could form (1 without batching).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc.aio
import torch
from diffusers import AutoPipelineForText2Image

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve import build_checkpoint, server_process

SIZE = 64
MAX_BATCH = 16


@dataclass
class Run:
    images: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_event: list[float] = field(default_factory=list)
    to_started: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ceiling(checkpoint: Path, batch: int, steps: int, repeats: int) -> float:
    """Images per second of the pipeline called directly with `batch` prompts per call.

    Runs in a child process: torch called from two threads of one process (this one and the
    server's device thread) keeps two OpenMP pools competing for the cores and slows both.
    """
    result = subprocess.run(
        [sys.executable, __file__, "--ceiling", str(checkpoint), str(batch), str(steps), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def _ceiling_in_process(checkpoint: Path, batch: int, steps: int, repeats: int) -> float:
    pipe = AutoPipelineForText2Image.from_pretrained(checkpoint, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def call(seed: int) -> None:
        pipe(
            [f"prompt {i}" for i in range(batch)],
            num_inference_steps=steps,
            width=SIZE,
            height=SIZE,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
        )

    call(0)
    started = time.perf_counter()
    for r in range(repeats):
        call(r)
    return batch * repeats / (time.perf_counter() - started)


async def load(target: str, clients: int, requests: int, steps: int) -> Run:
    run = Run()

    async def client(index: int, stub: pb_grpc.AutoPipelineServiceStub) -> None:
        for r in range(requests):
            request = pb.GenerateRequest(
                task=pb.TASK_TEXT_TO_IMAGE,
                prompt=f"client {index} request {r}",
                seed=index * 1000 + r,
                num_inference_steps=steps,
                width=SIZE,
                height=SIZE,
            )
            sent = time.perf_counter()
            first = started = None
            async for event in stub.Generate(request):
                now = time.perf_counter()
                first = first or now
                if event.HasField("started"):
                    started = now
                    run.batch_sizes.append(event.started.batch_images)
                if event.HasField("completed"):
                    run.images += event.completed.num_images
            done = time.perf_counter()
            run.latencies.append(done - sent)
            run.first_event.append((first or done) - sent)
            run.to_started.append((started or done) - sent)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        begin = time.perf_counter()
        await asyncio.gather(*(client(i, stub) for i in range(clients)))
        run.seconds = time.perf_counter() - begin
    return run


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--ceiling":
        checkpoint, batch, steps, repeats = Path(sys.argv[2]), *map(int, sys.argv[3:])
        print(_ceiling_in_process(checkpoint, batch, steps, repeats))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(args.family, Path(tmp) / args.family)
        batches = sorted({1, *(min(c, MAX_BATCH) for c in args.clients)})
        ceilings = {b: ceiling(checkpoint, b, args.steps, repeats=max(4, 32 // b)) for b in batches}
        rows = []
        for mode, batch_size in (("off", 1), ("on", MAX_BATCH)):
            options = ["--max-queue", "256", "--max-batch-size", str(batch_size)]
            if batch_size > 1:
                options += ["--max-batch-delay-ms", "5"]
            with server_process("--model", f"tiny={checkpoint}", *options) as target:
                asyncio.run(load(target, 1, 2, args.steps))  # warm the path
                for clients in args.clients:
                    run = asyncio.run(load(target, clients, args.requests, args.steps))
                    best = ceilings[1 if batch_size == 1 else min(clients, MAX_BATCH)]
                    rows.append((mode, clients, run, best))
    print(f"{args.family}, {SIZE}x{SIZE}, {args.steps} steps, {args.requests} requests per client, CPU")
    print(
        "ceiling (direct pipeline calls): "
        + ", ".join(f"batch {b}: {v:.1f} img/s" for b, v in ceilings.items())
    )
    header = (
        f"{'batching':8} {'clients':>7} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'1st ev ms':>9} "
        f"{'started ms':>10} {'mean batch':>10} {'ceiling':>8} {'served/ceiling':>14}"
    )
    print(header)
    for mode, clients, run, best in rows:
        rate = run.images / run.seconds
        print(
            f"{mode:8} {clients:7d} {rate:7.1f} {statistics.median(run.latencies) * 1000:8.1f} "
            f"{percentile(run.latencies, 0.95) * 1000:8.1f} {statistics.median(run.first_event) * 1000:9.1f} "
            f"{statistics.median(run.to_started) * 1000:10.1f} {statistics.mean(run.batch_sizes):10.2f} "
            f"{best:8.1f} {rate / best:14.2f}"
        )


if __name__ == "__main__":
    main()
