"""Pipeline calls: validate a request against a task pipeline; run it, alone or batched, on the device."""

from __future__ import annotations

import gc
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import PIL.Image
import torch

from autopipeline_server.arguments import FIELD_ARGUMENTS, RESERVED_ARGUMENTS, coerce, jsonable
from autopipeline_server.domain import GenerationRequest, Task
from autopipeline_server.errors import InvalidRequest, OutOfMemory
from autopipeline_server.pipelines import LoadedModel, TaskPipeline

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 256
# Arguments that differ between the members of a batched call; each member's go into lists.
PER_MEMBER_ARGUMENTS = frozenset(
    {"prompt", "negative_prompt", "num_images_per_prompt", "image", "mask_image"}
)
# Secondary prompts are broadcast against the prompt list in ways that differ by family: run alone.
UNBATCHABLE_ARGUMENTS = frozenset({"prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3"})


class PipelineRejected(Exception):
    """The pipeline refused the call's arguments (a ValueError from its own input checks)."""


class CallCancelled(Exception):
    """Raised from inside the denoising loop to abort a call whose callers are gone."""


# Test-only: called on the device thread after every denoising step with the step number, so
# tests can raise what a CPU cannot produce (a CUDA out-of-memory) from inside a real call.
StepFaultHook = Callable[[int], None]


class CallHooks(Protocol):
    """What a running call reports to, from the worker thread."""

    def started(self, total_steps: int) -> None: ...

    def step(self, step: int, total_steps: int) -> None: ...

    def preview(self, step: int, images: list[PIL.Image.Image]) -> None: ...

    def cancelled(self) -> bool: ...


# ------------------------------------------------------------------------------------ prepared calls


MAX_SEED = 2**64 - 1


@dataclass
class PreparedCall:
    """A request resolved against one task pipeline: everything needed to call it, validated."""

    model: LoadedModel
    target: TaskPipeline
    kwargs: dict[str, Any]
    seeds: tuple[int, ...]
    width: int
    height: int
    scheduler: str
    preview_interval: int

    def batch_key(self) -> str | None:
        """Calls with equal keys can share one pipeline call; None means this call runs alone.

        Everything but the prompts, inputs and seeds must match: model, task, size, steps,
        guidance, strength, scheduler, previews and every extra argument. Whether a negative
        prompt is present matters too: SDXL treats an absent one (zeros) differently from "".
        """
        if UNBATCHABLE_ARGUMENTS & self.kwargs.keys():
            return None
        shared = {k: v for k, v in self.kwargs.items() if k not in PER_MEMBER_ARGUMENTS}
        ok, values = jsonable(list(shared.values()))
        if not ok:
            return None
        return json.dumps(
            [
                self.model.spec.name,
                id(self.model),
                self.target.task.value,
                self.scheduler,
                self.width,
                self.height,
                self.preview_interval,
                "negative_prompt" in self.kwargs,
                sorted(zip(shared, values, strict=True)),
            ]
        )

    def resolved_parameters(self) -> dict[str, Any]:
        """The call arguments as JSON values, for the `completed` event."""
        resolved: dict[str, Any] = {}
        for name, value in self.kwargs.items():
            if name in ("image", "mask_image"):
                continue
            ok, converted = jsonable(value)
            if ok:
                resolved[name] = converted
        resolved["width"], resolved["height"] = self.width, self.height
        resolved["scheduler"] = self.scheduler
        resolved["seeds"] = [s if s < 2**53 else str(s) for s in self.seeds]
        return resolved


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def prepare_call(model: LoadedModel, request: GenerationRequest) -> PreparedCall:
    """Validates a request against the model's pipeline for its task and builds the call arguments."""
    target = model.task(request.task)
    errors: list[InvalidRequest] = []
    multiple = target.size_multiple

    # Sizes: explicit, else the input image's size (rounded down), else the model default.
    if request.image is not None:
        base_width, base_height = request.image.size
        base_width, base_height = _round_down(base_width, multiple), _round_down(base_height, multiple)
    else:
        base_width, base_height = target.default_size
    width = request.width if request.width is not None else base_width
    height = request.height if request.height is not None else base_height
    for name, value in (("width", width), ("height", height)):
        if value % multiple:
            errors.append(InvalidRequest.field(name, f"must be a multiple of {multiple}, got {value}"))

    steps = request.num_inference_steps
    if steps is None:
        steps = int(target.default_of("num_inference_steps") or 50)
    kwargs: dict[str, Any] = {"prompt": request.prompt, "num_inference_steps": steps}
    if request.negative_prompt:
        if "negative_prompt" not in target.named_arguments:
            errors.append(InvalidRequest.field("negative_prompt", f"{target.pipeline_class} takes none"))
        kwargs["negative_prompt"] = request.negative_prompt

    if request.guidance_scale is not None:
        if "guidance_scale" not in target.named_arguments:
            errors.append(InvalidRequest.field("guidance_scale", f"{target.pipeline_class} takes none"))
        elif not math.isfinite(request.guidance_scale) or request.guidance_scale < 0:
            errors.append(InvalidRequest.field("guidance_scale", "must be a finite number >= 0"))
        kwargs["guidance_scale"] = request.guidance_scale
    elif "guidance_scale" in target.named_arguments:
        kwargs["guidance_scale"] = target.default_of("guidance_scale")

    if "strength" in target.named_arguments:
        strength = request.strength if request.strength is not None else target.default_of("strength")
        if strength is not None:
            if not (math.isfinite(strength) and 0 < strength <= 1):
                errors.append(InvalidRequest.field("strength", f"must be in (0, 1], got {strength}"))
            elif int(steps * strength) < 1:
                errors.append(
                    InvalidRequest.field(
                        "strength",
                        f"leaves no step: int(num_inference_steps {steps} * strength {strength}) is 0",
                    )
                )
            kwargs["strength"] = strength
    elif request.strength is not None:
        errors.append(InvalidRequest.field("strength", f"{target.pipeline_class} takes no strength"))

    if "height" in target.named_arguments and "width" in target.named_arguments:
        kwargs["height"], kwargs["width"] = height, width
    elif request.image is None and (width, height) != target.default_size:
        errors.append(InvalidRequest.field("width", f"{target.pipeline_class} cannot set the output size"))

    if request.image is not None:
        image = request.image
        if image.size != (width, height):
            image = image.resize((width, height), PIL.Image.Resampling.LANCZOS)
        kwargs["image"] = image
    if request.mask_image is not None:
        if request.image is not None and request.mask_image.size != request.image.size:
            errors.append(
                InvalidRequest.field(
                    "mask_image",
                    f"must be the size of image ({request.image.size[0]}x{request.image.size[1]}), "
                    f"got {request.mask_image.size[0]}x{request.mask_image.size[1]}",
                )
            )
        mask = request.mask_image
        if mask.size != (width, height):
            mask = mask.resize((width, height), PIL.Image.Resampling.NEAREST)
        kwargs["mask_image"] = mask

    scheduler = request.scheduler or target.default_scheduler
    if scheduler not in target.schedulers:
        errors.append(
            InvalidRequest.field(
                "scheduler", f"{scheduler!r} is not compatible; choose one of {', '.join(target.schedulers)}"
            )
        )

    for name, value in request.parameters.items():
        field_name = f"parameters.{name}"
        if name in FIELD_ARGUMENTS:
            errors.append(
                InvalidRequest.field(field_name, f"use the request field {FIELD_ARGUMENTS[name]!r}")
            )
        elif name not in target.accepted:
            reason = "is set by the server" if name in RESERVED_ARGUMENTS else "is not an argument of"
            errors.append(
                InvalidRequest.field(
                    field_name,
                    f"{reason} {target.pipeline_class}; accepted: {', '.join(sorted(target.accepted))}",
                    reason="UNKNOWN_PARAMETER",
                )
            )
        else:
            info = target.accepted[name]
            try:
                kwargs[name] = coerce(value, info.annotation)
            except TypeError as err:
                errors.append(
                    InvalidRequest.field(field_name, f"must be {info.type_name} ({err}), got {value!r}")
                )

    if request.preview_interval and not target.supports_previews:
        errors.append(
            InvalidRequest.field("preview_interval", f"{target.pipeline_class} cannot make previews")
        )

    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    if seed + request.num_images - 1 > MAX_SEED:
        errors.append(InvalidRequest.field("seed", f"seed + num_images - 1 must not exceed {MAX_SEED}"))
    if errors:
        raise InvalidRequest.combined(errors)

    kwargs["num_images_per_prompt"] = request.num_images
    return PreparedCall(
        model=model,
        target=target,
        kwargs=kwargs,
        seeds=tuple(seed + i for i in range(request.num_images)),
        width=width,
        height=height,
        scheduler=scheduler,
        preview_interval=request.preview_interval,
    )


