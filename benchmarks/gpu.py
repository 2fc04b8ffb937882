"""GPU benchmark: direct diffusers vs this server, eager and compiled, on full-size random-weight checkpoints.

Builds SD 1.5- and SDXL-architecture checkpoints offline (the real configs, random weights scaled down,
saved in float16 as the server loads them, in-memory tokenizers as in tiny.py), then prints one row per
phase as soon as it is measured: direct eager, served eager and served compiled (p50/p95, time to first
event, first step, an undeclared size, images/s with 1/8/16 clients with batching off and on against the
direct batched ceiling), cold start with an empty and a warm compile cache, the compiled/eager denoiser
calls the server counted, GPU memory, and how far compiled images are from eager ones.

A "direct compiled" row compiles the direct pipeline's UNet as diffusers documents it and profiles one
call: the yardstick for the served compiled path on the same GPU. A "server call path" row runs the
server's own load, placement, compile and `run_call` in-process (no gRPC) and profiles one call: between
the two, what the server's call path costs; between it and served compiled, what the server around it
costs.

Probes run only when named in --phases. "precompile" measures what the server's precompiled graphs rest
on: one UNet call eager, traced (`torch.compile`) and precompiled (`aot_compile`), then in a fresh process
the precompiled graph's load time against dynamo's re-trace with a warm cache, whether CUDA graph trees
capture the loaded graph, and the alternative of capturing it in a CUDA graph of our own. On an H200 (SD
1.5): 6.9 ms a call traced and precompiled alike, 0.8 s to load against 7.5 s to re-trace, the graph
trees held it; our own capture 6.3 ms. On a 2-core CPU (tiny SD 1.5): load 0.1 s against 2.2 s.

Made for one unattended run: every phase is timed against `--budget` (a phase that cannot start in time
is printed as skipped, a server that cannot become SERVING in the time left is stopped), phases run
most telling first (see PHASES), throughput is measured over a time window whose unfinished requests
are cancelled, and a failing phase prints its error and the server's last log lines, then the run
goes on. On one H100, SD 1.5's build, direct, eager, compiled cold and compiled warm phases took 368 s
(compiling batch sizes 1 and 8, one graph, 106 of them), and SDXL's build, direct and compiled cold
phases at batch 1 took 217 s; so run the families apart:

    python benchmarks/gpu.py --families sd15 --phases direct,eager,compiled-cold,compiled-warm
    python benchmarks/gpu.py --families sd15 --phases direct-compiled,call-path     # the yardsticks
    python benchmarks/gpu.py --families sdxl --phases direct,compiled-cold,compiled-warm --batch 1 --clients 1
    python benchmarks/gpu.py --families sd15 --phases precompile      # the probe alone, about 2 minutes
    python benchmarks/gpu.py --tiny --device cpu  # smoke test: tiny checkpoints, small numbers
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import PIL.Image
from _serve import build_checkpoint, served_process

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

FULL = {  # family: (size, steps)
    "sd15": (512, 25),
    "sdxl": (1024, 20),
}
# A family's phases, in the order they run.
PHASES = (
    "direct",
    "eager",
    "compiled-cold",
    "compiled-warm",
    "eager-batching",
    "direct-compiled",
    "call-path",
)
# Run only when named in --phases, after the phases: "eager-prepared" serves `--acceleration eager` (the
# denoiser channels_last with fused QKV, no compiler: compiled servers' path for undeclared sizes);
# "precompile" measures what the server's precompiled graphs rest on, and an alternative to them.
PROBES = ("eager-prepared", "precompile")
# Seconds kept back from the budget for stopping a server and printing.
RESERVE = 15.0
T = TypeVar("T")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Budget:
    """The run's deadline: phases ask what is left before they start, servers get it as their start limit."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE


# ------------------------------------------------------------------------------ full-size checkpoints


def build_full_checkpoint(family: str, out: Path, log: Path, device: str) -> Path:
    """The real SD 1.5 / SDXL architectures, random weights (built in a child: this process has no torch)."""
    _in_child(f"_build_full({family!r}, {str(out)!r}, {device!r})", log)
    return out


def _build_full(family: str, out: str, device: str = "cpu") -> None:
    import torch

    torch.manual_seed(0)
    # Built on the benchmark's device: initialising SDXL's 3.5 billion random weights takes the CPU a
    # minute, the GPU a second.
    with torch.device(device):
        pipe = _full_pipeline(family)
    # Margin for float16: measured in float32 on SD 1.5, the largest activation of any block is ~14.
    with torch.no_grad():
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for parameter in module.parameters():
                    if parameter.dim() >= 2:
                        parameter.mul_(0.5)
    # Saved as the server and the direct baseline load it: half the bytes to write and to read back
    # in each of the five processes of a family (SDXL: 7 GB instead of 14).
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)


def _full_pipeline(family: str) -> Any:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from autopipeline_server import tiny

    vocab = tiny._vocab()

    def text(hidden: int, layers: int, heads: int, projection: bool) -> Any:
        config = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=vocab[tiny._BOS], eos_token_id=vocab[tiny._EOS], pad_token_id=vocab[tiny._EOS],
        )  # fmt: skip
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024 if family == "sdxl" else 512,
        force_upcast=family == "sdxl",
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )
    if family == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        pipe: Any = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text(768, 12, 12, False), tokenizer=tiny._tokenizer(),
            scheduler=PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    skip_prk_steps=True, steps_offset=1),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae,
            text_encoder=text(768, 12, 12, False), text_encoder_2=text(1280, 32, 20, True),
            tokenizer=tiny._tokenizer(), tokenizer_2=tiny._tokenizer(pad_token="!"),
            scheduler=EulerDiscreteScheduler(
                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                steps_offset=1, timestep_spacing="leading",
            ),
            image_encoder=None, feature_extractor=None,
        )  # fmt: skip
    return pipe


