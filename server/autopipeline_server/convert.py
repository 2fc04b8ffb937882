"""Converts between autopipeline.v1 protobuf messages and domain objects, validating what arrives."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import diffusers
import PIL.Image
import torch
from google.protobuf import duration_pb2, struct_pb2

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline_server import __version__
from autopipeline_server.acceleration import AccelerationReport
from autopipeline_server.arguments import SCHEDULE_ARGUMENTS, ParameterInfo, ValueKind, value_kind
from autopipeline_server.codecs import (
    DEFAULT_QUALITY,
    EncodedImage,
    OutputFormat,
    chunk_count,
    chunks,
    decode_image,
    load_image,
    open_image,
    oriented_size,
)
from autopipeline_server.controlnet import controlnet_source, requires_control_image
from autopipeline_server.devices import DevicePool
from autopipeline_server.domain import (
    AdapterWeight,
    Finished,
    GenerationRequest,
    ModelState,
    Preview,
    Progress,
    Queued,
    Started,
    Task,
)
from autopipeline_server.errors import InvalidRequest, Violations, quote
from autopipeline_server.pipelines import TaskPipeline
from autopipeline_server.registry import ModelEntry
from autopipeline_server.settings import Limits, Settings

TASKS = {
    pb.TASK_TEXT_TO_IMAGE: Task.TEXT_TO_IMAGE,
    pb.TASK_IMAGE_TO_IMAGE: Task.IMAGE_TO_IMAGE,
    pb.TASK_INPAINTING: Task.INPAINTING,
}
TASKS_TO_WIRE = {task: value for value, task in TASKS.items()}
FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: OutputFormat.PNG,
    pb.IMAGE_FORMAT_PNG: OutputFormat.PNG,
    pb.IMAGE_FORMAT_JPEG: OutputFormat.JPEG,
    pb.IMAGE_FORMAT_WEBP: OutputFormat.WEBP,
}
STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.EVICTED: pb.MODEL_STATE_EVICTED,
}


def value_to_python(value: struct_pb2.Value) -> Any:
    """A protobuf Value as plain Python, keeping what JSON cannot say (NaN, infinities) for validation."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_python(value.struct_value)
    if kind == "list_value":
        return [value_to_python(item) for item in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: value_to_python(value) for key, value in struct.fields.items()}


def output_format(request: pb.GenerateRequest) -> tuple[OutputFormat, int]:
    """The requested encoding and quality (validated in `generation_request`)."""
    return FORMATS.get(request.output_format, OutputFormat.PNG), request.output_quality or DEFAULT_QUALITY


# Seeds are uint64 on the wire; image i uses seed + i, which must stay representable.
MAX_SEED = 2**64 - 1
# Configured names are at most 128 characters (settings.ModelSpec); a source is a hub id or a path.
MAX_MODEL_NAME_LENGTH = 128
MAX_SOURCE_LENGTH = 1024
# Adapters one request may apply; registered adapters are checked by name once the model is known.
MAX_ADAPTERS = 16
MAX_PARAMETER_NAME_LENGTH = 128


