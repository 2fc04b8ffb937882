"""Latency of one small text-to-image request through the server versus the pipeline called directly.

Usage: python benchmarks/latency.py [--family sd15] [--requests 50] [--steps 4] [--size 64]
Prints median and p95 wall time of three paths: the pipeline called directly, as loaded; the server
with its default acceleration (on CPU: the denoiser in channels_last); the server with
`--acceleration off`, which runs the pipeline as loaded, so against direct it is the server's own
cost. Then served/direct, that overhead, and the time from sending a request to its first event (the
`queued` event). The paths' calls rotate, so a change in the machine's load weighs on all alike. Then the
same messages one served request received are replayed by a bare grpc.aio server that does no
other work: the transport floor, what any gRPC server in Python pays for this stream here.

The server runs as its own process, as in production, and the direct calls run in another child
process: torch called from two threads of one process keeps two OpenMP pools competing for the
cores (on 2 cores the second thread ran several times slower), and an in-process server would
share the client's GIL.
"""

from __future__ import annotations

import argparse
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


def direct_worker(checkpoint: Path, steps: int, size: int) -> None:
    """The child process: loads the pipeline, then runs one call per seed read from stdin and
    prints each call's wall time (seconds) on its own line."""
    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(checkpoint, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    print("ready", flush=True)
    for line in sys.stdin:
        started = time.perf_counter()
        pipe(
            "a lighthouse",
            num_inference_steps=steps,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(int(line)),
            output_type="pil",
        )
        print(time.perf_counter() - started, flush=True)


class Direct:
    """Direct pipeline calls, run one at a time in a child process (see the module docstring)."""

    def __init__(self, checkpoint: Path, steps: int, size: int) -> None:
        command = [
            sys.executable,
            __file__,
            "--steps",
            str(steps),
            "--size",
            str(size),
            "--direct-in",
            str(checkpoint),
        ]
        self._child = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self._child.stdin is not None
        assert self._child.stdout is not None
        self._stdin, self._stdout = self._child.stdin, self._child.stdout
        if self._stdout.readline().strip() != "ready":
            self._child.kill()
            raise RuntimeError("the direct child process did not start")

    def call(self, seed: int) -> float:
        self._stdin.write(f"{seed}\n")
        self._stdin.flush()
        return float(self._stdout.readline())

    def close(self) -> None:
        self._stdin.close()
        self._child.wait(60)


def replay_server(recorded: Path) -> None:
    """The child process of the transport floor: a bare grpc.aio server whose Generate answers any
    request with the recorded messages of one served request, doing nothing else."""
    import asyncio

    import grpc.aio

    data = recorded.read_bytes()
    messages, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        messages.append(pb.GenerateResponse.FromString(data[offset + 4 : offset + 4 + size]))
        offset += 4 + size

    async def generate(requests: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        await context.read()
        await context.send_initial_metadata((("x-request-id", "replay"),))
        for message in messages:
            await context.write(message)

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            generate,
            request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateResponse.SerializeToString,
        )
        service = pb.DESCRIPTOR.services_by_name["AutoPipelineService"].full_name
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"Generate": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


def transport_floor(recorded: list[pb.GenerateResponse], requests: int, steps: int, size: int) -> list[float]:
    """Wall times of requests answered with `recorded` by a bare grpc.aio server (see `replay_server`)."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as file:
        for message in recorded:
            body = message.SerializeToString()
            file.write(len(body).to_bytes(4, "big") + body)
        file.flush()
        command = [sys.executable, __file__, "--replay", file.name]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as child:
            try:
                assert child.stdout is not None
                target = f"127.0.0.1:{int(child.stdout.readline())}"
                with grpc.insecure_channel(target) as channel:
                    stub = pb_grpc.AutoPipelineServiceStub(channel)
                    return [served_call(stub, i, steps, size)[0] for i in range(requests + 1)][1:]
            finally:
                child.terminate()


def served_call(
    stub: pb_grpc.AutoPipelineServiceStub,
    seed: int,
    steps: int,
    size: int,
    events: list[pb.GenerateResponse] | None = None,
) -> tuple[float, float]:
    """One request's wall time and its time to the first event (its events go to `events`)."""
    request = pb.GenerateRequest(
        task=pb.TASK_TEXT_TO_IMAGE,
        prompt="a lighthouse",
        num_inference_steps=steps,
        width=size,
        height=size,
        seed=seed,
    )
    started = time.perf_counter()
    first, last = None, None
    for event in stub.Generate(request):
        if first is None:
            first = time.perf_counter() - started
        last = event
        if events is not None:
            events.append(event)
    assert first is not None
    assert last is not None
    assert last.HasField("completed")
    return time.perf_counter() - started, first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--direct-in", type=Path, help=argparse.SUPPRESS)  # child processes' modes
    parser.add_argument("--replay", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.direct_in:
        direct_worker(args.direct_in, args.steps, args.size)
        return
    if args.replay:
        replay_server(args.replay)
        return
    # "served" runs the server's default acceleration (`auto`: on CPU the denoiser in channels_last);
    # "served off" the pipeline exactly as loaded, as the direct path runs it: the server's own cost.
    timings: dict[str, list[float]] = {"direct": [], "served": [], "served off": []}
    first_events: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(args.family, Path(tmp) / args.family)
        direct = Direct(checkpoint, args.steps, args.size)
        try:
            with (
                server_process("--model", f"tiny={checkpoint}") as target,
                server_process("--model", f"tiny={checkpoint}", "--acceleration", "off") as target_off,
                grpc.insecure_channel(target) as channel,
                grpc.insecure_channel(target_off) as channel_off,
            ):
                stubs = {
                    "served": pb_grpc.AutoPipelineServiceStub(channel),
                    "served off": pb_grpc.AutoPipelineServiceStub(channel_off),
                }
                direct.call(0)  # warms every path
                for stub in stubs.values():
                    served_call(stub, 0, args.steps, args.size)
                # Interleaved, rotating which goes first, so the machine's changing load weighs on
                # every path alike.
                paths = list(timings)
                for i in range(1, args.requests + 1):
                    for path in paths[i % 3 :] + paths[: i % 3]:
                        if path == "direct":
                            timings["direct"].append(direct.call(i))
                            continue
                        recorded: list[pb.GenerateResponse] = []
                        wall, first = served_call(stubs[path], i, args.steps, args.size, recorded)
                        timings[path].append(wall)
                        if path == "served":
                            first_events.append(first)
        finally:
            direct.close()
    floor = transport_floor(recorded, args.requests, args.steps, args.size)
    print(
        f"{args.family}, {args.size}x{args.size}, {args.steps} steps, {args.requests} requests per path, CPU"
    )
    for name, values in timings.items():
        print(
            f"  {name:10s} median {statistics.median(values) * 1000:7.1f} ms   "
            f"p95 {percentile(values, 0.95) * 1000:7.1f} ms"
        )
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"  served/direct {median['served'] / median['direct']:.3f} (default acceleration)")
    print(
        f"  server overhead, pipeline as loaded (served off - direct): "
        f"{(median['served off'] - median['direct']) * 1000:.1f} ms; "
        f"served off/direct {median['served off'] / median['direct']:.3f}"
    )
    print(
        f"  transport floor: the same {len(recorded)} messages from a bare grpc.aio server that does "
        f"nothing else: median {statistics.median(floor) * 1000:.2f} ms"
    )
    print(
        f"  time to first event: median {statistics.median(first_events) * 1000:.2f} ms, "
        f"p95 {percentile(first_events, 0.95) * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
