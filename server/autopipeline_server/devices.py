"""Many devices in one server: a worker and a copy of every model per device, and dispatch between them.

Each device gets its own `InferenceWorker` (one thread, one pipeline call at a time) and its own
`ModelRegistry` (its own copy of the pipelines, loaded and warmed there). A request goes to the
device where its model is ready and the expected wait is shortest; with one device this is the
server as it always was.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autopipeline_server.domain import ModelState
from autopipeline_server.metrics import ServerMetrics
from autopipeline_server.pipelines import resolve_devices, resolve_dtype
from autopipeline_server.registry import ModelEntry, ModelRegistry
from autopipeline_server.settings import Settings
from autopipeline_server.worker import InferenceWorker, WorkerStats


@dataclass
class Replica:
    """One device's worker and models."""

    device: torch.device
    worker: InferenceWorker
    registry: ModelRegistry


class DevicePool:
    """The replicas of a server, one per configured device."""

    def __init__(self, replicas: list[Replica]) -> None:
        assert replicas, "a server has at least one device"
        self.replicas = replicas

    @classmethod
    def create(
        cls,
        settings: Settings,
        on_state_change: Callable[[ModelEntry], None],
        *,
        metrics: ServerMetrics | None = None,
    ) -> DevicePool:
        replicas = []
        for device in resolve_devices(settings.device):
            worker = InferenceWorker(
                max_queue=settings.max_queue,
                max_batch_size=settings.max_batch_size,
                max_batch_delay=settings.max_batch_delay_ms / 1000,
                metrics=metrics,
            )
            registry = ModelRegistry(
                settings,
                device=device,
                dtype=resolve_dtype(settings.dtype, device),
                worker=worker,
                on_state_change=on_state_change,
            )
            replicas.append(Replica(device, worker, registry))
        return cls(replicas)

    @property
    def primary(self) -> Replica:
        return self.replicas[0]

    def choose(self, model: str, source: str) -> tuple[Replica, ModelEntry]:
        """The replica to run a request on, and its entry for the request's model.

        Raises the lookup's error (unknown model, source not allowed) as one device would. Among
        the devices where the model is ready (else where it is loading, else all), the one with
        the shortest expected wait wins; ties go to the earlier device.
        """
        entries = [(replica, replica.registry.lookup(model, source)) for replica in self.replicas]
        ready = [(r, e) for r, e in entries if e.state is ModelState.READY]
        loading = [(r, e) for r, e in entries if e.loading is not None and not e.loading.done()]
        candidates = ready or loading or entries
        return min(candidates, key=lambda pair: pair[0].worker.expected_wait)

    def state(self, name: str) -> ModelState | None:
        """A model's state for health: READY when any device serves it."""
        states = [r.registry.entries[name].state for r in self.replicas if name in r.registry.entries]
        if not states:
            return None
        return ModelState.READY if ModelState.READY in states else states[0]

    @property
    def queue_depth(self) -> int:
        return sum(r.worker.queue_depth for r in self.replicas)

    @property
    def running(self) -> int:
        return sum(r.worker.running for r in self.replicas)

    def stats(self) -> WorkerStats:
        """Every device's counters added up (the largest batch is the largest on any device)."""
        total = WorkerStats()
        for replica in self.replicas:
            for field in dataclasses.fields(WorkerStats):
                mine, theirs = getattr(total, field.name), getattr(replica.worker.stats, field.name)
                merged = max(mine, theirs) if field.name == "largest_batch_images" else mine + theirs
                setattr(total, field.name, merged)
        return total

    def start(self) -> None:
        for replica in self.replicas:
            replica.worker.start()

    async def load_all(self, *, warm: bool) -> None:
        # Devices load in turn: reading weights shares host memory and disk bandwidth.
        for replica in self.replicas:
            await replica.registry.load_all(warm=warm)

    async def drain(self, grace: float, *, stuck_after: float) -> bool:
        """Every device stops accepting at once and drains within the same grace period.

        False when a call stuck inside a step kept some device's thread (see `InferenceWorker.drain`).
        """
        results = await asyncio.gather(
            *(replica.worker.drain(grace, stuck_after=stuck_after) for replica in self.replicas)
        )
        return all(results)

    async def close(self, *, wait: bool = True) -> None:
        for replica in self.replicas:
            await replica.worker.close(wait=wait)
            replica.registry.close()
