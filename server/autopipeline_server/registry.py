"""The model registry: configured (pinned) models, on-demand models the operator allowed, a memory budget."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autopipeline_server.acceleration import AccelerationPlan, accelerate, prepare_compiler
from autopipeline_server.adapters import load_adapters
from autopipeline_server.calls import warm_up
from autopipeline_server.domain import ModelState
from autopipeline_server.errors import (
    ModelFailed,
    ModelLoading,
    ModelNotFound,
    ModelUnavailable,
    ServingError,
)
from autopipeline_server.pipelines import (
    LoadedModel,
    load_model,
    pin_signatures,
    resolve_dtype,
    skip_hook_walks,
)
from autopipeline_server.settings import HUB_ID, ModelSpec, Settings
from autopipeline_server.worker import InferenceWorker

log = logging.getLogger(__name__)

MAX_REMEMBERED_SOURCES = 64


@dataclass
class ModelEntry:
    """A model and where it is in its life."""

    spec: ModelSpec
    pinned: bool
    state: ModelState = ModelState.LOADING
    reason: str = "waiting to load"
    model: LoadedModel | None = None
    last_used: float = field(default_factory=time.monotonic)
    in_use: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    last_size: int = 0
    loading: asyncio.Task[None] | None = None

    @property
    def parameter_bytes(self) -> int:
        return self.model.parameter_bytes if self.model is not None else 0


StateListener = Callable[[ModelEntry], None]


def place_on_device(model: LoadedModel, device: torch.device, plan: AccelerationPlan, *, warm: bool) -> None:
    """Makes a loaded model ready to serve on `device`; runs on the device's thread.

    Also what `benchmarks/gpu.py` runs to time the server's own call path without gRPC.
    """
    model.to(device)
    # Before anything runs or compiles, so all of it sees the final state; `accelerate` pins again
    # the processors its fused QKV projections swap in.
    skip_hook_walks(model)
    pin_signatures(model)
    # Prepares the denoiser and compiles (and captures) the declared shapes before the model is READY;
    # the warm-up then initialises what the first request would otherwise pay for on the prepared model.
    accelerate(model, plan)
    if warm:
        warm_up(model)


def allowed_source(name: str, patterns: tuple[str, ...]) -> str | None:
    """The normalised source a request may load under `name`, or None.

    Hub ids and absolute paths matching a pattern are allowed. URLs, relative paths and `..` never
    match; a local path must match both as written (normalised: `//m/./x/` is `/m/x`) and after
    symlinks are resolved, so a link inside an allowed directory cannot lead outside it. Every
    spelling of one directory normalises to one source, so it is loaded once.
    """
    if not patterns or "://" in name or "\\" in name or "\0" in name:
        return None
    if name.startswith("/"):
        if ".." in Path(name).parts:
            return None
        normal = "/" + os.path.normpath(name).lstrip("/")
        real = os.path.realpath(normal)
        local = [p for p in patterns if p.startswith("/")]
        if any(fnmatch.fnmatchcase(normal, p) for p in local) and any(
            fnmatch.fnmatchcase(real, p) for p in local
        ):
            return normal
        return None
    if HUB_ID.match(name) and ".." not in name:
        hub = [p for p in patterns if not p.startswith("/")]
        if any(fnmatch.fnmatchcase(name, p) for p in hub):
            return name
    return None


def _size_on_disk(source: str) -> int:
    path = Path(source)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


class ModelRegistry:
    """Knows every model; loads each once, off the device thread; keeps on-demand models in budget.

    A request finds its model with `lookup` (once) and holds it with `lease` while it runs.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        device: torch.device,
        dtype: torch.dtype,
        worker: InferenceWorker,
        on_state_change: StateListener | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self._worker = worker
        self.entries: dict[str, ModelEntry] = {
            spec.name: ModelEntry(spec, pinned=True) for spec in settings.models
        }
        self._on_state_change = on_state_change
        # Reading weights (and downloading them) happens here, so the device thread keeps serving;
        # one thread, so loads queue instead of filling host memory at once.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self.acceleration = AccelerationPlan.from_settings(settings, device)

    @property
    def default_model(self) -> str:
        return self.settings.default_model

    def lookup(self, model: str = "", source: str = "", *, create: bool = True) -> ModelEntry:
        """The entry a request names: a configured `model` (empty = the default) or an on-demand `source`.

        With `create`, an allowed source seen for the first time gets an entry (not loaded yet).
        """
        if not source:
            entry = self.entries.get(model or self.default_model)
            if entry is None or not entry.pinned:
                served = ", ".join(e.spec.name for e in self.entries.values() if e.pinned)
                hint = "; to load a checkpoint on demand, name it in `source`" if "/" in model else ""
                raise ModelNotFound(
                    f"model {model!r} is not served here; served models: {served}{hint}",
                    metadata={"model": model},
                )
            return entry
        normal = allowed_source(source, self.settings.allow_sources)
        existing = self.entries.get(normal) if normal is not None else None
        if existing is not None and not existing.pinned:
            return existing
        if normal is None or not create:
            allowed = ", ".join(self.settings.allow_sources) or "none"
            raise ModelNotFound(
                f"source {source!r} is not an allowed on-demand source (allowed: {allowed})",
                metadata={"source": source},
            )
        self._forget_stale_entries()
        entry = ModelEntry(ModelSpec(name=normal, source=normal), pinned=False, reason="not loaded yet")
        self.entries[normal] = entry
        return entry

    def _forget_stale_entries(self) -> None:
        """Bounds what callers naming many sources can make the registry remember."""
        dynamic = [e for e in self.entries.values() if not e.pinned]
        if len(dynamic) < MAX_REMEMBERED_SOURCES:
            return
        stale = [e for e in dynamic if e.state in (ModelState.FAILED, ModelState.EVICTED) and e.in_use == 0]
        for entry in sorted(stale, key=lambda e: e.last_used)[: len(dynamic) - MAX_REMEMBERED_SOURCES + 1]:
            del self.entries[entry.spec.name]

    @contextlib.asynccontextmanager
    async def lease(self, entry: ModelEntry) -> AsyncIterator[LoadedModel]:
        """Holds a ready model for one request: never evicted meanwhile; on-demand models load first.

        Concurrent first requests for an on-demand model share one load. Raises why the model
        cannot serve: ModelFailed (a configured model failed), ModelLoading, ModelUnavailable.
        """
        entry.in_use += 1
        try:
            if not entry.pinned and entry.state is not ModelState.READY:
                if entry.loading is None or entry.loading.done():
                    entry.loading = asyncio.get_running_loop().create_task(
                        self._load(entry, warm=self.settings.warmup)
                    )
                await asyncio.shield(entry.loading)
            if entry.state is ModelState.READY and entry.model is not None:
                entry.last_used = time.monotonic()
                yield entry.model
            elif entry.pinned and entry.state is ModelState.FAILED:
                raise ModelFailed(
                    f"model {entry.spec.name!r} failed to load: {entry.reason}",
                    metadata={"model": entry.spec.name},
                )
            elif entry.pinned:
                raise ModelLoading(
                    f"model {entry.spec.name!r} is loading", metadata={"model": entry.spec.name}
                )
            else:
                raise ModelUnavailable(
                    f"source {entry.spec.name!r} could not be loaded: {entry.reason}",
                    metadata={"source": entry.spec.name},
                )
        finally:
            entry.in_use -= 1
            entry.last_used = time.monotonic()

    async def load_all(self, *, warm: bool) -> None:
        """Loads every configured model in order; a failure marks that model FAILED and moves on."""
        for entry in list(self.entries.values()):
            if entry.pinned:
                await self._load(entry, warm=warm)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    def _budget_used(self, excluding: ModelEntry | None = None) -> int:
        return sum(
            e.parameter_bytes
            for e in self.entries.values()
            if not e.pinned and e is not excluding and e.state is ModelState.READY
        )

    async def _make_room(self, needed: int, keep: ModelEntry) -> None:
        """Evicts idle on-demand models, least recently used first, until `needed` more bytes fit."""
        budget = self.settings.memory_budget
        if not budget:
            return
        while self._budget_used(keep) + needed > budget:
            idle = [
                e
                for e in self.entries.values()
                if not e.pinned and e is not keep and e.state is ModelState.READY and e.in_use == 0
            ]
            if not idle:
                log.warning("memory budget exceeded but every on-demand model is in use")
                return
            await self._evict(min(idle, key=lambda e: e.last_used))

    async def _evict(self, entry: ModelEntry) -> None:
        model, entry.model = entry.model, None
        entry.last_size = model.parameter_bytes if model is not None else entry.last_size
        self._set(entry, ModelState.EVICTED, "evicted to stay within the memory budget")
        del model

        def release() -> None:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        await self._worker.run_on_device(release)
        log.info("evicted %s (%d bytes)", entry.spec.name, entry.last_size)

    async def _load(self, entry: ModelEntry, *, warm: bool) -> None:
        """Reads weights on the loader thread; only the move to the device and warm-up use the device's."""
        self._set(entry, ModelState.LOADING, "loading")
        if not entry.pinned:
            await self._make_room(entry.last_size or _size_on_disk(entry.spec.source), keep=entry)
        entry.loads += 1
        started = time.perf_counter()
        spec, device = entry.spec, self.device

        def place(model: LoadedModel) -> None:
            place_on_device(model, device, plan, warm=warm)

        plan = self.acceleration

        # A model's own dtype (Flux and other DiTs want bfloat16), else the server's.
        dtype = self.dtype if spec.dtype == "auto" else resolve_dtype(spec.dtype, device)

        def read() -> LoadedModel:
            model = load_model(spec, dtype=dtype, allow_pickle=self.settings.allow_pickle)
            # Before `accelerate` compiles: hot-swapping needs its preparation first.
            load_adapters(model, prepare_hotswap=plan.mode == "compile")
            return model

        try:
            # The device thread pays torch.compile's first-use costs while the loader reads the checkpoint
            # (`prepare_compiler` returns at once unless it is needed, and never raises).
            model, _ = await asyncio.gather(
                asyncio.get_running_loop().run_in_executor(self._loader, read),
                self._worker.run_on_device(prepare_compiler, device, plan),
            )
            await self._worker.run_on_device(place, model)
        except ServingError as err:
            log.error("model %s cannot serve: %s", entry.spec.name, err.message)
            self._set(entry, ModelState.FAILED, err.message)
            return
        except Exception as err:
            log.exception("model %s failed to load", entry.spec.name)
            self._set(entry, ModelState.FAILED, f"{type(err).__name__}: {err}")
            return
        entry.model = model
        entry.last_used = time.monotonic()
        entry.load_seconds = time.perf_counter() - started
        self._set(entry, ModelState.READY, "")
        if not entry.pinned:
            await self._make_room(0, keep=entry)

    def _set(self, entry: ModelEntry, state: ModelState, reason: str) -> None:
        entry.state, entry.reason = state, reason
        if self._on_state_change is not None:
            self._on_state_change(entry)
