"""Acceleration on CPU, tiny SD 1.5: compiled equals eager, and nothing recompiles on the hot path."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import os
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch._dynamo.utils import counters

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline_server import acceleration, convert
from autopipeline_server.acceleration import (
    MEGACACHE_FOLDER,
    PRECOMPILED_FOLDER,
    AccelerationPlan,
    AccelerationReport,
    DenoiserDispatcher,
    Signature,
    _normalise_inputs,
    _Padding,
    _padding,
    _signature,
    _StanceGate,
    accelerate,
    configure_cache,
    prepare_compiler,
    schedule_on_host,
)
from autopipeline_server.calls import QuietHooks, run_batch, run_call
from autopipeline_server.domain import GenerationRequest, ModelState, Task
from autopipeline_server.pipelines import LoadedModel, load_model, pin_signatures
from autopipeline_server.prepare import prepare_call, prepare_with_inputs
from autopipeline_server.registry import ModelEntry
from autopipeline_server.settings import ConfigError, ModelSpec, Settings, load_settings

# float32 on CPU: inductor's fused kernels reorder sums, and fused QKV / channels_last change the
# order again, so latents differ by ~1e-6; after rounding to 8-bit pixels at most one level moves.
PIXEL_TOLERANCE = 1
# The tiny model's default size at two and three images per call (denoiser batches 4 and 6 with CFG).
DECLARED = ((64, 64, 2), (64, 64, 3))


def _plan(cache_dir: Path, mode: str = "compile") -> AccelerationPlan:
    return AccelerationPlan(
        requested=mode,
        mode=mode,
        shapes=DECLARED,
        max_batch_size=2,
        cache_dir=str(cache_dir),
        compile_mode=None,
    )


def _load(checkpoint: Path) -> LoadedModel:
    return load_model(ModelSpec("sd15", str(checkpoint)), dtype=torch.float32, allow_pickle=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compile-cache")
    configure_cache(str(path))
    return path


@pytest.fixture(scope="module")
def compiled(checkpoints: dict[str, Path], cache_dir: Path) -> LoadedModel:
    model = _load(checkpoints["sd15"])
    report = accelerate(model, _plan(cache_dir))
    assert report.error == "", report.error
    pin_signatures(model)  # as the registry does: compiled graphs see the pinned signatures
    return model


@pytest.fixture(scope="module")
def eager(checkpoints: dict[str, Path], cache_dir: Path) -> LoadedModel:
    model = _load(checkpoints["sd15"])
    accelerate(model, _plan(cache_dir, mode="off"))
    pin_signatures(model)
    return model


def _report(model: LoadedModel) -> AccelerationReport:
    assert model.acceleration is not None
    return model.acceleration


def _request(num_images: int, **overrides: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "model": "sd15",
        "task": Task.TEXT_TO_IMAGE,
        "prompt": "a red square",
        "num_inference_steps": 3,
        "seed": 7,
        "num_images": num_images,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


class _Watch:
    """Counts what the dispatcher and dynamo did between entering and leaving."""

    def __init__(self, model: LoadedModel) -> None:
        self._report = _report(model)

    def __enter__(self) -> _Watch:
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._snapshot()
        self.compiled, self.eager, self.fallbacks, self.graphs = (
            b - a for a, b in zip(self._start, end, strict=True)
        )

    def _snapshot(self) -> tuple[int, int, int, int]:
        report = self._report
        graphs = counters["stats"]["unique_graphs"]
        return report.compiled_calls, report.eager_calls, report.eager_fallbacks, graphs


def _pixels(images: list[PIL.Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_compiled_images_equal_eager_images_at_a_declared_shape(
    compiled: LoadedModel, eager: LoadedModel
) -> None:
    with _Watch(compiled) as watch:
        fast = run_call(prepare_call(compiled, _request(2)), QuietHooks())
    slow = run_call(prepare_call(eager, _request(2)), QuietHooks())
    assert watch.compiled >= 3 and watch.eager == 0  # every denoiser call (PNDM: steps + 1) compiled
    assert watch.fallbacks == 0 and watch.graphs == 0  # and nothing was compiled on the way
    assert np.abs(_pixels(fast) - _pixels(slow)).max() <= PIXEL_TOLERANCE


def test_declared_batch_sizes_of_one_size_share_one_traced_graph(
    compiled: LoadedModel, eager: LoadedModel
) -> None:
    """Dynamo traced the declared size once for both batch sizes (a trace per start saved, and a
    compile on an empty cache), and each batch size runs compiled, unpadded, with eager's images."""
    report = _report(compiled)
    assert report.graphs == 1 and len(report.compiled_shapes) == 2
    padded = report.padded_calls
    for images in (2, 3):
        with _Watch(compiled) as watch:
            fast = run_call(prepare_call(compiled, _request(images)), QuietHooks())
        slow = run_call(prepare_call(eager, _request(images)), QuietHooks())
        assert (watch.compiled, watch.eager, watch.fallbacks, watch.graphs) == (4, 0, 0, 0)
        assert np.abs(_pixels(fast) - _pixels(slow)).max() <= PIXEL_TOLERANCE
    assert report.padded_calls == padded