def generation_request(request: pb.GenerateRequest, limits: Limits) -> GenerationRequest:
    """Validates everything about a wire request that does not depend on the model, all at once.

    This is the one owner of these rules: field ranges and limits, which fields apply to the task,
    the output encoding, the seed range, and the input images' headers (format, pixel count, mask
    size, and the output size they imply). No pixel is decoded here: the images come back opened
    but not loaded, for `decode_inputs` once the request is admitted. What depends on the model
    (size multiples, arguments its pipeline takes) is `prepare.py`'s.
    """
    v = Violations()
    task = TASKS.get(request.task)
    if task is None:
        v.add("task", "must be TASK_TEXT_TO_IMAGE, TASK_IMAGE_TO_IMAGE or TASK_INPAINTING")
    if request.model and request.source:
        v.add("source", "names an on-demand checkpoint; leave `model` empty when setting it")
    if len(request.model) > MAX_MODEL_NAME_LENGTH:
        v.add(
            "model", f"is {len(request.model)} characters; model names have at most {MAX_MODEL_NAME_LENGTH}"
        )
    if len(request.source) > MAX_SOURCE_LENGTH:
        v.add("source", f"is {len(request.source)} characters; the limit is {MAX_SOURCE_LENGTH}")
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if len(text) > limits.max_prompt_length:
            v.add(name, f"is {len(text)} characters; the limit is {limits.max_prompt_length}")
    for name, maximum in (("width", limits.max_width), ("height", limits.max_height)):
        if request.HasField(name) and not 1 <= getattr(request, name) <= maximum:  # type: ignore[arg-type]
            v.add(name, f"must be between 1 and {maximum}, got {getattr(request, name)}")
    if request.HasField("num_inference_steps") and not (
        1 <= request.num_inference_steps <= limits.max_num_inference_steps
    ):
        v.add(
            "num_inference_steps",
            f"must be between 1 and {limits.max_num_inference_steps}, got {request.num_inference_steps}",
        )
    num_images = request.num_images or 1
    if num_images > limits.max_num_images:
        v.add("num_images", f"must be at most {limits.max_num_images}, got {num_images}")
    if request.HasField("seed") and request.seed + num_images - 1 > MAX_SEED:
        v.add("seed", f"seed + num_images - 1 must not exceed {MAX_SEED}")
    if request.HasField("guidance_scale") and not (
        math.isfinite(request.guidance_scale) and request.guidance_scale >= 0
    ):
        v.add("guidance_scale", f"must be a finite number >= 0, got {request.guidance_scale}")
    if request.output_format not in FORMATS:
        v.add("output_format", f"unknown value {request.output_format}")
    if request.output_quality > 100:
        v.add("output_quality", f"must be between 1 and 100 (0 = default), got {request.output_quality}")
    if request.output_quality and FORMATS.get(request.output_format) is OutputFormat.PNG:
        v.add("output_quality", "applies to JPEG and WebP only", reason="FIELD_NOT_APPLICABLE")
    parameters: dict[str, Any] = {}
    if request.HasField("parameters"):
        if len(request.parameters.fields) > limits.max_parameters:
            v.add(
                "parameters",
                f"has {len(request.parameters.fields)} entries; the limit is {limits.max_parameters}",
            )
        for name in request.parameters.fields:
            if len(name) > MAX_PARAMETER_NAME_LENGTH:
                v.add("parameters", f"names {quote(name, 40)}; the limit is {MAX_PARAMETER_NAME_LENGTH}")
        parameters = struct_to_python(request.parameters)
        for name in SCHEDULE_ARGUMENTS:
            schedule = parameters.get(name)
            if isinstance(schedule, list) and len(schedule) > limits.max_num_inference_steps:
                v.add(
                    f"parameters.{name}",
                    f"has {len(schedule)} entries (one per step); the limit is "
                    f"{limits.max_num_inference_steps}",
                )

    if task is Task.TEXT_TO_IMAGE:
        for name in ("image", "mask_image", "strength"):
            if request.HasField(name):  # type: ignore[arg-type]
                v.add(name, "does not apply to text-to-image", reason="FIELD_NOT_APPLICABLE")
    if task is Task.IMAGE_TO_IMAGE and request.HasField("mask_image"):
        v.add(
            "mask_image",
            "does not apply to image-to-image; use TASK_INPAINTING",
            reason="FIELD_NOT_APPLICABLE",
        )
    if request.HasField("strength") and not (math.isfinite(request.strength) and 0 < request.strength <= 1):
        v.add("strength", f"must be in (0, 1], got {request.strength}")

    image = mask = None
    if task in (Task.IMAGE_TO_IMAGE, Task.INPAINTING):
        try:
            image = open_image(request.image.data, field="image", max_pixels=limits.max_input_pixels)
        except InvalidRequest as err:
            v.caught(err)
    if task is Task.INPAINTING:
        try:
            mask = open_image(request.mask_image.data, field="mask_image", max_pixels=limits.max_input_pixels)
        except InvalidRequest as err:
            v.caught(err)
    control_image = None
    if request.HasField("control_image"):
        try:
            # A control image is decoded here (it is small, and sizes the output of text-to-image).
            control_image = decode_image(
                request.control_image.data, field="control_image", max_pixels=limits.max_input_pixels
            )
        except InvalidRequest as err:
            v.caught(err)
    adapters = _adapter_weights(request, v)
    if image is not None:
        size = oriented_size(image)
        # Without an explicit size the output takes the input's: that path honours the limits too.
        sides = (("width", size[0], limits.max_width), ("height", size[1], limits.max_height))
        for name, side, maximum in sides:
            if not request.HasField(name) and side > maximum:  # type: ignore[arg-type]
                v.add(
                    "image",
                    f"is {size[0]}x{size[1]}; without `{name}` the output takes the input's {name}, "
                    f"whose limit is {maximum}: set `{name}` or send a smaller image",
                )
        if mask is not None and oriented_size(mask) != size:
            masked = oriented_size(mask)
            v.add(
                "mask_image",
                f"must be the size of image ({size[0]}x{size[1]}), got {masked[0]}x{masked[1]}",
            )
    v.raise_if_any()
    assert task is not None
    return GenerationRequest(
        model=request.model,
        source=request.source,
        task=task,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width if request.HasField("width") else None,
        height=request.height if request.HasField("height") else None,
        num_inference_steps=request.num_inference_steps if request.HasField("num_inference_steps") else None,
        guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
        strength=request.strength if request.HasField("strength") else None,
        num_images=num_images,
        seed=request.seed if request.HasField("seed") else None,
        image=image,
        mask_image=mask,
        scheduler=request.scheduler,
        preview_interval=request.preview_interval,
        parameters=parameters,
        control_image=control_image,
        adapters=adapters,
    )


