"""Converts between the SDK's types and autopipeline.v1 messages, for `Client` and `AsyncClient` alike."""

from __future__ import annotations

import dataclasses
import enum
import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import Message
from PIL import Image

from autopipeline import _types
from autopipeline._errors import ProtocolError
from autopipeline._types import ImageFormat, ImageInput, Task
from autopipeline.v1 import autopipeline_pb2 as pb

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")
_E = TypeVar("_E", bound=enum.Enum)

# Beyond this, a double no longer holds every integer, so an integral value is not known to be one.
_MAX_EXACT_INTEGER = 2**53


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateCall:
    """The built `GenerateRequest`s of one call (one per prompt) and its own timeout (None: the client's)."""

    requests: tuple[pb.GenerateRequest, ...]
    timeout: float | None


def generate_call(
    prompt: str | Sequence[str] = "",
    *,
    task: Task | str | None = None,
    model: str = "",
    source: str = "",
    negative_prompt: str = "",
    image: ImageInput | None = None,
    mask_image: ImageInput | None = None,
    control_image: ImageInput | None = None,
    adapters: Mapping[str, float] | None = None,
    width: int | None = None,
    height: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    strength: float | None = None,
    num_images: int = 1,
    seed: int | None = None,
    scheduler: str = "",
    output_format: ImageFormat | str = ImageFormat.PNG,
    output_quality: int | None = None,
    preview_interval: int = 0,
    parameters: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> GenerateCall:
    """The arguments of `Client.generate` and its siblings, checked and built into requests.

    A list of prompts becomes one request per prompt; with a ``seed``, prompt k's images take the
    seeds that follow prompt k-1's (image i of the call uses ``seed + i``, as for one prompt).
    Raises `ValueError`/`TypeError` for arguments no request can carry, and `OSError` for an
    image path that cannot be read, before anything is sent.
    """
    prompts = _prompts(prompt)
    fields: dict[str, Any] = {
        "model": model,
        "source": source,
        "task": pb.Task.Value(f"TASK_{infer_task(task, image, mask_image).name}"),
        "negative_prompt": negative_prompt,
        "width": width,
        "height": height,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "strength": strength,
        "num_images": num_images,
        "scheduler": scheduler,
        "output_format": pb.ImageFormat.Value(
            f"IMAGE_FORMAT_{_coerce(ImageFormat, output_format, 'output_format').name}"
        ),
        "output_quality": output_quality,
        "preview_interval": preview_interval,
    }
    base = pb.GenerateRequest()
    for name, value in fields.items():
        _set(base, name, value)
    if image is not None:
        base.image.CopyFrom(encode_image(image))
    if mask_image is not None:
        base.mask_image.CopyFrom(encode_image(mask_image))
    if control_image is not None:
        base.control_image.CopyFrom(encode_image(control_image))
    for name, weight in (adapters or {}).items():
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"adapters must map adapter names to numbers, got {name!r}: {weight!r}")
        base.adapters.append(pb.AdapterWeight(name=name, weight=float(weight)))
    if parameters:
        try:
            base.parameters.update(parameters)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"parameters must hold JSON-like values (str, int, float, bool, None, lists, dicts): {err}"
            ) from err
    requests = []
    for number, text in enumerate(prompts):
        request = pb.GenerateRequest()
        request.CopyFrom(base)
        _set(request, "prompt", text)
        # The wire reads num_images 0 as 1; seeds continue from one prompt's images to the next's.
        _set(request, "seed", None if seed is None else seed + number * max(num_images, 1))
        requests.append(request)
    return GenerateCall(tuple(requests), timeout)


def infer_task(task: Task | str | None, image: object | None, mask_image: object | None) -> Task:
    """``task`` as a `Task`; when None, the task the inputs imply (as diffusers' AutoPipelineFor* do).

    ``image`` and ``mask_image`` imply inpainting, ``image`` alone image-to-image, neither
    text-to-image. A ``mask_image`` without an ``image`` fits no task and raises `ValueError`.
    """
    if mask_image is not None and image is None:
        raise ValueError("mask_image was given without image: inpainting needs both")
    if task is not None:
        return _coerce(Task, task, "task")
    if mask_image is not None:
        return Task.INPAINTING
    return Task.IMAGE_TO_IMAGE if image is not None else Task.TEXT_TO_IMAGE


