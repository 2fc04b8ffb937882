"""The diffusers layer: resolve a checkpoint's family and task classes, load it once, warm and describe it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import time
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from diffusers.hooks import group_offloading
from diffusers.pipelines import auto_pipeline
from diffusers.utils.import_utils import DummyObject

from autopipeline_server import previews
from autopipeline_server.arguments import ParameterInfo, call_parameters
from autopipeline_server.controlnet import load_controlnet
from autopipeline_server.domain import Task
from autopipeline_server.errors import ModelFailed, TaskNotSupported
from autopipeline_server.settings import ModelSpec

if TYPE_CHECKING:
    from autopipeline_server.acceleration import AccelerationReport

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
# The decoders of combined pipelines (Kandinsky), per task: a decoder checkpoint's own class is here.
DECODER_MAPPINGS: dict[Task, Mapping[str, type[Any]]] = {
    Task.TEXT_TO_IMAGE: auto_pipeline._AUTO_TEXT2IMAGE_DECODER_PIPELINES_MAPPING,
    Task.IMAGE_TO_IMAGE: auto_pipeline._AUTO_IMAGE2IMAGE_DECODER_PIPELINES_MAPPING,
    Task.INPAINTING: auto_pipeline._AUTO_INPAINT_DECODER_PIPELINES_MAPPING,
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


def own_task(checkpoint_class: str, classes: Mapping[Task, type[Any]]) -> Task:
    """The task a checkpoint class was saved for (a Kandinsky 2.2 inpainting decoder: inpainting)."""
    for task, cls in classes.items():
        decoder = DECODER_MAPPINGS[task].get(family_of(checkpoint_class) or "")
        if checkpoint_class in (cls.__name__, getattr(decoder, "__name__", None)):
            return task
    return next(iter(classes))


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
    # The smallest width/height the family runs at (a multiple of size_multiple).
    min_size: int = 8
    # The pipeline returns only default_size, whatever it is given (DeepFloyd IF image-to-image, inpainting).
    fixed_size: bool = False
    # A combined pipeline's inner pipelines in the order they run (Kandinsky: prior, decoder); () otherwise.
    stages: tuple[Any, ...] = ()

    @property
    def pipeline_class(self) -> str:
        return type(self.pipe).__name__

    def default_of(self, name: str) -> Any:
        parameter = self.named_arguments.get(name)
        return None if parameter is None or parameter.default is parameter.empty else parameter.default


@dataclass(frozen=True)
class LoadOptions:
    """The per-model load options in force (ModelSpec asks; this says what was applied)."""

    variant: str = ""
    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: bool = False


def apply_memory_options(pipe: Any, spec: ModelSpec) -> LoadOptions:
    """VAE tiling/slicing as the model spec asks, where the pipeline's autoencoder supports them."""
    vae: Any = getattr(pipe, "vae", None)
    tiling = bool(spec.vae_tiling and hasattr(vae, "enable_tiling"))
    slicing = bool(spec.vae_slicing and hasattr(vae, "enable_slicing"))
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    for name, asked, done in (
        ("vae_tiling", spec.vae_tiling, tiling),
        ("vae_slicing", spec.vae_slicing, slicing),
    ):
        if asked and not done:
            log.warning(
                "%s: %s asked for, but %s has no VAE that supports it", spec.name, name, type(pipe).__name__
            )
    return LoadOptions(variant=spec.variant, vae_tiling=tiling, vae_slicing=slicing)


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
    options: LoadOptions = field(default_factory=LoadOptions)
    # Set by acceleration.accelerate once the model is loaded (None: not applied).
    acceleration: AccelerationReport | None = None
    # LoRA adapters loaded by adapters.load_adapters: name -> the components each changes.
    adapters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Schedulers built once by `new_scheduler`, by role and class; each call gets a copy.
    _scheduler_prototypes: dict[tuple[str, type[Any]], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def new_scheduler(self, cls: type[Any], *, role: str = "denoiser", config: Any = None) -> Any:
        """A fresh scheduler of `cls` for one call, configured from `config` (by default the
        checkpoint's scheduler config; `role` names another, e.g. a prior's).

        It is a copy of one built by `from_config` the first time: `from_config` inspects the
        signature of every compatible scheduler class (measured: 0.42 ms per call on CPU, against
        0.06 ms for the copy). Device thread only.
        """
        key = (role, cls)
        prototype = self._scheduler_prototypes.get(key)
        if prototype is None:
            prototype = cls.from_config(self.scheduler_config if config is None else config)
            self._scheduler_prototypes[key] = prototype
        return copy.deepcopy(prototype)

    def to(self, device: torch.device) -> None:
        """Moves the shared modules (every task pipeline's) to `device`, or offloads them to it.

        Model CPU offload keeps each module on the host until it runs; it needs an accelerator,
        so on a CPU device the request is logged and ignored (Inspect shows it off).
        """
        if self.spec.cpu_offload and device.type != "cpu":
            self.base.enable_model_cpu_offload(device=device)
            self.options = dataclasses.replace(self.options, cpu_offload=True)
        else:
            if self.spec.cpu_offload:
                log.warning(
                    "%s: cpu_offload needs an accelerator; the model runs on %s", self.spec.name, device
                )
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


def resolve_devices(devices: str) -> list[torch.device]:
    """The devices a `--device` setting names: a comma-separated list, or all CUDA devices for "all"."""
    if devices.strip() == "all":
        count = torch.cuda.device_count()
        return [torch.device(f"cuda:{i}") for i in range(count)] or [resolve_device("auto")]
    return [resolve_device(d.strip()) for d in devices.split(",")]


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


# ------------------------------------------------------------------------------------- capabilities
# What a family can do is read from the loaded pipeline's own modules and attributes, never from a
# table of family names: the autoencoder (vae, movq or none), latent packing and patching, sample sizes.


def _autoencoder(pipe: Any) -> Any:
    """The module that maps latents to pixels: `vae`, Kandinsky's `movq`, or None (pixel-space, e.g. IF)."""
    return getattr(pipe, "vae", None) or getattr(pipe, "movq", None)


def _denoiser(pipe: Any) -> Any:
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def _latent_channels(pipe: Any) -> int | None:
    autoencoder = _autoencoder(pipe)
    if autoencoder is None:
        return None
    channels = getattr(autoencoder.config, "latent_channels", None)
    return int(channels) if channels is not None else None


def _patch_factor(pipe: Any) -> int:
    """Latent pixels per token side: 2 when the pipeline packs 2x2 latents (Flux, Flux.2, Qwen-Image: their
    `transformer.config.patch_size` does not show it), else the transformer's patch (`all_patch_size` for
    Z-Image), else 1."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    patch = getattr(config, "patch_size", None)
    if patch is None:
        patch = getattr(config, "all_patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0] if patch else None
    patch = int(patch) if isinstance(patch, int) and patch > 0 else 1
    packs = 2 if hasattr(pipe, "_pack_latents") else 1
    return max(patch, packs)


def size_multiple_of(pipe: Any) -> int:
    """The multiple width and height must be for `pipe` to return exactly the size it was asked for."""
    movq = getattr(pipe, "movq", None)
    if movq is not None:
        # Kandinsky's downscale_height_and_width rounds the latent side up to a multiple of the MoVQ
        # factor, so only multiples of factor**2 come back unchanged (72 -> 128 with factor 8).
        factor = 2 ** (len(movq.config.block_out_channels) - 1)
        return int(factor * factor)
    if getattr(pipe, "vae", None) is None:
        # Pixel-space (DeepFloyd IF): the UNet halves the image once per down block after the first.
        denoiser = _denoiser(pipe)
        blocks = len(getattr(getattr(denoiser, "config", None), "down_block_types", ()) or ())
        return int(2 ** max(blocks - 1, 0))
    return int(getattr(pipe, "vae_scale_factor", 8) or 8) * _patch_factor(pipe)


def _pixel_scale(pipe: Any) -> int:
    """Image pixels per latent pixel (1 for pixel-space pipelines)."""
    if getattr(pipe, "movq", None) is not None:
        return int(2 ** (len(pipe.movq.config.block_out_channels) - 1))
    if getattr(pipe, "vae", None) is None:
        return 1
    return int(getattr(pipe, "vae_scale_factor", 8) or 8)


def default_size_of(pipe: Any, named: Mapping[str, inspect.Parameter], multiple: int) -> tuple[int, int]:
    """The size the pipeline itself uses when given none: its signature's default (Kandinsky: 512),
    its `default_sample_size` (Flux, Qwen-Image, SDXL, SD3), or the denoiser's sample size, each in
    pixels; 1024 for pipelines that hard-code it (Z-Image)."""
    height, width = named.get("height"), named.get("width")
    if (
        height is not None
        and width is not None
        and isinstance(height.default, int)
        and isinstance(width.default, int)
    ):
        size = (int(width.default), int(height.default))
    else:
        scale = _pixel_scale(pipe)
        sample = getattr(pipe, "default_sample_size", None)
        if not isinstance(sample, int):
            sample = getattr(getattr(_denoiser(pipe), "config", None), "sample_size", None)
        if isinstance(sample, (list, tuple)):
            size = (int(sample[1]) * scale, int(sample[0]) * scale)
        elif isinstance(sample, int):
            size = (sample * scale, sample * scale)
        else:
            size = (1024, 1024)
    return (max(multiple, size[0] // multiple * multiple), max(multiple, size[1] // multiple * multiple))


def _returns_native_size(pipe: Any, named: Mapping[str, inspect.Parameter]) -> bool:
    """A pixel-space pipeline without height/width resizes its input to the UNet's sample size (IF
    image-to-image and inpainting), so that is the only size it returns."""
    return _autoencoder(pipe) is None and not ("height" in named and "width" in named)


def _unet_needs_mask_channels(pipe: Any) -> bool:
    """A UNet whose input takes latents, mask and masked image (2 * latent + 1 channels)."""
    unet, latent = getattr(pipe, "unet", None), _latent_channels(pipe)
    if unet is None or latent is None:
        return False
    return int(unet.config.in_channels) == 2 * latent + 1


def runnable_tasks(base: Any, classes: Mapping[Task, type[Any]]) -> list[Task]:
    """The tasks of `classes` this checkpoint can run.

    A UNet with mask channels (SD inpainting, Kandinsky 2.2 inpainting decoders) runs only inpainting.
    Otherwise every task runs, except inpainting through MoVQ decoders (Kandinsky 2.1/2.2): they
    always concatenate mask and masked image, so a plain UNet cannot inpaint (SD/SDXL inpainting
    pipelines blend latents for a plain UNet instead).
    """
    if _unet_needs_mask_channels(base):
        return [Task.INPAINTING] if Task.INPAINTING in classes else []
    tasks = list(classes)
    if getattr(base, "movq", None) is not None and getattr(base, "unet", None) is not None:
        tasks = [task for task in tasks if task is not Task.INPAINTING]
    return tasks


def _stages(pipe: Any) -> tuple[Any, ...]:
    """The inner pipelines a combined pipeline runs, in order (its own progress bar is never driven)."""
    stages = tuple(getattr(pipe, name, None) for name in ("prior_pipe", "decoder_pipe"))
    return stages if all(stage is not None for stage in stages) else ()


def _task_pipeline(task: Task, pipe: Any) -> TaskPipeline:
    named, accepted = call_parameters(type(pipe))
    stages = _stages(pipe)
    # A combined pipeline's sizes are its decoder's.
    sized = stages[-1] if stages else pipe
    multiple = size_multiple_of(sized)
    default = default_size_of(sized, named, multiple)
    fixed = _returns_native_size(sized, named)
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
        default_size=default,
        size_multiple=multiple,
        supports_previews=previews.can_preview(pipe, named),
        min_size=max(multiple, 8),
        fixed_size=fixed,
        stages=stages,
    )


def _usable(cls: type[Any], config: Any) -> bool:
    """Whether a compatible scheduler can be built here, so Inspect advertises only those that run.

    Not when diffusers stands in a dummy for it (its optional dependency, scipy or torchsde, is
    missing), nor when building it fails (KDPM2 schedulers with some numpy/torch pairs).
    """
    if isinstance(cls, DummyObject):
        _say_once(logging.INFO, f"not offering {cls.__name__}: its optional dependency is not installed")
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls.from_config(config)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        _say_once(logging.WARNING, f"not offering {cls.__name__}: it cannot be built here ({reason})")
        return False
    return True


@functools.cache
def _say_once(level: int, message: str) -> None:
    """Logs a message the first time only: each task's pipeline of a model asks about the same schedulers."""
    log.log(level, "%s", message)


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
    saved_for = own_task(checkpoint_class, classes)
    started = time.perf_counter()
    # A configured ControlNet makes AutoPipeline pick each task's ControlNet pipeline instead.
    controlnet = load_controlnet(spec, dtype=dtype, allow_pickle=allow_pickle)
    try:
        base = AUTO_PIPELINES[saved_for].from_pretrained(
            spec.source,
            dtype=dtype,
            variant=spec.variant or None,
            use_safetensors=None if allow_pickle else True,
            local_files_only=Path(spec.source).is_dir(),
            **controlnet,
        )
    except Exception as err:
        raise ModelFailed(f"loading {spec.source!r} failed: {type(err).__name__}: {err}") from err
    if controlnet:
        classes = task_classes(type(base).__name__)
        family = family_of(type(base).__name__) or family
    base.set_progress_bar_config(disable=True)
    options = apply_memory_options(base, spec)
    _alias_text_models(base)
    pipes: dict[Task, Any] = {}
    for task in runnable_tasks(base, classes):
        pipe = base if saved_for == task else AUTO_PIPELINES[task].from_pipe(base)
        pipe.set_progress_bar_config(disable=True)
        pipes[task] = pipe
    if not pipes:
        raise ModelFailed(f"{checkpoint_class} from {spec.source!r} can run none of the tasks of its family")
    model = LoadedModel(
        spec=spec,
        family=family,
        checkpoint_class=checkpoint_class,
        device=base.device,
        dtype=dtype,
        parameter_bytes=_parameter_bytes(base),
        scheduler_config=base.scheduler.config,
        base=base,
        options=options,
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


def pin_signatures(model: LoadedModel) -> None:
    """Stores, once, the signatures diffusers derives again on every call.

    `Attention.forward` calls `inspect.signature(self.processor.__call__)` in every attention
    layer at every step (to warn about unused cross-attention arguments), and pipelines inspect
    their scheduler's `step` and `set_timesteps` on every call. Deriving a signature takes ~14 us:
    with 65 attention calls, ~0.9 ms of a 25 ms tiny SD 1.5 call on CPU (measured: 26.2 -> 25.1 ms
    median). A function's signature never changes, so each one is computed here and kept as its
    `__signature__`, which `inspect.signature` returns as is. Run after anything that swaps
    attention processors (fused QKV projections); process-wide, like the classes themselves.
    """
    functions: set[Any] = set()
    for component in model.base.components.values():
        if isinstance(component, torch.nn.Module):
            for module in component.modules():
                processor = getattr(module, "processor", None)
                if processor is not None and callable(processor):
                    functions.add(type(processor).__call__)
    for target in model.tasks.values():
        for scheduler in target.schedulers.values():
            functions.update((scheduler.step, scheduler.set_timesteps))
    for function in functions:
        if inspect.isfunction(function) and "__signature__" not in function.__dict__:
            try:
                function.__signature__ = _traceable(inspect.signature(function))  # type: ignore[attr-defined]
            except (ValueError, TypeError):  # one inspect cannot derive: left as it is
                continue


def _traceable(signature: inspect.Signature) -> inspect.Signature:
    """The signature with its parameters in a plain dict instead of the read-only view inspect keeps.

    A compiled denoiser's graph includes `Attention.forward`'s `inspect.signature` call, so dynamo
    traces it into the pinned signature. Dynamo refuses to read an existing `mappingproxy` once the
    traced code has changed any dict (it cannot tell which dict the view shows), and by their first
    attention layer Flux's and Qwen-Image's traced forwards have: with the view, their compile
    failed ("mapping proxy affected by dictionary mutation"). Nothing writes to a signature's
    parameters (the signatures `inspect` derives from this one, for bound methods, get views of
    their own). Left as it is where the class has no such slot to set.
    """
    with contextlib.suppress(AttributeError, TypeError):
        object.__setattr__(signature, "_parameters", dict(signature.parameters))
    return signature


# Marks a component module that holds no diffusers hooks (see `skip_hook_walks`).
_HOOK_FREE = "_autopipeline_hook_free"
H = typing.TypeVar("H")


def _hook_free_shortcut(walk: Callable[[torch.nn.Module], H | None]) -> Callable[[torch.nn.Module], H | None]:
    """`walk` (diffusers' search of a module tree for a group-offloading hook), answering None at
    once for a module `skip_hook_walks` marked; wrapped once, process-wide."""

    @functools.wraps(walk)
    def shortcut(module: torch.nn.Module) -> H | None:
        if module.__dict__.get(_HOOK_FREE):
            return None
        return walk(module)

    shortcut.__dict__[_HOOK_FREE] = True
    return shortcut


def skip_hook_walks(model: LoadedModel) -> None:
    """Spares every call diffusers' walks over all submodules looking for group-offloading hooks.

    `ModelMixin.device` and `DiffusionPipeline._execution_device` first search each component's
    whole module tree for a group-offloading hook, with a `hasattr` that misses through
    `nn.Module.__getattr__` in every submodule: 5 to 10 walks per call, ~0.3 ms of CPU per walk of
    a tiny UNet and 1.35 ms per `_execution_device` (measured: a tiny SD 1.5 call took 22.8 -> 21.1
    ms of CPU time without them), and a full-size UNet has several times as many submodules.
    The server applies no diffusers hooks (group offloading, layerwise casting, caches) to a loaded
    model, so each component found hook-free here is marked, and the search answers "none" for it
    at once. Everything else diffusers derives (the parameters' device, accelerate's offload
    hooks) is unchanged. Run once the model is placed, before it runs or compiles.
    """
    if not group_offloading._get_top_level_group_offload_hook.__dict__.get(_HOOK_FREE):
        group_offloading._get_top_level_group_offload_hook = _hook_free_shortcut(  # type: ignore[assignment]
            group_offloading._get_top_level_group_offload_hook
        )  # diffusers' callers look the name up at call time, so they all get the shortcut
    pipes = [model.base, *(target.pipe for target in model.tasks.values())]
    for component in {id(c): c for pipe in pipes for c in pipe.components.values()}.values():
        if isinstance(component, torch.nn.Module) and not any(
            "_diffusers_hook" in module.__dict__ for module in component.modules()
        ):
            component.__dict__[_HOOK_FREE] = True


def _task_order(item: tuple[Task, Any]) -> int:
    return list(Task).index(item[0])