def _adapter_weights(request: pb.GenerateRequest, v: Violations) -> tuple[AdapterWeight, ...]:
    """The request's adapters, each named once with a finite weight (the names are the model's to check)."""
    if len(request.adapters) > MAX_ADAPTERS:
        v.add("adapters", f"names {len(request.adapters)} adapters; the limit is {MAX_ADAPTERS}")
        return ()
    seen: set[str] = set()
    for index, adapter in enumerate(request.adapters):
        if not adapter.name:
            v.add(f"adapters[{index}].name", "is empty; name an adapter from Inspect's ModelInfo.adapters")
        elif adapter.name in seen:
            v.add(f"adapters[{index}].name", f"{adapter.name!r} is named twice")
        seen.add(adapter.name)
        if not math.isfinite(adapter.weight):
            v.add(f"adapters[{index}].weight", f"must be a finite number, got {adapter.weight}")
    return tuple(AdapterWeight(adapter.name, adapter.weight) for adapter in request.adapters)


def decode_inputs(request: GenerationRequest) -> tuple[PIL.Image.Image | None, PIL.Image.Image | None]:
    """The request's input image (RGB) and mask (L), decoded: the pixel work `generation_request` defers."""
    image = mask = None
    if request.image is not None:
        image = load_image(request.image, field="image")
    if request.mask_image is not None:
        mask = load_image(request.mask_image, field="mask_image", mode="L")
    return image, mask


def input_pixels(request: GenerationRequest) -> int:
    """Pixels the request's inputs take once decoded."""
    return sum(i.size[0] * i.size[1] for i in (request.image, request.mask_image) if i is not None)


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def queued_event(event: Queued) -> pb.GenerateResponse:
    return pb.GenerateResponse(queued=pb.Queued(position=event.position, queue_depth=event.depth))


def started_event(event: Started) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        started=pb.Started(
            model=event.model,
            pipeline_class=event.pipeline_class,
            total_steps=event.total_steps,
            seeds=list(event.seeds),
            batch_requests=event.batch_requests,
            batch_images=event.batch_images,
            width=event.width,
            height=event.height,
            scheduler=event.scheduler,
        )
    )


def progress_event(event: Progress) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        progress=pb.Progress(step=event.step, total_steps=event.total_steps, elapsed=duration(event.elapsed))
    )


def preview_event(event: Preview, encoded: EncodedImage) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        preview=pb.Preview(
            step=event.step, index=event.index, image=pb.Image(data=encoded.data, mime_type=encoded.mime_type)
        )
    )