# --------------------------------------------------------------------------------------- measuring


def _in_child(call: str, log: Path) -> dict[str, Any]:
    """Runs `gpu.<call>` in a child Python (torch stays out of this process) and returns what it
    returned (a JSON-able dict; None gives an empty one); the child's stderr goes to `log`."""
    here = str(Path(__file__).parent)
    code = (
        f"import sys, json; sys.path.insert(0, {here!r}); import gpu; print(json.dumps(gpu.{call} or {{}}))"
    )
    return dict(json.loads(_child([sys.executable, "-c", code], log).strip().splitlines()[-1]))


def _child(command: list[str], log: Path) -> str:
    """Runs a child to completion and returns its stdout; its stderr goes to `log`."""
    with log.open("w") as stderr:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the child process exited with {result.returncode} (its log: {log})")
    return result.stdout


def _tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + line for line in text[-lines:])


# The server's log lines that say where a start's time went, in the order they come.
_START_MESSAGES = re.compile(
    r"listening on|loaded \S+ \(|torch\.compile ready|denoiser shapes|warm-up requests took|models ready"
    r"|precompil"
)


def start_timeline(log: Path) -> str:
    """A start's milestones from a server log: seconds since its first line, then the message."""
    first: datetime.datetime | None = None
    parts = []
    for line in log.read_text(errors="replace").splitlines():
        stamp, _, rest = line.partition(" INFO ")
        if not rest:
            stamp, _, rest = line.partition(" WARNING ")
        try:
            when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            continue
        first = first or when
        message = rest.partition(": ")[2]
        if _START_MESSAGES.search(message):
            parts.append(f"+{(when - first).total_seconds():.1f}s {message[:220]}")
    return "; ".join(parts)


class Stages:
    """Where one pipeline call's time goes: each stage's calls, host ms and device ms, and the call's wall.

    Wraps the pipeline's text encoder, denoiser, scheduler step, VAE decode and post-processing (the
    scheduler on its class: the server gives each call its own instance). Device ms are the GPU
    timeline's span between CUDA events recorded at each stage's start and end, idle gaps included:
    span above host time means the GPU bounds the stage, span near host time that launches do.
    """

    NAMES = ("text_encoder", "denoiser", "scheduler", "vae_decode", "postprocess")

    def __init__(self, pipe: Any, cuda: bool) -> None:
        self._pipe, self._cuda = pipe, cuda
        self._host: dict[str, float] = dict.fromkeys(self.NAMES, 0.0)
        self._calls: dict[str, int] = dict.fromkeys(self.NAMES, 0)
        self._events: dict[str, list[tuple[Any, Any]]] = {name: [] for name in self.NAMES}

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        import torch

        def timed(*args: Any, **kwargs: Any) -> Any:
            begun = time.perf_counter()
            if self._cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            try:
                return fn(*args, **kwargs)
            finally:
                if self._cuda:
                    end.record()
                    self._events[name].append((start, end))
                self._host[name] += time.perf_counter() - begun
                self._calls[name] += 1

        return timed

    def measure(self, run: Callable[[], float]) -> str:
        """Runs `run` once with every stage wrapped; returns the breakdown as one line."""
        import torch

        pipe = self._pipe
        denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        scheduler_class = type(pipe.scheduler)
        targets = [
            (pipe.text_encoder, "forward", "text_encoder"),
            (denoiser, "forward", "denoiser"),
            (pipe.vae, "decode", "vae_decode"),
            (pipe.image_processor, "postprocess", "postprocess"),
        ]
        had = [(obj, attr, attr in vars(obj), getattr(obj, attr)) for obj, attr, _ in targets]
        step = scheduler_class.step
        for obj, attr, name in targets:
            setattr(obj, attr, self._wrap(name, getattr(obj, attr)))
        scheduler_class.step = self._wrap("scheduler", step)
        try:
            wall = run()
        finally:
            scheduler_class.step = step
            for obj, attr, own, value in had:
                if own:
                    setattr(obj, attr, value)
                else:
                    delattr(obj, attr)
        if self._cuda:
            torch.cuda.synchronize()
        parts = [f"wall {wall * 1000:.1f} ms"]
        for name in self.NAMES:
            device = sum(s.elapsed_time(e) for s, e in self._events[name])
            parts.append(
                f"{name} x{self._calls[name]} host {self._host[name] * 1000:.1f}"
                + (f" device {device:.1f}" if self._cuda else "")
            )
        parts.append(f"other host {(wall - sum(self._host.values())) * 1000:.1f}")
        return "; ".join(parts)


def _off_shape_calls(
    pipe: Any, run: Callable[[int, int], float], size: int, count: int, cuda: bool
) -> dict[str, Any]:
    """`count` calls at the undeclared size (3/4 of the width), then one more broken down in stages."""
    width, height = _off_shape(size)
    times = [run(width, height) for _ in range(count)]
    return {"times": times, "stages": Stages(pipe, cuda).measure(lambda: run(width, height))}


