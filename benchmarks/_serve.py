"""Runs `autopipeline-server serve` as its own process for benchmarks, as it runs in production."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_checkpoint(family: str, out: Path) -> Path:
    """A tiny checkpoint, built in a child process so this one never runs torch."""
    command = [sys.executable, "-m", "autopipeline_server.cli", "tiny-model", "--family", family, str(out)]
    subprocess.run(command, check=True, capture_output=True)
    return out


@contextlib.contextmanager
def server_process(*args: str) -> Iterator[str]:
    """Starts `autopipeline-server serve --host 127.0.0.1 --port 0 ARGS`; yields its target once SERVING."""
    with served_process(*args) as (target, _):
        yield target


@contextlib.contextmanager
def served_process(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """As `server_process`, with the environment given; yields the target and the process id."""
    command = [sys.executable, "-m", "autopipeline_server.cli", "--log-level", "WARNING", "serve"]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        target = process.stdout.readline().strip().rsplit(" ", 1)[-1]
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 300
            while (
                health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING
            ):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the server did not become SERVING")
                time.sleep(0.1)
        yield target, process.pid
    finally:
        process.terminate()
        process.wait(60)
        if process.stdout is not None:
            process.stdout.close()
