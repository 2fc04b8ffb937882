"""The diffusers layer: resolve, load and warm checkpoints, validate call arguments, run pipeline calls."""

from __future__ import annotations

import inspect
import logging
import math
import secrets
import time
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import PIL.Image
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from diffusers.pipelines import auto_pipeline

from autopipeline_server.domain import GenerationRequest, Task
from autopipeline_server.errors import InvalidRequest, ModelFailed, TaskNotSupported
from autopipeline_server.settings import ModelSpec

log = logging.getLogger(__name__)

# diffusers' own task mappings (family -> pipeline class); dispatch is data, not a table of ours.
AUTO_PIPELINES: dict[Task, Any] = {
    Task.TEXT_TO_IMAGE: AutoPipelineForText2Image,
    Task.IMAGE_TO_IMAGE: AutoPipelineForImage2Image,
    Task.INPAINTING: AutoPipelineForInpainting,
}
TASK_MAPPINGS: dict[Task, Mapping[str, type[Any]]] = {
    Task.TEXT_TO_IMAGE: auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    Task.IMAGE_TO_IMAGE: auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    Task.INPAINTING: auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
}

# Call arguments that have their own GenerateRequest field.
FIELD_ARGUMENTS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "height": "height",
    "width": "width",
    "num_inference_steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "strength": "strength",
    "num_images_per_prompt": "num_images",
    "image": "image",
    "mask_image": "mask_image",
}
# Call arguments the server owns: callbacks, randomness, output control and tensors.
RESERVED_ARGUMENTS = frozenset(
    {
        "generator",
        "latents",
        "output_type",
        "return_dict",
        "callback",
        "callback_steps",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "ip_adapter_image",
        "ip_adapter_image_embeds",
        "masked_image_latents",
    }
)
PREVIEW_MAX_SIDE = 256


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


# ----------------------------------------------------------------------------------------- resolution


def family_of(checkpoint_class: str) -> str | None:
    """The AutoPipeline family name (e.g. "stable-diffusion-xl") of a pipeline class name."""
    mappings = typing.cast(list[Mapping[str, type[Any]]], auto_pipeline.SUPPORTED_TASKS_MAPPINGS)
    for mapping in mappings:
        for family, cls in mapping.items():
            if cls.__name__ == checkpoint_class:
                return str(family)
    return None


def task_classes(checkpoint_class: str) -> dict[Task, type[Any]]:
    """The pipeline class diffusers' AutoPipeline uses for each task of a checkpoint class."""
    family = family_of(checkpoint_class)
    if family is None:
        return {}
    return {task: mapping[family] for task, mapping in TASK_MAPPINGS.items() if family in mapping}


def supported_families() -> list[str]:
    return sorted({family for mapping in TASK_MAPPINGS.values() for family in mapping})


# ------------------------------------------------------------------------------------- call arguments


