"""LoRA adapters per request: loaded once with the model, applied to one pipeline call, then switched off.

Operators register adapters per model (`--lora MODEL:NAME=PATH`). `load_adapters` loads each into
the model's shared modules with `load_lora_weights(path, adapter_name=NAME)` and leaves them all
disabled: peft's LoRA layers then return exactly their base layer's output, and base weights are
never merged or touched, so a request without adapters gets the same bytes as a model without any.
`applied` turns on a call's adapters with `set_adapters(names, weights)` for the duration of that
call only, on the device thread, and disables them again however the call ends.

Compiled denoisers (acceleration.py) are compiled with every adapter disabled; a call that applies
adapters runs its denoiser eagerly (counted in Inspect's `Acceleration.adapter_calls`), so switching
adapters never recompiles and never replays a graph that lacks them. When adapters are registered
and compiling is on, `enable_lora_hotswap` is called before the first adapter loads, as diffusers
requires, so that hot-swapping into compiled graphs can follow without reloading the model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from autopipeline_server.domain import AdapterWeight
from autopipeline_server.errors import InvalidRequest, ModelFailed

if TYPE_CHECKING:
    from autopipeline_server.pipelines import LoadedModel

# Key fragments of a LoRA's down (A) matrices in the formats diffusers loads; their first
# dimension is the rank.
_DOWN_KEYS = ("lora_A", "lora.down", "lora_down")


def lora_rank(path: str) -> int:
    """The largest rank in a LoRA safetensors file (0 when no down matrix is recognised)."""
    rank = 0
    with safe_open(path, framework="pt") as file:
        for key in file.keys():  # noqa: SIM118 - safe_open objects are not iterable
            if any(fragment in key for fragment in _DOWN_KEYS):
                shape = file.get_slice(key).get_shape()
                if shape:
                    rank = max(rank, int(shape[0]))
    return rank


def load_adapters(model: LoadedModel, *, prepare_hotswap: bool) -> None:
    """Loads the model's registered adapters into its (shared) modules, all disabled.

    Runs with the model in host memory, off the device thread. `prepare_hotswap` (compiling is on)
    calls `enable_lora_hotswap` first, with the largest rank among the adapters.
    """
    specs = model.spec.adapters
    if not specs:
        return
    pipe = model.base
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelFailed(
            f"{type(pipe).__name__} takes no LoRA adapters; remove those configured for {model.spec.name!r}"
        )
    try:
        if prepare_hotswap:
            pipe.enable_lora_hotswap(target_rank=max(lora_rank(spec.path) for spec in specs))
        with warnings.catch_warnings():
            # peft warns that a second adapter makes several in one model: that is the point here.
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            for spec in specs:
                pipe.load_lora_weights(spec.path, adapter_name=spec.name)
    except Exception as err:
        raise ModelFailed(
            f"loading the LoRA adapters of {model.spec.name!r} failed: {type(err).__name__}: {err}"
        ) from err
    loaded: dict[str, list[str]] = {}
    for component, names in pipe.get_list_adapters().items():
        for name in names:
            loaded.setdefault(name, []).append(component)
    missing = [spec.name for spec in specs if spec.name not in loaded]
    if missing:
        raise ModelFailed(
            f"LoRA adapter(s) {', '.join(missing)} of {model.spec.name!r} match no module of "
            f"{type(pipe).__name__}: were they trained for another model family?"
        )
    pipe.disable_lora()
    model.adapters = {spec.name: tuple(loaded[spec.name]) for spec in specs}


def resolve(
    model: LoadedModel, requested: Sequence[AdapterWeight]
) -> tuple[tuple[AdapterWeight, ...], list[InvalidRequest]]:
    """The request's adapters in canonical order (by name: equal sets batch together), or what is wrong."""
    problems = []
    registered = ", ".join(model.adapters) or "none"
    for index, adapter in enumerate(requested):
        if adapter.name not in model.adapters:
            problems.append(
                InvalidRequest.field(
                    f"adapters[{index}].name",
                    f"{adapter.name!r} is not an adapter of model {model.spec.name!r}; "
                    f"registered: {registered}",
                )
            )
    return tuple(sorted(requested, key=lambda adapter: adapter.name)), problems


@contextlib.contextmanager
def applied(model: LoadedModel, pipe: Any, adapters: Sequence[AdapterWeight]) -> Iterator[None]:
    """Applies `adapters` to `pipe` for one call on the device thread; all are disabled afterwards."""
    if not adapters:
        yield
        return
    dispatcher = model.acceleration.dispatcher if model.acceleration is not None else None
    try:
        pipe.enable_lora()
        pipe.set_adapters([a.name for a in adapters], adapter_weights=[a.weight for a in adapters])
        with dispatcher.eagerly() if dispatcher is not None else contextlib.nullcontext():
            yield
    finally:
        pipe.disable_lora()
