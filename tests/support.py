"""Test helpers: a real server on its own event-loop thread, and small image utilities."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import grpc
import PIL.Image

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.server import RunningServer, create_server
from autopipeline_server.settings import Settings

Generate = Callable[..., list[pb.GenerateResponse]]


class ServerThread:
    """Runs a real `grpc.aio` server on its own event loop thread, so tests can use blocking clients."""

    def __init__(self, settings: Settings, *, wait_until_loaded: bool = True, **options: Any) -> None:
        self.settings = settings.validate()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(create_server(self.settings, **options))
        if wait_until_loaded:
            self.call(self.running.wait_until_loaded())
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coroutine: Any, timeout: float = 120) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def stop(self, grace: float = 5) -> None:
        try:
            self.call(self.running.stop(grace))
        finally:
            self.close_loop()

    def close_loop(self) -> None:
        """Ends the event-loop thread (after the server was stopped, or by `stop`)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def fault_in_denoiser(server: ServerThread, model: str, fault: Callable[[int], None]) -> Iterator[None]:
    """A fake, for what a CPU cannot do (a CUDA out-of-memory): calls `fault(n)` before the n-th
    denoiser forward pass of `model` (one per denoising step), from inside a real pipeline call."""
    loaded = server.running.registry.entries[model].model
    assert loaded is not None, f"{model} is not loaded"
    denoiser = getattr(loaded.base, "unet", None) or loaded.base.transformer
    real_forward = denoiser.forward
    calls = 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        fault(calls)
        return real_forward(*args, **kwargs)

    denoiser.forward = forward
    try:
        yield
    finally:
        del denoiser.forward  # the instance attribute goes; the class's forward is back


def server_info(server: ServerThread) -> pb.ServerInfo:
    """What the server says about itself over the wire (queue, running, ServerStats)."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        return stub.Inspect(pb.InspectRequest(), timeout=30).server


def wait_for(predicate: Callable[[], bool], timeout: float = 120) -> None:
    """Polls until `predicate` holds; the timeout is only a backstop against a hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def queued_together(
    server: ServerThread, requests: Sequence[pb.GenerateRequest], *, blocker: pb.GenerateRequest
) -> list[list[pb.GenerateResponse]]:
    """Runs `requests` so that they are all in the queue when the device frees up.

    `blocker` (a long request the others cannot batch with) holds the device until every request
    is queued, then is cancelled: whether they share a call then depends on batching alone, not
    on how quickly each reached a busy server.
    """

    async def main() -> list[list[pb.GenerateResponse]]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)

            async def collect(request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
                return [event async for event in stub.Generate(request, timeout=300)]

            held = stub.Generate(blocker)
            async for event in held:
                if event.HasField("progress"):
                    break
            calls = [asyncio.ensure_future(collect(request)) for request in requests]
            while (await stub.Inspect(pb.InspectRequest())).server.queue_depth < len(requests):
                await asyncio.sleep(0.005)
            held.cancel()
            return list(await asyncio.gather(*calls))

    return asyncio.run(main())


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
