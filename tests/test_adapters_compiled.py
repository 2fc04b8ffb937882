"""LoRA adapters on a compiled denoiser (CPU inductor): adapter calls run eagerly, nothing recompiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autopipeline_server.acceleration import AccelerationPlan, accelerate
from autopipeline_server.adapters import load_adapters
from autopipeline_server.calls import QuietHooks, run_call
from autopipeline_server.domain import AdapterWeight, GenerationRequest, Task
from autopipeline_server.pipelines import LoadedModel, load_model
from autopipeline_server.prepare import prepare_call
from autopipeline_server.settings import AdapterSpec, ModelSpec
from autopipeline_server.tiny import build_tiny_checkpoint
from autopipeline_server.tiny_lora import build_tiny_lora

STYLE = (AdapterWeight("style", 1.0),)
MIXED = (AdapterWeight("other", 0.5), AdapterWeight("style", 0.5))


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    root = tmp_path_factory.mktemp("compiled-adapters")
    checkpoint = build_tiny_checkpoint("sd15", root / "sd15", seed=0)
    adapters = tuple(
        AdapterSpec(name, str(build_tiny_lora(checkpoint, root / f"{name}.safetensors", seed=seed)))
        for name, seed in (("style", 1), ("other", 2))
    )
    return ModelSpec("lora", str(checkpoint), adapters=adapters)


def _load(spec: ModelSpec, *, compiled: bool) -> LoadedModel:
    model = load_model(spec, dtype=torch.float32, allow_pickle=False)
    load_adapters(model, prepare_hotswap=compiled)
    if compiled:
        plan = AccelerationPlan("compile", "compile", ((64, 64, 1),), 1, "", None)
        assert accelerate(model, plan).error == ""
    return model


def _pixels(model: LoadedModel, adapters: tuple[AdapterWeight, ...] = ()) -> np.ndarray:
    request = GenerationRequest(
        model="lora",
        task=Task.TEXT_TO_IMAGE,
        prompt="a cube",
        width=64,
        height=64,
        num_inference_steps=2,
        seed=4,
        adapters=adapters,
    )
    return np.asarray(run_call(prepare_call(model, request), QuietHooks())[0], dtype=np.int16)


def test_switching_adapters_on_a_compiled_model_runs_them_eagerly_and_correctly(spec: ModelSpec) -> None:
    eager = _load(spec, compiled=False)
    compiled = _load(spec, compiled=True)
    report = compiled.acceleration
    assert report is not None and report.dispatcher is not None
    expected = {adapters: _pixels(eager, adapters) for adapters in ((), STYLE, MIXED)}
    compiled_before = report.compiled_calls
    base = _pixels(compiled)
    assert report.compiled_calls > compiled_before, "the base call did not run the compiled graph"
    assert np.abs(base - expected[()]).max() <= 1
    for adapters in (STYLE, MIXED, STYLE):
        calls = report.adapter_calls
        image = _pixels(compiled, adapters)
        assert report.adapter_calls > calls
        # Adapters change the image, and exactly as they do on the eager model.
        assert np.abs(image - base).max() > 10
        assert np.abs(image - expected[adapters]).max() <= 1
    compiled_before = report.compiled_calls
    assert np.array_equal(_pixels(compiled), base), "an adapter leaked into a later base call"
    assert report.compiled_calls > compiled_before
    assert (report.eager_calls, report.eager_fallbacks) == (0, 0), "a call recompiled or fell back"
