"""Peak and retained memory (RSS) of a served process under the floods of issue 10, before and after.

Each flood runs against a fresh `autopipeline-server serve` process (tiny SD 1.5, CPU, loopback);
RSS is sampled from /proc every 20 ms while the flood runs ("peak") and read once it is over and
the server has had a second to settle ("retained"). `--before DIR` serves the code of another
checkout (its `server/` and `client/` first on PYTHONPATH) for comparison, e.g. the commit before.

    python benchmarks/memory.py --before /path/to/old/checkout
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import PIL.Image

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from _serve import build_checkpoint, served_process

MiB = 1024 * 1024
TOKEN = "benchmark-token"
OK = pb.GenerateRequest(task=pb.TASK_TEXT_TO_IMAGE, prompt="ok", num_inference_steps=2, width=64, height=64)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


class Sampler:
    """Samples a process's RSS in the background; `peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss_mib(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _quietly(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


def flood_large_bodies(target: str, metadata: tuple[tuple[str, str], ...]) -> str:
    """30 connections x 3 calls of 30 MB bodies, in 3 waves (what the issue measured)."""
    body = pb.GenerateRequest(
        task=pb.TASK_IMAGE_TO_IMAGE, prompt="x", image=pb.Image(data=b"\1" * (30 * MiB))
    )
    codes: dict[str, int] = {}

    def client() -> None:
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            for _ in range(3):
                code = _quietly(lambda: list(stub.Generate(body, metadata=metadata, timeout=120)))
                codes[code] = codes.get(code, 0) + 1

    for _ in range(3):
        with ThreadPoolExecutor(30) as pool:
            for _ in range(30):
                pool.submit(client)
    return ", ".join(f"{n} {code}" for code, n in sorted(codes.items()))


def flood_large_images(target: str, metadata: tuple[tuple[str, str], ...]) -> str:
    """40 concurrent invalid (unknown scheduler) requests with a 4096x4096 input; a valid one meanwhile."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (4096, 4096), (40, 90, 200)).save(buffer, format="PNG")
    bad = pb.GenerateRequest(
        task=pb.TASK_IMAGE_TO_IMAGE,
        prompt="x",
        scheduler="NoSuchScheduler",
        image=pb.Image(data=buffer.getvalue()),
    )
    with grpc.insecure_channel(target) as channel, ThreadPoolExecutor(40) as pool:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        futures = [
            pool.submit(_quietly, lambda: list(stub.Generate(bad, metadata=metadata, timeout=300)))
            for _ in range(40)
        ]
        started = time.perf_counter()
        list(stub.Generate(OK, metadata=metadata, timeout=300))
        valid = time.perf_counter() - started
        codes = [f.result() for f in futures]
    return f"{codes.count('INVALID_ARGUMENT')}/40 INVALID_ARGUMENT; a valid 64x64 call took {valid:.2f}s"


def flood_slow_readers(target: str, metadata: tuple[tuple[str, str], ...], pid: int) -> str:
    """8 streams of 4 noisy 512x512 images whose clients never read; RSS once the worker is idle."""
    request = pb.GenerateRequest(
        task=pb.TASK_TEXT_TO_IMAGE, prompt="x", num_inference_steps=2, width=512, height=512, num_images=4
    )
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    channels = [grpc.insecure_channel(target, options=options) for _ in range(8)]
    calls = [
        pb_grpc.AutoPipelineServiceStub(ch).Generate(request, metadata=metadata, timeout=600)
        for ch in channels
    ]
    for call in calls:
        next(call)  # the first event; then silence
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        while True:  # until every call has run (the worker is idle and nothing is queued)
            server = stub.Inspect(pb.InspectRequest(), metadata=metadata, timeout=60).server
            if server.stats.pipeline_calls >= 8 and server.queue_depth == 0 and server.running == 0:
                break
            time.sleep(0.2)
    time.sleep(3)  # past the idle timeout given to the server after the fix
    stalled = rss_mib(pid)
    for call in calls:
        call.cancel()
    for ch in channels:
        ch.close()
    return f"RSS with 8 silent readers, worker idle: {stalled:.0f} MiB"


def measure(
    label: str, pythonpath: str, checkpoint: Path, extra: list[str]
) -> list[tuple[str, str, float, float, float, str]]:
    rows = []
    env = {**os.environ, "PYTHONPATH": pythonpath, "AUTOPIPELINE_AUTH_TOKENS": TOKEN}
    floods: list[tuple[str, bool, Callable[..., str]]] = [
        ("30x3 unauthenticated 30 MB bodies", True, flood_large_bodies),
        ("30x3 authenticated 30 MB bodies", False, flood_large_bodies),
        ("40 invalid 4096^2 images", False, flood_large_images),
        ("8 silent readers", False, flood_slow_readers),
    ]
    for name, anonymous, flood in floods:
        with served_process("--model", f"tiny={checkpoint}", "--no-warmup", *extra, env=env) as (target, pid):
            metadata = () if anonymous else (("authorization", f"Bearer {TOKEN}"),)
            baseline = rss_mib(pid)
            with Sampler(pid) as sampler:
                if flood is flood_slow_readers:
                    note = flood(target, metadata, pid)
                else:
                    note = flood(target, metadata)
            time.sleep(1)
            rows.append((label, name, baseline, sampler.peak, rss_mib(pid), note))
            start, peak, retained = baseline, sampler.peak, rows[-1][4]
            print(f"{label:6} {name:36} {start:6.0f} {peak:6.0f} {retained:6.0f} MiB  {note}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout with the code to compare against")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint("sd15", Path(tmp) / "sd15")
        rows = []
        if args.before:
            before = args.before.resolve()
            rows += measure("before", f"{before}/client:{before}/server", checkpoint, [])
        rows += measure("after", f"{here}/client:{here}/server", checkpoint, ["--stream-idle-timeout", "2"])
    print()
    print("| code | flood | start MiB | peak MiB | retained MiB | outcome |")
    print("|---|---|---:|---:|---:|---|")
    for label, name, start, peak, retained, note in rows:
        print(f"| {label} | {name} | {start:.0f} | {peak:.0f} | {retained:.0f} | {note} |")


if __name__ == "__main__":
    main()
