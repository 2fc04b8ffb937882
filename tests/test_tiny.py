"""Tiny checkpoints build offline, deterministically, and load through the real diffusers path."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from PIL import Image
from safetensors.torch import load_file

from autopipeline_server.tiny import FAMILIES, build_tiny_checkpoint

# EulerDiscreteScheduler.set_timesteps calls np.array(torch_tensor); with numpy 2 and torch's
# `Tensor.__array__(self, dtype=None)` numpy emits this DeprecationWarning (not our code).
EULER_NUMPY_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"

CLASS_NAMES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd15-inpainting": "StableDiffusionInpaintPipeline",
}
PROMPT = "a tiny red cube"


def _generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


def _image() -> Image.Image:
    return Image.new("RGB", (64, 64), (200, 40, 40))


def _mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


def _load(auto_class: Any, family: str, root: pathlib.Path) -> Any:
    """Build ``family`` and load it with ``auto_class.from_pretrained`` (untyped in diffusers)."""
    return auto_class.from_pretrained(build_tiny_checkpoint(family, root))


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_families_cover_all_builders() -> None:
    assert set(FAMILIES) == set(CLASS_NAMES)


@pytest.mark.parametrize("family", FAMILIES)
def test_layout(family: str, tmp_path: pathlib.Path) -> None:
    out = build_tiny_checkpoint(family, tmp_path / "nested" / family)
    assert out == tmp_path / "nested" / family
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == CLASS_NAMES[family]
    assert list(out.rglob("*.safetensors"))
    assert not list(out.rglob("*.bin"))


@pytest.mark.filterwarnings(EULER_NUMPY_WARNING)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text2image(family: str, tmp_path: pathlib.Path) -> None:
    pipe = _load(AutoPipelineForText2Image, family, tmp_path)
    assert type(pipe).__name__ == CLASS_NAMES[family]
    result = pipe(
        PROMPT, height=64, width=64, num_inference_steps=2, output_type="pil", generator=_generator()
    )
    assert result.images[0].size == (64, 64)


def test_inpainting_checkpoint(tmp_path: pathlib.Path) -> None:
    pipe = _load(AutoPipelineForInpainting, "sd15-inpainting", tmp_path)
    assert type(pipe).__name__ == CLASS_NAMES["sd15-inpainting"]
    assert pipe.unet.config.in_channels == 9
    result = pipe(
        PROMPT,
        image=_image(),
        mask_image=_mask(),
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="pil",
        generator=_generator(),
    )
    assert result.images[0].size == (64, 64)


def test_sd15_from_pipe_img2img_and_inpaint(tmp_path: pathlib.Path) -> None:
    text2image = _load(AutoPipelineForText2Image, "sd15", tmp_path)
    img2img = AutoPipelineForImage2Image.from_pipe(text2image)
    result = img2img(PROMPT, image=_image(), strength=0.5, num_inference_steps=4, generator=_generator())
    assert result.images[0].size == (64, 64)
    inpaint = AutoPipelineForInpainting.from_pipe(text2image)
    result = inpaint(
        PROMPT,
        image=_image(),
        mask_image=_mask(),
        strength=0.5,
        num_inference_steps=4,
        generator=_generator(),
    )
    assert result.images[0].size == (64, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_is_byte_identical(family: str, tmp_path: pathlib.Path) -> None:
    first = _files(build_tiny_checkpoint(family, tmp_path / "a", seed=7))
    second = _files(build_tiny_checkpoint(family, tmp_path / "b", seed=7))
    assert first == second


def test_different_seed_changes_unet_weights(tmp_path: pathlib.Path) -> None:
    weights = "unet/diffusion_pytorch_model.safetensors"
    a = load_file(build_tiny_checkpoint("sd15", tmp_path / "a", seed=0) / weights)
    b = load_file(build_tiny_checkpoint("sd15", tmp_path / "b", seed=1) / weights)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[key], b[key]) for key in a)


def test_unknown_family(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="sd15-inpainting"):
        build_tiny_checkpoint("sd3", tmp_path)
    assert not tmp_path.joinpath("model_index.json").exists()