def _json_type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def coerce(value: Any, annotation: Any) -> Any:
    """Converts a JSON value (from a protobuf Struct) to `annotation`, or raises TypeError.

    Only JSON-expressible annotations are supported: bool, int, float, str, None, unions, lists,
    tuples and dicts of those. Struct numbers arrive as floats, so integral floats become ints.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is None or annotation is type(None):
        if value is None:
            return None
        raise TypeError("null")
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg)
            except TypeError:
                continue
        raise TypeError(_json_type_name(annotation))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("a boolean")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("an integer")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise TypeError("an integer")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError("a finite number")
        return float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list):
            raise TypeError("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TypeError(f"a list of {len(args)} items")
            return tuple(coerce(v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        items = [coerce(v, item) for v in value]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise TypeError("an object")
        return value
    raise TypeError(f"not settable over the wire ({_json_type_name(annotation)})")


def _is_json_expressible(annotation: Any) -> bool:
    if annotation in (Any, None, type(None), bool, int, float, str, list, tuple, dict):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return all(a is Ellipsis or _is_json_expressible(a) for a in typing.get_args(annotation))
    if origin is dict:
        key, *_ = typing.get_args(annotation) or (str,)
        return key is str
    return False


def _jsonable(value: Any) -> tuple[bool, Any]:
    if value is None or isinstance(value, (bool, int, str)):
        return True, value
    if isinstance(value, float):
        return math.isfinite(value), value
    if isinstance(value, (list, tuple)):
        converted = [_jsonable(v) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    return False, None


@dataclass(frozen=True)
class ParameterInfo:
    """One argument a request may pass through `parameters`."""

    name: str
    annotation: Any
    has_default: bool
    default: Any

    @property
    def type_name(self) -> str:
        return _json_type_name(self.annotation)


def call_parameters(
    pipeline_class: type[Any],
) -> tuple[dict[str, inspect.Parameter], dict[str, ParameterInfo]]:
    """All named `__call__` arguments, and the subset a request may set through `parameters`."""
    call = pipeline_class.__call__
    signature = inspect.signature(call)
    try:
        hints = typing.get_type_hints(call)
    except Exception:  # some pipelines annotate with names that only resolve under TYPE_CHECKING
        hints = {}
    named = {
        name: p
        for name, p in signature.parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    accepted: dict[str, ParameterInfo] = {}
    for name, p in named.items():
        if name in FIELD_ARGUMENTS or name in RESERVED_ARGUMENTS:
            continue
        annotation = hints.get(name, p.annotation)
        if annotation is inspect.Parameter.empty or not _is_json_expressible(annotation):
            continue
        has_default, default = (False, None) if p.default is p.empty else _jsonable(p.default)
        accepted[name] = ParameterInfo(name, annotation, has_default, default)
    return named, accepted


# ------------------------------------------------------------------------------------------- models


@dataclass
class TaskPipeline:
    """One task of a loaded model: its diffusers pipeline and what a request may ask of it."""

    task: Task
    pipe: Any
    named_arguments: dict[str, inspect.Parameter]
    accepted: dict[str, ParameterInfo]
    schedulers: dict[str, type[Any]]
    default_scheduler: str
    default_size: tuple[int, int]
    size_multiple: int
    supports_previews: bool

    @property
    def pipeline_class(self) -> str:
        return type(self.pipe).__name__

    def default_of(self, name: str) -> Any:
        parameter = self.named_arguments.get(name)
        return None if parameter is None or parameter.default is parameter.empty else parameter.default


@dataclass
class LoadedModel:
    """A checkpoint loaded once, with one pipeline per task sharing its modules."""

    spec: ModelSpec
    family: str
    checkpoint_class: str
    device: torch.device
    dtype: torch.dtype
    parameter_bytes: int
    scheduler_config: Any
    tasks: dict[Task, TaskPipeline] = field(default_factory=dict)

    def task(self, task: Task) -> TaskPipeline:
        try:
            return self.tasks[task]
        except KeyError:
            offered = ", ".join(t.value for t in self.tasks) or "none"
            raise TaskNotSupported(
                f"model {self.spec.name!r} ({self.checkpoint_class}) cannot do {task.value}; "
                f"its tasks: {offered}",
                metadata={"model": self.spec.name, "task": task.value},
            ) from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    resolved = getattr(torch, dtype)
    assert isinstance(resolved, torch.dtype)
    return resolved


def _parameter_bytes(pipe: Any) -> int:
    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += tensor.numel() * tensor.element_size()
    return total


def _size_multiple(pipe: Any) -> int:
    multiple = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    transformer = getattr(pipe, "transformer", None)
    patch = getattr(getattr(transformer, "config", None), "patch_size", None)
    if isinstance(patch, int) and patch > 1:
        multiple *= patch
    return multiple


def _default_size(pipe: Any, multiple: int) -> tuple[int, int]:
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    if isinstance(sample, (list, tuple)):
        return int(sample[1]) * scale, int(sample[0]) * scale
    if isinstance(sample, int):
        side = sample * scale
        return side, side
    return 1024 // multiple * multiple, 1024 // multiple * multiple


def _supports_previews(pipe: Any, named: Mapping[str, inspect.Parameter]) -> bool:
    vae = getattr(pipe, "vae", None)
    return (
        "callback_on_step_end" in named
        and getattr(pipe, "unet", None) is not None
        and vae is not None
        and hasattr(vae, "decode")
        and hasattr(pipe, "image_processor")
    )


def _is_inpainting_unet(pipe: Any) -> bool:
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if unet is None or vae is None:
        return False
    latent = int(getattr(vae.config, "latent_channels", 4))
    return int(unet.config.in_channels) == 2 * latent + 1


def _task_pipeline(task: Task, pipe: Any) -> TaskPipeline:
    named, accepted = call_parameters(type(pipe))
    multiple = _size_multiple(pipe)
    scheduler = pipe.scheduler
    compatibles = {cls.__name__: cls for cls in [type(scheduler), *getattr(scheduler, "compatibles", [])]}
    return TaskPipeline(
        task=task,
        pipe=pipe,
        named_arguments=named,
        accepted=accepted,
        schedulers=dict(sorted(compatibles.items())),
        default_scheduler=type(scheduler).__name__,
        default_size=_default_size(pipe, multiple),
        size_multiple=multiple,
        supports_previews=_supports_previews(pipe, named),
    )


def read_checkpoint_class(source: str) -> str:
    """The `_class_name` in the checkpoint's model_index.json (local directory or hub id)."""
    try:
        config = DiffusionPipeline.load_config(source, local_files_only=Path(source).is_dir())
    except Exception as err:
        raise ModelFailed(f"cannot read model_index.json of {source!r}: {err}") from err
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(class_name, str):
        raise ModelFailed(f"model_index.json of {source!r} names no pipeline class")
    return class_name


