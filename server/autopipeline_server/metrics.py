"""Prometheus metrics: every definition, the recording functions the runtime calls, and the /metrics endpoint.

Each server has its own `CollectorRegistry`, so several servers in one process (tests, embedders)
never share or collide on a metric. Values that already live in the runtime (queue depth, worker
counters, model states and sizes) are read when Prometheus scrapes, by `_RuntimeCollector`; the
rest are recorded where they happen: requests by the access layer (`observe.py`), pipeline calls
by the worker, model loads and evictions from the registry's state changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from autopipeline_server.domain import ModelState

if TYPE_CHECKING:
    import PIL.Image

    from autopipeline_server.calls import CallHooks
    from autopipeline_server.devices import DevicePool
    from autopipeline_server.registry import ModelEntry
    from autopipeline_server.worker import Job

PREFIX = "autopipeline"
# Label values callers can choose (on-demand sources) are capped, so a caller naming many allowed
# sources cannot grow the scrape without bound; past the cap they are counted as "other".
MAX_MODEL_LABELS = 64
OTHER = "other"
# Diffusion requests take from milliseconds (tiny models, warm queue) to minutes (large batches).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """One server's metrics; the recording methods are safe to call from any thread."""

    def __init__(self, configured_models: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._pinned = frozenset(configured_models)
        self._labels: set[str] = set()
        self._labels_lock = threading.Lock()
        self._loads_started: dict[str, float] = {}
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "RPCs finished, by method, task, model and gRPC status code",
            ["rpc", "task", "model", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Seconds from an RPC's arrival to its end, by method and gRPC status code",
            ["rpc", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Seconds a request waited in the queue (batch forming included) before its pipeline call",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_step = Histogram(
            f"{PREFIX}_time_to_first_step_seconds",
            "Seconds from entering the queue to the end of the request's first denoising step",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            f"{PREFIX}_step_duration_seconds",
            "Seconds per denoising step of a pipeline call (a batched call counts once)",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            f"{PREFIX}_images_generated",
            "Images returned to callers; rate() gives images per second",
            ["model", "task"],
            registry=r,
        )
        self.batch_images = Histogram(
            f"{PREFIX}_batch_images",
            "Images made by one pipeline call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            f"{PREFIX}_batch_requests",
            "Requests sharing one pipeline call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.load_seconds = Gauge(
            f"{PREFIX}_model_load_seconds",
            "Seconds the model's latest load took (reading, moving to the device and warm-up)",
            ["model"],
            registry=r,
        )
        self.evictions = Counter(
            f"{PREFIX}_model_evictions",
            "On-demand models evicted to stay within the memory budget",
            ["model"],
            registry=r,
        )

    def watch(self, devices: DevicePool) -> None:
        """Adds what the workers and registries know (read at scrape time) to these metrics."""
        self.registry.register(_RuntimeCollector(devices, self.model_label))

    def model_label(self, model: str) -> str:
        """`model` as a label value: configured names always, on-demand sources up to a cap."""
        if not model or model in self._pinned:
            return model
        with self._labels_lock:
            if model in self._labels:
                return model
            if len(self._labels) < MAX_MODEL_LABELS:
                self._labels.add(model)
                return model
        return OTHER

    # -- recorded by the access layer (observe.py), once per RPC
    def request_finished(
        self, *, rpc: str, task: str, model: str, code: str, seconds: float, images: int
    ) -> None:
        label = self.model_label(model)
        self.requests.labels(rpc, task, label, code).inc()
        self.request_seconds.labels(rpc, code).observe(seconds)
        if images:
            self.images.labels(label, task).inc(images)

    # -- recorded by the worker, on the event loop (call start) and the device thread (steps)
    def call_started(
        self, batch: Sequence[Job], started: float, hooks: Sequence[CallHooks]
    ) -> list[CallHooks]:
        """Records a pipeline call's batch and queue waits; returns its hooks, timing its steps."""
        model = self.model_label(batch[0].call.model.spec.name)
        self.batch_requests.observe(len(batch))
        self.batch_images.observe(sum(job.images for job in batch))
        for job in batch:
            self.queue_wait.labels(model).observe(started - job.arrived)
        return [
            _TimedHooks(inner, self, model, job.arrived, steps=index == 0)
            for index, (job, inner) in enumerate(zip(batch, hooks, strict=True))
        ]

    # -- recorded from the registry's state changes (on the event loop)
    def model_state_changed(self, entry: ModelEntry) -> None:
        name = entry.spec.name
        if entry.state is ModelState.LOADING:
            self._loads_started[name] = time.perf_counter()
        elif entry.state in (ModelState.READY, ModelState.FAILED):
            began = self._loads_started.pop(name, None)
            if began is not None:
                self.load_seconds.labels(self.model_label(name)).set(time.perf_counter() - began)
        elif entry.state is ModelState.EVICTED:
            self.evictions.labels(self.model_label(name)).inc()


class _TimedHooks:
    """A call's hooks that also time its first step and (for one member per call) every step."""

    def __init__(
        self, inner: CallHooks, metrics: ServerMetrics, model: str, arrived: float, *, steps: bool
    ) -> None:
        self._inner = inner
        self._metrics = metrics
        self._model = model
        self._arrived = arrived
        self._steps = steps
        self._first = True
        self._last = 0.0

    def started(self, total_steps: int) -> None:
        self._last = time.perf_counter()
        self._inner.started(total_steps)

    def step(self, step: int, total_steps: int) -> None:
        now = time.perf_counter()
        if self._first:
            self._first = False
            self._metrics.time_to_first_step.labels(self._model).observe(now - self._arrived)
        if self._steps:
            self._metrics.step_seconds.labels(self._model).observe(now - self._last)
        self._last = now
        self._inner.step(step, total_steps)

    def preview(self, step: int, images: list[PIL.Image.Image]) -> None:
        self._inner.preview(step, images)
        self._last = time.perf_counter()  # decoding a preview is not the denoiser's time

    def cancelled(self) -> bool:
        return self._inner.cancelled()


class _RuntimeCollector:
    """Reads what the runtime already knows when Prometheus scrapes (on the HTTP server's thread).

    Only reads: ints and a copy of the registry's entries, which the event loop may change meanwhile.
    """

    def __init__(self, devices: DevicePool, label: Callable[[str], str]) -> None:
        self._devices = devices
        self._label = label

    def collect(self) -> Iterable[Metric]:
        # Every device's queue and counters added up, as Inspect's ServerInfo does.
        devices, stats = self._devices, self._devices.stats()
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting in the queue", value=devices.queue_depth
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_running_requests", "Requests in the pipeline call now running", value=devices.running
        )
        cancellations = CounterMetricFamily(
            f"{PREFIX}_cancellations",
            "Requests cancelled (caller gone, deadline, shutdown), by where",
            labels=["where"],
        )
        cancellations.add_metric(["queued"], stats.cancelled_queued)
        cancellations.add_metric(["running"], stats.cancelled_running)
        yield cancellations
        states = GaugeMetricFamily(
            f"{PREFIX}_model_state",
            "1 for the state each model is in, 0 for the others",
            labels=["model", "state"],
        )
        sizes = GaugeMetricFamily(
            f"{PREFIX}_model_parameter_bytes", "Bytes of parameters a loaded model holds", labels=["model"]
        )
        for entry in list(devices.primary.registry.entries.values()):
            name = self._label(entry.spec.name)
            if name == OTHER:
                continue
            current = devices.state(entry.spec.name)  # READY while any device serves it
            for state in ModelState:
                states.add_metric([name, state.value], 1.0 if current is state else 0.0)
            sizes.add_metric([name], entry.parameter_bytes)
        yield states
        yield sizes


class MetricsEndpoint:
    """The /metrics HTTP endpoint, served by prometheus_client on its own daemon thread."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int) -> None:
        # "[::]" is how gRPC spells every IPv6 address; the HTTP server wants "::".
        address = host.removeprefix("[").removesuffix("]")
        server, thread = start_http_server(port, addr=address, registry=metrics.registry)
        self._server: WSGIServer = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
