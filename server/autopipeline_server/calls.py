"""Runs prepared pipeline calls on the device thread, alone or batched; reports steps, honours cancels."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import PIL.Image
import torch

from autopipeline_server.domain import GenerationRequest, Task
from autopipeline_server.errors import OutOfMemory
from autopipeline_server.pipelines import LoadedModel
from autopipeline_server.prepare import PER_MEMBER_ARGUMENTS, PreparedCall, attach_inputs, prepare_call
from autopipeline_server.previews import decode_previews

log = logging.getLogger(__name__)


class PipelineRejected(Exception):
    """The pipeline refused the call's arguments (a ValueError from its own input checks)."""


class CallCancelled(Exception):
    """Raised from inside the denoising loop to abort a call whose callers are gone."""


class CallHooks(Protocol):
    """What a running call reports to, from the worker thread."""

    def started(self, total_steps: int) -> None: ...

    def step(self, step: int, total_steps: int) -> None: ...

    def preview(self, step: int, images: list[PIL.Image.Image]) -> None: ...

    def cancelled(self) -> bool: ...


# ------------------------------------------------------------------------------------------ running


class _ProgressReporter:
    """Stands in for the pipeline's tqdm bar: reports steps and previews, and aborts cancelled calls.

    Every diffusers pipeline drives its progress bar once per denoising step (after `strength` and
    scheduler warm-up are accounted for), so this counts real steps for every family, including
    those without `callback_on_step_end`.
    """

    def __init__(self, hooks: CallHooks, preview_interval: int, pipe: Any) -> None:
        self._hooks = hooks
        self._preview_interval = preview_interval
        self._pipe = pipe
        self._total = 0
        self._done = 0
        self.latents: torch.Tensor | None = None

    def __call__(self, iterable: Iterable[Any] | None = None, total: int | None = None) -> Any:
        if iterable is not None:
            items = list(iterable)
            self._begin(len(items))
            return self._iterate(items)
        if total is None:
            raise ValueError("Either `total` or `iterable` has to be defined.")
        self._begin(total)
        return self

    def _begin(self, total: int) -> None:
        self._check()
        self._total, self._done = total, 0
        self._hooks.started(total)

    def _iterate(self, items: list[Any]) -> Iterator[Any]:
        for item in items:
            yield item
            self.update()

    def _check(self) -> None:
        if self._hooks.cancelled():
            raise CallCancelled

    def on_step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """`callback_on_step_end`: keeps the latest latents for the next preview."""
        self.latents = tensors.get("latents")
        return {}

    def update(self, n: int = 1) -> None:
        self._done = min(self._total, self._done + n)
        self._hooks.step(self._done, self._total)
        if self._preview_interval and self.latents is not None and self._done % self._preview_interval == 0:
            self._hooks.preview(self._done, decode_previews(self._pipe, self.latents))
        self._check()

    def __enter__(self) -> _ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _BatchHooks:
    """Fans one pipeline call's progress out to the requests sharing it."""

    def __init__(self, members: list[tuple[CallHooks, int]]) -> None:
        self._members = members

    def started(self, total_steps: int) -> None:
        for hooks, _ in self._members:
            hooks.started(total_steps)

    def step(self, step: int, total_steps: int) -> None:
        for hooks, _ in self._members:
            hooks.step(step, total_steps)

    def preview(self, step: int, images: list[PIL.Image.Image]) -> None:
        offset = 0
        for hooks, count in self._members:
            hooks.preview(step, images[offset : offset + count])
            offset += count

    def cancelled(self) -> bool:
        # One member going away must not spoil the others: stop only when nobody is left.
        return all(hooks.cancelled() for hooks, _ in self._members)


def _batched_kwargs(calls: Sequence[PreparedCall]) -> dict[str, Any]:
    """One call's arguments for several compatible requests: per-image lists of their own inputs."""
    first = calls[0]
    kwargs = {k: v for k, v in first.kwargs.items() if k not in PER_MEMBER_ARGUMENTS}
    for name in PER_MEMBER_ARGUMENTS - {"num_images_per_prompt"}:
        if name in first.kwargs:
            kwargs[name] = [call.kwargs[name] for call in calls for _ in call.seeds]
    kwargs["num_images_per_prompt"] = 1
    return kwargs