def test_an_undeclared_shape_runs_eagerly_without_compiling(
    compiled: LoadedModel, eager: LoadedModel
) -> None:
    with _Watch(compiled) as watch:
        fast = run_call(prepare_call(compiled, _request(1, width=32, height=48)), QuietHooks())
        # The declared size at a batch over PAD_UP_TO times smaller than the compiled one: no CFG,
        # so a denoiser batch of 1 against the graph's 4.
        run_call(prepare_call(compiled, _request(1, guidance_scale=1.0)), QuietHooks())
    slow = run_call(prepare_call(eager, _request(1, width=32, height=48)), QuietHooks())
    # PNDM (the model's scheduler) calls the denoiser steps + 1 times: 2 requests x 4 calls.
    assert (watch.compiled, watch.eager, watch.fallbacks, watch.graphs) == (0, 8, 0, 0)
    assert np.abs(_pixels(fast) - _pixels(slow)).max() <= PIXEL_TOLERANCE


def test_eager_mode_prepares_the_denoiser_and_compiles_nothing(
    checkpoints: dict[str, Path], cache_dir: Path, eager: LoadedModel
) -> None:
    model = _load(checkpoints["sd15"])
    graphs = counters["stats"]["unique_graphs"]
    report = accelerate(model, _plan(cache_dir, mode="eager"))
    unet = model.tasks[Task.TEXT_TO_IMAGE].pipe.unet
    assert (report.mode, report.error, report.compiled_shapes) == ("eager", "", [])
    assert report.dispatcher is not None and not report.dispatcher.ready  # it only normalises inputs
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert unet.conv_in.weight.is_contiguous() is False  # really converted, not 1x1-ambiguous
    attention = [module for module in unet.modules() if isinstance(module, Attention)]
    assert attention and all(module.fused_projections for module in attention)
    images = run_call(prepare_call(model, _request(2)), QuietHooks())
    assert counters["stats"]["unique_graphs"] == graphs
    assert (report.compiled_calls, report.eager_calls) == (0, 4)  # PNDM: 3 steps, 4 denoiser calls
    as_loaded = run_call(prepare_call(eager, _request(2)), QuietHooks())
    assert np.abs(_pixels(images) - _pixels(as_loaded)).max() <= PIXEL_TOLERANCE


def test_the_compiler_is_prepared_once_a_process_and_only_for_compile(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(acceleration, "_compiler_ready", set())  # as in a fresh process
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=acceleration.__name__):
        for mode in ("off", "eager", "compile", "compile"):
            prepare_compiler(cpu, _plan(cache_dir, mode=mode))
    ready = [r.getMessage() for r in caplog.records if "torch.compile ready" in r.getMessage()]
    assert len(ready) == 1 and ready[0].startswith("torch.compile ready on cpu"), caplog.text
    assert "failed" not in caplog.text


def test_a_smaller_batch_runs_padded_in_a_compiled_graph_with_eager_images(
    compiled: LoadedModel, eager: LoadedModel
) -> None:
    """One image (denoiser batch 2 with CFG) runs in the graph compiled for two (batch 4), its
    inputs padded and its outputs cut back: the images are the eager ones, nothing compiles."""
    padded_before = _report(compiled).padded_calls
    with _Watch(compiled) as watch:
        fast = run_call(prepare_call(compiled, _request(1)), QuietHooks())
    slow = run_call(prepare_call(eager, _request(1)), QuietHooks())
    assert (watch.compiled, watch.eager, watch.fallbacks, watch.graphs) == (4, 0, 0, 0)
    assert _report(compiled).padded_calls - padded_before == 4
    assert len(fast) == 1
    assert np.abs(_pixels(fast) - _pixels(slow)).max() <= PIXEL_TOLERANCE


