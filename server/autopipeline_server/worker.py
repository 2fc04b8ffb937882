"""The inference worker: a bounded queue owned by the event loop, feeding one device thread, with batching."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import PIL.Image

from autopipeline_server.calls import CallCancelled, CallHooks, run_batch
from autopipeline_server.domain import Event, Finished, Preview, Progress, Queued, Started
from autopipeline_server.errors import QueueFull, RequestCancelled, ServingError, ShuttingDown, chain
from autopipeline_server.prepare import PreparedCall

if TYPE_CHECKING:
    from autopipeline_server.metrics import ServerMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds a cancelled call may take to reach its next step before draining gives up on it.
STUCK_CALL_SECONDS = 5.0
MIN_RETRY_HINT = 0.1
MAX_RETRY_HINT = 30.0
# How long a call may wait for its callers' first events to be written (see `Job.greeted`).
GREETING_WAIT = 0.05


@dataclass(frozen=True)
class _Failed:
    """How a job ended, for its event stream. A batch's failure is one error for all its jobs; each
    raise starts again from the traceback it had here, so no caller's frames join another's."""

    error: BaseException
    traceback: TracebackType | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "traceback", self.error.__traceback__)


def _without_locals(error: BaseException) -> BaseException:
    """A failed call's error, for its jobs' queues: its traceback still says where the call failed
    (for the log), but no frame it passed through keeps its locals.

    Those frames (`_execute`'s, the device thread's, the pipeline's) hold the batch's jobs (`batch`,
    the hooks), and each job's queue holds the error: a reference cycle wherever nobody reads the
    queue (its caller went away while the call was failing), which kept the call's input images
    and the pipeline's tensors until the garbage collector happened to run. The catching frame
    (`_execute`, still running, so it cannot be cleared) is left out of the traceback.
    """
    head = error.__traceback__
    error.__traceback__ = head.tb_next if head is not None else None
    for linked in chain(error):  # and the errors it was raised from
        traceback.clear_frames(linked.__traceback__)
    return error


@dataclass
class WorkerStats:
    """Counters for operators and tests; only the event loop writes them."""

    submitted: int = 0
    rejected_queue_full: int = 0
    rejected_draining: int = 0
    completed: int = 0
    failed: int = 0
    cancelled_queued: int = 0
    cancelled_running: int = 0
    pipeline_calls: int = 0
    batched_calls: int = 0
    largest_batch_images: int = 0
    rejected_inputs_busy: int = 0
    ended_client_too_slow: int = 0


class Job:
    """One queued request: its prepared call, its event stream and its cancellation flag."""

    def __init__(self, call: PreparedCall, loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.images = len(call.seeds)
        self.arrived = time.perf_counter()
        # When its pipeline call began and ended (perf_counter), for traces; None until then.
        self.started: float | None = None
        self.finished: float | None = None
        self._loop = loop
        self._events: asyncio.Queue[Event | _Failed] = asyncio.Queue()
        self._cancel = threading.Event()
        self._cancel_reason: ServingError | None = None
        self.done = False
        self.last_position: int | None = None
        # Set once the caller's first event is written (or the job is cancelled). A call waits for
        # it, at most GREETING_WAIT, before it starts: on an idle server the device would otherwise
        # take the cores and the GIL at once and hold that first write back.
        self.greeted = asyncio.Event()

    @functools.cached_property
    def batch_key(self) -> str | None:
        """See `PreparedCall.batch_key`; computed only when batching asks for it."""
        return self.call.batch_key()

    # -- called on the worker thread
    def emit_threadsafe(self, event: Event | _Failed) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- called on the event loop
    def emit(self, event: Event | _Failed) -> None:
        self._events.put_nowait(event)

    def cancel(self, reason: ServingError | None = None) -> None:
        if reason is not None:
            self._cancel_reason = reason
        self._cancel.set()
        self.greeted.set()

    def end_cancelled(self) -> None:
        """Ends the job's events with the error it was cancelled with, which the job lets go of:
        its handler's frames hold the job, and the error's traceback will hold those frames (a
        reference cycle, which kept each such request until the garbage collector happened to run).
        """
        reason, self._cancel_reason = self._cancel_reason, None
        self.emit(_Failed(reason or RequestCancelled("cancelled by its caller")))

    async def events(self) -> AsyncIterator[Event]:
        """Yields the job's events until `Finished`; raises the error the job failed with."""
        while True:
            item = await self._events.get()
            if isinstance(item, _Failed):
                try:
                    raise item.error.with_traceback(item.traceback)
                finally:
                    # The error's traceback holds this frame: `item` would lead back to the error,
                    # a reference cycle that, through the traceback's other frames, held the
                    # request, its input image and the pipeline's tensors until the garbage
                    # collector happened to run.
                    del item
            yield item
            if isinstance(item, Finished):
                return


class Arrival:
    """A request on its way to the queue (see `InferenceWorker.arriving`); `close` is idempotent."""

    def __init__(self, worker: InferenceWorker) -> None:
        self._worker: InferenceWorker | None = worker

    def close(self) -> None:
        if self._worker is not None:
            self._worker._arrived()
            self._worker = None


class _Hooks:
    """Turns a running call's progress into one job's events (on the worker thread)."""

    def __init__(self, job: Job, batch_requests: int, batch_images: int) -> None:
        self._job = job
        self._batch_requests = batch_requests
        self._batch_images = batch_images
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
                batch_requests=self._batch_requests,
                batch_images=self._batch_images,
                width=call.width,
                height=call.height,
                scheduler=call.scheduler,
            )
        )

    def step(self, step: int, total_steps: int) -> None:
        if not self._job.cancelled():
            self._job.emit_threadsafe(Progress(step, total_steps, time.perf_counter() - self._started_at))

    def preview(self, step: int, images: list[PIL.Image.Image]) -> None:
        if not self._job.cancelled():
            for index, image in enumerate(images):
                self._job.emit_threadsafe(Preview(step, index, image))

    def cancelled(self) -> bool:
        return self._job.cancelled()