def release_memory() -> None:
    """Returns what a failed call held to the device, so the next call starts from a clean slate."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_batch(calls: Sequence[PreparedCall], hooks: Sequence[CallHooks]) -> list[list[PIL.Image.Image]]:
    """Runs one pipeline call for compatible prepared calls (see `PreparedCall.batch_key`).

    Runs on the device thread. Returns each call's images in seed order. A single call is passed
    to the pipeline exactly as prepared. Each call gets its own scheduler instance, so no state
    leaks between calls through the scheduler `from_pipe` shares between task pipelines.
    """
    first = calls[0]
    target = first.target
    pipe = target.pipe
    if len(calls) == 1:
        kwargs = dict(first.kwargs)
        call_hooks: CallHooks = hooks[0]
    else:
        kwargs = _batched_kwargs(calls)
        call_hooks = _BatchHooks([(h, len(c.seeds)) for c, h in zip(calls, hooks, strict=True)])
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(seed) for call in calls for seed in call.seeds]
    kwargs["output_type"] = "pil"
    reporter = _ProgressReporter(call_hooks, first.preview_interval, pipe)
    if first.preview_interval:
        kwargs["callback_on_step_end"] = reporter.on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    pipe.scheduler = target.schedulers[first.scheduler].from_config(first.model.scheduler_config)
    pipe.progress_bar = reporter
    out_of_memory = False
    try:
        with torch.inference_mode():
            output = pipe(**kwargs)
    except (ValueError, TypeError) as err:
        # Arguments were validated already; what remains are the pipeline's own input checks.
        raise PipelineRejected(str(err)) from err
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, once this frame no longer holds the traceback
    finally:
        del pipe.progress_bar
    if out_of_memory:
        release_memory()
        count = sum(len(call.seeds) for call in calls)
        raise OutOfMemory(
            f"the device ran out of memory generating {count} image(s) at {first.width}x{first.height}; "
            "retry later, or ask for fewer images or a smaller size"
        )
    images = list(output.images)
    results: list[list[PIL.Image.Image]] = []
    for call in calls:
        results.append(images[: len(call.seeds)])
        images = images[len(call.seeds) :]
    return results


def run_call(call: PreparedCall, hooks: CallHooks) -> list[PIL.Image.Image]:
    """Runs a single prepared call; see `run_batch`."""
    return run_batch([call], [hooks])[0]


def warm_up(model: LoadedModel) -> None:
    """Runs one small generation so first requests do not pay for lazy initialisation."""

    class _Quiet:
        def started(self, total_steps: int) -> None:
            pass

        def step(self, step: int, total_steps: int) -> None:
            pass

        def preview(self, step: int, images: list[PIL.Image.Image]) -> None:
            pass

        def cancelled(self) -> bool:
            return False

    task = next(iter(model.tasks))
    target = model.tasks[task]
    width, _ = target.default_size
    size = (min(width, 512) // target.size_multiple * target.size_multiple,) * 2
    image = PIL.Image.new("RGB", size, (127, 127, 127)) if task is not Task.TEXT_TO_IMAGE else None
    mask = PIL.Image.new("L", size, 255) if task is Task.INPAINTING else None
    request = GenerationRequest(
        model=model.spec.name,
        task=task,
        prompt="warm-up",
        width=size[0],
        height=size[1],
        num_inference_steps=2,
        strength=1.0 if task is not Task.TEXT_TO_IMAGE and "strength" in target.named_arguments else None,
        seed=0,
        image=image,
        mask_image=mask,
    )
    started = time.perf_counter()
    call = prepare_call(model, request)
    attach_inputs(call, image, mask)
    run_call(call, _Quiet())
    log.info("warmed up %s (%s) in %.2fs", model.spec.name, task.value, time.perf_counter() - started)