# ------------------------------------------------------------------------------------------ running


class _ProgressReporter:
    """Stands in for the pipeline's tqdm bar: reports steps and previews, and aborts cancelled calls.

    Every diffusers pipeline drives its progress bar once per denoising step (after `strength` and
    scheduler warm-up are accounted for), so this counts real steps for every family, including
    those without `callback_on_step_end`.
    """

    def __init__(
        self, hooks: CallHooks, preview_interval: int, pipe: Any, fault_hook: StepFaultHook | None = None
    ) -> None:
        self._hooks = hooks
        self._fault_hook = fault_hook
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
        if self._fault_hook is not None:
            self._fault_hook(self._done)
        self._hooks.step(self._done, self._total)
        if self._preview_interval and self.latents is not None and self._done % self._preview_interval == 0:
            self._hooks.preview(self._done, _decode_previews(self._pipe, self.latents))
        self._check()

    def __enter__(self) -> _ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _decode_previews(pipe: Any, latents: torch.Tensor) -> list[PIL.Image.Image]:
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    # The SDXL VAE overflows in float16 (force_upcast); decode in float32 as the pipelines do, and
    # give the shared module back in its own dtype (only this thread touches it meanwhile).
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    dtype = vae.dtype
    try:
        if upcast:
            vae.to(torch.float32)
        with torch.no_grad():
            decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype)
    images: list[PIL.Image.Image] = pipe.image_processor.postprocess(decoded.float(), output_type="pil")
    for image in images:
        image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    return images


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


def run_batch(
    calls: Sequence[PreparedCall],
    hooks: Sequence[CallHooks],
    *,
    testing_fault_hook: StepFaultHook | None = None,
) -> list[list[PIL.Image.Image]]:
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
    reporter = _ProgressReporter(call_hooks, first.preview_interval, pipe, testing_fault_hook)
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
    run_call(prepare_call(model, request), _Quiet())
    log.info("warmed up %s (%s) in %.2fs", model.spec.name, task.value, time.perf_counter() - started)