def completed_event(
    event: Finished, *, encoding_seconds: float, total_seconds: float, num_images: int | None = None
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        completed=pb.Completed(
            timings=pb.Timings(
                queued=duration(event.queued_seconds),
                running=duration(event.running_seconds),
                encoding=duration(encoding_seconds),
                total=duration(total_seconds),
            ),
            parameters=struct(event.parameters),
            model=event.model,
            pipeline_class=event.pipeline_class,
            num_images=len(event.images) if num_images is None else num_images,
        )
    )


def image_events(
    index: int, seed: int, size: tuple[int, int], encoded: EncodedImage, chunk_bytes: int
) -> Iterator[pb.GenerateResponse]:
    """One `image` event per chunk of the encoded image; every message stays under the size limit."""
    count = chunk_count(encoded.data, chunk_bytes)
    for chunk_index, data in enumerate(chunks(encoded.data, chunk_bytes)):
        yield pb.GenerateResponse(
            image=pb.GeneratedImage(
                index=index,
                seed=seed,
                width=size[0],
                height=size[1],
                image=pb.Image(data=data, mime_type=encoded.mime_type),
                chunk_index=chunk_index,
                chunk_count=count,
            )
        )


def _value(value: Any) -> struct_pb2.Value:
    holder = struct_pb2.Struct()
    holder.update({"v": value})
    return holder.fields["v"]


VALUE_KINDS = {
    ValueKind.NUMBER: pb.VALUE_KIND_NUMBER,
    ValueKind.INTEGER: pb.VALUE_KIND_INTEGER,
    ValueKind.BOOLEAN: pb.VALUE_KIND_BOOLEAN,
    ValueKind.STRING: pb.VALUE_KIND_STRING,
    ValueKind.ARRAY: pb.VALUE_KIND_ARRAY,
    ValueKind.OBJECT: pb.VALUE_KIND_OBJECT,
    ValueKind.ANY: pb.VALUE_KIND_ANY,
}


def _parameter_info(info: ParameterInfo) -> pb.ParameterInfo:
    schema = info.schema
    kind, nullable = value_kind(schema)
    return pb.ParameterInfo(
        name=info.name,
        default_value=_value(info.default) if info.has_default else None,
        schema=struct(schema),
        kind=VALUE_KINDS[kind],
        nullable=nullable,
    )


def task_info(target: TaskPipeline) -> pb.TaskInfo:
    return pb.TaskInfo(
        task=TASKS_TO_WIRE[target.task],
        pipeline_class=target.pipeline_class,
        parameters=[_parameter_info(info) for info in target.accepted.values()],
        schedulers=list(target.schedulers),
        default_scheduler=target.default_scheduler,
        default_width=target.default_size[0],
        default_height=target.default_size[1],
        supports_previews=target.supports_previews,
        size_multiple=target.size_multiple,
        requires_control_image=requires_control_image(target),
        min_size=target.min_size,
        fixed_size=target.fixed_size,
        stages=max(1, len(target.stages)),
    )


def models_info(devices: DevicePool, entries: Sequence[ModelEntry], default_model: str) -> list[pb.ModelInfo]:
    """One ModelInfo per model, from the first device where it is ready, with every device's copy."""
    infos = []
    for entry in entries:
        name = entry.spec.name
        copies = [(r, r.registry.entries[name]) for r in devices.replicas if name in r.registry.entries]
        replica, shown = next(((r, e) for r, e in copies if e.state is ModelState.READY), copies[0])
        info = model_info(
            shown,
            default_model=default_model,
            device=str(replica.device),
            dtype=str(replica.registry.dtype).removeprefix("torch."),
        )
        info.replicas.extend(
            pb.ModelReplica(device=str(r.device), state=STATES[e.state], state_reason=e.reason)
            for r, e in copies
        )
        infos.append(info)
    return infos


