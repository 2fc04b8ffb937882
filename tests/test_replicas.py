"""Many replicas: three server processes behind one round_robin target; draining one loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from autopipeline import Client, RetryPolicy
from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

from .support import wait_for

BIN = Path(sys.executable).parent


def _completed(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            pb_grpc.AutoPipelineServiceStub(channel)
            .Inspect(pb.InspectRequest(), timeout=30)
            .server.stats.completed
        )


def _serving(target: str) -> bool:
    result = subprocess.run(
        [str(BIN / "autopipeline-server"), "health", "--target", target], capture_output=True, check=False
    )
    return result.returncode == 0


@pytest.fixture
def replicas(
    checkpoints: dict[str, Path], tmp_path: Path
) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    processes = []
    for i in range(3):
        log = (tmp_path / f"replica-{i}.log").open("w")
        process = subprocess.Popen(
            [str(BIN / "autopipeline-server"), "serve", "--model", f"tiny={checkpoints['sd15']}",
             "--host", "127.0.0.1", "--port", "0", "--grace", "120"],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        processes.append((process, log))
    try:
        started = []
        for process, _ in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert "listening on" in line, line
            started.append((process, line.strip().rsplit(" ", 1)[-1]))
        for _, target in started:
            wait_for(lambda target=target: _serving(target), timeout=300)  # type: ignore[misc]
        yield started
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
            process.wait(30)
            if process.stdout is not None:
                process.stdout.close()
            log.close()


def test_round_robin_spreads_requests_and_a_draining_replica_loses_none(
    replicas: list[tuple[subprocess.Popen[str], str]],
) -> None:
    targets = [target for _, target in replicas]
    # gRPC's own multi-address form; the SDK balances it with round_robin.
    combined = "ipv4:" + ",".join(targets)
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=1.0)
    with Client(combined, timeout=120, retry=policy) as client:
        for i in range(9):
            client.generate(f"spread {i}", num_inference_steps=1)
        counts = [_completed(target) for target in targets]
        assert sum(counts) == 9 and all(count >= 1 for count in counts), counts

        # Drain one replica while a caller keeps sending: every request must still complete.
        failures: list[BaseException] = []
        done = [0]
        stop = threading.Event()

        def keep_sending() -> None:
            while not stop.is_set():
                try:
                    client.generate("during drain", num_inference_steps=2)
                    done[0] += 1
                except BaseException as err:
                    failures.append(err)
                    return

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            wait_for(lambda: done[0] >= 3 or bool(failures))
            draining, _ = replicas[0]
            draining.send_signal(signal.SIGTERM)
            assert draining.wait(180) == 0
            after = done[0]
            wait_for(lambda: done[0] >= after + 6 or bool(failures))
        finally:
            stop.set()
            sender.join(180)
    assert not failures, failures
    survivors = sum(_completed(target) for target in targets[1:])
    assert survivors >= counts[1] + counts[2] + 6
