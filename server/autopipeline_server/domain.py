"""Domain objects shared by the servicer, the runtime and the pipeline layer; no gRPC or torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import PIL.Image


class Task(Enum):
    """What a caller asks a model to do."""

    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    INPAINTING = "inpainting"


class ModelState(Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    EVICTED = "evicted"


@dataclass(frozen=True)
class AdapterWeight:
    """A LoRA adapter a request applies, by its registered name, and its weight."""

    name: str
    weight: float


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, before it is resolved against a model's pipeline."""

    model: str
    task: Task
    prompt: str
    # An on-demand checkpoint (hub id or absolute path) instead of a configured `model`.
    source: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    strength: float | None = None
    num_images: int = 1
    seed: int | None = None
    image: PIL.Image.Image | None = None
    mask_image: PIL.Image.Image | None = None
    scheduler: str = ""
    preview_interval: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)
    # The ControlNet conditioning image (controlnet.py), and LoRA adapters to apply (adapters.py).
    control_image: PIL.Image.Image | None = None
    adapters: tuple[AdapterWeight, ...] = ()


@dataclass(frozen=True)
class Queued:
    position: int
    depth: int


@dataclass(frozen=True)
class Started:
    model: str
    pipeline_class: str
    total_steps: int
    seeds: tuple[int, ...]
    # Requests sharing the pipeline call, and the images it makes for all of them.
    batch_requests: int
    batch_images: int
    width: int
    height: int
    scheduler: str


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    elapsed: float


@dataclass(frozen=True)
class Preview:
    step: int
    index: int
    image: PIL.Image.Image


@dataclass(frozen=True)
class Finished:
    """The pipeline call returned: the images, in seed order, and what was resolved."""

    model: str
    pipeline_class: str
    images: tuple[PIL.Image.Image, ...]
    seeds: tuple[int, ...]
    parameters: dict[str, Any]
    queued_seconds: float
    running_seconds: float


Event = Queued | Started | Progress | Preview | Finished
