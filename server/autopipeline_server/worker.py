"""The inference worker: a bounded queue owned by the event loop, feeding one device thread."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import PIL.Image

from autopipeline_server.domain import Event, Finished, Preview, Progress, Queued, Started
from autopipeline_server.errors import QueueFull, RequestCancelled, ShuttingDown
from autopipeline_server.pipelines import CallCancelled, PreparedCall, run_call

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class Job:
    """One queued request: its prepared call, its event stream and its cancellation flag."""

    def __init__(self, call: PreparedCall, loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.arrived = time.perf_counter()
        self._loop = loop
        self._events: asyncio.Queue[Event | _Failed] = asyncio.Queue()
        self._cancel = threading.Event()
        self.done = False
        self.last_position: int | None = None

    # -- called on the worker thread
    def emit_threadsafe(self, event: Event | _Failed) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- called on the event loop
    def emit(self, event: Event | _Failed) -> None:
        self._events.put_nowait(event)

    def cancel(self) -> None:
        self._cancel.set()

    async def events(self) -> AsyncIterator[Event]:
        """Yields the job's events until `Finished`; raises the error the job failed with."""
        while True:
            item = await self._events.get()
            if isinstance(item, _Failed):
                raise item.error
            yield item
            if isinstance(item, Finished):
                return


class _Hooks:
    """Turns a running call's progress into the job's events (on the worker thread)."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._started_at = 0.0

    def started(self, total_steps: int) -> None:
        call = self._job.call
        self._started_at = time.perf_counter()
        self._job.emit_threadsafe(
            Started(
                model=call.model.spec.name,
                pipeline_class=call.target.pipeline_class,
                total_steps=total_steps,
                seeds=call.seeds,
                batch_size=1,
                width=call.width,
                height=call.height,
                scheduler=call.scheduler,
            )
        )

    def step(self, step: int, total_steps: int) -> None:
        self._job.emit_threadsafe(Progress(step, total_steps, time.perf_counter() - self._started_at))

    def preview(self, step: int, images: list[PIL.Image.Image]) -> None:
        for index, image in enumerate(images):
            self._job.emit_threadsafe(Preview(step, index, image))

    def cancelled(self) -> bool:
        return self._job.cancelled()


class InferenceWorker:
    """Runs one pipeline call at a time on a dedicated thread; the queue lives on the event loop.

    diffusers pipelines are not thread-safe, so every call (and every model load) for the device
    goes through this one thread. Queue bookkeeping happens only on the event loop, so it needs
    no locks; callers learn their position at once and whenever it changes.
    """

    def __init__(self, *, max_queue: int) -> None:
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running: Job | None = None
        self._accepting = True
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return 0 if self._running is None else 1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="inference-dispatch")

    async def run_on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn` on the device thread (model loads and warm-ups share it with inference)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, call: PreparedCall) -> Job:
        """Queues a call; raises QueueFull or ShuttingDown at once instead of waiting."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if len(self._pending) >= self.max_queue:
            raise QueueFull(
                f"the queue is full ({self.max_queue} requests waiting); retry later",
                retry_after=self._retry_hint(),
            )
        job = Job(call, asyncio.get_running_loop())
        self._pending.append(job)
        self._idle.clear()
        self._announce_positions()
        self._wakeup.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drops a queued job, or asks a running one to stop at its next denoising step."""
        if job.done:
            return
        job.cancel()
        try:
            self._pending.remove(job)
        except ValueError:
            return  # running: the flag stops it between steps
        job.done = True
        self._announce_positions()
        self._update_idle()

    async def drain(self, grace: float) -> None:
        """Stops accepting work, lets queued and running jobs finish for `grace` seconds, then cancels."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            log.warning(
                "grace period of %.1fs ended; cancelling %d jobs", grace, self.queue_depth + self.running
            )
            for job in list(self._pending):
                self.cancel(job)
                job.emit(_Failed(ShuttingDown("the server shut down before this request ran")))
            if self._running is not None:
                self._running.cancel()
            await self._idle.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _retry_hint(self) -> float:
        return max(1.0, float(len(self._pending)))

    def _announce_positions(self) -> None:
        depth = len(self._pending)
        for position, job in enumerate(self._pending):
            if job.last_position != position:
                job.last_position = position
                job.emit(Queued(position=position, depth=depth))

    def _update_idle(self) -> None:
        if not self._pending and self._running is None:
            self._idle.set()

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self._pending.popleft()
            self._running = job
            self._announce_positions()
            try:
                await self._execute(job)
            finally:
                job.done = True
                self._running = None
                self._update_idle()

    async def _execute(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            images = await self.run_on_device(run_call, job.call, _Hooks(job))
        except CallCancelled:
            job.emit(_Failed(RequestCancelled("cancelled while running")))
            log.info(
                "cancelled a running %s call on %s", job.call.target.task.value, job.call.model.spec.name
            )
            return
        except Exception as err:  # the call's failure is the job's, never the worker's
            job.emit(_Failed(err))
            return
        job.emit(
            Finished(
                model=job.call.model.spec.name,
                pipeline_class=job.call.target.pipeline_class,
                images=tuple(images),
                seeds=job.call.seeds,
                parameters=job.call.resolved_parameters(),
                queued_seconds=started - job.arrived,
                running_seconds=time.perf_counter() - started,
            )
        )
