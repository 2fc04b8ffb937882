"""ControlNet: loading a configured ControlNet beside a checkpoint, and the control image of each call.

A checkpoint saved with a ControlNet (its model_index.json has `controlnet`) resolves to diffusers'
ControlNet pipelines by itself. A ControlNet configured for a plain checkpoint (`--controlnet
MODEL=SOURCE`) is loaded here and handed to `AutoPipelineFor*.from_pretrained(..., controlnet=...)`,
which picks the ControlNet pipeline of the task; `from_pipe` then derives the other tasks' ControlNet
pipelines, sharing every module. diffusers names the control image `image` in text-to-image ControlNet
pipelines (whose `image` is nothing else) and `control_image` where `image` is the input image.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import PIL.Image
import torch

from autopipeline_server.errors import InvalidRequest, ModelFailed
from autopipeline_server.settings import ModelSpec

if TYPE_CHECKING:
    from autopipeline_server.pipelines import LoadedModel, TaskPipeline

FIELD = "control_image"


def load_controlnet(spec: ModelSpec, *, dtype: torch.dtype, allow_pickle: bool) -> dict[str, Any]:
    """The `controlnet=` keyword for AutoPipeline's `from_pretrained`: {} when none is configured.

    The class comes from the ControlNet's own config (`ControlNetModel`, `ControlNetUnionModel`,
    `SD3ControlNetModel`, `FluxControlNetModel`, ...), so AutoPipeline sees the model it expects.
    """
    if not spec.controlnet:
        return {}
    source = spec.controlnet
    local = Path(source).is_dir()
    try:
        config = diffusers.ControlNetModel.load_config(source, local_files_only=local)
    except Exception as err:
        raise ModelFailed(f"cannot read the config of controlnet {source!r}: {err}") from err
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) and "ControlNet" in cls.__name__):
        raise ModelFailed(f"controlnet {source!r} is not a diffusers ControlNet model (class {class_name!r})")
    try:
        model = cls.from_pretrained(  # type: ignore[no-untyped-call]
            source, dtype=dtype, use_safetensors=None if allow_pickle else True, local_files_only=local
        )
    except Exception as err:
        raise ModelFailed(f"loading controlnet {source!r} failed: {type(err).__name__}: {err}") from err
    return {"controlnet": model}


def control_argument(pipe: Any) -> str | None:
    """The `__call__` argument that takes the control image, or None for a pipeline without a ControlNet."""
    if getattr(pipe, "controlnet", None) is None:
        return None
    named = inspect.signature(type(pipe).__call__).parameters
    return "control_image" if "control_image" in named else "image"


def requires_control_image(target: TaskPipeline) -> bool:
    return control_argument(target.pipe) is not None


def controlnet_source(model: LoadedModel) -> str:
    """Where the model's ControlNet comes from, for Inspect: the configured one, else the checkpoint."""
    if getattr(model.base, "controlnet", None) is None:
        return ""
    return model.spec.controlnet or model.spec.source


def control_kwargs(
    target: TaskPipeline, image: PIL.Image.Image | None, size: tuple[int, int]
) -> tuple[dict[str, Any], list[InvalidRequest]]:
    """The call argument holding the control image, resized to the output `size`, or what is wrong."""
    argument = control_argument(target.pipe)
    if argument is None:
        if image is None:
            return {}, []
        problem = InvalidRequest.field(
            FIELD,
            f"{target.pipeline_class} has no ControlNet; the model takes no control image",
            reason="FIELD_NOT_APPLICABLE",
        )
        return {}, [problem]
    if image is None:
        problem = InvalidRequest.field(
            FIELD, f"is required: {target.pipeline_class} is a ControlNet pipeline and needs a control image"
        )
        return {}, [problem]
    if image.size != size:
        image = image.resize(size, PIL.Image.Resampling.LANCZOS)
    return {argument: image}, []


def warm_up_image(target: TaskPipeline, size: tuple[int, int]) -> PIL.Image.Image | None:
    """A plain control image for warm-up and compile requests; None when the pipeline takes none."""
    if control_argument(target.pipe) is None:
        return None
    return PIL.Image.new("RGB", size, (127, 127, 127))
