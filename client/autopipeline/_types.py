"""The SDK's public value types: tasks and formats, stream events, results and server descriptions."""

from __future__ import annotations

import enum
import io
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeAlias

from PIL import Image, UnidentifiedImageError

from autopipeline._errors import ProtocolError

__all__ = [
    "AdapterInfo",
    "Completed",
    "Event",
    "GeneratedImage",
    "GenerationResult",
    "ImageFormat",
    "ImageInput",
    "Limits",
    "ModelInfo",
    "ModelState",
    "ParameterInfo",
    "Preview",
    "Progress",
    "Queued",
    "RequestSummary",
    "ServerInfo",
    "Started",
    "Task",
    "TaskInfo",
    "Timings",
]

ImageInput: TypeAlias = Image.Image | bytes | str | os.PathLike[str]
"""An input image: a PIL image (sent as PNG), encoded bytes, or the path of an image file."""


class Task(str, enum.Enum):
    """What a caller asks a model to do; the string values are accepted wherever a `Task` is.

    Example:
        >>> Task("image-to-image") is Task.IMAGE_TO_IMAGE
        True
    """

    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    INPAINTING = "inpainting"

    def __str__(self) -> str:
        return self.value


class ImageFormat(str, enum.Enum):
    """The encoding of returned images.

    Example:
        >>> ImageFormat("webp").mime_type
        'image/webp'
    """

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    def __str__(self) -> str:
        return self.value

    @property
    def mime_type(self) -> str:
        """The media type of this format, e.g. ``"image/png"``."""
        return f"image/{self.value}"


class ModelState(str, enum.Enum):
    """The lifecycle state of a served model; ``UNKNOWN`` stands for a state this SDK does not know.

    Example:
        >>> ModelState.READY.value
        'ready'
    """

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    EVICTED = "evicted"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


