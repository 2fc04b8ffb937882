"""The diffusers layer: resolve a checkpoint's family and task classes, load it once, warm and describe it."""

from __future__ import annotations

import inspect
import logging
import time
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from diffusers.pipelines import auto_pipeline
from diffusers.utils.import_utils import DummyObject

from autopipeline_server.arguments import ParameterInfo, call_parameters
from autopipeline_server.domain import Task
from autopipeline_server.errors import ModelFailed, TaskNotSupported
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
    base: Any
    tasks: dict[Task, TaskPipeline] = field(default_factory=dict)

    def to(self, device: torch.device) -> None:
        """Moves the shared modules (every task pipeline's) to `device`."""
        self.base.to(device)
        self.device = device

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
    compatibles = {
        cls.__name__: cls
        for cls in [type(scheduler), *getattr(scheduler, "compatibles", [])]
        if _usable(cls, scheduler.config)
    }
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


def _usable(cls: type[Any], config: Any) -> bool:
    """Whether a compatible scheduler can be built here, so Inspect advertises only those that run.

    Not when diffusers stands in a dummy for it (its optional dependency, scipy or torchsde, is
    missing), nor when building it fails (KDPM2 schedulers with some numpy/torch pairs).
    """
    if isinstance(cls, DummyObject):
        log.info("not offering %s: its optional dependency is not installed", cls.__name__)
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls.from_config(config)
    except Exception as err:
        log.warning(
            "not offering %s: it cannot be built here (%s: %s)", cls.__name__, type(err).__name__, err
        )
        return False
    return True


def _alias_text_models(pipe: Any) -> None:
    """Lets diffusers reach CLIP text encoders as `text_encoder.text_model`, as before transformers 5.

    transformers 5 flattened `CLIPTextModel` (its layers are the model's own), but diffusers 0.42
    still reads `text_encoder.text_model.final_layer_norm` for `clip_skip` and
    `text_model.encoder.layers` for a LoRA `scale`. The alias is a plain attribute, not a
    submodule, so weights, `state_dict` and `.to()` are unaffected.
    """
    for component in pipe.components.values():
        if (
            isinstance(component, torch.nn.Module)
            and not hasattr(component, "text_model")
            and hasattr(component, "final_layer_norm")
            and hasattr(component, "encoder")
        ):
            object.__setattr__(component, "text_model", component)


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


def load_model(spec: ModelSpec, *, dtype: torch.dtype, allow_pickle: bool) -> LoadedModel:
    """Loads a checkpoint once through AutoPipeline and derives its other tasks with `from_pipe`.

    Reads (and, for a hub id, downloads) the weights into host memory; it does not touch the
    device, so it runs off the device thread. `LoadedModel.to` moves it there.
    """
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
    base.set_progress_bar_config(disable=True)
    _alias_text_models(base)
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
        device=base.device,
        dtype=dtype,
        parameter_bytes=_parameter_bytes(base),
        scheduler_config=base.scheduler.config,
        base=base,
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