def direct(
    checkpoint: Path, args: argparse.Namespace, size: int, steps: int, log: Path, profile: Path | None = None
) -> dict[str, Any]:
    """Direct diffusers in a child process: p50/p95 of one image, and images/s at `batch` per call.

    With `profile`, the yardstick the served compiled path is held to: the same pipeline with its UNet
    compiled as diffusers documents it (channels_last, fused QKV, `torch.compile(mode="reduce-overhead",
    fullgraph=True)`), one image per call, and one call under torch.profiler, whose table goes to `profile`.
    """
    return _in_child(
        f"_direct({str(checkpoint)!r}, {args.device!r}, {size}, {steps}, {args.requests}, {args.batch}, "
        f"{args.latency_seconds}, {str(profile) if profile else None!r}, "
        f"{0 if profile else args.off_shape_requests})",
        log,
    )


def _direct(
    checkpoint: str,
    device: str,
    size: int,
    steps: int,
    requests: int,
    batch: int,
    seconds: float,
    profile: str | None = None,
    off_shape: int = 0,
) -> dict[str, Any]:
    import torch
    from diffusers import AutoPipelineForText2Image

    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(checkpoint, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if profile is not None:
        return _direct_compiled(pipe, cuda, size, steps, requests, seconds, Path(profile))

    def run(n: int, width: int = size, height: int = size) -> float:
        started = time.perf_counter()
        pipe(["a lighthouse"] * n, num_inference_steps=steps, width=width, height=height)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    run(1)
    singles = _repeat(lambda _: run(1), requests, seconds)
    run(batch)
    batched = _repeat(lambda _: run(batch), 2, 0.0)
    used = 0.0
    if cuda:
        free, total = torch.cuda.mem_get_info()
        used = (total - free) / 2**30
    result: dict[str, Any] = {
        "p50": statistics.median(singles),
        "p95": percentile(singles, 0.95),
        "images_per_s_1": len(singles) / sum(singles),
        "ceiling": batch / statistics.median(batched),
        "gib": used,  # the whole device, as nvidia-smi reports it for the served rows
        "stages": Stages(pipe, cuda).measure(lambda: run(1)),
    }
    if off_shape:
        # The undeclared size eagerly as loaded, then with the denoiser prepared as compiled servers
        # run it there (channels_last, fused QKV): in one process, so only the preparation differs.
        result["off"] = _off_shape_calls(pipe, lambda w, h: run(1, w, h), size, off_shape, cuda)
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet.fuse_qkv_projections()
        result["prepared"] = statistics.median(run(1) for _ in range(max(3, off_shape)))
        result["prepared_off"] = _off_shape_calls(pipe, lambda w, h: run(1, w, h), size, off_shape, cuda)
    return result


def _direct_compiled(
    pipe: Any, cuda: bool, size: int, steps: int, requests: int, seconds: float, profile: Path
) -> dict[str, float]:
    import torch

    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet.fuse_qkv_projections()
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead" if cuda else None, fullgraph=True)

    def run() -> float:
        started = time.perf_counter()
        pipe("a lighthouse", num_inference_steps=steps, width=size, height=size)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(3):  # compile, record the CUDA graphs, replay
        run()
    result = _timed_and_profiled(pipe, run, requests, seconds, cuda, profile, time.perf_counter() - started)
    # Whether compiling the VAE decoder as well would pay: its compile time, then the stages again.
    pipe.vae.decoder.to(memory_format=torch.channels_last)
    mode = "reduce-overhead" if cuda else None
    pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=mode, fullgraph=True)
    started = time.perf_counter()
    for _ in range(3):
        run()
    result["vae_compile"] = time.perf_counter() - started
    result["vae_p50"] = statistics.median(run() for _ in range(max(3, requests)))
    result["vae_stages"] = Stages(pipe, cuda).measure(run)
    return result


def call_path(
    checkpoint: Path, args: argparse.Namespace, size: int, steps: int, log: Path, profile: Path
) -> dict[str, Any]:
    """The server's own call path in a child, without gRPC: the model loaded, placed and compiled
    as the server does it (one declared shape, batch 1), then `run_call` timed and one call profiled.

    Against "direct compiled" it says what the server's call path costs; against served compiled,
    what the server around it costs.
    """
    return _in_child(
        f"_call_path({str(checkpoint)!r}, {args.device!r}, {size}, {steps}, {args.requests}, "
        f"{args.latency_seconds}, {str(profile)!r}, {args.off_shape_requests})",
        log,
    )


def _call_path(
    checkpoint: str,
    device: str,
    size: int,
    steps: int,
    requests: int,
    seconds: float,
    profile: str,
    off_shape: int = 0,
) -> dict[str, Any]:
    import torch

    from autopipeline_server.acceleration import AccelerationPlan
    from autopipeline_server.calls import QuietHooks, run_call
    from autopipeline_server.domain import GenerationRequest, Task
    from autopipeline_server.pipelines import load_model, resolve_dtype
    from autopipeline_server.prepare import prepare_call
    from autopipeline_server.registry import place_on_device
    from autopipeline_server.settings import load_settings

    settings = load_settings(
        {"models": f"m={checkpoint}", "acceleration": "compile", "compile_shapes": f"{size}x{size}x1"}, {}
    )
    where = torch.device(device)
    model = load_model(settings.models[0], dtype=resolve_dtype("auto", where), allow_pickle=False)
    started = time.perf_counter()
    place_on_device(model, where, AccelerationPlan.from_settings(settings, where), warm=True)
    compile_seconds = time.perf_counter() - started
    cuda = where.type == "cuda"

    def run(width: int = size, height: int = size) -> float:
        request = GenerationRequest(
            model="m", task=Task.TEXT_TO_IMAGE, prompt="a lighthouse", width=width, height=height,
            num_inference_steps=steps, seed=0,
        )  # fmt: skip
        begun = time.perf_counter()
        run_call(prepare_call(model, request), QuietHooks())  # PIL images back: the GPU is done
        return time.perf_counter() - begun

    run()
    pipe = model.tasks[Task.TEXT_TO_IMAGE].pipe
    result = _timed_and_profiled(pipe, run, requests, seconds, cuda, Path(profile), compile_seconds)
    if off_shape:  # the compiled server's eager path, as a request at an undeclared size takes it
        result["off"] = _off_shape_calls(pipe, run, size, off_shape, cuda)
    return result