class InferenceWorker:
    """Runs one pipeline call at a time on a dedicated thread; the queue lives on the event loop.

    diffusers pipelines are not thread-safe, so every call (and every model load) for the device
    goes through this one thread. Queue bookkeeping happens only on the event loop, so it needs
    no locks; callers learn their position at once and whenever it changes. With
    `max_batch_size` > 1, compatible queued requests (equal `PreparedCall.batch_key`) share one
    pipeline call of up to that many images; the head of the queue waits at most
    `max_batch_delay` seconds for company.
    """

    def __init__(
        self,
        *,
        max_queue: int,
        max_batch_size: int = 1,
        max_batch_delay: float = 0.0,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.max_queue = max_queue
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay
        self.stats = WorkerStats()
        self._pending: collections.deque[Job] = collections.deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running: list[Job] = []
        self._accepting = True
        self._task: asyncio.Task[None] | None = None
        # Requests between arriving at the server and `submit` (see `arriving`); only the loop writes it.
        self._arriving = 0
        # Places held by requests admitted but still decoding their inputs (see `reserve`).
        self._reserved = 0
        # Seconds a pipeline call has taken lately (a moving average), for retry hints and dispatch.
        self._call_seconds: float | None = None
        # The last call that ran: its batch key, how many requests it served and when it ended
        # (perf_counter, as Job.arrived), for the company a batch forming after it waits for.
        self._last_call: tuple[str | None, int, float] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def accepting(self) -> bool:
        """False once draining has begun."""
        return self._accepting

    @property
    def expected_wait(self) -> float:
        """Seconds a new request would wait here: the images ahead of it, in calls, times a call's time.

        With batching, queued images share calls, so they count per `max_batch_size`.
        """
        ahead = sum(job.images for job in self._pending)
        calls = -(-ahead // self.max_batch_size) + len(self._running)
        return calls * (self._call_seconds or 1.0)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="inference-dispatch")

    async def run_on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn` on the device thread (model loads and warm-ups share it with inference)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def arriving(self) -> Arrival:
        """Marks a request on its way to `submit` (decoding, validating) until the arrival is closed.

        A forming batch's head waits up to `max_batch_delay` only while someone is on the way: a
        lone client's request starts at once instead of paying the delay for company that cannot come.
        """
        self._arriving += 1
        return Arrival(self)

    def _arrived(self) -> None:
        self._arriving -= 1
        self._wakeup.set()  # a forming batch re-checks whether to keep waiting

    def _admit(self) -> None:
        if not self._accepting:
            self.stats.rejected_draining += 1
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if len(self._pending) + self._reserved >= self.max_queue:
            self.stats.rejected_queue_full += 1
            raise QueueFull(
                f"the queue is full ({self.max_queue} requests waiting); retry later",
                retry_after=self.retry_hint(),
            )

    @contextlib.contextmanager
    def reserve(self) -> Iterator[None]:
        """Holds a place in the queue while a request decodes its inputs; `submit` inside takes it.

        Raises QueueFull or ShuttingDown at once, so a request the queue has no room for is refused
        before any of its pixels are decoded.
        """
        self._admit()
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def submit(self, call: PreparedCall, *, reserved: bool = False) -> Job:
        """Queues a call; raises QueueFull or ShuttingDown at once instead of waiting.

        `reserved`: the caller holds a place from `reserve`, so the queue has room for it.
        """
        if not reserved or not self._accepting:
            self._admit()
        job = Job(call, asyncio.get_running_loop())
        self.stats.submitted += 1
        self._pending.append(job)
        self._idle.clear()
        self._announce_positions()
        self._wakeup.set()
        return job

    def cancel(self, job: Job, reason: ServingError | None = None) -> None:
        """Drops a queued job, or asks a running one to stop at its next denoising step.

        Its inputs are freed when no call will read them: at once if queued, else when it is left
        out of its call before the call starts, or when the call has ended.
        """
        if job.done:
            return
        job.cancel(reason)
        try:
            self._pending.remove(job)
        except ValueError:
            # Taken for a call: left out of it if it has not started (`_ready_to_call`), else the
            # flag stops it between steps.
            return
        self._drop(job)
        self._announce_positions()
        self._update_idle()

    def _drop(self, job: Job) -> None:
        """Ends a cancelled job that never reached the device: its inputs go, and its events end
        with the error it was cancelled with (ShuttingDown in a drain), as a running job's do."""
        job.done = True
        job.call.release_inputs()
        self.stats.cancelled_queued += 1
        job.end_cancelled()

    async def drain(self, grace: float, *, stuck_after: float = STUCK_CALL_SECONDS) -> bool:
        """Stops accepting work, lets queued and running jobs finish for `grace` seconds, then cancels.

        A cancelled call stops at its next step; one that does not within `stuck_after` seconds
        (stuck inside a step) is given up on: returns False, and the device thread is left behind.
        """
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
            return True
        except TimeoutError:
            log.warning(
                "grace period of %.1fs ended; cancelling %d jobs", grace, self.queue_depth + self.running
            )
        for job in [*self._pending, *self._running]:
            # An error of its own each: one raised by several handlers would carry all their frames.
            self.cancel(
                job, ShuttingDown("the server shut down before this request finished; retry elsewhere")
            )
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=stuck_after)
            return True
        except TimeoutError:
            log.error("a running call did not stop within %.1fs of its cancellation", stuck_after)
            return False

    async def close(self, *, wait: bool = True) -> None:
        """Stops dispatching; `wait=False` leaves a stuck device thread running instead of blocking."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def retry_hint(self) -> float:
        """Seconds after which a refused request may find room: about half the queue worked off.

        Estimated from recent call times, queue depth and batching; before any call, one second.
        """
        if self._call_seconds is None:
            return 1.0
        calls_ahead = (len(self._pending) + self._reserved + len(self._running)) / 2 / self.max_batch_size
        return min(MAX_RETRY_HINT, max(MIN_RETRY_HINT, self._call_seconds * max(1.0, calls_ahead)))

    def _record_call(self, seconds: float) -> None:
        previous = self._call_seconds
        self._call_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def _announce_positions(self) -> None:
        depth = len(self._pending)
        for position, job in enumerate(self._pending):
            if job.last_position != position:
                job.last_position = position
                job.emit(Queued(position=position, depth=depth))

    def _update_idle(self) -> None:
        if not self._pending and not self._running:
            self._idle.set()

    def _take_companions(self, batch: list[Job]) -> None:
        """Moves queued jobs compatible with the batch's head into it, in queue order."""
        key = batch[0].batch_key
        room = self.max_batch_size - sum(job.images for job in batch)
        for job in list(self._pending):
            if room <= 0:
                break
            if job.batch_key == key and job.images <= room:
                self._pending.remove(job)
                batch.append(job)
                room -= job.images

    def _company_awaited(self, batch: list[Job]) -> int:
        """The size a batch forming now may wait to reach, besides the requests on their way (0: none).

        When the last call served several requests of the batch's kind and ended less than
        `max_batch_delay` ago, its clients may come back together: the batch waits for as many
        requests as that call served, plus its members that were already queued before it ended.
        Without this, a request queued behind a batch starts alone the moment the batch ends, while
        that batch's clients are still receiving their images, and their next requests queue
        behind it: a split that repeats for as long as they keep sending (measured on an H100 with
        8 clients and compiled SD 1.5: batches of 7 and 1, 4.7 images/s where a batch of 8 runs
        6.2). A lone client is never in such a call, so it never waits.
        """
        if self._last_call is None:
            return 0
        key, served, ended = self._last_call
        if served <= 1 or key != batch[0].batch_key or time.perf_counter() - ended > self.max_batch_delay:
            return 0
        waited_through_it = sum(1 for job in batch if job.arrived < ended)
        return min(self.max_batch_size, waited_through_it + served)

    async def _fill(self, batch: list[Job]) -> None:
        """Adds compatible company to a batch, waiting up to `max_batch_delay` for more to arrive.

        It waits only while requests are on their way to the queue, or while the last call's
        requests may come back (`_company_awaited`): a lone client never pays the delay.
        """
        if self.max_batch_size <= 1 or batch[0].batch_key is None:
            return
        self._take_companions(batch)
        awaited = self._company_awaited(batch)
        deadline = time.monotonic() + self.max_batch_delay
        while sum(job.images for job in batch) < self.max_batch_size and self._accepting:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not (self._arriving or len(batch) < awaited):
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            self._take_companions(batch)

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # In a coroutine of its own, whose locals go when it returns: an idle worker holds
            # nothing of its last batch (the jobs, their calls, the error in a queue nobody reads).
            await self._run_next_batch()

    async def _run_next_batch(self) -> None:
        # A forming batch counts as running, so drain() does not see an idle worker meanwhile.
        batch = [self._pending.popleft()]
        self._running = batch
        self._announce_positions()
        try:
            await self._fill(batch)
            self._announce_positions()
            await self._execute(batch)
        finally:
            finished = time.perf_counter()
            # The call ran (or began to); only batching reads it, and the key costs a JSON dump.
            if batch and batch[0].started is not None and self.max_batch_size > 1:
                self._last_call = (batch[0].batch_key, len(batch), finished)
            for job in batch:
                job.done = True
                if job.started is not None:
                    job.finished = finished
                job.call.release_inputs()
            self._running = []
            self._update_idle()

    async def _ready_to_call(self, batch: list[Job]) -> bool:
        """Waits (at most GREETING_WAIT) for the batch's callers' first events, then takes out the
        jobs cancelled since they left the queue; False when none is left, and the call must not
        start: its prompts would be encoded and the device held for nobody until its first step."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GREETING_WAIT):
                for job in batch:
                    await job.greeted.wait()
        for job in list(batch):
            if job.cancelled():  # went away while the batch was forming, or its greeting was awaited
                batch.remove(job)
                self._drop(job)
        return bool(batch)

    async def _execute(self, batch: list[Job]) -> None:
        if not await self._ready_to_call(batch):
            return
        started = time.perf_counter()
        self.stats.pipeline_calls += 1
        if len(batch) > 1:
            self.stats.batched_calls += 1
        batch_images = sum(job.images for job in batch)
        self.stats.largest_batch_images = max(self.stats.largest_batch_images, batch_images)
        hooks: list[CallHooks] = [_Hooks(job, len(batch), batch_images) for job in batch]
        for job in batch:
            job.started = started
        if self._metrics is not None:  # observability: batch sizes, queue waits, step timings
            hooks = self._metrics.call_started(batch, started, hooks)
        try:
            results = await self.run_on_device(run_batch, [job.call for job in batch], hooks)
        except CallCancelled:
            self._record_call(time.perf_counter() - started)
            for job in batch:
                self.stats.cancelled_running += 1
                job.end_cancelled()
            call = batch[0].call
            log.info("cancelled a running %s call on %s", call.target.task.value, call.model.spec.name)
            return
        except Exception as err:  # the call's failure is its requests', never the worker's
            self.stats.failed += len(batch)
            failure = _Failed(_without_locals(err))
            for job in batch:
                job.emit(failure)
            return
        finished = time.perf_counter()
        self._record_call(finished - started)
        for job, images in zip(batch, results, strict=True):
            if job.cancelled():
                self.stats.cancelled_running += 1
                job.end_cancelled()
                continue
            self.stats.completed += 1
            job.emit(
                Finished(
                    model=job.call.model.spec.name,
                    pipeline_class=job.call.target.pipeline_class,
                    images=tuple(images),
                    seeds=job.call.seeds,
                    parameters=job.call.resolved_parameters(),
                    queued_seconds=started - job.arrived,
                    running_seconds=finished - started,
                )
            )
