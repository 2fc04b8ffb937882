"""Runs prepared pipeline calls on the device thread, alone or batched; reports steps, honours cancels."""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import PIL.Image
import torch

from autopipeline_server import adapters, controlnet
from autopipeline_server.acceleration import schedule_on_host
from autopipeline_server.domain import GenerationRequest, Task
from autopipeline_server.errors import OutOfMemory
from autopipeline_server.pipelines import LoadedModel, TaskPipeline
from autopipeline_server.prepare import (
    INPUT_ARGUMENTS,
    PER_MEMBER_ARGUMENTS,
    PreparedCall,
    prepare_with_inputs,
)
from autopipeline_server.previews import Previewer, latent_hook

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
    those without `callback_on_step_end`. A combined pipeline (Kandinsky prior + decoder) never drives
    its own bar: the same stand-in is installed on each inner pipeline, `started` is reported once
    when the first stage begins (with `expected_total`, the steps of all stages), and steps count on
    across stages, so a cancel lands between steps of any stage.

    On CUDA the host queues work ahead of the GPU (with CUDA graphs a whole call's steps can be
    queued before the first has run), so each step's report first waits for the GPU to finish the
    step before it: reports, previews and cancels lag the GPU by at most one step, and the host
    stays at most one step ahead (enough to keep the GPU fed).
    """

    def __init__(
        self,
        hooks: CallHooks,
        preview_interval: int,
        previewer: Previewer | None,
        expected_total: int | None = None,
        *,
        device: torch.device | None = None,
    ) -> None:
        self._hooks = hooks
        # Where each step's GPU work is queued, on CUDA: the stream this (device) thread uses there.
        self._stream = (
            torch.cuda.current_stream(device) if device is not None and device.type == "cuda" else None
        )
        self._previous_step: torch.cuda.Event | None = None
        self._preview_interval = preview_interval
        self._previewer = previewer
        self._expected_total = expected_total
        self._total = 0
        self._offset = 0
        self._stage_total = 0
        self._stage_done = 0
        self._begun = False
        self._previewed = -1
        self.latents: torch.Tensor | None = None

    @property
    def done(self) -> int:
        return self._offset + self._stage_done

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
        if self._begun:  # the next stage of a combined pipeline
            self._offset += self._stage_total
        self._stage_total, self._stage_done = total, 0
        if not self._begun:
            self._begun = True
            self._total = self._expected_total or total
            self._hooks.started(self._total)
        elif self._offset + total > self._total:
            log.warning("stage of %d steps runs past the %d steps announced", total, self._total)
            self._total = self._offset + total

    def _iterate(self, items: list[Any]) -> Iterator[Any]:
        for item in items:
            yield item
            self.update()

    def _check(self) -> None:
        if self._hooks.cancelled():
            raise CallCancelled

    def on_step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """`callback_on_step_end` (runs before the bar update): keeps the latents for its preview."""
        self.latents = tensors.get("latents")
        return {}

    def on_legacy_step(self, step: int, timestep: Any, latents: torch.Tensor) -> None:
        """The legacy `callback(step, timestep, latents)` (runs after the bar's update): previews now."""
        self.latents = latents
        self._maybe_preview()

    def _maybe_preview(self) -> None:
        done = self.done
        due = self._preview_interval and done and done % self._preview_interval == 0
        if due and self.latents is not None and self._previewer is not None and self._previewed != done:
            self._previewed = done
            self._hooks.preview(done, self._previewer(self.latents))

    def update(self, n: int = 1) -> None:
        if self._stream is not None:
            self._keep_pace(self._stream)
        self._stage_done = min(self._stage_total, self._stage_done + n)
        self._hooks.step(self.done, self._total)
        self._maybe_preview()
        self.latents = None
        self._check()

    def _keep_pace(self, stream: torch.cuda.Stream) -> None:
        """Marks the end of this step's queued GPU work and waits for the previous step's."""
        step = torch.cuda.Event()  # type: ignore[no-untyped-call]
        step.record(stream)
        if self._previous_step is not None:
            self._previous_step.synchronize()
        self._previous_step = step

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


def _per_image(call: PreparedCall) -> bool:
    """Whether a call for several images from one input image passes each image its own copy.

    Several pipelines encode an input image once per generator, `image[i : i + 1]` for each, and
    break when one image serves several (SD 3's image-to-image: "cannot reshape tensor of 0
    elements"; Kandinsky 2.1's: "Unexpected latents shape"). Every pipeline takes the form a batch of
    requests runs in: a prompt and inputs per image, one image per prompt. A call that cannot be
    batched (secondary prompts broadcast differently by family) keeps its own form.
    """
    return len(call.seeds) > 1 and bool(INPUT_ARGUMENTS & call.kwargs.keys()) and call.batch_key() is not None


def release_memory() -> None:
    """Returns what a failed call held to the device, so the next call starts from a clean slate."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_batch(calls: Sequence[PreparedCall], hooks: Sequence[CallHooks]) -> list[list[PIL.Image.Image]]:
    """Runs one pipeline call for compatible prepared calls (see `PreparedCall.batch_key`).

    Runs on the device thread. Returns each call's images in seed order. A single call is passed
    to the pipeline as prepared, unless it asks for several images from an input image (see
    `_per_image`). Each call gets its own scheduler instance, so no state
    leaks between calls through the scheduler `from_pipe` shares between task pipelines.
    """
    first = calls[0]
    target = first.target
    pipe = target.pipe
    if len(calls) == 1:
        kwargs = _batched_kwargs(calls) if _per_image(first) else dict(first.kwargs)
        call_hooks: CallHooks = hooks[0]
    else:
        kwargs = _batched_kwargs(calls)
        call_hooks = _BatchHooks([(h, len(c.seeds)) for c, h in zip(calls, hooks, strict=True)])
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(seed) for call in calls for seed in call.seeds]
    kwargs["output_type"] = "pil"
    scheduler = first.model.new_scheduler(target.schedulers[first.scheduler])
    stages = target.stages
    previewer = None
    hook = latent_hook(pipe, target.named_arguments) if first.preview_interval else None
    if hook is not None:
        previewer = Previewer(pipe, first.width, first.height)
    reporter = _ProgressReporter(
        call_hooks,
        first.preview_interval,
        previewer,
        expected_total=_expected_steps(first.model, target, kwargs, scheduler),
        device=first.model.device,
    )
    if hook == "callback_on_step_end":
        kwargs["callback_on_step_end"] = reporter.on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    elif hook == "callback":
        kwargs["callback"] = reporter.on_legacy_step
    # Each call gets its own scheduler (and each stage its own), and every stage reports to the stand-in.
    schedule_on_host(first.model, scheduler)
    pipe.scheduler = scheduler
    if stages:
        prior, decoder = stages
        prior.scheduler = first.model.new_scheduler(
            type(prior.scheduler), role="prior", config=prior.scheduler.config
        )
        decoder.scheduler = scheduler
    driven = [pipe, *stages]
    for stage in driven:
        stage.progress_bar = reporter
    out_of_memory = False
    try:
        with adapters.applied(first.model, pipe, first.adapters), torch.inference_mode():
            output = pipe(**kwargs)
    except (ValueError, TypeError) as err:
        # Arguments were validated already; what remains are the pipeline's own input checks.
        raise PipelineRejected(str(err)) from err
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, once this frame no longer holds the traceback
    finally:
        for stage in driven:
            del stage.progress_bar
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


def _timestep_count(scheduler: Any, steps: int) -> int:
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def _expected_steps(
    model: LoadedModel, target: TaskPipeline, kwargs: dict[str, Any], scheduler: Any
) -> int | None:
    """The steps of all stages of a combined pipeline (prior + decoder), known before it starts; None
    for a single pipeline, whose bar announces its own total.

    The decoder applies `strength` as Kandinsky's `get_timesteps` does: it keeps the last
    min(int(steps * strength), steps) timesteps.
    """
    if not target.stages:
        return None
    prior = target.stages[0]
    prior_steps = int(
        kwargs.get("prior_num_inference_steps") or target.default_of("prior_num_inference_steps") or 25
    )
    prior_scheduler = model.new_scheduler(type(prior.scheduler), role="prior", config=prior.scheduler.config)
    total = _timestep_count(prior_scheduler, prior_steps)
    steps = int(kwargs["num_inference_steps"])
    decoder_scheduler = copy.deepcopy(scheduler)
    count = _timestep_count(decoder_scheduler, steps)
    strength = kwargs.get("strength")
    if strength is not None:
        kept = min(int(steps * float(strength)), steps)
        count = len(decoder_scheduler.timesteps[max(steps - kept, 0) :])
    return total + count


def run_call(call: PreparedCall, hooks: CallHooks) -> list[PIL.Image.Image]:
    """Runs a single prepared call; see `run_batch`."""
    return run_batch([call], [hooks])[0]


def warm_up_size(target: TaskPipeline) -> tuple[int, int]:
    """A size the task really runs at and that is cheap: its fixed size, else about 64 pixels a side
    (the smallest valid size at or above 64, never above the default: 512 pixel-space steps are slow)."""
    if target.fixed_size:
        return target.default_size
    multiple = target.size_multiple
    side = max(target.min_size, -(-64 // multiple) * multiple)
    return min(side, target.default_size[0]), min(side, target.default_size[1])


class QuietHooks:
    """Call hooks that report nowhere: warm-up and compile calls have no caller."""

    def started(self, total_steps: int) -> None:
        pass

    def step(self, step: int, total_steps: int) -> None:
        pass

    def preview(self, step: int, images: list[PIL.Image.Image]) -> None:
        pass

    def cancelled(self) -> bool:
        return False


def warm_up(model: LoadedModel) -> None:
    """Runs one small generation so first requests do not pay for lazy initialisation."""

    task = next(iter(model.tasks))  # text-to-image when the checkpoint can do it, else what it can
    target = model.tasks[task]
    size = warm_up_size(target)
    image = PIL.Image.new("RGB", size, (127, 127, 127)) if task is not Task.TEXT_TO_IMAGE else None
    mask = PIL.Image.new("L", size, 255) if task is Task.INPAINTING else None
    request = GenerationRequest(
        model=model.spec.name,
        task=task,
        prompt="warm-up",
        width=size[0],
        height=size[1],
        num_inference_steps=2,
        parameters={"prior_num_inference_steps": 2} if "prior_num_inference_steps" in target.accepted else {},
        strength=1.0 if task is not Task.TEXT_TO_IMAGE and "strength" in target.named_arguments else None,
        seed=0,
        image=image,
        mask_image=mask,
        control_image=controlnet.warm_up_image(target, size),
    )
    started = time.perf_counter()
    run_call(prepare_with_inputs(model, request), QuietHooks())
    log.info("warmed up %s (%s) in %.2fs", model.spec.name, task.value, time.perf_counter() - started)