def test_scheduler_batch_composition_and_task_do_not_recompile(compiled: LoadedModel) -> None:
    euler = "EulerDiscreteScheduler"  # float timesteps where the default PNDM gives integers
    assert euler in compiled.tasks[Task.TEXT_TO_IMAGE].schedulers
    two_callers = [prepare_call(compiled, _request(1, prompt=p, scheduler=euler)) for p in ("a cat", "a dog")]
    assert two_callers[0].batch_key() == two_callers[1].batch_key()
    image = PIL.Image.new("RGB", (64, 64), (200, 30, 30))
    with _Watch(compiled) as watch:
        results = run_batch(two_callers, [QuietHooks(), QuietHooks()])
        # No guidance: no CFG, so four images are the same denoiser batch as two with guidance.
        run_call(prepare_call(compiled, _request(4, guidance_scale=1.0)), QuietHooks())
        run_call(
            prepare_with_inputs(compiled, _request(2, task=Task.IMAGE_TO_IMAGE, image=image, strength=1.0)),
            QuietHooks(),
        )
    assert [len(images) for images in results] == [1, 1]
    # Euler: 3 calls; PNDM: 4 calls, twice.
    assert (watch.compiled, watch.eager, watch.fallbacks, watch.graphs) == (11, 0, 0, 0)


def test_a_call_keeps_its_schedule_on_the_host_where_a_dispatcher_runs_the_denoiser(
    compiled: LoadedModel, eager: LoadedModel
) -> None:
    """Pipelines ask for the timesteps on the device ("meta" stands in for a GPU here): with a dispatcher
    they stay on the host, so that the scheduler's reads of them wait for no kernel; without one
    (acceleration off) the pipeline gets what it asked for, as in diffusers."""
    target = compiled.tasks[Task.TEXT_TO_IMAGE]
    schedulers = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")
    # (Euler cannot build its sigmas on "meta": it keeps them on the host anyway.)
    for model, device, names in ((compiled, "cpu", schedulers), (eager, "meta", schedulers[:2])):
        for name in names:
            scheduler = model.new_scheduler(target.schedulers[name])
            schedule_on_host(model, scheduler)
            scheduler.set_timesteps(5, device=torch.device("meta"))
            assert scheduler.timesteps.device.type == device, (name, device)
            scheduler.set_timesteps(5, "meta")  # by position too
            assert scheduler.timesteps.device.type == device, (name, device)
            # Pipelines ask what it takes (diffusers' `retrieve_timesteps`: custom sigmas?).
            own = inspect.signature(model.new_scheduler(target.schedulers[name]).set_timesteps)
            assert inspect.signature(scheduler.set_timesteps) == own
    # Each call's scheduler is its own: the prototype and the next call's are untouched.
    assert "set_timesteps" not in vars(compiled.new_scheduler(target.schedulers["PNDMScheduler"]))


def test_inputs_on_the_host_go_to_the_device_of_the_latents() -> None:
    """With the schedule on the host the timestep (and what the pipeline derives from it) arrives as a
    host tensor; the denoiser gets it on its device, as a float32 like every timestep."""
    sample = torch.empty(2, 4, 8, 8, device="meta")
    args, kwargs = _normalise_inputs(
        (sample, torch.tensor(981)),
        {"encoder_hidden_states": torch.empty(2, 3, 8, device="meta"), "ids": [torch.ones(2)]},
    )
    assert args[1].device.type == "meta" and args[1].dtype == torch.float32
    assert kwargs["ids"][0].device.type == "meta"
    assert args[0].is_contiguous(memory_format=torch.channels_last)
    args, kwargs = _normalise_inputs(
        (), {"hidden_states": torch.empty(2, 16, device="meta"), "timestep": torch.ones(2) / 1000}
    )
    assert kwargs["timestep"].device.type == "meta"
    # Latents as a list of tensors (Z-Image): the timestep goes to their device too.
    listed = [torch.empty(16, 1, 8, 8, device="meta")] * 2
    args, _ = _normalise_inputs((listed, torch.ones(2), torch.empty(2, 3, device="meta")), {})
    assert args[1].device.type == "meta" and all(a is b for a, b in zip(args[0], listed, strict=True))
    host = torch.ones(2, 4, 8, 8)  # on a CPU device nothing moves
    args, _ = _normalise_inputs((host, torch.tensor(1.0)), {})
    assert args[1].device.type == "cpu"