def load_model(
    spec: ModelSpec, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool
) -> LoadedModel:
    """Loads a checkpoint once through AutoPipeline and derives its other tasks with `from_pipe`."""
    checkpoint_class = read_checkpoint_class(spec.source)
    classes = task_classes(checkpoint_class)
    family = family_of(checkpoint_class)
    if family is None or not classes:
        raise ModelFailed(
            f"AutoPipeline cannot serve {checkpoint_class} (from {spec.source!r}): it is in no "
            f"text-to-image, image-to-image or inpainting mapping; supported families: "
            f"{', '.join(supported_families())}"
        )
    own_task = next(
        (t for t, cls in classes.items() if cls.__name__ == checkpoint_class), next(iter(classes))
    )
    started = time.perf_counter()
    try:
        base = AUTO_PIPELINES[own_task].from_pretrained(
            spec.source,
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
            local_files_only=Path(spec.source).is_dir(),
        )
    except Exception as err:
        raise ModelFailed(f"loading {spec.source!r} failed: {type(err).__name__}: {err}") from err
    base.to(device)
    base.set_progress_bar_config(disable=True)
    tasks = list(classes)
    if _is_inpainting_unet(base):
        # A UNet with masked-image input channels only works for inpainting.
        tasks = [Task.INPAINTING] if Task.INPAINTING in classes else []
    pipes: dict[Task, Any] = {}
    for task in tasks:
        pipe = base if own_task == task else AUTO_PIPELINES[task].from_pipe(base)
        pipe.set_progress_bar_config(disable=True)
        pipes[task] = pipe
    model = LoadedModel(
        spec=spec,
        family=family,
        checkpoint_class=checkpoint_class,
        device=device,
        dtype=dtype,
        parameter_bytes=_parameter_bytes(base),
        scheduler_config=base.scheduler.config,
        tasks={task: _task_pipeline(task, pipe) for task, pipe in sorted(pipes.items(), key=_task_order)},
    )
    log.info(
        "loaded %s (%s, %s) from %s in %.2fs: %s",
        spec.name,
        family,
        checkpoint_class,
        spec.source,
        time.perf_counter() - started,
        ", ".join(f"{t.value}={p.pipeline_class}" for t, p in model.tasks.items()),
    )
    return model


def _task_order(item: tuple[Task, Any]) -> int:
    return list(Task).index(item[0])


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

    def resolved_parameters(self) -> dict[str, Any]:
        """The call arguments as JSON values, for the `completed` event."""
        resolved: dict[str, Any] = {}
        for name, value in self.kwargs.items():
            if name in ("image", "mask_image"):
                continue
            ok, converted = _jsonable(value)
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
        violations = [v for e in errors for v in e.violations]
        reason = errors[0].reason if len({e.reason for e in errors}) == 1 else InvalidRequest.reason
        raise InvalidRequest("; ".join(e.message for e in errors), violations, reason=reason)

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
    with torch.no_grad():
        decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    images: list[PIL.Image.Image] = pipe.image_processor.postprocess(decoded.float(), output_type="pil")
    for image in images:
        image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    return images


def run_call(call: PreparedCall, hooks: CallHooks) -> list[PIL.Image.Image]:
    """Runs a prepared call on the calling (worker) thread; returns the images in seed order.

    Each call gets its own scheduler instance, so no state leaks between calls through the
    scheduler `from_pipe` shares between task pipelines.
    """
    target = call.target
    pipe = target.pipe
    kwargs = dict(call.kwargs)
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(seed) for seed in call.seeds]
    kwargs["output_type"] = "pil"
    reporter = _ProgressReporter(hooks, call.preview_interval, pipe)
    if call.preview_interval:
        kwargs["callback_on_step_end"] = reporter.on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    pipe.scheduler = target.schedulers[call.scheduler].from_config(call.model.scheduler_config)
    pipe.progress_bar = reporter
    try:
        with torch.inference_mode():
            output = pipe(**kwargs)
    except (ValueError, TypeError) as err:
        # Arguments were validated already; what remains are the pipeline's own input checks.
        raise PipelineRejected(str(err)) from err
    finally:
        del pipe.progress_bar
    images = list(output.images)
    return images


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
