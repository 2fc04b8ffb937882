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

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc


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
def served_process(
    *args: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    ready_within: float = 300.0,
    log_level: str = "WARNING",
) -> Iterator[tuple[str, int]]:
    """As `server_process`, with the environment given; yields the target and the process id.

    `log`: the server's stderr goes to this file (else nowhere), so a failed start can be explained.
    `ready_within`: seconds it may take to become SERVING (compiling large models takes minutes).
    """
    command = [sys.executable, "-m", "autopipeline_server.cli", "--log-level", log_level, "serve"]
    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(log.open("w")) if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        try:
            assert process.stdout is not None
            target = process.stdout.readline().strip().rsplit(" ", 1)[-1]
            if not target:
                raise RuntimeError(f"the server exited before listening (exit code {process.wait()})")
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                deadline = time.monotonic() + ready_within
                while (
                    health.Check(health_pb2.HealthCheckRequest()).status
                    != health_pb2.HealthCheckResponse.SERVING
                ):
                    if process.poll() is not None:
                        raise RuntimeError(f"the server exited before SERVING (code {process.returncode})")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the server did not become SERVING within {ready_within:.0f}s")
                    _raise_if_failed(pb_grpc.AutoPipelineServiceStub(channel))
                    time.sleep(0.1)
            yield target, process.pid
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:  # stuck (e.g. inside a compile): the device must be freed
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _raise_if_failed(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    """A configured model that failed to load never becomes SERVING: say so instead of waiting."""
    for model in stub.Inspect(pb.InspectRequest()).models:
        if model.state == pb.MODEL_STATE_FAILED:
            raise RuntimeError(f"model {model.name!r} failed to load: {model.state_reason}")
