"""Tiny checkpoints build offline, deterministically, and load through the real diffusers path."""

from __future__ import annotations

import inspect
import json
import pathlib
from typing import Any

import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from PIL import Image
from safetensors.torch import load_file

from autopipeline_server.cli import main
from autopipeline_server.domain import Task
from autopipeline_server.pipelines import load_model
from autopipeline_server.settings import ModelSpec
from autopipeline_server.tiny import FAMILIES, build_tiny_checkpoint

# The checkpoint class each family's model_index.json names.
CLASS_NAMES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd15-inpainting": "StableDiffusionInpaintPipeline",
    "kandinsky21": "KandinskyPipeline",
    "kandinsky22": "KandinskyV22Pipeline",
    "kandinsky22-inpainting": "KandinskyV22InpaintPipeline",
    "if": "IFPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "flux2-klein": "Flux2KleinPipeline",
    "pixart-sigma": "PixArtSigmaPipeline",
    "sana": "SanaPipeline",
    "qwen-image": "QwenImagePipeline",
    "z-image": "ZImagePipeline",
    "lcm": "LatentConsistencyModelPipeline",
    "sdxl-pag": "StableDiffusionXLPAGPipeline",
    "sd15-controlnet": "StableDiffusionControlNetPipeline",
}
KANDINSKY = ("kandinsky21", "kandinsky22", "kandinsky22-inpainting")
MAX_BYTES = 2_500_000  # the largest part is Kandinsky's MoVQ: SpatialNorm needs 32-channel stages

# Kandinsky 2.2's combined pipelines pass the deprecated `callback_steps` to their decoder (diffusers' code).
KANDINSKY_CALLBACK_STEPS = "ignore:`callback_steps` is deprecated:FutureWarning"
PROMPT = "a tiny red cube"
SIZE = 64


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_checkpoint(family, root / family, seed=0) for family in FAMILIES}


def _generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


def _image() -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), (200, 40, 40))


def _mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


def _run_one_step(pipe: Any, task: Task) -> Image.Image:
    """One denoising step of ``task`` straight through a diffusers pipeline (untyped)."""
    named = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": 1,
        "generator": _generator(),
    }
    if "prior_num_inference_steps" in named:
        kwargs["prior_num_inference_steps"] = 2  # UnCLIPScheduler divides by steps - 1
    if task is Task.INPAINTING:
        kwargs.update(image=_image(), mask_image=_mask())
    elif task is Task.IMAGE_TO_IMAGE:
        kwargs.update(image=_image(), strength=1.0)
    elif "controlnet" in pipe.components:
        kwargs["image"] = _image()  # the control image
    image: Image.Image = pipe(**kwargs).images[0]
    return image


def _files(root: pathlib.Path) -> dict[str, bytes]:
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    # A Kandinsky decoder's card names its prior by absolute path: compare it relative to the checkpoint.
    if "README.md" in files:
        files["README.md"] = files["README.md"].replace(str(root.resolve()).encode(), b"<root>")
    return files


def test_families_cover_all_builders() -> None:
    assert set(FAMILIES) == set(CLASS_NAMES)


@pytest.mark.parametrize("family", FAMILIES)
def test_layout(family: str, built: dict[str, pathlib.Path]) -> None:
    out = built[family]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == CLASS_NAMES[family]
    assert list(out.rglob("*.safetensors"))
    assert not list(out.rglob("*.bin"))
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < MAX_BYTES


@pytest.mark.parametrize("family", KANDINSKY)
def test_kandinsky_decoder_names_its_local_prior(family: str, built: dict[str, pathlib.Path]) -> None:
    out = built[family]
    card = (out / "README.md").read_text()
    assert f'prior:\n- "{(out / "prior").resolve()}"\n' in card
    prior = json.loads((out / "prior" / "model_index.json").read_text())
    assert prior["_class_name"] in ("KandinskyPriorPipeline", "KandinskyV22PriorPipeline")


def _through_load_model(family: str, path: pathlib.Path) -> tuple[Any, Task]:
    """The project's loader; its first task, and that task's pipeline."""
    model = load_model(ModelSpec(family, str(path)), dtype=torch.float32, allow_pickle=False)
    task = next(iter(model.tasks))
    return model.tasks[task].pipe, task


@pytest.mark.filterwarnings(KANDINSKY_CALLBACK_STEPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step(family: str, built: dict[str, pathlib.Path]) -> None:
    """Every checkpoint loads offline (Kandinsky: with its prior) and runs one step of its first task."""
    pipe, task = _through_load_model(family, built[family])
    if family in KANDINSKY:
        assert type(pipe).__name__.endswith("CombinedPipeline")
        assert pipe.prior_prior is not None
    assert _run_one_step(pipe, task).size == (SIZE, SIZE)


def test_sd15_from_pipe_img2img_and_inpaint(built: dict[str, pathlib.Path]) -> None:
    text2image = AutoPipelineForText2Image.from_pretrained(built["sd15"])
    img2img = AutoPipelineForImage2Image.from_pipe(text2image)
    result = img2img(PROMPT, image=_image(), strength=0.5, num_inference_steps=4, generator=_generator())
    assert result.images[0].size == (SIZE, SIZE)
    inpaint = AutoPipelineForInpainting.from_pipe(text2image)
    result = inpaint(
        PROMPT,
        image=_image(),
        mask_image=_mask(),
        strength=0.5,
        num_inference_steps=4,
        generator=_generator(),
    )
    assert result.images[0].size == (SIZE, SIZE)


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
        build_tiny_checkpoint("sd2", tmp_path)
    assert not tmp_path.joinpath("model_index.json").exists()


def test_cli_builds_any_family_and_rejects_others(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tiny-model", "--family", "if", str(tmp_path / "if")]) == 0
    assert json.loads((tmp_path / "if" / "model_index.json").read_text())["_class_name"] == "IFPipeline"
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--family", "sd2", str(tmp_path / "sd2")])
    assert exit_info.value.code == 2
    assert "z-image" in capsys.readouterr().err
    assert not (tmp_path / "sd2").exists()