def _timed_and_profiled(
    pipe: Any,
    run: Callable[[], float],
    requests: int,
    seconds: float,
    cuda: bool,
    table: Path,
    compile_seconds: float,
) -> dict[str, Any]:
    """p50/p95 of a compiled call, then one more call under torch.profiler: its wall time and the
    seconds of kernels it ran (each kernel's self time on the device, summed), which against the
    wall time say whether the GPU or the host bounds the call. The top operators go to `table`.
    Then one more call broken down in stages (see `Stages`)."""
    import torch

    singles = _repeat(lambda _: run(), requests, seconds)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        wall = run()
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table.write_text(averages.table(sort_by=sort_by, row_limit=30))
    return {
        "p50": statistics.median(singles),
        "p95": percentile(singles, 0.95),
        "compile": compile_seconds,
        "profiled_wall": wall,
        "device_busy": sum(event.self_device_time_total for event in averages) / 1e6,
        "stages": Stages(pipe, cuda).measure(run),
    }


def precompile_probe(
    checkpoint: Path, args: argparse.Namespace, size: int, folder: Path, log: Path
) -> dict[str, Any]:
    """What precompiled graphs save a restart, and whether they keep CUDA graphs.

    A traced graph's restart re-traces the UNet with dynamo (7.5 s on an H200 host, 4-5 s on a 2-core
    CPU) before the compile cache can answer. `torch.compile(...).aot_compile` saves the traced
    bytecode, its guards and the compiled graph, and `torch.compiler.load_compiled_function` loads them
    in a fresh process without tracing; Inductor applies CUDA graphs to a loaded graph if its setting is
    on while it loads (pytorch#155703 is about carrying it in the file). One child compiles the UNet of a
    batch-1 call both ways and saves the precompiled one; a second, fresh child loads it and times it
    against `torch.compile` warm from the first child's Inductor cache, as a restart would be.
    """
    call = f"{str(checkpoint)!r}, {args.device!r}, {size}, {args.requests}, {str(folder)!r}"
    saved = _in_child(f"_precompile({call}, 'save')", log)
    loaded = _in_child(f"_precompile({call}, 'load')", log.with_suffix(".load.log"))
    return {**saved, **loaded}


_UNET: list[Any] = []  # the module `_unet_call` runs: the precompiled artefact refers to it, not its weights


