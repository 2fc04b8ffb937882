"""Prepares a pipeline call: checks a request against the model's task pipeline and builds its arguments.

`convert.py` owns every rule that does not depend on the model; this module owns the ones that do
(size multiples, which arguments the pipeline takes, defaults, schedulers), and reports all of its
problems in one error. Nothing here runs the pipeline: that is `calls.py`, on the device thread.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

import PIL.Image

from autopipeline_server import adapters, controlnet
from autopipeline_server.arguments import (
    FIELD_ARGUMENTS,
    RESERVED_ARGUMENTS,
    SCHEDULE_ARGUMENTS,
    coerce,
    jsonable,
)
from autopipeline_server.codecs import oriented_size
from autopipeline_server.domain import AdapterWeight, GenerationRequest
from autopipeline_server.errors import Violations, quote
from autopipeline_server.pipelines import LoadedModel, TaskPipeline

# Arguments that differ between the members of a batched call; each member's go into lists.
PER_MEMBER_ARGUMENTS = frozenset(
    {"prompt", "negative_prompt", "num_images_per_prompt", "image", "mask_image", "control_image"}
)
# Secondary prompts are broadcast against the prompt list in ways that differ by family: run alone.
UNBATCHABLE_ARGUMENTS = frozenset({"prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3"})
# The decoded input images: the input, the mask and ControlNet's conditioning image (which
# text-to-image ControlNet pipelines take as `image`).
INPUT_ARGUMENTS = frozenset({"image", "mask_image", "control_image"})
NOT_APPLICABLE = "FIELD_NOT_APPLICABLE"


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
    # LoRA adapters applied to this call only (adapters.py), in canonical order.
    adapters: tuple[AdapterWeight, ...] = ()

    def batch_key(self) -> str | None:
        """Calls with equal keys can share one pipeline call; None means this call runs alone.

        Everything but the prompts, inputs and seeds must match: model, task, size, steps,
        guidance, strength, scheduler, previews, LoRA adapters with their weights, and every extra
        argument. Whether a negative prompt is present matters too: SDXL treats an absent one
        (zeros) differently from "".
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
                [[adapter.name, adapter.weight] for adapter in self.adapters],
            ]
        )

    def release_inputs(self) -> None:
        """Drops the decoded input images once the call has ended, whoever still holds the call."""
        for name in INPUT_ARGUMENTS:
            self.kwargs.pop(name, None)

    def resolved_parameters(self) -> dict[str, Any]:
        """The call arguments JSON can express, for the `completed` event (seeds have typed fields)."""
        resolved: dict[str, Any] = {}
        for name, value in self.kwargs.items():
            if name in INPUT_ARGUMENTS:
                continue
            ok, converted = jsonable(value)
            if ok:
                resolved[name] = converted
        resolved["width"], resolved["height"] = self.width, self.height
        resolved["scheduler"] = self.scheduler
        return resolved


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


class _Problems(Violations):
    """Every model-dependent problem with a request, reported together."""

    def __init__(self, target: TaskPipeline) -> None:
        super().__init__()
        self._target = target

    def not_taken(self, field: str) -> None:
        self.add(field, f"{self._target.pipeline_class} takes none", reason=NOT_APPLICABLE)


def _output_size(target: TaskPipeline, request: GenerationRequest, problems: _Problems) -> tuple[int, int]:
    """The size the pipeline will return: explicit, else the input image's size rounded down to the
    multiple, else the model default; a size the family cannot return exactly is a problem, never changed."""
    multiple, minimum = target.size_multiple, target.min_size
    # Explicit, else the input (or else the control) image's size rounded down, else the default.
    sized_by = request.image if request.image is not None else request.control_image
    if target.fixed_size:
        base_width, base_height = target.default_size
    elif sized_by is not None:
        # Only the input's header is read here: its pixels are decoded once the request is admitted.
        base_width, base_height = (
            max(minimum, _round_down(side, multiple)) for side in oriented_size(sized_by)
        )
    else:
        base_width, base_height = target.default_size
    width = request.width if request.width is not None else base_width
    height = request.height if request.height is not None else base_height
    for name, value, native in (
        ("width", width, target.default_size[0]),
        ("height", height, target.default_size[1]),
    ):
        if target.fixed_size and value != native:
            problems.add(
                name,
                f"{target.pipeline_class} returns only the model's sample size, {native}; got {value}",
            )
        elif value % multiple or value < minimum:
            problems.add(
                name, f"must be a multiple of {multiple} and at least {minimum} for this model, got {value}"
            )
    return width, height


def _check_stage_arguments(target: TaskPipeline, kwargs: dict[str, Any], problems: _Problems) -> None:
    """Arguments of a combined pipeline's prior: UnCLIPScheduler divides by (steps - 1)."""
    if not target.stages or "prior_num_inference_steps" not in target.named_arguments:
        return
    prior_steps = kwargs.get("prior_num_inference_steps", target.default_of("prior_num_inference_steps"))
    if isinstance(prior_steps, int) and prior_steps < 2:
        problems.add(
            "parameters.prior_num_inference_steps",
            f"must be at least 2 (the prior's scheduler needs two timesteps), got {prior_steps}",
        )