def test_inspect_reports_the_mode_and_compiled_shapes(compiled: LoadedModel, eager: LoadedModel) -> None:
    entry = ModelEntry(compiled.spec, pinned=True, state=ModelState.READY, reason="", model=compiled)
    info = convert.model_info(entry, default_model="sd15", device="cpu", dtype="float32")
    acceleration = info.acceleration
    assert (acceleration.requested, acceleration.mode) == ("compile", "compile")
    assert acceleration.compile_time.ToTimedelta().total_seconds() > 0
    shapes = {
        (s.task, s.width, s.height, s.batch_images, tuple(s.denoiser_shape))
        for s in acceleration.compiled_shapes
    }
    # One graph serves all three tasks: their denoiser inputs are alike (a 4-channel UNet).
    assert shapes == {
        (pb.TASK_TEXT_TO_IMAGE, 64, 64, 2, (4, 4, 8, 8)),
        (pb.TASK_TEXT_TO_IMAGE, 64, 64, 3, (6, 4, 8, 8)),
    }
    assert acceleration.compiled_calls >= 3 and acceleration.eager_fallbacks == 0
    entry = dataclasses.replace(entry, model=eager)
    off = convert.model_info(entry, default_model="sd15", device="cpu", dtype="float32").acceleration
    assert (off.mode, len(off.compiled_shapes), off.compiled_calls) == ("off", 0, 0)
    eager_mode = _load(Path(compiled.spec.source))
    accelerate(eager_mode, dataclasses.replace(_plan(Path()), requested="auto", mode="eager"))
    entry = dataclasses.replace(entry, model=eager_mode)
    prepared = convert.model_info(entry, default_model="sd15", device="cpu", dtype="float32").acceleration
    assert (prepared.requested, prepared.mode, len(prepared.compiled_shapes)) == ("auto", "eager", 0)


def test_the_cache_dir_holds_artifacts_and_a_second_load_hits_them(
    compiled: LoadedModel, checkpoints: dict[str, Path], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _report(compiled)
    assert list((cache_dir / MEGACACHE_FOLDER).glob("*.bin"))
    assert any(
        path.is_dir() for path in cache_dir.iterdir() if path.name != MEGACACHE_FOLDER
    )  # Inductor's own
    # A second model of the same architecture would reuse this process's compiled code outright;
    # forget it, as a restarted process would, so the graphs must come from the cache dir.
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger=acceleration.__name__):
        again = accelerate(_load(checkpoints["sd15"]), _plan(cache_dir))
    assert again.cache_loaded and again.cache_hits >= 1 and again.cache_misses == 0
    assert again.compiled_shapes == first.compiled_shapes
    # The graph itself came precompiled: dynamo traced nothing at this "restart".
    assert list((cache_dir / PRECOMPILED_FOLDER).glob("*/*.bin"))
    assert (first.graphs, first.graphs_loaded, first.precompile_error) == (1, 0, "")
    assert (again.graphs, again.graphs_loaded) == (0, 1)
    # The log says where a (re)start's compile time went: each warm-up request's seconds.
    took = [r.getMessage() for r in caplog.records if "warm-up requests took" in r.getMessage()]
    assert len(took) == 1 and took[0].count("text-to-image 64x64x") == 2, caplog.text


def test_a_restarted_model_runs_its_loaded_graphs_with_eager_images(
    checkpoints: dict[str, Path], cache_dir: Path, compiled: LoadedModel, eager: LoadedModel
) -> None:
    torch._dynamo.reset()  # as a new process: nothing compiled in memory
    restarted = _load(checkpoints["sd15"])
    report = accelerate(restarted, _plan(cache_dir))
    pin_signatures(restarted)
    assert (report.graphs, report.graphs_loaded, report.error) == (0, 1, "")
    for images in (1, 2, 3):  # batch 1 padded into batch 2's graph
        with _Watch(restarted) as watch:
            fast = run_call(prepare_call(restarted, _request(images)), QuietHooks())
        slow = run_call(prepare_call(eager, _request(images)), QuietHooks())
        assert (watch.compiled, watch.eager, watch.fallbacks, watch.graphs) == (4, 0, 0, 0)
        assert np.abs(_pixels(fast) - _pixels(slow)).max() <= PIXEL_TOLERANCE