def decode_image(data: bytes) -> Image.Image:
    """Decodes image bytes the server sent; undecodable bytes break the contract."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ProtocolError(f"the server sent image bytes that cannot be decoded: {err}") from err
    return image


@dataclass(frozen=True, slots=True)
class Queued:
    """The request is waiting in the server's queue.

    Example:
        >>> Queued(position=0, queue_depth=3).position  # runs next
        0
    """

    position: int
    """0-based position, as on the wire: 0 means the request runs next. (The ``autopipeline`` CLI
    shows it 1-based, as "position 1 of 3".)"""
    queue_depth: int
    """Requests waiting in the queue, this one included."""


@dataclass(frozen=True, slots=True)
class Started:
    """The pipeline call for the request has begun denoising.

    Example:
        >>> result = client.generate("a red cube", num_images=2, seed=7)
        >>> result.started.pipeline_class, result.started.total_steps, result.started.seeds
        ('StableDiffusionXLPipeline', 30, (7, 8))
    """

    model: str
    """The served model name."""
    pipeline_class: str
    """The diffusers pipeline class running the call, e.g. ``"StableDiffusionXLPipeline"``."""
    total_steps: int
    """Denoising steps this call runs (after ``strength`` is applied)."""
    seeds: tuple[int, ...]
    """The seed of each image, in order."""
    batch_requests: int
    """How many requests share this pipeline call (1 without batching)."""
    width: int
    """Output width in pixels."""
    height: int
    """Output height in pixels."""
    scheduler: str
    """The scheduler class in use."""
    batch_images: int
    """How many images this pipeline call makes for all the requests sharing it."""


@dataclass(frozen=True, slots=True)
class Progress:
    """A denoising step finished.

    Example:
        >>> Progress(step=5, total_steps=20, elapsed=1.25).step
        5
    """

    step: int
    """Steps finished, 1 .. ``total_steps``."""
    total_steps: int
    """Denoising steps this call runs."""
    elapsed: float
    """Seconds since the call started denoising."""


@dataclass(frozen=True, slots=True)
class Preview:
    """A small preview (at most 256 pixels on the longer side) of an image being generated.

    Example:
        >>> for event in client.stream("a red cube", preview_interval=5):
        ...     if isinstance(event, Preview):
        ...         event.image.save(f"preview-{event.step}.png")
    """

    step: int
    """The step after which the preview was taken."""
    index: int
    """The index of the image previewed."""
    image: Image.Image
    """The decoded preview."""


@dataclass(frozen=True)
class GeneratedImage:
    """A finished image: the encoded bytes the server sent, its seed and index, and the decoded `image`.

    `GenerationResult.images` holds the decoded PIL images, as a diffusers pipeline returns them;
    `GenerationResult.outputs` holds these, one per image, in the same order.

    Example:
        >>> result = client.generate("a red cube", seed=7)
        >>> output = result.outputs[0]
        >>> output.seed, output.mime_type, output.image.size
        (7, 'image/png', (1024, 1024))
        >>> output.save("cube.png")  # the received PNG bytes, unchanged
        >>> output.save("cube.jpg")  # re-encoded to JPEG by PIL
    """

    index: int
    """0-based position of the image among those of the call (`GenerationResult.outputs[index]`);
    for one prompt, the image's index within its request."""
    seed: int
    """The seed that produced this image."""
    width: int
    """Width in pixels."""
    height: int
    """Height in pixels."""
    data: bytes = field(repr=False)
    """The encoded image exactly as the server sent it (PNG, JPEG or WebP, as requested)."""
    mime_type: str
    """The media type of `data`, e.g. ``"image/png"``."""
    prompt_index: int = 0
    """Which prompt produced the image, when `Client.generate` was given a list of prompts."""

    @cached_property
    def image(self) -> Image.Image:
        """The image decoded with PIL (decoded once, on first access)."""
        return decode_image(self.data)

    @property
    def format(self) -> str:
        """PIL's name for the format of `data`: ``"PNG"``, ``"JPEG"`` or ``"WEBP"``."""
        by_mime_type = {mime_type: name for name, mime_type in Image.MIME.items()}
        return by_mime_type.get(self.mime_type) or self.image.format or ""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the image to ``path``, in the format that the path's extension names.

        When the extension names the format the server sent (``.png`` for PNG, ``.jpg`` or
        ``.jpeg`` for JPEG, ``.webp`` for WebP), `data` is written unchanged. Otherwise the image
        is re-encoded with PIL to the extension's format, at PIL's default settings: a PNG saved
        as ``cube.jpg`` becomes a real JPEG (lossy; transparency dropped), never PNG bytes under a
        ``.jpg`` name. A path without an extension PIL can write raises `ValueError`, and nothing
        is written.

        Example:
            >>> output.save("cube.webp")
        """
        target = _format_for_path(path)
        if target == self.format:
            with open(path, "wb") as file:
                file.write(self.data)
            return
        image = self.image
        if target == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
        image.save(path, format=target)


def _format_for_path(path: str | os.PathLike[str]) -> str:
    """The PIL format an output path's extension names; `ValueError` when PIL cannot write one."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    name = Image.registered_extensions().get(extension)
    if name is None or name not in Image.SAVE:
        raise ValueError(
            f"cannot tell which image format to write to {os.fspath(path)!r} from its extension; "
            "use one such as .png, .jpg or .webp"
        )
    return name


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds a request spent, by phase.

    Example:
        >>> result.timings.total
        0.84
    """

    queued: float
    """Waiting in the queue."""
    running: float
    """Running the pipeline call (including batch companions)."""
    encoding: float
    """Encoding the output images."""
    total: float
    """From arrival to completion."""


@dataclass(frozen=True, slots=True)
class Completed:
    """The request finished; the last event of a stream.

    Example:
        >>> completed.parameters["num_inference_steps"]
        30
    """

    timings: Timings
    """Time spent, by phase."""
    parameters: dict[str, Any]
    """Every argument the pipeline was called with, as resolved by the server (integral numbers as `int`)."""
    model: str
    """The served model name."""
    pipeline_class: str
    """The diffusers pipeline class that ran the call."""
    num_images: int
    """The number of images sent."""


Event: TypeAlias = Queued | Started | Progress | Preview | GeneratedImage | Completed
"""One event of a generation stream, in the order the server sends them."""


@dataclass(frozen=True, slots=True)
class RequestSummary:
    """What the server reported about one request of a call: its prompt, `Started` and `Completed`.

    Example:
        >>> [summary.prompt for summary in client.generate(["a cat", "a dog"]).requests]
        ['a cat', 'a dog']
    """

    prompt: str
    """The request's prompt."""
    started: Started
    """The `Started` event: pipeline class, steps, seeds, size and scheduler."""
    completed: Completed
    """The `Completed` event: timings and resolved parameters."""


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """Everything a finished generation returned, shaped like a diffusers pipeline's output.

    ``result.images[i]`` is a `PIL.Image.Image`, as ``pipe(...).images[i]`` is in diffusers;
    ``result.outputs[i]`` is the same image as a `GeneratedImage` (seed, index, the encoded bytes).
    Given a list of prompts, images come prompt by prompt: ``num_images`` for the first prompt,
    then for the second, and so on (diffusers' ``num_images_per_prompt`` order).

    Example:
        >>> result = client.generate("a red cube", num_images=2, seed=7)
        >>> result.images[0].size
        (1024, 1024)
        >>> result.seeds
        (7, 8)
        >>> result.outputs[1].save("cube-1.png")
    """

    outputs: list[GeneratedImage]
    """The images with their seeds and encoded bytes, in order."""
    requests: list[RequestSummary]
    """One summary per request: one per prompt, in order."""

    @property
    def images(self) -> list[Image.Image]:
        """The images decoded with PIL, in order (each decoded once, on first access)."""
        return [output.image for output in self.outputs]

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed of each image, in order."""
        return tuple(output.seed for output in self.outputs)

    @property
    def started(self) -> Started:
        """The `Started` event (of the first prompt's request; `requests` has each)."""
        return self.requests[0].started

    @property
    def completed(self) -> Completed:
        """The `Completed` event (of the first prompt's request; `requests` has each)."""
        return self.requests[0].completed

    @property
    def timings(self) -> Timings:
        """Seconds spent, by phase (by the first prompt's request; `requests` has each)."""
        return self.completed.timings

    @property
    def parameters(self) -> dict[str, Any]:
        """Every argument the pipeline was called with, as resolved by the server (first request)."""
        return self.completed.parameters


@dataclass(frozen=True, slots=True)
class ServerStats:
    """What the server has done since it started.

    Example:
        >>> stats = client.inspect().stats
        >>> stats.completed, stats.rejected_queue_full, stats.batched_calls
        (1200, 3, 310)
    """

    submitted: int
    """Generate requests accepted into the queue."""
    completed: int
    """Requests that finished."""
    failed: int
    """Requests whose pipeline call failed."""
    cancelled_queued: int
    """Requests dropped from the queue because their caller went away."""
    cancelled_running: int
    """Requests stopped while running (caller gone, or shutdown)."""
    rejected_queue_full: int
    """Requests refused because the queue was full."""
    rejected_draining: int
    """Requests refused because the server was draining."""
    pipeline_calls: int
    """Pipeline calls run on the device."""
    batched_calls: int
    """Pipeline calls that served more than one request."""
    largest_batch_images: int
    """The most images one pipeline call has produced."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits on requests, set by the server's operator.

    Example:
        >>> info = client.inspect()
        >>> info.limits.max_width
        2048
    """

    max_width: int
    """Maximum output width in pixels."""
    max_height: int
    """Maximum output height in pixels."""
    max_num_inference_steps: int
    """Maximum ``num_inference_steps``."""
    max_num_images: int
    """Maximum ``num_images``."""
    max_prompt_length: int
    """Maximum length of ``prompt`` and ``negative_prompt``, in characters."""
    max_parameters: int
    """Maximum number of entries in ``parameters``."""
    max_input_pixels: int
    """Maximum pixels (width * height) of an input image or mask."""
    max_queue: int
    """Maximum requests waiting in the queue; more are rejected with `ResourceExhaustedError`."""
    max_request_bytes: int
    """Maximum size of an encoded request in bytes."""
    image_chunk_bytes: int
    """Maximum bytes of image data in one response message."""


@dataclass(frozen=True, slots=True)
class ParameterInfo:
    """One extra argument a pipeline accepts through ``parameters``.

    Example:
        >>> [p.name for p in task_info.parameters]
        ['eta', 'guidance_rescale', ...]
    """

    name: str
    """The argument name."""
    default: Any
    """Its default value (``None`` when it has none that JSON can express)."""
    has_default: bool
    """Whether `default` is the real default."""
    schema: dict[str, Any]
    """The JSON values accepted, as a JSON Schema fragment (``{}`` accepts anything)."""
    kind: str
    """The JSON kind of a non-null value: ``"number"``, ``"integer"``, ``"boolean"``, ``"string"``,
    ``"array"``, ``"object"``, or ``"any"`` when several are accepted."""
    nullable: bool
    """Whether ``None`` is accepted."""


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """How a model performs one task.

    Example:
        >>> model.tasks[0].task, model.tasks[0].pipeline_class
        (<Task.TEXT_TO_IMAGE: 'text-to-image'>, 'StableDiffusionXLPipeline')
    """

    task: Task
    """The task."""
    pipeline_class: str
    """The diffusers pipeline class for this task."""
    parameters: list[ParameterInfo]
    """The arguments ``parameters`` accepts for this task."""
    schedulers: list[str]
    """Scheduler class names accepted by ``scheduler``."""
    default_scheduler: str
    """The model's own scheduler class."""
    default_width: int
    """Output width used when a text-to-image request sets none."""
    default_height: int
    """Output height used when a text-to-image request sets none."""
    supports_previews: bool
    """Whether ``preview_interval`` is supported."""
    size_multiple: int
    """Output width and height must be multiples of this (8 for SD, 16 for Flux/SD3, 64 for Kandinsky)."""
    requires_control_image: bool
    """Whether the task runs a ControlNet pipeline, so requests must pass ``control_image``."""
    min_size: int = 0
    """The smallest output width and height the model runs at."""
    fixed_size: bool = False
    """Whether the pipeline returns only ``default_width`` x ``default_height`` (DeepFloyd IF
    image-to-image and inpainting)."""
    stages: int = 1
    """Denoising stages (2 for combined prior + decoder pipelines); ``Started.total_steps`` counts all."""


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A LoRA adapter the operator registered for a model; requests apply it with ``adapters=``.

    Example:
        >>> [(a.name, a.components) for a in model.adapters]
        [('watercolor', ['unet'])]
    """

    name: str
    """The name requests use."""
    components: list[str]
    """The model components it changes, e.g. ``"unet"`` or ``"text_encoder"``."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device of the server, with its own queue and copy of every model.

    Example:
        >>> [(d.device, d.queue_depth) for d in client.inspect().devices]
        [('cuda:0', 0), ('cuda:1', 2)]
    """

    device: str
    """The device, e.g. ``"cuda:1"``."""
    queue_depth: int
    """Requests waiting for this device."""
    running: int
    """Requests running on this device now."""
    stats: ServerStats
    """This device's counters since the server started."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model.

    Example:
        >>> [(m.name, m.state) for m in client.inspect().models]
        [('sdxl', <ModelState.READY: 'ready'>)]
    """

    name: str
    """The name requests use."""
    source: str
    """Where the weights came from: a local directory or a hub id."""
    family: str
    """The AutoPipeline family, e.g. ``"stable-diffusion-xl"``."""
    state: ModelState
    """The lifecycle state."""
    state_reason: str
    """Why the model is in its state (the load error when failed)."""
    dtype: str
    """The weights' dtype, e.g. ``"float16"``."""
    device: str
    """The device the model lives on."""
    parameter_bytes: int
    """Bytes of parameters held by the model's modules."""
    is_default: bool
    """Whether requests that name no model use this one."""
    checkpoint_class: str
    """The checkpoint's own pipeline class (``model_index.json`` ``_class_name``)."""
    tasks: list[TaskInfo]
    """The tasks the model can perform (those this SDK knows), in `Task` order."""
    on_demand: bool
    """Whether it was loaded on demand from a request's ``source`` (it may then be evicted)."""
    loads: int
    """How many times the weights were loaded since the server started."""
    load_duration: float
    """Seconds the last load took, warm-up included."""
    replicas: list[tuple[str, ModelState]]
    """``(device, state)`` of the model's copy on each device; ``device`` above is the first
    device where it is ready."""
    controlnet: str
    """Where the model's ControlNet comes from (its tasks then need ``control_image``); empty: none."""
    adapters: list[AdapterInfo]
    """The LoRA adapters requests may apply by name (``adapters={"name": weight}``)."""
    variant: str = ""
    """The weights variant loaded (e.g. ``"fp16"``); empty: the default weights."""
    vae_tiling: bool = False
    """Whether the VAE decodes in tiles."""
    vae_slicing: bool = False
    """Whether the VAE decodes one image at a time."""
    cpu_offload: bool = False
    """Whether model CPU offload is in force (only with an accelerator)."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server, its software, limits and models, as `Client.inspect` returns them.

    Example:
        >>> info = client.inspect()
        >>> info.device, info.default_model, [m.name for m in info.models]
        ('cuda:0', 'sdxl', ['sdxl'])
    """

    version: str
    """autopipeline-grpc version."""
    diffusers_version: str
    """diffusers version."""
    torch_version: str
    """torch version."""
    device: str
    """The device pipelines run on, e.g. ``"cuda:0"`` or ``"cpu"``."""
    default_model: str
    """The name of the model used when a request names none."""
    queue_depth: int
    """Requests waiting in the queue now."""
    running: int
    """Requests running on the device now."""
    limits: Limits
    """The limits requests must respect."""
    max_batch_images: int
    """Images one batched pipeline call may hold; 1 means the server does not batch."""
    max_batch_delay: float
    """Seconds the first request of a batch may wait for compatible company."""
    allowed_sources: list[str]
    """Glob patterns of sources (hub ids, absolute paths) requests may name to load on demand."""
    memory_budget_bytes: int
    """Parameter bytes on-demand models may hold together; 0 means no budget."""
    stats: ServerStats
    """Counters since the server started."""
    models: list[ModelInfo]
    """The models asked for: every model, or the one named."""
    devices: list[DeviceInfo]
    """Each device the server runs pipelines on; the queue and counters above add them up."""