def _check_schedule(
    problems: _Problems, target: TaskPipeline, name: str, scheduler: str, values: Any
) -> None:
    """`timesteps`/`sigmas` as the scheduler can use them: supported, non-empty, strictly decreasing.

    diffusers does not check these: an empty list or repeated timesteps fail deep inside a step.
    """
    field_name = f"parameters.{name}"
    cls = target.schedulers.get(scheduler)
    if cls is not None and name not in inspect.signature(cls.set_timesteps).parameters:
        problems.add(field_name, f"{scheduler} does not take a custom schedule; choose another scheduler")
        return
    if not isinstance(values, (list, tuple)) or not values:
        problems.add(field_name, "must be a non-empty list, one entry per step")
        return
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        problems.add(field_name, "must hold finite numbers")
        return
    if any(later >= earlier for earlier, later in itertools.pairwise(values)):
        problems.add(field_name, "must be strictly decreasing (noisiest first)")
    train_steps = int(target.pipe.scheduler.config.get("num_train_timesteps", 1000))
    if name == "timesteps" and not all(0 <= v < train_steps for v in values):
        problems.add(field_name, f"must lie in [0, {train_steps}), the model's training timesteps")
    if name == "sigmas" and min(values) < 0:
        problems.add(field_name, "must not be negative")


def attach_inputs(call: PreparedCall, image: PIL.Image.Image | None, mask: PIL.Image.Image | None) -> None:
    """Adds the decoded input image and mask to a prepared call, resized to its output size."""
    size = (call.width, call.height)
    if image is not None:
        if image.size != size:
            image = image.resize(size, PIL.Image.Resampling.LANCZOS)
        call.kwargs["image"] = image
    if mask is not None:
        if mask.size != size:
            mask = mask.resize(size, PIL.Image.Resampling.NEAREST)
        call.kwargs["mask_image"] = mask


def prepare_with_inputs(model: LoadedModel, request: GenerationRequest) -> PreparedCall:
    """`prepare_call` and `attach_inputs` at once, for callers whose inputs are decoded already
    (warm-up, compilation); requests from the wire attach theirs once admitted."""
    call = prepare_call(model, request)
    attach_inputs(call, request.image, request.mask_image)
    return call


def prepare_call(model: LoadedModel, request: GenerationRequest) -> PreparedCall:
    """Checks a request against the model's pipeline for its task and builds the call arguments.

    `request` has passed `convert.generation_request`, so only what depends on the model is checked.
    No pixel is touched: the inputs join the call with `attach_inputs` once they are decoded.
    """
    target = model.task(request.task)
    problems = _Problems(target)
    named = target.named_arguments

    width, height = _output_size(target, request, problems)

    steps = request.num_inference_steps
    if steps is None:
        steps = int(target.default_of("num_inference_steps") or 50)
    kwargs: dict[str, Any] = {"prompt": request.prompt, "num_inference_steps": steps}
    if request.negative_prompt:
        if "negative_prompt" not in named:
            problems.not_taken("negative_prompt")
        kwargs["negative_prompt"] = request.negative_prompt

    if request.guidance_scale is not None:
        if "guidance_scale" not in named:
            problems.not_taken("guidance_scale")
        kwargs["guidance_scale"] = request.guidance_scale
    elif "guidance_scale" in named:
        kwargs["guidance_scale"] = target.default_of("guidance_scale")

    if "strength" in named:
        strength = request.strength if request.strength is not None else target.default_of("strength")
        if strength is not None:
            # diffusers runs min(int(steps * strength), steps) steps, in double precision as here.
            if int(steps * strength) < 1:
                problems.add(
                    "strength",
                    f"leaves no step: int(num_inference_steps {steps} * strength {strength}) is 0",
                )
            kwargs["strength"] = strength
    elif request.strength is not None:
        problems.not_taken("strength")

    if "height" in named and "width" in named:
        kwargs["height"], kwargs["width"] = height, width
    elif request.image is None and request.control_image is None and (width, height) != target.default_size:
        problems.add("width", f"{target.pipeline_class} cannot set the output size")

    control, control_problems = controlnet.control_kwargs(target, request.control_image, (width, height))
    kwargs.update(control)
    problems.errors.extend(control_problems)
    call_adapters, adapter_problems = adapters.resolve(model, request.adapters)
    problems.errors.extend(adapter_problems)

    scheduler = request.scheduler or target.default_scheduler
    if scheduler not in target.schedulers:
        problems.add(
            "scheduler", f"{quote(scheduler)} is not compatible; choose one of {', '.join(target.schedulers)}"
        )

    for name, value in request.parameters.items():
        field_name = f"parameters.{name}"
        if name in FIELD_ARGUMENTS:
            problems.add(field_name, f"use the request field {FIELD_ARGUMENTS[name]!r}")
        elif name not in target.accepted:
            reason = "is set by the server" if name in RESERVED_ARGUMENTS else "is not an argument of"
            problems.add(
                field_name,
                f"{reason} {target.pipeline_class}; accepted: {', '.join(sorted(target.accepted))}",
                reason="UNKNOWN_PARAMETER",
            )
        else:
            info = target.accepted[name]
            try:
                kwargs[name] = coerce(value, info.annotation)
            except TypeError as err:
                problems.add(field_name, f"must match {info.describe()} ({err}), got {quote(repr(value))}")
            else:
                if name in SCHEDULE_ARGUMENTS:
                    _check_schedule(problems, target, name, scheduler, kwargs[name])

    schedule = [kwargs[name] for name in SCHEDULE_ARGUMENTS if kwargs.get(name) is not None]
    if len(schedule) > 1:
        problems.add("parameters.sigmas", "set `timesteps` or `sigmas`, not both")
    elif schedule:
        steps = len(schedule[0])  # a custom schedule sets the step count
        kwargs["num_inference_steps"] = steps
        strength = kwargs.get("strength")
        if strength is not None and int(steps * strength) < 1:
            problems.add("strength", f"leaves no step of the {steps} the schedule has")

    _check_stage_arguments(target, kwargs, problems)

    if request.preview_interval and not target.supports_previews:
        problems.add(
            "preview_interval", f"{target.pipeline_class} cannot make previews", reason=NOT_APPLICABLE
        )

    problems.raise_if_any()

    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
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
        adapters=call_adapters,
    )