def test_graphs_left_without_cuda_graphs_are_counted(checkpoints: dict[str, Path], cache_dir: Path) -> None:
    # A CPU has no CUDA graphs: every graph of the mode that asks for them is one Inductor skips.
    plan = dataclasses.replace(
        _plan(cache_dir), shapes=((64, 64, 1),), max_batch_size=1, compile_mode="reduce-overhead"
    )
    report = accelerate(_load(checkpoints["sd15"]), plan)
    assert report.error == "" and report.compiled_shapes
    assert report.cudagraph_skips >= 1
    assert convert.acceleration_info(report).cudagraph_skips == report.cudagraph_skips


def test_settings_parse_acceleration_and_hot_shapes(tmp_path: Path) -> None:
    settings = load_settings(
        {"models": [ModelSpec("m", "/m")], "compile_shapes": "512x512, 768x512x4"},
        {"AUTOPIPELINE_ACCELERATION": "compile", "AUTOPIPELINE_PNG_COMPRESS_LEVEL": "3"},
    )
    assert settings.acceleration == "compile" and settings.png_compress_level == 3
    assert settings.hot_shapes == ((512, 512, None), (768, 512, 4))
    plan = AccelerationPlan.from_settings(
        dataclasses.replace(settings, max_batch_size=8), torch.device("cpu")
    )
    assert plan.batch_sizes(None) == [1, 8] and plan.batch_sizes(4) == [4]
    kinds = ("cpu", "cuda", "meta")
    auto = {kind: AccelerationPlan.from_settings(Settings(), torch.device(kind)) for kind in kinds}
    assert {kind: (plan.requested, plan.mode, plan.compile_mode) for kind, plan in auto.items()} == {
        "cpu": ("auto", "eager", None),
        "cuda": ("auto", "compile", "reduce-overhead"),
        "meta": ("auto", "off", None),
    }
    # Compiling without a configured cache dir keeps its files beside torch's own Inductor cache.
    assert auto["cuda"].cache_dir == os.environ["TORCHINDUCTOR_CACHE_DIR"] and auto["cpu"].cache_dir == ""
    for bad in ({"compile_shapes": "512"}, {"compile_shapes": "0x512"}, {"acceleration": "fast"},
                {"png_compress_level": 10}, {"compile_shapes": "4096x512"}):  # fmt: skip
        with pytest.raises(ConfigError):
            load_settings({"models": "m=/m", **bad}, {})


# ------------------------------------------------------------------------ several devices' threads
# dynamo's compile stance is one global of the process; each device has a thread of its own.


_FRESH = itertools.count()