def _unet_call(sample: Any, timestep: Any, encoder_hidden_states: Any) -> Any:
    return _UNET[0](sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _precompile(
    checkpoint: str, device: str, size: int, requests: int, folder: str, stage: str
) -> dict[str, float]:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder) / "inductor")  # shared by both children
    import torch
    from diffusers import AutoPipelineForText2Image

    cuda = device.startswith("cuda")
    pipe = AutoPipelineForText2Image.from_pretrained(
        checkpoint, dtype=torch.float16 if cuda else torch.float32
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    unet.to(memory_format=torch.channels_last)  # as the server prepares it
    unet.fuse_qkv_projections()
    seen: list[tuple[Any, ...]] = []
    eager_forward = unet.forward
    unet.forward = lambda *a, **k: seen.append((*a[:2], k["encoder_hidden_states"])) or eager_forward(*a, **k)
    with torch.inference_mode():
        pipe("a lighthouse", num_inference_steps=2, width=size, height=size)
        del unet.forward
        sample, timestep, text = seen[0]
        inputs = (sample.contiguous(memory_format=torch.channels_last), timestep.float(), text)
    _UNET[:] = [unet]
    graphs = {"triton.cudagraphs": True} if cuda else {}
    path = Path(folder) / "unet.aot"

    def timed(fn: Callable[..., Any]) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            fn(*inputs)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - started

    def steady(fn: Callable[..., Any]) -> float:
        for _ in range(3):  # CUDA graph trees record on the second call and replay from the third
            timed(fn)
        return statistics.median(timed(fn) for _ in range(max(requests, 5)))

    result: dict[str, float] = {}
    if stage == "save":
        result["eager_call"] = steady(_unet_call)
        started = time.perf_counter()
        # torch 2.11 offers `aot_compile` only with this flag; later versions always do.
        with torch.inference_mode(), torch._dynamo.config.patch(enable_aot_compile=True):
            portable = getattr(torch.compiler, "keep_portable_guards_unsafe", None)
            options = {**({"guard_filter_fn": portable} if portable else {}), **graphs}
            aot = torch.compile(_unet_call, fullgraph=True, dynamic=False, options=options)
            precompiled = aot.aot_compile((inputs, {}))  # type: ignore[attr-defined]
        result["aot_compile"] = time.perf_counter() - started
        started = time.perf_counter()
        precompiled.save_compiled_function(str(path), external_data={"unet": unet})
        result["save"], result["bytes"] = time.perf_counter() - started, path.stat().st_size
        result["aot_call"] = steady(precompiled)
        # The regular path, compiled cold here so that the second child's Inductor cache is warm.
        compiled = torch.compile(_unet_call, fullgraph=True, dynamic=False, options=graphs)
        result["compile_first"] = timed(compiled)
        result["compile_call"] = steady(compiled)
        return result
    with torch.inference_mode():  # Inductor's imports, paid by whichever compiled code comes first
        torch.compile(lambda x: x + 1, dynamic=False)(inputs[0])
    started = time.perf_counter()
    # Inductor decides on CUDA graphs when it loads a graph, from its config then (pytorch#155703).
    with (
        path.open("rb") as file,
        torch.inference_mode(),  # the guards' dispatch keys as in the calls
        torch._inductor.config.patch(graphs),
    ):
        loaded = torch.compiler.load_compiled_function(file, external_data={"unet": unet})
    result["load"] = time.perf_counter() - started
    result["loaded_first"] = timed(loaded)
    result["loaded_call"] = steady(loaded)
    if cuda:  # functions the CUDA graph trees hold: 0 means the loaded graph runs without CUDA graphs
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        result["graph_functions"] = len(getattr(manager, "ids_to_funcs", ()))
        # The alternative to graph trees: the loaded graph without them, captured in a CUDA graph here.
        started = time.perf_counter()
        with path.open("rb") as file, torch.inference_mode():
            plain = torch.compiler.load_compiled_function(file, external_data={"unet": unet})
            static = tuple(t.clone() for t in inputs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    plain(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = plain(*static)
            torch.cuda.synchronize()
        result["capture"] = time.perf_counter() - started

        def replay(*args: Any) -> Any:
            for into, value in zip(static, args, strict=True):
                into.copy_(value)
            graph.replay()
            return out.clone()

        result["plain_call"] = steady(plain)
        result["captured_call"] = steady(replay)
        with torch.inference_mode():
            result["captured_diff"] = float((replay(*inputs) - _unet_call(*inputs)).abs().max())
    compiled = torch.compile(_unet_call, fullgraph=True, dynamic=False, options=graphs)
    result["warm_first"] = timed(compiled)  # dynamo's trace, then the Inductor cache
    result["warm_call"] = steady(compiled)
    return result


def _repeat(measure: Callable[[int], T], count: int, seconds: float) -> list[T]:
    """`count` measurements, or fewer (at least 3) once `seconds` have gone by (0: no time limit)."""
    results: list[T] = []
    started = time.monotonic()
    while len(results) < count:
        results.append(measure(len(results)))
        if seconds and len(results) >= 3 and time.monotonic() - started > seconds:
            break
    return results


@dataclass
class One:
    total: float
    first_event: float
    first_step: float
    image: bytes
    running: float = 0.0  # the server's own split of the request (Completed.timings)
    encoding: float = 0.0


def _one(stub: pb_grpc.AutoPipelineServiceStub, width: int, height: int, steps: int, seed: int) -> One:
    """One text-to-image request: its latency, time to first event and to first step, and its PNG."""
    request = pb.GenerateRequest(
        task=pb.TASK_TEXT_TO_IMAGE,
        prompt="a lighthouse",
        num_inference_steps=steps,
        width=width,
        height=height,
        seed=seed,
    )
    started = time.perf_counter()
    first = first_step = 0.0
    chunks: list[bytes] = []
    timings = pb.Timings()
    for event in stub.Generate(request):
        now = time.perf_counter() - started
        first = first or now
        if event.HasField("progress") and not first_step:
            first_step = now
        if event.HasField("image") and event.image.index == 0:
            chunks.append(event.image.image.data)
        if event.HasField("completed"):
            timings = event.completed.timings
    return One(
        time.perf_counter() - started, first, first_step, b"".join(chunks),
        timings.running.ToTimedelta().total_seconds(), timings.encoding.ToTimedelta().total_seconds(),
    )  # fmt: skip


def _throughput(
    stub: pb_grpc.AutoPipelineServiceStub, size: int, steps: int, clients: int, window: float, limit: float
) -> float | None:
    """Images/s of `clients` clients sending back to back, for `window` s and `clients` images at least.

    When both are reached (or `limit` seconds have gone by), the requests still running are cancelled,
    so the server is idle again at once instead of working off a queue nobody measures. None: `limit`
    came before `clients` images were done (no figure rather than a wrong one).
    """
    done: list[float] = []
    errors: list[BaseException] = []
    running: dict[int, Any] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        try:
            send(index)
        except BaseException as err:  # raised again below, in the measuring thread
            errors.append(err)
            stop.set()

    def send(index: int) -> None:
        for i in itertools.count():
            request = pb.GenerateRequest(
                task=pb.TASK_TEXT_TO_IMAGE, prompt=f"a lighthouse {index}", num_inference_steps=steps,
                width=size, height=size, seed=index * 1_000_000 + i,
            )  # fmt: skip
            with lock:
                if stop.is_set():
                    return
                call = running[index] = stub.Generate(request)
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                if stop.is_set():
                    return
                raise
            with lock:
                done.append(time.perf_counter())

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    while time.perf_counter() - started < limit and not stop.is_set():
        if time.perf_counter() - started >= window and len(done) >= clients:
            break
        time.sleep(0.05)
    with lock:
        stop.set()
        for call in running.values():
            call.cancel()
    for thread in threads:
        thread.join(30)
    if errors:
        raise errors[0]
    if len(done) < clients:
        return None
    return len(done) / (max(done) - started)


class GpuMemory:
    """Peak memory used on the device (GiB, the whole GPU), sampled from nvidia-smi once a second."""

    def __init__(self, device: str) -> None:
        self._index = _physical_index(device)
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        if self._index is None or shutil.which("nvidia-smi") is None:
            return
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", self._index]
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
            used = float(out.strip().splitlines()[0]) / 1024
            self.peak = max(self.peak or 0.0, used)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()


def _physical_index(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


@dataclass
class Served:
    start: float
    p50: float = 0.0
    p95: float = 0.0
    ttfe: float = 0.0
    first_step: float = 0.0
    off_shape: tuple[float, float | None] | None = None  # the first request at the size, the rest's median
    running: float = 0.0  # medians of the server's own split of one client's requests
    encoding: float = 0.0
    throughput: dict[int, float | None] = field(default_factory=dict)
    acceleration: Any = None
    gib: float | None = None
    image: bytes = b""


def served(
    checkpoint: Path, args: argparse.Namespace, budget: Budget, size: int, steps: int, log: Path, *flags: str
) -> Served:
    """Starts a server with `flags`: one client's latency, an undeclared size, several clients' images/s."""
    began = time.perf_counter()
    with (
        GpuMemory(args.device) as memory,
        served_process(
            "--model", f"m={checkpoint}", "--device", args.device, *flags,
            log=log, ready_within=budget.left(), log_level="INFO",
        ) as (target, _),
        grpc.insecure_channel(target) as channel,
    ):  # fmt: skip
        result = Served(start=time.perf_counter() - began)
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        result.image = _one(stub, size, size, steps, 0).image
        runs = _repeat(lambda i: _one(stub, size, size, steps, i + 1), args.requests, args.latency_seconds)
        result.p50 = statistics.median(r.total for r in runs)
        result.p95 = percentile([r.total for r in runs], 0.95)
        result.ttfe = statistics.median(r.first_event for r in runs)
        result.first_step = statistics.median(r.first_step for r in runs)
        result.running = statistics.median(r.running for r in runs)
        result.encoding = statistics.median(r.encoding for r in runs)
        if args.off_shape_requests:
            width, height = _off_shape(size)
            off = [_one(stub, width, height, steps, 100 + i).total for i in range(args.off_shape_requests)]
            result.off_shape = (off[0], statistics.median(off[1:]) if off[1:] else None)
        result.throughput[1] = len(runs) / sum(r.total for r in runs)
        for clients in (c for c in args.clients if c > 1):
            limit = min(4 * args.window, max(budget.left() - 10, 1.0))
            result.throughput[clients] = _throughput(stub, size, steps, clients, args.window, limit)
        result.acceleration = stub.Inspect(pb.InspectRequest()).models[0].acceleration
    result.gib = memory.peak
    return result


def _off_shape_notes(what: str, off: dict[str, Any]) -> None:
    note(f"{what}, undeclared size, calls in order: {', '.join(_ms(t) for t in off['times'])} ms")
    note(f"{what}, undeclared size, one more call in stages: {off['stages']}")


def _off_shape(size: int) -> tuple[int, int]:
    """A size no server here declares (so compiled servers run it eagerly): 3/4 of the width."""
    return size * 3 // 4 // 8 * 8, size


def _off_shape_cell(off: tuple[float, float | None] | None) -> str:
    if off is None:
        return ""
    first, rest = off
    return _ms(first) if rest is None else f"{_ms(first)}/{_ms(rest)}"


def image_difference(a: bytes, b: bytes) -> str:
    """Max and mean absolute difference of two PNGs, in 8-bit levels."""
    if not a or not b:
        return "n/a"
    first = np.asarray(PIL.Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.int16)
    second = np.asarray(PIL.Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)
    if first.shape != second.shape:
        return f"shapes {first.shape} vs {second.shape}"
    delta = np.abs(first - second)
    return f"max {int(delta.max())} mean {float(delta.mean()):.2f}"


# ---------------------------------------------------------------------------------------- printing

COLUMNS = (
    ("model", 22),
    ("path", 38),
    ("start s", 28),
    ("p50 ms", 8),
    ("p95 ms", 8),
    ("TTFE ms", 8),
    ("1st step ms", 11),
    ("off-shape ms 1st/rest", 21),
    ("images/s by clients", 30),
    ("denoiser calls c/e/f", 20),
    ("GiB", 5),
    ("vs served eager", 16),
)


def emit(*cells: str) -> None:
    line = "  ".join(str(cell).ljust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True))
    print(line.rstrip(), flush=True)


def note(text: str) -> None:
    print(f"  ! {text}", flush=True)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def served_row(label: str, name: str, result: Served, reference: bytes | None) -> None:
    """One served phase's row; `reference`: the served eager image of the same request (None: this is it)."""
    acc = result.acceleration
    start = f"{result.start:.1f}"
    if acc.mode == "compile":
        found = f"loaded {acc.graphs_loaded}" if acc.graphs_loaded else f"hits {acc.cache_hits}"
        start += f" (compile {acc.compile_time.ToTimedelta().total_seconds():.1f}, {found})"
    emit(
        label,
        f"{name} [{acc.mode}]",
        start,
        _ms(result.p50),
        _ms(result.p95),
        _ms(result.ttfe),
        _ms(result.first_step),
        _off_shape_cell(result.off_shape),
        " / ".join(f"{c}:{'n/a' if v is None else f'{v:.2f}'}" for c, v in result.throughput.items()),
        f"{acc.compiled_calls}/{acc.eager_calls}/{acc.eager_fallbacks}",
        _gib(result.gib),
        image_difference(reference, result.image)
        if reference is not None
        else "(reference)"
        if acc.mode == "off"
        else "n/a: no eager run",
    )
    note(
        f"{label}, {name}: medians of the pipeline call {_ms(result.running)} ms, "
        f"encoding {_ms(result.encoding)} ms"
    )
    if acc.error:
        note(f"acceleration error: {acc.error}")
    if acc.cudagraph_skips:
        reason = acc.cudagraph_skip_reason or "no reason given"
        note(f"{acc.cudagraph_skips} compiled graphs run without CUDA graphs (launch-bound): {reason}")


# ------------------------------------------------------------------------------------------------ run


@contextlib.contextmanager
def phase(name: str, budget: Budget, needs: float, log: Path | None = None) -> Iterator[bool]:
    """Runs a phase if `needs` seconds are left; a failure prints the log's tail, and the run goes on."""
    if budget.left() < needs:
        note(f"{name}: skipped, {max(budget.left(), 0):.0f}s of the budget left")
        yield False
        return
    started = time.monotonic()
    try:
        yield True
    except Exception as err:
        note(f"{name}: FAILED after {time.monotonic() - started:.0f}s: {type(err).__name__}: {err}")
        if log is not None and log.exists():
            print(_tail(log), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints, 64x64, 4 steps (a smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds the whole run may take")
    parser.add_argument("--requests", type=int, default=10, help="latency requests per phase (at most)")
    parser.add_argument(
        "--latency-seconds", type=float, default=15.0, help="end latency runs after this (3 at least)"
    )
    parser.add_argument("--off-shape-requests", type=int, default=3, help="requests at an undeclared size")
    parser.add_argument("--clients", default="1,8,16")
    parser.add_argument("--window", type=float, default=8.0, help="seconds of each throughput measurement")
    parser.add_argument("--batch", type=int, default=8, help="max batch size when batching is on")
    parser.add_argument(
        "--batch-delay-ms",
        type=int,
        default=100,
        help="max batch delay when batching is on: long enough for a batch's clients to come back "
        "(random weights make noise images, which took 40-90 ms each to encode as PNG on the H100's host "
        "with Pillow; libpng now takes a fraction of that)",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"the phases to run for each family, of {','.join(PHASES)} (checkpoint building always "
        f"runs), and the probes {','.join(PROBES)} (only when named)",
    )
    parser.add_argument("--keep", metavar="DIR", help="keep checkpoints, caches and logs here")
    parser.add_argument("--logs", metavar="DIR", help="write the servers' and children's logs here")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.phases = set(args.phases.split(","))
    if args.phases - set(PHASES) - set(PROBES):
        parser.error(f"--phases: unknown {', '.join(sorted(args.phases - set(PHASES) - set(PROBES)))}")
    budget = Budget(args.budget)
    print(
        f"device {args.device}; served batching: max {args.batch}, delay {args.batch_delay_ms} ms; "
        f"budget {args.budget:.0f}s; "
        "denoiser calls: compiled/eager/eager fallbacks; GiB: peak used on the whole GPU (nvidia-smi)",
        flush=True,
    )
    emit(*(name for name, _ in COLUMNS))
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        logs = Path(args.logs) if args.logs else root
        for folder in (root, logs):
            folder.mkdir(parents=True, exist_ok=True)
        for family in args.families.split(","):
            run_family(family, args, budget, root, logs)
    note(f"done in {args.budget - (budget.deadline - time.monotonic()):.0f}s")


def run_family(family: str, args: argparse.Namespace, budget: Budget, root: Path, logs: Path) -> None:
    size, steps = (64, 4) if args.tiny else FULL[family]
    label = f"{family} {size}x{size} {steps} steps"
    out, cache = root / family, root / f"cache-{family}"
    log = logs / f"{family}-build.log"
    checkpoint: Path | None = None
    with phase(f"{family} checkpoint", budget, 60, log) as go:
        if go:
            started = time.monotonic()
            build = (
                build_checkpoint
                if args.tiny
                else functools.partial(build_full_checkpoint, log=log, device=args.device)
            )
            checkpoint = build(family, out)
            note(f"{family}: checkpoint built in {time.monotonic() - started:.0f}s")
    if checkpoint is None:
        return

    def direct_eager(log: Path) -> None:
        with GpuMemory(args.device) as memory:
            base = direct(checkpoint, args, size, steps, log)
        emit(
            label, "direct eager", "", _ms(base["p50"]), _ms(base["p95"]), "", "", "",
            f"1:{base['images_per_s_1']:.2f} / ceiling {base['ceiling']:.2f} (batch {args.batch})",
            "", _gib(memory.peak or base["gib"] or None), "",
        )  # fmt: skip
        note(f"{family} direct eager, one call in stages: {base['stages']}")
        if "off" in base:
            _off_shape_notes(f"{family} direct eager", base["off"])
            prepared = _ms(base["prepared"])
            note(f"{family} direct eager, denoiser prepared (channels_last, fused QKV): p50 {prepared} ms")
            _off_shape_notes(f"{family} direct eager, denoiser prepared", base["prepared_off"])

    def compiled_yardstick(
        key: str, path: str, said: str, measure: Callable[[Path, Path], dict[str, Any]]
    ) -> Callable[[Path], None]:
        """A batch-1 compiled measurement with one profiled call (`measure(log, table)`): its row and note."""

        def run(log: Path) -> None:
            table = logs / f"{family}-{key}-profile.txt"
            with GpuMemory(args.device) as memory:
                measured = measure(log, table)
            emit(
                label, path, f"(compile {measured['compile']:.1f})",
                _ms(measured["p50"]), _ms(measured["p95"]), "", "", "", "", "", _gib(memory.peak), "",
            )  # fmt: skip
            note(
                f"{family} {said}, one call profiled: {measured['device_busy'] * 1000:.1f} ms of "
                f"kernels in {measured['profiled_wall'] * 1000:.1f} ms (the top kernels: {table.name})"
            )
            note(f"{family} {said}, one call in stages: {measured['stages']}")
            if "vae_compile" in measured:
                note(
                    f"{family} {said}, the VAE decoder compiled too ({measured['vae_compile']:.1f} s): "
                    f"p50 {_ms(measured['vae_p50'])} ms; one call in stages: {measured['vae_stages']}"
                )
            if "off" in measured:
                _off_shape_notes(f"{family} {said}", measured["off"])

        return run

    direct_compiled = compiled_yardstick(
        "direct-compiled", "direct compiled (batch 1)", "direct compiled",
        lambda log, table: direct(checkpoint, args, size, steps, log, profile=table),
    )  # fmt: skip
    served_call_path = compiled_yardstick(
        "call-path", "call path, compiled (batch 1, no gRPC)", "server call path",
        lambda log, table: call_path(checkpoint, args, size, steps, log, table),
    )  # fmt: skip

    def precompile(log: Path) -> None:
        folder = root / f"precompile-{family}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        m = precompile_probe(checkpoint, args, size, folder, log)
        note(
            f"{family} precompile probe, one UNet call at batch 1 (p50 ms): eager {_ms(m['eager_call'])}, "
            f"torch.compile {_ms(m['compile_call'])}, precompiled {_ms(m['aot_call'])}; in a fresh process: "
            f"precompiled {_ms(m['loaded_call'])} after {m['load']:.1f} s to load and "
            f"{m['loaded_first']:.1f} s for its first call, torch.compile {_ms(m['warm_call'])} after "
            f"{m['warm_first']:.1f} s to trace and load its warm cache (cold: {m['compile_first']:.1f} s; "
            f"aot_compile {m['aot_compile']:.1f} s, {m['bytes'] / 2**20:.1f} MiB saved)"
            + (
                f"; CUDA graph trees held {m['graph_functions']} loaded functions; loaded without them "
                f"{_ms(m['plain_call'])}, captured here in a CUDA graph {_ms(m['captured_call'])} after "
                f"{m['capture']:.1f} s to load and capture, max diff from eager {m['captured_diff']:.4f}"
                if "graph_functions" in m
                else ""
            )
        )

    reference: list[bytes] = []  # the served eager image of seed 0, once measured

    def serve(name: str, *flags: str) -> Callable[[Path], None]:
        def run(log: Path) -> None:
            result = served(checkpoint, args, budget, size, steps, log, *flags)
            served_row(label, name, result, reference[0] if reference else None)
            note(f"{label}, {name}, its start: {start_timeline(log)}")
            if not reference and result.acceleration.mode == "off":
                reference.append(result.image)

        return run

    batching = ("--max-batch-size", str(args.batch), "--max-batch-delay-ms", str(args.batch_delay_ms))
    shapes = f"{size}x{size}"
    compiled = ("--acceleration", "compile", "--compile-shapes", shapes, "--compile-cache-dir", str(cache))
    # Most telling first, where the budget may not reach the end: the baselines, then compiled cold and
    # warm, then batching and the compiled yardstick.
    phases: dict[str, tuple[str, Callable[[Path], None], float]] = {
        "direct": ("direct", direct_eager, 30),
        "eager": ("served eager", serve("served eager", "--acceleration", "off"), 45),
        "compiled-cold": (
            "served compiled, cold cache",
            serve("served compiled, cold cache", *compiled, *batching),
            120,
        ),
        "compiled-warm": (
            "served compiled, warm cache",
            serve("served compiled, warm cache", *compiled, *batching),
            60,
        ),
        "eager-batching": (
            "served eager, batching",
            serve("served eager, batching", "--acceleration", "off", *batching),
            45,
        ),
        "direct-compiled": ("direct compiled", direct_compiled, 90),
        "call-path": ("server call path", served_call_path, 90),
        "eager-prepared": (
            "served eager, prepared",
            serve("served eager, prepared", "--acceleration", "eager"),
            45,
        ),
        "precompile": ("precompile probe", precompile, 120),
    }
    for key in (*PHASES, *PROBES):
        name, run, needs = phases[key]
        if key not in args.phases:
            continue
        if key == "compiled-warm" and not any(cache.glob("*")):
            note(f"{family} {name}: skipped, the cold run left no cache")
            continue
        if key == "compiled-cold":  # cold also where --keep names a folder of an earlier run
            shutil.rmtree(cache, ignore_errors=True)
        log = logs / f"{family}-{name.replace(' ', '-').replace(',', '')}.log"
        with phase(f"{family} {name}", budget, needs, log) as go:
            if go:
                run(log)


if __name__ == "__main__":
    main()