def model_info(entry: ModelEntry, *, default_model: str, device: str, dtype: str) -> pb.ModelInfo:
    info = pb.ModelInfo(
        name=entry.spec.name,
        source=entry.spec.source,
        state=STATES[entry.state],
        state_reason=entry.reason,
        is_default=entry.spec.name == default_model,
        on_demand=not entry.pinned,
        loads=entry.loads,
        load_duration=duration(entry.load_seconds),
        device=device,
        dtype=dtype,
    )
    model = entry.model
    # Registered adapters are listed in every state; what each changes is known once it is loaded.
    loaded = model.adapters if model is not None else {}
    info.adapters.extend(
        pb.AdapterInfo(name=adapter.name, components=list(loaded.get(adapter.name, ())))
        for adapter in entry.spec.adapters
    )
    info.controlnet = controlnet_source(model) if model is not None else entry.spec.controlnet
    if model is not None:
        info.family = model.family
        info.checkpoint_class = model.checkpoint_class
        info.parameter_bytes = model.parameter_bytes
        info.device = str(model.device)
        info.dtype = str(model.dtype).removeprefix("torch.")
        info.tasks.extend(task_info(target) for target in model.tasks.values())
        info.variant = model.options.variant
        info.vae_tiling = model.options.vae_tiling
        info.vae_slicing = model.options.vae_slicing
        info.cpu_offload = model.options.cpu_offload
        if model.acceleration is not None:
            info.acceleration.CopyFrom(acceleration_info(model.acceleration))
    return info


def acceleration_info(report: AccelerationReport) -> pb.Acceleration:
    return pb.Acceleration(
        requested=report.requested,
        mode=report.mode,
        compiled_shapes=[
            pb.CompiledShape(
                task=TASKS_TO_WIRE[shape.task],
                width=shape.width,
                height=shape.height,
                batch_images=shape.batch_size,
                denoiser_shape=shape.denoiser_shape,
            )
            for shape in report.compiled_shapes
        ],
        compile_time=duration(report.compile_seconds),
        cache_loaded=report.cache_loaded,
        cache_hits=report.cache_hits,
        cache_misses=report.cache_misses,
        compiled_calls=report.compiled_calls,
        eager_calls=report.eager_calls,
        eager_fallbacks=report.eager_fallbacks,
        error=report.error,
        adapter_calls=report.adapter_calls,
        cudagraph_skips=report.cudagraph_skips,
        padded_calls=report.padded_calls,
        cudagraph_skip_reason=report.cudagraph_skip_reason,
        graphs_loaded=report.graphs_loaded,
        precompile_error=report.precompile_error,
    )


def server_info(settings: Settings, devices: DevicePool) -> pb.ServerInfo:
    limits = settings.limits
    return pb.ServerInfo(
        version=__version__,
        diffusers_version=diffusers.__version__,
        torch_version=torch.__version__,
        device=",".join(str(r.device) for r in devices.replicas),
        default_model=settings.default_model,
        queue_depth=devices.queue_depth,
        running=devices.running,
        devices=[
            pb.DeviceInfo(
                device=str(r.device),
                queue_depth=r.worker.queue_depth,
                running=r.worker.running,
                stats=pb.ServerStats(**dataclasses.asdict(r.worker.stats)),
            )
            for r in devices.replicas
        ],
        batching=pb.Batching(
            max_batch_images=settings.max_batch_size, max_delay=duration(settings.max_batch_delay_ms / 1000)
        ),
        allowed_sources=list(settings.allow_sources),
        memory_budget_bytes=settings.memory_budget,
        stats=pb.ServerStats(**dataclasses.asdict(devices.stats())),
        limits=pb.Limits(
            max_width=limits.max_width,
            max_height=limits.max_height,
            max_num_inference_steps=limits.max_num_inference_steps,
            max_num_images=limits.max_num_images,
            max_prompt_length=limits.max_prompt_length,
            max_parameters=limits.max_parameters,
            max_input_pixels=limits.max_input_pixels,
            max_queue=settings.max_queue,
            max_request_bytes=limits.max_request_bytes,
            image_chunk_bytes=limits.image_chunk_bytes,
            max_inflight_request_bytes=limits.max_inflight_request_bytes,
            max_inflight_pixels=limits.max_inflight_pixels,
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            stream_idle_timeout=duration(settings.stream_idle_timeout),
        ),
    )