def _double_plus_one(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def _fresh_compiled() -> Callable[[torch.Tensor], torch.Tensor]:
    """A function never compiled before (dynamo caches by code object): its first call compiles."""
    code = _double_plus_one.__code__.replace(co_name=f"fresh_{next(_FRESH)}")
    return torch.compile(types.FunctionType(code, globals()), backend="eager")  # type: ignore[no-any-return]


def _in_thread(body: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_a_hot_call_on_one_thread_does_not_fail_a_compile_on_another() -> None:
    gate = _StanceGate()
    hot_running = threading.Event()
    errors: list[BaseException] = []

    def hot() -> None:
        with gate.hot() as admitted:
            assert admitted
            hot_running.set()
            with gate._lock:  # leave only once the other thread has asked to compile
                gate._lock.wait_for(lambda: gate._compiling == 1)

    def compile_elsewhere() -> None:
        hot_running.wait()
        try:
            with gate.compiling():  # waits for the hot call, then compiles under the default stance
                _fresh_compiled()(torch.ones(3))
        except BaseException as err:  # reported below: a thread cannot raise into the test
            errors.append(err)

    threads = [_in_thread(hot), _in_thread(compile_elsewhere)]
    for thread in threads:
        thread.join()
    assert errors == []


def test_interleaved_hot_calls_of_two_threads_leave_the_default_stance() -> None:
    gate = _StanceGate()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with gate.hot():
            first_in.set()
            second_in.wait()
        first_out.set()

    def second() -> None:
        first_in.wait()
        with gate.hot():
            second_in.set()
            first_out.wait()  # the first thread leaves before this one does

    for thread in [_in_thread(first), _in_thread(second)]:
        thread.join()
    _fresh_compiled()(torch.ones(3))  # compiles: the stance is no longer fail_on_recompile


def test_a_hot_call_while_another_thread_compiles_runs_eagerly() -> None:
    gate = _StanceGate()
    admitted: list[bool] = []

    def hot() -> None:
        with gate.hot() as ok:
            admitted.append(ok)

    with gate.compiling():
        _in_thread(hot).join()
    _in_thread(hot).join()
    assert admitted == [False, True]


def test_padding_fits_a_batch_in_a_graph_up_to_twice_as_large_and_pads_only_batch_tensors() -> None:
    def signature(batch: int, side: int = 8, ids: int = 3) -> Signature:
        return (("0", (batch, 4, side, side)), ("1", ()), ("cond.embeds", (batch, 6)), ("ids", (ids, 3)))

    ready = signature(8)
    padding = _padding(signature(6), ready)
    assert padding == _Padding(6, 8, frozenset({"0", "cond.embeds"}))
    assert _padding(signature(3), ready) is None  # the graph is over PAD_UP_TO times larger
    assert _padding(signature(8), ready) is None  # not smaller: the graph itself, or no padding
    assert _padding(signature(6, side=16), ready) is None  # another size
    assert _padding(signature(6, ids=4), ready) is None  # a tensor without the batch differs
    sample, ids = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 4, 8, 8), torch.zeros(3, 3)
    args, kwargs = padding.pad(
        (sample, torch.tensor(1.0)), {"cond": {"embeds": torch.ones(6, 6)}, "ids": ids}
    )
    assert args[0].shape == (8, 4, 8, 8) and args[0][6:, 0, 0, 0].tolist() == [0.0, 0.0]
    assert kwargs["cond"]["embeds"].shape == (8, 6) and kwargs["ids"] is ids
    trimmed = padding.trim((args[0] * 2, ids))
    assert torch.equal(trimmed[0], sample * 2) and trimmed[1] is ids


def test_tensors_in_lists_and_tuples_are_in_the_signature_and_padded() -> None:
    """ControlNet residuals come as a tuple and Z-Image's latents as a list: their shapes tell graphs
    apart like any other input's, and a padded batch pads them too."""

    def inputs(batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        residuals = (torch.ones(batch, 8, 8, 8), torch.ones(batch, 16, 4, 4))
        return (torch.zeros(batch, 4, 8, 8), torch.tensor(1.0)), {"down": residuals, "ids": [torch.zeros(3)]}

    args, kwargs = inputs(2)
    signature = _signature(args, kwargs)
    assert signature == (
        ("0", (2, 4, 8, 8)),
        ("1", ()),
        ("down[0]", (2, 8, 8, 8)),
        ("down[1]", (2, 16, 4, 4)),
        ("ids[0]", (3,)),
    )
    padding = _padding(signature, _signature(*inputs(4)))
    assert padding == _Padding(2, 4, frozenset({"0", "down[0]", "down[1]"}))
    args, kwargs = padding.pad(args, kwargs)
    assert isinstance(kwargs["down"], tuple) and [t.shape[0] for t in kwargs["down"]] == [4, 4]
    assert isinstance(kwargs["ids"], list) and kwargs["ids"][0].shape == (3,)
    # Latents as a list of samples (Z-Image) are reported as the samples' count and shape.
    listed = _signature(([torch.zeros(16, 1, 8, 8)] * 2, torch.tensor(1.0)), {})
    assert acceleration._sample_shape(listed) == (2, 16, 1, 8, 8)


class _LazyTable(torch.nn.Module):
    """Fills a table on its first call under a `torch.device` context, as Z-Image's rotary embedding
    does: dynamo cannot trace that context."""

    def __init__(self) -> None:
        super().__init__()
        self.table: torch.Tensor | None = None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            with torch.device("cpu"):
                self.table = torch.arange(4.0)
        return sample * self.table.sum() + timestep


def test_a_denoiser_filling_a_lazy_cache_on_its_first_call_compiles() -> None:
    dispatcher = DenoiserDispatcher(_LazyTable(), compile_mode=None)
    sample = torch.ones(2, 4, 8, 8)
    with dispatcher.warming(Task.TEXT_TO_IMAGE):
        warmed = dispatcher(sample, torch.tensor(1.0))
    assert len(dispatcher.ready) == 1 and torch.equal(warmed, sample * 6 + 1)
    assert torch.equal(dispatcher(sample, torch.tensor(2.0)), sample * 6 + 2)
    assert (dispatcher.compiled_calls, dispatcher.eager_calls, dispatcher.eager_fallbacks) == (1, 0, 0)


_CHANGED: dict[str, int] = {}  # a dict that exists before the trace, which the traced code changes


class _Processor:
    def __call__(
        self, attn: torch.nn.Module, hidden_states: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        return hidden_states * scale


class _Block(torch.nn.Module):
    """Changes a dict, then asks for its processor's signature, as diffusers' `Attention.forward` does
    after Flux's and Qwen-Image's forwards have changed dicts of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.processor = _Processor()

    def forward(self, hidden_states: torch.Tensor, options: dict[str, float]) -> torch.Tensor:
        _CHANGED["calls"] = _CHANGED.get("calls", 0) + 1
        names = set(inspect.signature(self.processor.__call__).parameters.keys())
        return self.processor(self, hidden_states, **{k: v for k, v in options.items() if k in names})


def test_pinned_signatures_do_not_stop_a_full_graph_trace() -> None:
    block = _Block()
    pin_signatures(types.SimpleNamespace(base=types.SimpleNamespace(components={"unet": block}), tasks={}))  # type: ignore[arg-type]
    assert "__signature__" in _Processor.__call__.__dict__
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(3), {"scale": 3.0, "other": 1.0}), torch.full((3,), 3.0))


class _Scaled(torch.nn.Module):
    """A denoiser in miniature: latents and a timestep in, latents out."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, width)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        return self.proj(sample) * timestep * (1.0 if scale is None else scale)


def _warm(dispatcher: DenoiserDispatcher, *batches: int) -> None:
    with dispatcher.warming(Task.TEXT_TO_IMAGE), torch.inference_mode():  # as pipelines call it
        for batch in batches:
            dispatcher(torch.randn(batch, 4, 8, 8), torch.tensor(3.0))


def test_a_precompiled_graph_is_saved_and_a_later_start_loads_it_without_tracing(tmp_path: Path) -> None:
    first = DenoiserDispatcher(_Scaled(), compile_mode=None, store=tmp_path)
    _warm(first, 2, 4)  # one graph: the batch is dynamic
    assert (first.graphs_precompiled, first.graphs_loaded, first.precompile_error) == (1, 0, "")
    (saved,) = tmp_path.glob("*.bin")
    assert saved.stat().st_mode & 0o777 == 0o644  # replicas running as other users read it too
    module = _Scaled()
    module.load_state_dict(first._module.state_dict())
    traced = counters["stats"]["unique_graphs"]
    second = DenoiserDispatcher(module, compile_mode=None, store=tmp_path)
    _warm(second, 2, 4)
    assert (second.graphs_precompiled, second.graphs_loaded) == (0, 1)
    assert counters["stats"]["unique_graphs"] == traced  # nothing traced
    sample = torch.randn(4, 4, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(second(sample, torch.tensor(2.0)), module(sample, torch.tensor(2.0)))
    assert (second.compiled_calls, second.eager_calls, second.eager_fallbacks) == (1, 0, 0)
    # An argument the graph was not traced with (its guards may not have been saved): eagerly, and right.
    with torch.inference_mode():
        scaled = second(sample, torch.tensor(2.0), scale=3.0)
        assert torch.allclose(scaled, module(sample, torch.tensor(2.0)) * 3.0)
    assert (second.compiled_calls, second.eager_calls) == (1, 1)
    # Calls alike but for such an argument get a graph (and a file) of their own, found again at a restart.
    with second.warming(Task.TEXT_TO_IMAGE), torch.inference_mode():
        second(sample, torch.tensor(2.0), scale=3.0)
    assert (second.graphs_precompiled, len(list(tmp_path.glob("*.bin")))) == (1, 2)
    third = DenoiserDispatcher(_Scaled(), compile_mode=None, store=tmp_path)
    with third.warming(Task.TEXT_TO_IMAGE), torch.inference_mode():
        third(sample, torch.tensor(2.0))
        third(sample, torch.tensor(2.0), scale=3.0)
    assert (third.graphs_precompiled, third.graphs_loaded) == (0, 2)
    fourth = DenoiserDispatcher(_Scaled(), compile_mode=None, store=tmp_path)
    _warm(fourth, 4)  # batch 4 first: the graph saved under batch 2's call serves it
    assert fourth.graphs_precompiled == 0 and fourth.graphs_loaded >= 1
    second.disable()  # as a failed warm-up leaves it: every call eager
    with torch.inference_mode():
        second(sample, torch.tensor(2.0))
    assert (second.compiled_calls, second.eager_calls) == (1, 2)


def test_a_precompiled_graph_that_does_not_fit_or_load_is_compiled_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _warm(DenoiserDispatcher(_Scaled(), compile_mode=None, store=tmp_path), 2)
    (saved,) = tmp_path.glob("*.bin")
    # Another model's graph under the same name: its weights' shapes fail the guards.
    wider = DenoiserDispatcher(_Scaled(width=6), compile_mode=None, store=tmp_path)
    with caplog.at_level(logging.WARNING, logger=acceleration.__name__):
        _warm(wider, 2)
    assert (wider.graphs_precompiled, wider.graphs_loaded) == (1, 0)
    assert "does not fit" in caplog.text and "size mismatch" in caplog.text
    saved.write_bytes(b"not a graph")
    corrupt = DenoiserDispatcher(_Scaled(width=6), compile_mode=None, store=tmp_path)
    with caplog.at_level(logging.WARNING, logger=acceleration.__name__):
        _warm(corrupt, 2)
    assert (corrupt.graphs_precompiled, corrupt.graphs_loaded) == (1, 0)
    assert "cannot load the precompiled graph" in caplog.text
    again = DenoiserDispatcher(_Scaled(width=6), compile_mode=None, store=tmp_path)
    _warm(again, 2)  # the rewritten file loads
    assert (again.graphs_precompiled, again.graphs_loaded) == (0, 1)
    # The source it was traced from changed since (an edited diffusers): compiled afresh.
    monkeypatch.setattr(torch._dynamo.package, "_hash_sourcelines", lambda *args: "edited")
    edited = DenoiserDispatcher(_Scaled(width=6), compile_mode=None, store=tmp_path)
    with caplog.at_level(logging.WARNING, logger=acceleration.__name__):
        _warm(edited, 2)
    assert (edited.graphs_precompiled, edited.graphs_loaded) == (1, 0)
    assert "its source changed" in caplog.text


def test_a_denoiser_that_cannot_be_precompiled_is_traced_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooked = _Scaled()
    eager_forward = hooked.forward
    hooked.forward = lambda *args, **kwargs: eager_forward(*args, **kwargs)  # e.g. offload hooks
    dispatcher = DenoiserDispatcher(hooked, compile_mode=None, store=tmp_path)
    traced = counters["stats"]["unique_graphs"]
    _warm(dispatcher, 2)
    assert counters["stats"]["unique_graphs"] == traced + 1 and not list(tmp_path.glob("*.bin"))
    assert dispatcher.graphs_precompiled == 0 and "hook" in dispatcher.precompile_error
    # Nowhere to keep a precompiled graph: it would not outlive the process, so it is traced.
    assert "no compile cache dir" in DenoiserDispatcher(_Scaled(), compile_mode=None).precompile_error

    def refuse(*args: object) -> None:
        raise torch._dynamo.exc.PackageError("ID_MATCH guard cannot be serialized.")

    monkeypatch.setattr(DenoiserDispatcher, "_precompiled", refuse)
    dispatcher = DenoiserDispatcher(_Scaled(), compile_mode=None, store=tmp_path)
    _warm(dispatcher, 2)
    assert "ID_MATCH" in dispatcher.precompile_error and len(dispatcher.ready) == 1
    sample = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        expected = dispatcher.eager_forward(sample, torch.tensor(2.0))
        assert torch.allclose(dispatcher(sample, torch.tensor(2.0)), expected)
    assert (dispatcher.compiled_calls, dispatcher.eager_calls) == (1, 0)
