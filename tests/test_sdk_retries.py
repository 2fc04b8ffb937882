"""SDK retries: only before the first event, bounded, honouring RetryInfo; unit and real-server tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from autopipeline import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    ResourceExhaustedError,
    RetryPolicy,
    UnavailableError,
)
from autopipeline._errors import AutoPipelineError
from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.settings import ModelSpec, Settings

from .support import ServerThread, fault_in_denoiser, server_info, wait_for

NO_JITTER = {"jitter": 0.0}
LONG = pb.GenerateRequest(
    task=pb.TASK_TEXT_TO_IMAGE, prompt="x", num_inference_steps=500, width=256, height=256
)


def error(cls: type[AutoPipelineError], retry_after: float | None = None) -> AutoPipelineError:
    err = cls("x", code="X")
    err.retry_after = retry_after
    return err


def test_policy_retries_unavailable_with_growing_backoff() -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.5, multiplier=2, max_backoff=1.5, **NO_JITTER)
    delays = [policy.delay(attempt, error(UnavailableError)) for attempt in (1, 2, 3, 4)]
    assert delays == [0.5, 1.0, 1.5, None]


def test_policy_honours_retry_info_and_gives_up_on_long_waits() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=5, **NO_JITTER)
    assert policy.delay(1, error(ResourceExhaustedError, retry_after=2.0)) == 2.0
    assert policy.delay(1, error(ResourceExhaustedError, retry_after=9.0)) is None
    assert policy.delay(1, error(ResourceExhaustedError)) is None, "no RetryInfo: not retried"
    assert policy.delay(1, error(InvalidArgumentError)) is None
    assert RetryPolicy(max_attempts=1).delay(1, error(UnavailableError)) is None


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="multiplier"):
        RetryPolicy(multiplier=0.5)


# --------------------------------------------------------------------------------------- real server


@pytest.fixture
def retry_server(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    settings = Settings(
        models=(ModelSpec("sd15", str(checkpoints["sd15"])),),
        host="127.0.0.1",
        port=0,
        device="cpu",
        max_queue=1,
    )
    server = ServerThread(settings)
    yield server
    server.stop()


@contextlib.contextmanager
def draining_server(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    """A server draining behind a running request: every new request is UNAVAILABLE until exit."""
    settings = Settings(
        models=(ModelSpec("sd15", str(checkpoints["sd15"])),), host="127.0.0.1", port=0, device="cpu"
    )
    server = ServerThread(settings)
    try:
        with grpc.insecure_channel(server.target) as channel:
            blocker = pb_grpc.AutoPipelineServiceStub(channel).Generate(LONG)
            next(e for e in blocker if e.HasField("progress"))
            draining = asyncio.run_coroutine_threadsafe(server.running.stop(grace=60), server.loop)
            wait_for(lambda: not server.running.worker.accepting)
            yield server
            blocker.cancel()
            draining.result(60)
    finally:
        server.close_loop()


def test_unavailable_is_retried_up_to_the_limit(checkpoints: dict[str, Path]) -> None:
    with draining_server(checkpoints) as server:
        before = server_info(server).stats.rejected_draining
        policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
        with Client(server.target, timeout=30, retry=policy) as client, pytest.raises(UnavailableError):
            client.generate("x", num_inference_steps=2)
        assert server_info(server).stats.rejected_draining == before + 3


@contextlib.contextmanager
def full_queue(server: ServerThread) -> Iterator[None]:
    """The server's one queue place taken (its `max_queue` is 1) behind a running request, until exit."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        blocker = stub.Generate(LONG)
        next(e for e in blocker if e.HasField("progress"))
        filler = stub.Generate(LONG)
        next(e for e in filler if e.HasField("queued"))
        try:
            yield
        finally:
            blocker.cancel()
            filler.cancel()


def test_a_full_queue_is_retried_after_the_delay_the_server_asks(
    retry_server: ServerThread,
) -> None:
    server = retry_server
    with full_queue(server):
        before = server_info(server).stats.rejected_queue_full
        patient = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=5)
        started = time.monotonic()
        with (
            Client(server.target, retry=patient) as client,
            pytest.raises(ResourceExhaustedError) as caught,
        ):
            client.generate("x", num_inference_steps=2)
        assert time.monotonic() - started >= caught.value.retry_after, "retried before the server's delay"
        assert server_info(server).stats.rejected_queue_full == before + 2

        impatient = RetryPolicy(max_attempts=5, max_backoff=0.5)  # the server asks for 1 s
        with Client(server.target, retry=impatient) as client, pytest.raises(ResourceExhaustedError):
            client.generate("x", num_inference_steps=2)
        assert server_info(server).stats.rejected_queue_full == before + 3


def test_nothing_is_retried_after_the_first_event(retry_server: ServerThread) -> None:
    server = retry_server
    calls = []

    def fake_cuda_oom(step: int) -> None:
        calls.append(step)
        if step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    with Client(server.target, retry=RetryPolicy(max_attempts=5)) as client:
        with (
            fault_in_denoiser(server, "sd15", fake_cuda_oom),
            pytest.raises(ResourceExhaustedError) as caught,
        ):
            client.generate("x", num_inference_steps=3)
        assert caught.value.reason == "OUT_OF_MEMORY" and caught.value.retry_after
    assert calls == [1], "the request ran again after events had been sent"


def test_async_client_retries_unavailable_up_to_the_limit(checkpoints: dict[str, Path]) -> None:
    """AsyncClient's own retry loop: every attempt meets a draining server, each is counted there."""
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with draining_server(checkpoints) as server:
        before = server_info(server).stats.rejected_draining

        async def attempt() -> None:
            async with AsyncClient(server.target, timeout=30, retry=policy) as client:
                await client.generate("x", num_inference_steps=2)

        with pytest.raises(UnavailableError):
            asyncio.run(attempt())
        assert server_info(server).stats.rejected_draining == before + 3


def test_async_client_waits_out_a_full_queue(retry_server: ServerThread) -> None:
    """AsyncClient honours RetryInfo like Client: it retries a full queue after the server's delay."""
    server = retry_server
    patient = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=5)

    async def full() -> ResourceExhaustedError:
        async with AsyncClient(server.target, retry=patient) as client:
            try:
                await client.generate("x", num_inference_steps=2)
            except ResourceExhaustedError as err:
                return err
        raise AssertionError("a full queue was not reported")

    with full_queue(server):
        before = server_info(server).stats.rejected_queue_full
        started = time.monotonic()
        error = asyncio.run(full())
        assert time.monotonic() - started >= error.retry_after, "retried before the server's delay"
        assert server_info(server).stats.rejected_queue_full == before + 2
