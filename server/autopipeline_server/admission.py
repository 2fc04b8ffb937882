"""Admission: bounds what requests hold around the queue: bodies, decoding, pixels, unread output."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from autopipeline_server.errors import ClientTooSlow, InputsBusy
from autopipeline_server.settings import Settings
from autopipeline_server.worker import WorkerStats

log = logging.getLogger(__name__)
T = TypeVar("T")
# Requests at least this large return their memory to the system when they are done (glibc).
TRIM_FROM_BYTES = 1024 * 1024


def _find_malloc_trim() -> Callable[[int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        return None
    return trim


_malloc_trim = _find_malloc_trim()
Context = grpc.aio.ServicerContext[Any, Any]


class Admission:
    """The server's budgets for work a request causes before (and beside) the inference worker.

    - Request bodies: handlers are registered as request-streaming, so gRPC reads no body before
      the handler asks for it (nor at all for a call the auth interceptor turns away); bodies are
      then read in at most `max_inflight_request_bytes // max_request_bytes` slots at once.
    - Input pixels: a request reserves its inputs' pixels (known from their headers) before they
      are decoded and frees them when its call ends; beyond `max_inflight_pixels` it is refused
      with RESOURCE_EXHAUSTED (INPUTS_BUSY) and a retry hint.
    - Decoding runs on `max_concurrent_decodes` threads of its own, so a burst of large inputs
      queues there instead of occupying every core and the event loop's default executor.
    - Output: every message is written with gRPC's flow control (a write completes when the
      transport takes it), so a stream holds one message beyond what HTTP/2 buffers; a client that
      reads nothing for `stream_idle_timeout` seconds has its stream ended (CLIENT_TOO_SLOW).
    """

    def __init__(self, settings: Settings, stats: WorkerStats, retry_hint: Callable[[], float]) -> None:
        limits = settings.limits
        self.body_slots = max(1, limits.max_inflight_request_bytes // limits.max_request_bytes)
        self._receiving = asyncio.Semaphore(self.body_slots)
        self._decoder = ThreadPoolExecutor(
            max_workers=limits.max_concurrent_decodes, thread_name_prefix="decode"
        )
        self.max_pixels = limits.max_inflight_pixels
        self.pixels = 0
        self.stream_idle_timeout = settings.stream_idle_timeout
        self._stats = stats
        self._retry_hint = retry_hint

    async def receive(self, context: Context) -> tuple[Any, Callable[[], None]]:
        """The one request message of a unary-request call (None if none came), read in a body slot.

        The slot stays taken until the returned release is called (idempotent): once the request
        has been converted and its bytes dropped, or when the call ends. Bodies received but not
        yet converted count as much as bodies being received.
        `context.read()`, not the request iterator: leaving that iterator after one message kept
        each message's buffers alive in grpc (measured: +30 MB per 30 MB request).
        """
        await self._receiving.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._receiving.release()

        try:
            message = await context.read()
        except BaseException:
            release()
            raise
        return (None if message is grpc.aio.EOF else message), release  # type: ignore[attr-defined]

    def returned(self, size: int) -> None:
        """Called when a request of `size` bytes is gone: hands large freed buffers back to the system.

        glibc keeps freed heap memory mapped (gRPC receives a body in many small slices); after a
        flood of large bodies that stayed as retained RSS (measured: 0.9 GB after 180 x 30 MB).
        """
        if size >= TRIM_FROM_BYTES and _malloc_trim is not None:
            _malloc_trim(0)

    @contextlib.contextmanager
    def hold_pixels(self, count: int) -> Iterator[None]:
        """Reserves `count` decoded input pixels for the block; raises InputsBusy beyond the budget."""
        if count and self.pixels + count > self.max_pixels:
            self._stats.rejected_inputs_busy += 1
            raise InputsBusy(
                f"the server is decoding or holding {self.pixels} input pixels; this request's "
                f"{count} would pass its limit of {self.max_pixels}: retry later",
                retry_after=self._retry_hint(),
            )
        self.pixels += count
        try:
            yield
        finally:
            self.pixels -= count

    async def decode(self, fn: Callable[[], T]) -> T:
        """Runs pixel work (decoding, resizing inputs) on the decode threads."""
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn)

    async def write(self, context: Context, message: object, request_id: str) -> None:
        """Writes one message, waiting for the transport to take it; ends slow readers' streams."""
        if not self.stream_idle_timeout:
            await context.write(message)
            return
        try:
            # asyncio.timeout, not wait_for: no task per message on the hot path.
            async with asyncio.timeout(self.stream_idle_timeout):
                await context.write(message)
        except TimeoutError:
            self._stats.ended_client_too_slow += 1
            log.warning(
                "request %s: the client read nothing for %.1fs; ending its stream",
                request_id,
                self.stream_idle_timeout,
            )
            raise ClientTooSlow(
                f"the client read nothing for {self.stream_idle_timeout:g}s (stream_idle_timeout)"
            ) from None

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)


async def bounded(awaitable: Awaitable[T], timeout: float) -> T | None:
    """`awaitable`'s result, or None when it does not finish within `timeout` seconds."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        return None