def _prompts(prompt: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(prompt, str):
        return (prompt,)
    prompts = tuple(prompt)
    if not prompts:
        raise ValueError("prompt is an empty list: give a string, or a list of at least one")
    if not all(isinstance(text, str) for text in prompts):
        raise TypeError("prompt must be a string or a list of strings")
    return prompts


def _set(request: pb.GenerateRequest, name: str, value: Any) -> None:
    # None leaves a field unset: for the `optional` scalars that means "the server decides".
    if value is None:
        return
    try:
        setattr(request, name, value)
    except (TypeError, ValueError) as err:
        # protobuf's own message ("Value out of range: -1") does not say which argument.
        raise type(err)(f"{name}={value!r} cannot be sent: {err}") from err


def inspect_request(model: str | None, source: str | None = None) -> pb.InspectRequest:
    """The `InspectRequest` for one model (or on-demand source), or for all when both are empty."""
    return pb.InspectRequest(model=model or "", source=source or "")


def encode_image(image: ImageInput) -> pb.Image:
    """An input image as a message: PIL images encoded to PNG, bytes as they are, paths read."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return pb.Image(data=buffer.getvalue(), mime_type="image/png")
    if isinstance(image, bytes):
        # The server recognises the format from the bytes; guessing a media type here could only be wrong.
        return pb.Image(data=image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            return pb.Image(data=file.read())
    raise TypeError(f"an image must be a PIL image, bytes or a path, not {type(image).__name__}")


def _coerce(enum_class: type[_E], value: _E | str, argument: str) -> _E:
    try:
        return enum_class(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in enum_class)
        raise ValueError(f"{argument}={value!r} is not one of {choices}") from None


def _enum_from_pb(enum_class: type[_E], names: Any, prefix: str, number: int) -> _E | None:
    """The SDK member for a protobuf enum number (``TASK_INPAINTING`` → ``INPAINTING``), if any."""
    try:
        return enum_class[names.Name(number).removeprefix(prefix)]
    except (KeyError, ValueError):
        # A value from a newer contract, or the UNSPECIFIED zero.
        return None


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _from_value(value: struct_pb2.Value) -> Any:
    """A `google.protobuf.Value` as plain Python; integral numbers become `int`, as they were sent."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _from_struct(value.struct_value)
    if kind == "list_value":
        return [_from_value(item) for item in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        # Struct numbers are doubles; without this, steps and seeds would come back as 30.0.
        return int(number) if number.is_integer() and abs(number) <= _MAX_EXACT_INTEGER else number
    if kind in ("string_value", "bool_value"):
        return getattr(value, kind)
    return None


def _from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _from_value(item) for key, item in struct.fields.items()}


def _from_fields(cls: type[_D], message: Message, **converted: Any) -> _D:
    """``cls`` built from the message's same-named scalar fields; ``converted`` supplies the others."""
    scalars = {
        field.name: getattr(message, field.name)
        for field in dataclasses.fields(cls)
        if field.name not in converted
    }
    return cls(**scalars, **converted)


def _started(message: pb.Started) -> _types.Started:
    return _from_fields(_types.Started, message, seeds=tuple(message.seeds))


def _progress(message: pb.Progress) -> _types.Progress:
    return _from_fields(_types.Progress, message, elapsed=_seconds(message.elapsed))


def _preview(message: pb.Preview) -> _types.Preview:
    return _from_fields(_types.Preview, message, image=_types.decode_image(message.image.data))


def _completed(message: pb.Completed) -> _types.Completed:
    timings = message.timings
    return _from_fields(
        _types.Completed,
        message,
        timings=_types.Timings(
            queued=_seconds(timings.queued),
            running=_seconds(timings.running),
            encoding=_seconds(timings.encoding),
            total=_seconds(timings.total),
        ),
        parameters=_from_struct(message.parameters),
    )


# The events that convert one message to one event; `image` needs reassembly and is handled apart.
_EVENT_CONVERTERS: dict[str, Callable[[Any], _types.Event]] = {
    "queued": lambda message: _from_fields(_types.Queued, message),
    "started": _started,
    "progress": _progress,
    "preview": _preview,
    "completed": _completed,
}


class _ImageAssembler:
    """Joins the chunks of each image: chunks of one image arrive consecutively, in order."""

    def __init__(self) -> None:
        self._first: pb.GeneratedImage | None = None
        self._chunks: list[bytes] = []
        self._done: set[int] = set()

    def add(self, chunk: pb.GeneratedImage) -> _types.GeneratedImage | None:
        """Takes one chunk; returns the image when this was its last chunk."""
        first = self._first
        if first is None:
            if chunk.index in self._done:
                raise ProtocolError(f"image {chunk.index} was sent twice")
            if chunk.chunk_index != 0:
                raise ProtocolError(f"image {chunk.index} began with chunk {chunk.chunk_index}, not 0")
            self._first = first = chunk
        elif chunk.index != first.index:
            raise ProtocolError(
                f"image {chunk.index} began before image {first.index} was complete "
                f"({len(self._chunks)} of {_chunk_count(first)} chunks)"
            )
        elif chunk.chunk_index != len(self._chunks) or chunk.chunk_count != first.chunk_count:
            raise ProtocolError(
                f"image {first.index}: chunk {chunk.chunk_index} of {_chunk_count(chunk)} arrived "
                f"where chunk {len(self._chunks)} of {_chunk_count(first)} was due"
            )
        self._chunks.append(chunk.image.data)
        if len(self._chunks) < _chunk_count(first):
            return None
        data = b"".join(self._chunks)
        self._first, self._chunks = None, []
        self._done.add(first.index)
        return _from_fields(
            _types.GeneratedImage, first, data=data, mime_type=first.image.mime_type, prompt_index=0
        )

    def check_idle(self, reason: str) -> None:
        """Raises `ProtocolError` when an image is incomplete at a point where none may be."""
        if self._first is not None:
            raise ProtocolError(
                f"{reason} while image {self._first.index} was incomplete "
                f"({len(self._chunks)} of {_chunk_count(self._first)} chunks)"
            )


def _chunk_count(chunk: pb.GeneratedImage) -> int:
    # proto3 cannot tell 0 from unset; an image that was not split is one chunk.
    return chunk.chunk_count or 1


class EventReader:
    """Turns the `GenerateResponse`s of one stream into events, checking the stream's rules."""

    def __init__(self) -> None:
        self._images = _ImageAssembler()
        self._completed = False
        # Whether the server has sent anything: from then on the request may have run, so the
        # client must not send it again.
        self.started = False

    def read(self, response: pb.GenerateResponse) -> _types.Event | None:
        """The event a response completes, or None (a chunk of a larger image, an unknown event)."""
        self.started = True
        kind = response.WhichOneof("event")
        if self._completed:
            raise ProtocolError(f"the stream went on after `completed` with `{kind}`")
        if kind == "image":
            return self._images.add(response.image)
        self._images.check_idle(f"a `{kind}` event arrived")
        if kind is None:
            # An event a newer server added: skipping it keeps older clients working.
            return None
        event = _EVENT_CONVERTERS[kind](getattr(response, kind))
        self._completed = isinstance(event, _types.Completed)
        return event

    def close(self) -> None:
        """Checks that the stream, now ended without an error status, ended as the contract says."""
        self._images.check_idle("the stream ended")
        if not self._completed:
            raise ProtocolError("the stream ended without a `completed` event")


class ResultCollector:
    """Gathers one request's events into a `GenerationResult`."""

    def __init__(self, prompt: str) -> None:
        self._prompt = prompt
        self._images: list[_types.GeneratedImage] = []
        self._started: _types.Started | None = None
        self._completed: _types.Completed | None = None

    def add(self, event: _types.Event) -> None:
        """Keeps what the result needs from one event."""
        if isinstance(event, _types.GeneratedImage):
            self._images.append(event)
        elif isinstance(event, _types.Started):
            self._started = event
        elif isinstance(event, _types.Completed):
            self._completed = event

    def result(self) -> _types.GenerationResult:
        """The result; `ProtocolError` when the stream lacked `started` or `completed`, or images."""
        if self._started is None:
            raise ProtocolError("the stream ended without a `started` event")
        if self._completed is None:
            raise ProtocolError("the stream ended without a `completed` event")
        if len(self._images) != self._completed.num_images:
            raise ProtocolError(
                f"`completed` reports {self._completed.num_images} images; "
                f"the stream sent {len(self._images)}"
            )
        outputs = sorted(self._images, key=lambda image: image.index)
        summary = _types.RequestSummary(self._prompt, self._started, self._completed)
        return _types.GenerationResult(outputs=outputs, requests=[summary])


def combine(results: Sequence[_types.GenerationResult]) -> _types.GenerationResult:
    """The results of a call's requests (one per prompt, in order) as one result.

    Each image's `index` becomes its position in the combined `outputs`, and `prompt_index` says
    which request produced it.
    """
    if len(results) == 1:
        return results[0]
    outputs: list[_types.GeneratedImage] = []
    for prompt_index, result in enumerate(results):
        for output in result.outputs:
            outputs.append(dataclasses.replace(output, index=len(outputs), prompt_index=prompt_index))
    return _types.GenerationResult(
        outputs=outputs, requests=[summary for result in results for summary in result.requests]
    )


def server_info(response: pb.InspectResponse) -> _types.ServerInfo:
    """An `InspectResponse` as a `ServerInfo`."""
    return _from_fields(
        _types.ServerInfo,
        response.server,
        limits=_from_fields(_types.Limits, response.server.limits),
        max_batch_images=response.server.batching.max_batch_images or 1,
        max_batch_delay=_seconds(response.server.batching.max_delay),
        allowed_sources=list(response.server.allowed_sources),
        stats=_from_fields(_types.ServerStats, response.server.stats),
        models=[_model_info(model) for model in response.models],
        devices=[
            _from_fields(_types.DeviceInfo, device, stats=_from_fields(_types.ServerStats, device.stats))
            for device in response.server.devices
        ],
    )


def _model_info(message: pb.ModelInfo) -> _types.ModelInfo:
    state = _enum_from_pb(_types.ModelState, pb.ModelState, "MODEL_STATE_", message.state)
    tasks = [_task_info(task) for task in message.tasks]
    return _from_fields(
        _types.ModelInfo,
        message,
        state=state or _types.ModelState.UNKNOWN,
        load_duration=_seconds(message.load_duration),
        replicas=[
            (
                replica.device,
                _enum_from_pb(_types.ModelState, pb.ModelState, "MODEL_STATE_", replica.state)
                or _types.ModelState.UNKNOWN,
            )
            for replica in message.replicas
        ],
        adapters=[
            _types.AdapterInfo(name=adapter.name, components=list(adapter.components))
            for adapter in message.adapters
        ],
        # A task from a newer contract cannot be requested through this SDK, so it is left out.
        tasks=[task for task in tasks if task is not None],
    )


def _task_info(message: pb.TaskInfo) -> _types.TaskInfo | None:
    task = _enum_from_pb(Task, pb.Task, "TASK_", message.task)
    if task is None:
        return None
    return _from_fields(
        _types.TaskInfo,
        message,
        task=task,
        parameters=[_parameter_info(parameter) for parameter in message.parameters],
        schedulers=list(message.schedulers),
    )


def _parameter_info(message: pb.ParameterInfo) -> _types.ParameterInfo:
    has_default = message.HasField("default_value")
    kind = pb.ValueKind.Name(message.kind).removeprefix("VALUE_KIND_").lower() if message.kind else "any"
    return _from_fields(
        _types.ParameterInfo,
        message,
        default=_from_value(message.default_value) if has_default else None,
        has_default=has_default,
        schema=_from_struct(message.schema),
        kind=kind,
    )
