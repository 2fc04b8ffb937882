"""The model registry: which models are served, their load state, and loading them warm."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autopipeline_server.domain import ModelState
from autopipeline_server.errors import ModelFailed, ModelLoading, ModelNotFound, ServingError
from autopipeline_server.pipelines import LoadedModel, load_model, warm_up
from autopipeline_server.settings import ModelSpec, Settings
from autopipeline_server.worker import InferenceWorker

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """A configured model and where it is in its life."""

    spec: ModelSpec
    state: ModelState = ModelState.LOADING
    reason: str = "waiting to load"
    model: LoadedModel | None = None


StateListener = Callable[[ModelEntry], None]


class ModelRegistry:
    """Holds the configured models; loads each once, on the device thread, and warms it up."""

    def __init__(
        self,
        settings: Settings,
        *,
        device: torch.device,
        dtype: torch.dtype,
        on_state_change: StateListener | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.entries: dict[str, ModelEntry] = {spec.name: ModelEntry(spec) for spec in settings.models}
        self._on_state_change = on_state_change

    @property
    def default_model(self) -> str:
        return self.settings.default_model

    def entry(self, name: str) -> ModelEntry:
        """The entry for a request's model name (empty = the default model)."""
        resolved = name or self.default_model
        try:
            return self.entries[resolved]
        except KeyError:
            served = ", ".join(self.entries)
            raise ModelNotFound(
                f"model {resolved!r} is not served here; served models: {served}",
                metadata={"model": resolved},
            ) from None

    def get(self, name: str) -> LoadedModel:
        """A ready model, or the error that says why it cannot serve."""
        entry = self.entry(name)
        if entry.state is ModelState.READY and entry.model is not None:
            return entry.model
        if entry.state is ModelState.FAILED:
            raise ModelFailed(
                f"model {entry.spec.name!r} failed to load: {entry.reason}",
                metadata={"model": entry.spec.name},
            )
        raise ModelLoading(f"model {entry.spec.name!r} is still loading", metadata={"model": entry.spec.name})

    async def load_all(self, worker: InferenceWorker, *, warm: bool) -> None:
        """Loads every configured model in order; a failure marks that model FAILED and moves on."""
        for entry in self.entries.values():
            await self._load(entry, worker, warm=warm)

    async def _load(self, entry: ModelEntry, worker: InferenceWorker, *, warm: bool) -> None:
        self._set(entry, ModelState.LOADING, "loading")
        try:
            model = await worker.run_on_device(
                lambda: load_model(
                    entry.spec, device=self.device, dtype=self.dtype, allow_pickle=self.settings.allow_pickle
                )
            )
            if warm:
                await worker.run_on_device(warm_up, model)
        except ServingError as err:
            log.error("model %s cannot serve: %s", entry.spec.name, err.message)
            self._set(entry, ModelState.FAILED, err.message)
            return
        except Exception as err:
            log.exception("model %s failed to load", entry.spec.name)
            self._set(entry, ModelState.FAILED, f"{type(err).__name__}: {err}")
            return
        entry.model = model
        self._set(entry, ModelState.READY, "")

    def _set(self, entry: ModelEntry, state: ModelState, reason: str) -> None:
        entry.state, entry.reason = state, reason
        if self._on_state_change is not None:
            self._on_state_change(entry)
