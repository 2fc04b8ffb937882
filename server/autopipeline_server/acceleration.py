"""Acceleration: a prepared (channels_last, fused QKV) denoiser, compiled and graph-captured for declared
hot shapes where the mode asks for it, its graphs precompiled into the cache dir so that the next start
loads rather than traces them; other shapes run it eagerly."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import PIL.Image
import torch
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only

from autopipeline_server import __version__
from autopipeline_server.controlnet import warm_up_image
from autopipeline_server.domain import GenerationRequest, Task
from autopipeline_server.settings import Settings

if TYPE_CHECKING:
    from autopipeline_server.pipelines import LoadedModel

log = logging.getLogger(__name__)

# The mega-cache files (torch.compiler.save_cache_artifacts) live in this folder of the cache dir.
MEGACACHE_FOLDER = "autopipeline-megacache"
# Precompiled graphs (`aot_compile`: dynamo's trace, its guards and Inductor's code, in one file per
# denoiser signature) live in a folder per model below this one.
PRECOMPILED_FOLDER = "autopipeline-precompiled"
# Denoising steps of a warm-up call: CUDA graph trees run a shape once eagerly, record it on the
# second call and replay from the third, so three calls per shape leave it captured.
WARMUP_STEPS = 3
# A denoiser batch smaller than a compiled one runs in that graph, padded, when the graph's batch is
# at most this many times its own: each sample of a UNet or DiT is computed independently, so
# padding changes no sample, and on a launch-bound GPU a graph at twice the batch is still far
# faster than eager. Beyond it the batch runs eagerly.
PAD_UP_TO = 2
# Where Inductor says why it left a compiled graph without CUDA graphs (it also counts them, in
# counters["inductor"]["cudagraph_skips"]): such a graph runs compiled but launch-bound, like eager.
_CUDAGRAPH_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"

# What `auto` means per device type, from measurements (README "Performance"): on CUDA eager diffusers
# is launch-bound and CUDA graphs pay 3.5x; on CPU the prepared denoiser made the tiny SD 1.5 10-15%
# faster and the full-size UNet no slower, while compiling costs seconds per shape at every start.
# Other devices keep the pipeline as loaded.
_AUTO = {"cuda": "compile", "cpu": "eager"}

Shape = tuple[int, ...]
Signature = tuple[tuple[str, Shape], ...]


@dataclass(frozen=True)
class AccelerationPlan:
    """What the operator asked for, resolved for one device."""

    requested: str
    mode: str  # "off", "eager" or "compile"
    shapes: tuple[tuple[int, int, int | None], ...]
    max_batch_size: int
    cache_dir: str
    # torch.compile's mode: "reduce-overhead" (CUDA graphs) on CUDA, the default elsewhere.
    compile_mode: str | None

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> AccelerationPlan:
        mode = settings.acceleration
        if mode == "auto":
            mode = _AUTO.get(device.type, "off")
        return cls(
            requested=settings.acceleration,
            mode=mode,
            shapes=settings.hot_shapes,
            max_batch_size=settings.max_batch_size,
            cache_dir=settings.compile_cache_dir or (_default_cache_dir() if mode == "compile" else ""),
            compile_mode="reduce-overhead" if mode == "compile" and device.type == "cuda" else None,
        )

    def batch_sizes(self, declared: int | None) -> list[int]:
        return [declared] if declared is not None else sorted({1, self.max_batch_size})


def _default_cache_dir() -> str:
    """torch's own Inductor cache dir: $TORCHINDUCTOR_CACHE_DIR, else a per-user folder in the temp dir.

    Without a configured cache dir, precompiled graphs and the mega-cache go beside Inductor's cache, so
    that a restart on the same machine (or a container whose image points the variable at a volume)
    still loads them.
    """
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # an older torch: no files of our own, Inductor keeps its cache where it does
        return ""
    return cache_dir()


def configure_cache(cache_dir: str) -> None:
    """Points torch's compile caches (Inductor, and Triton beneath it) at `cache_dir`; call once at start-up.

    torch reads the variable itself, lazily, so setting it before the first compile is the documented
    way to choose the folder; the value comes from the settings, not from our environment.
    """
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())


_compiler_ready: set[str] = set()  # device types `prepare_compiler` has run on in this process
_compiler_lock = threading.Lock()


def _scale_and_shift(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def prepare_compiler(device: torch.device, plan: AccelerationPlan) -> None:
    """Pays torch.compile's once-a-process costs on a trivial function; runs on the device thread.

    The first compile in a process imports dynamo, AOTAutograd and Inductor and starts their caches
    (and on CUDA, Triton): about 2 s on a 2-core CPU before any model code is traced. The registry
    runs this while the checkpoint is read, so a start-up pays it alongside the load instead of after
    it. Inductor's default mode: CUDA graph trees are left to the denoiser's own graphs.
    """
    if plan.mode != "compile":
        return
    with _compiler_lock:
        if device.type in _compiler_ready:
            return
        _compiler_ready.add(device.type)
    started = time.perf_counter()
    try:
        with _GATE.compiling(), torch.inference_mode():
            torch.compile(_scale_and_shift, fullgraph=True, dynamic=False)(torch.ones(8, device=device))
    except Exception:  # the first real compile pays instead, and says why if it fails too
        log.warning("preparing torch.compile on %s failed", device, exc_info=True)
        return
    log.info("torch.compile ready on %s in %.1fs", device, time.perf_counter() - started)


@dataclass(frozen=True)
class CompiledShape:
    """A denoiser input shape compiled (and on CUDA captured) during warm-up, and the request it serves."""

    task: Task
    width: int
    height: int
    batch_size: int
    denoiser_shape: Shape


@dataclass
class AccelerationReport:
    """What acceleration did for one model, for the log and Inspect."""

    requested: str
    mode: str
    compiled_shapes: list[CompiledShape] = field(default_factory=list)
    compile_seconds: float = 0.0
    cache_loaded: bool = False  # a mega-cache file for this model, torch and device was found and loaded
    cache_hits: int = 0  # Inductor FX graph cache hits during warm-up
    cache_misses: int = 0
    # Graphs compiled during warm-up that run without CUDA graphs although the mode asks for them,
    # and Inductor's reason for the first (where it gives one).
    cudagraph_skips: int = 0
    cudagraph_skip_reason: str = ""
    graphs: int = 0  # dynamo graphs traced during warm-up: batch sizes of one size share one
    # Graphs loaded ready-made from the cache dir (precompiled by an earlier start): neither traced
    # nor compiled again.
    graphs_loaded: int = 0
    # Why the graphs are traced at every start instead of precompiled; empty otherwise.
    precompile_error: str = ""
    error: str = ""
    dispatcher: DenoiserDispatcher | None = None

    @property
    def compiled_calls(self) -> int:
        return self.dispatcher.compiled_calls if self.dispatcher else 0

    @property
    def eager_calls(self) -> int:
        return self.dispatcher.eager_calls if self.dispatcher else 0

    @property
    def eager_fallbacks(self) -> int:
        return self.dispatcher.eager_fallbacks if self.dispatcher else 0

    @property
    def adapter_calls(self) -> int:
        return self.dispatcher.adapter_calls if self.dispatcher else 0

    @property
    def padded_calls(self) -> int:
        return self.dispatcher.padded_calls if self.dispatcher else 0


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Signature:
    """The shapes of every tensor argument (by position or name, in nested dicts, lists and tuples too:
    ControlNet residuals come as a tuple, Z-Image's latents and prompts as lists of per-sample tensors)."""
    parts: list[tuple[str, Shape]] = []

    def add(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape)))
        elif isinstance(value, dict):
            for key in sorted(value):
                add(f"{name}.{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                add(f"{name}[{index}]", item)

    for index, value in enumerate(args):
        add(str(index), value)
    for key in sorted(kwargs):
        add(key, kwargs[key])
    return tuple(parts)


def _sample_shape(signature: Signature) -> Shape:
    """The latents' shape; for latents passed as a list of per-sample tensors (Z-Image), the list's
    length followed by the first sample's shape."""
    named = dict(signature)
    shape = named.get("0") or named.get("sample") or named.get("hidden_states")
    if shape:
        return shape
    samples = [shape for name, shape in signature if name.startswith("0[")]
    return (len(samples), *samples[0]) if samples else ()


@dataclass(frozen=True)
class _Padding:
    """How a smaller batch runs in a compiled graph: the tensors `names` (as `_signature` names them)
    lead with `batch` samples, padded to the graph's `to`."""

    batch: int
    to: int
    names: frozenset[str]

    def pad(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments with the first sample of each batch tensor repeated up to the graph's batch."""

        def padded(name: str, value: Any) -> Any:
            if isinstance(value, torch.Tensor) and name in self.names:
                return torch.cat([value, value[:1].expand(self.to - self.batch, *value.shape[1:])])
            if isinstance(value, dict):
                return {key: padded(f"{name}.{key}", item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(padded(f"{name}[{index}]", item) for index, item in enumerate(value))
            return value

        return (
            tuple(padded(str(index), value) for index, value in enumerate(args)),
            {key: padded(key, value) for key, value in kwargs.items()},
        )

    def trim(self, value: Any) -> Any:
        """The graph's outputs cut back to the batch's own samples."""
        return tree_map_only(
            torch.Tensor, lambda t: t[: self.batch] if t.dim() and t.shape[0] == self.to else t, value
        )


def _padding(signature: Signature, ready: Signature) -> _Padding | None:
    """How `signature`'s batch runs padded in the graph of `ready`; None if it cannot (see PAD_UP_TO).

    Every tensor must have the same shape in both, except that those leading with the sample's
    batch may lead with the graph's batch instead (latents, prompt embeddings, per-sample timesteps).
    """
    sample, compiled = _sample_shape(signature), _sample_shape(ready)
    if not sample or not compiled or len(signature) != len(ready):
        return None
    batch, to = sample[0], compiled[0]
    if not batch < to <= PAD_UP_TO * batch:
        return None
    names = set()
    for (name, shape), (ready_name, ready_shape) in zip(signature, ready, strict=True):
        if name != ready_name:
            return None
        if shape == ready_shape:
            continue
        if (
            len(shape) != len(ready_shape)
            or shape[0] != batch
            or ready_shape[0] != to
            or shape[1:] != ready_shape[1:]
        ):
            return None
        names.add(name)
    return _Padding(batch, to, frozenset(names))


class _StanceGate:
    """Keeps hot calls (under dynamo's `fail_on_recompile` stance) and compiling calls apart, process-wide.

    The stance is one global of the process, not of a thread, while each device has its own thread:
    a hot call on one device would make another device's warm-up compile fail ("Detected recompile"),
    and two threads' `set_stance` contexts that interleave leave the stance stuck at
    `fail_on_recompile` for good. So the stance is set while at least one hot call runs and restored
    when the last one ends; a compiling call waits for the hot calls running (a graph launch each) and,
    while it compiles, hot calls on other devices run eagerly rather than wait for a compiler.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._hot = 0
        self._compiling = 0
        self._stance: Any = None  # the set_stance object whose exit restores the stance before it

    @contextlib.contextmanager
    def hot(self) -> Iterator[bool]:
        """Yields True with the stance set for a compiled call; False while another thread compiles."""
        with self._lock:
            admitted = not self._compiling
            if admitted:
                self._hot += 1
                if self._hot == 1:
                    self._stance = torch.compiler.set_stance("fail_on_recompile")
        try:
            yield admitted
        finally:
            if admitted:
                with self._lock:
                    self._hot -= 1
                    if self._hot == 0:
                        self._stance.__exit__(None, None, None)
                        self._stance = None
                        self._lock.notify_all()

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        with self._lock:
            self._compiling += 1  # from now on other threads' hot calls run eagerly
            self._lock.notify_all()
            self._lock.wait_for(lambda: self._hot == 0)
        try:
            yield
        finally:
            with self._lock:
                self._compiling -= 1


_GATE = _StanceGate()


@dataclass(frozen=True)
class _Runner:
    """How a ready signature runs: its compiled callable, and whether dynamo traced it at this start."""

    call: Callable[..., Any]
    traced: bool


# Scalars and strings among a call's arguments, with where they are: the part of a call its signature
# (tensor shapes) leaves out.
Constants = tuple[Any, ...]
_Key = tuple[Signature, Constants]


def _constants(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Constants:
    """The call's arguments other than tensors, and its structure (`None` where a dict may come).

    A graph was traced with these: `return_dict=False`, `cross_attention_kwargs=None`, a ControlNet's
    conditioning scale. Dynamo's own guards check them on a traced graph; a precompiled graph keeps
    only guards a new process can rebuild, so calls whose constants differ from its warm-up call's
    are kept from it here, whatever the torch version saves.
    """
    leaves, structure = tree_flatten((args, kwargs))
    return (str(structure), *(v for v in leaves if isinstance(v, (bool, int, float, str, type(None)))))


class DenoiserDispatcher:
    """Stands in for the denoiser's `forward`: warmed shapes run compiled, every other shape eagerly.

    Installed as the module's instance `forward`, so the pipelines (and `from_pipe` siblings, which
    share the module) call it unchanged. During warm-up (`warming`) calls compile freely and their
    shapes become ready. Afterwards a ready shape runs its compiled graph; a graph whose guards
    unexpectedly fail falls back to eager and is counted, so nothing ever compiles on the hot path.
    Any other shape goes straight to the eager forward.

    Graphs are precompiled where torch can (`torch.compile(...).aot_compile`): dynamo's trace, its
    guards and Inductor's code in one object, saved to `store` and loaded from it by the next start
    without tracing. Measured on an H200 with the SD 1.5 UNet: 0.8 s to load and 0.1 s for the first
    call, against 7.5 s for dynamo to re-trace before Inductor's cache could answer; CUDA graph trees
    capture a loaded graph as they do a traced one (6.9 ms a call either way). Where precompiling
    fails the denoiser is traced with `torch.compile` as before, and every start traces again.
    """

    def __init__(
        self, module: torch.nn.Module, *, compile_mode: str | None, store: Path | None = None
    ) -> None:
        self.eager_forward: Callable[..., Any] = module.forward
        self._module = module
        self._cuda_graphs = compile_mode == "reduce-overhead"
        # Inductor's settings for the mode, e.g. {"triton.cudagraphs": True}: a loaded graph takes
        # them from the config in force while it loads.
        self._options: dict[str, Any] = (
            dict(torch._inductor.list_mode_options(compile_mode)) if compile_mode else {}
        )
        self.compiled_forward: Callable[..., Any] = torch.compile(
            self.eager_forward, mode=compile_mode, fullgraph=True, dynamic=False
        )
        self._inner = _precompilable(module) if store is not None else None
        self.precompile_error = ""
        if store is None:
            self.precompile_error = "no compile cache dir to keep precompiled graphs in"
        elif self._inner is None:
            self.precompile_error = "the denoiser's forward is wrapped by a hook"
        self._store = store
        self._graphs: list[Any] = []  # precompiled graphs; one may serve several signatures
        self._tried: set[Path] = set()  # files of `store` loaded (or found unusable) by this process
        # Per signature and the call's other arguments: a precompiled graph keeps only the guards a new
        # process can check, so the arguments it was traced with are checked here.
        self._runners: dict[_Key, _Runner] = {}
        self.ready: dict[Signature, Task] = {}
        self.compiled_calls = 0
        self.eager_calls = 0
        self.eager_fallbacks = 0
        self.adapter_calls = 0
        self.padded_calls = 0
        self.graphs_loaded = 0  # precompiled graphs loaded from `store`
        self.graphs_precompiled = 0  # ... and compiled afresh (then saved there)
        self._paddings: dict[_Key, tuple[_Padding, _Runner] | None] = {}
        self._warming: Task | None = None
        self._eager = False
        self._primed = False

    @contextlib.contextmanager
    def warming(self, task: Task) -> Iterator[None]:
        self._warming = task
        try:
            yield
        finally:
            self._warming = None

    @contextlib.contextmanager
    def eagerly(self) -> Iterator[None]:
        """Runs the block's denoiser calls eagerly: LoRA adapters are on; graphs hold base weights only."""
        self._eager = True
        try:
            yield
        finally:
            self._eager = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _normalise_inputs(args, kwargs)
        if self._eager:
            self.adapter_calls += 1
            return self.eager_forward(*args, **kwargs)
        if self._warming is None and not self._runners:  # nothing compiled (the eager mode): no key to find
            self.eager_calls += 1
            return self.eager_forward(*args, **kwargs)
        signature = _signature(args, kwargs)
        key = (signature, _constants(args, kwargs))
        if self._warming is not None:
            if not self._primed:
                # Some denoisers fill lazy caches on their first call, in code dynamo cannot trace
                # (Z-Image computes its rotary tables under a `torch.device` context): one eager call
                # fills them before the first trace, at the cost of one step at start-up.
                self.eager_forward(*args, **kwargs)
                self._primed = True
            traced = _batch_dynamic(args, kwargs)
            with _GATE.compiling():
                runner = self._runners.get(key) or self._warm_runner(key, args, kwargs, traced)
                # torch.compile traces on its first call; a precompiled graph was traced already.
                result = self._run(runner.call, *(traced if runner.traced else (args, kwargs)))
            self._runners[key] = runner
            self.ready.setdefault(signature, self._warming)
            self._paddings.clear()
            return result
        hot = self._runners.get(key)
        padding = None if hot is not None else self._padding(key)
        if padding is not None:
            hot = padding[1]
        if hot is not None:
            # A traced graph's guards answer to dynamo's process-wide stance; a precompiled one checks
            # its own, and runs whichever thread compiles.
            with _GATE.hot() if hot.traced else contextlib.nullcontext(True) as admitted:
                if admitted:
                    try:
                        if padding is None:
                            result = self._run(hot.call, args, kwargs)
                        else:
                            padded = _normalise_inputs(*padding[0].pad(args, kwargs))
                            result = padding[0].trim(self._run(hot.call, *padded))
                            self.padded_calls += 1
                        self.compiled_calls += 1
                        return result
                    except RuntimeError as err:
                        if not any(message in str(err) for message in _GUARD_FAILURES):
                            raise
                        log.warning("a warmed shape %s failed its guards; ran eagerly: %s", signature, err)
            self.eager_fallbacks += 1  # guards failed, or another device's thread was compiling
        self.eager_calls += 1
        return self.eager_forward(*args, **kwargs)

    def disable(self) -> None:
        """Runs every call eagerly from now on: what the warm-up compiled is dropped (it failed)."""
        self.ready.clear()
        self._runners.clear()
        self._paddings.clear()

    def _padding(self, key: _Key) -> tuple[_Padding, _Runner] | None:
        """How a batch no graph was compiled for runs padded in the smallest one that fits, if any."""
        if key not in self._paddings:
            signature, constants = key
            fits = [
                (padding, runner)
                for (ready, ready_constants), runner in self._runners.items()
                if ready_constants == constants and (padding := _padding(signature, ready)) is not None
            ]
            self._paddings[key] = min(fits, key=lambda fit: fit[0].to) if fits else None
        return self._paddings[key]

    def _run(self, runner: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self._cuda_graphs:
            return runner(*args, **kwargs)
        # A CUDA graph's outputs live in memory its next replay overwrites, and schedulers such as
        # PNDM keep past outputs: mark each call a new step and hand out copies.
        torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        return tree_map_only(torch.Tensor, torch.clone, runner(*args, **kwargs))

    def _warm_runner(
        self,
        key: _Key,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        traced: tuple[tuple[Any, ...], dict[str, Any]],
    ) -> _Runner:
        """What runs calls like this one (`key`) from now on: a precompiled graph (loaded, or traced
        with `traced` and saved), or the traced `torch.compile` where precompiling is not possible."""
        if self._inner is not None:
            try:
                graph = self._precompiled(key, ((self._module, *args), kwargs), traced)
                return _Runner(functools.partial(graph, self._module), traced=False)
            except Exception as err:  # e.g. a guard torch cannot save: trace it as before
                log.warning("precompiling the denoiser failed; it is traced instead", exc_info=True)
                self._inner = None
                self.precompile_error = f"{type(err).__name__}: {err}"
        return _Runner(self.compiled_forward, traced=True)

    def _precompiled(
        self,
        key: _Key,
        call: tuple[tuple[Any, ...], dict[str, Any]],
        traced: tuple[tuple[Any, ...], dict[str, Any]],
    ) -> Any:
        for graph in self._graphs:  # batch sizes of one size share a graph: their batch is dynamic
            if _fits(graph, call):
                return graph
        # One file per signature and constants: calls alike but for `return_dict` (Z-Image makes both)
        # are two graphs, and each must find its own at the next start.
        path = self._store / f"{_digest(repr(key))}.bin" if self._store else None
        if path is not None and path.is_file() and path not in self._tried:
            self._tried.add(path)
            graph = self._load(path)
            if graph is None:
                misfit = "not loaded"
            else:
                misfit = _changed_source(graph) or ("" if _fits(graph, call) else _misfit(graph, call))
            if graph is not None and not misfit:
                self._graphs.append(graph)
                self.graphs_loaded += 1
                return graph
            log.warning("the precompiled graph %s does not fit (%s); compiling it afresh", path, misfit)
        # A graph saved under another call's name may serve this one too (the batch sizes of one size
        # share a graph, saved under the batch that compiled it): the model's other files, once each.
        for other in sorted(self._store.glob("*.bin")) if self._store else ():
            if other in self._tried:
                continue
            self._tried.add(other)
            graph = self._load(other)
            if graph is not None and not _changed_source(graph):
                self._graphs.append(graph)
                self.graphs_loaded += 1
                if _fits(graph, call):
                    return graph
        # One compiler at a time in the process: dynamo's own trace holds a lock that `aot_compile`
        # does not take, and devices' threads warm up side by side.
        with _COMPILING, _aot_compile_enabled():
            options = {**self._options, "guard_filter_fn": _serialisable_guards}
            compiled = torch.compile(self._inner, fullgraph=True, dynamic=False, options=options)
            graph = compiled.aot_compile(((self._module, *traced[0]), traced[1]))  # type: ignore[union-attr]
        self._graphs.append(graph)
        self.graphs_precompiled += 1
        if path is not None:
            self._tried.add(path)  # in memory already
            self._save(graph, path)
        return graph

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        """A saved graph's guards hold the module's attributes, this one too (it is the module's
        `forward`): they get a placeholder, not the process's graphs and counters."""
        return _no_dispatcher, ()

    def _external(self) -> dict[str, Any]:
        """What a saved graph refers to rather than holds: the module (its weights) and its code."""
        return {"denoiser": self._module, "forward": self._inner}

    def _load(self, path: Path) -> Any:
        try:
            # The traced function's module globals, for what the traced code names there (an output
            # class where a call returns a dict); torch 2.11 takes none.
            scope = {"f_globals": getattr(self._inner, "__globals__", None)} if _LOAD_TAKES_GLOBALS else {}
            with _COMPILING, path.open("rb") as file, torch._inductor.config.patch(self._options):
                return torch.compiler.load_compiled_function(file, external_data=self._external(), **scope)
        except Exception as err:  # a corrupt, foreign or older file only costs a compile
            log.warning("cannot load the precompiled graph %s: %s", path, err)
            return None

    def _save(self, graph: Any, path: Path) -> None:
        """Writes a graph atomically: replicas sharing a volume never read half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            pass
        try:
            graph.save_compiled_function(tmp.name, external_data=self._external())
            _readable(tmp.name)
            os.replace(tmp.name, path)
        except Exception as err:  # the graph serves this process; the next start compiles again
            Path(tmp.name).unlink(missing_ok=True)
            log.warning("cannot save the precompiled graph %s: %s", path, err)
            self.precompile_error = f"cannot save a precompiled graph: {type(err).__name__}: {err}"


def _no_dispatcher() -> None:
    return None


_COMPILING = threading.Lock()  # held while a graph is precompiled or loaded
_LOAD_TAKES_GLOBALS = "f_globals" in inspect.signature(torch.compiler.load_compiled_function).parameters


def _readable(path: str) -> None:
    """Cache files are read by every replica sharing the volume, whichever user it runs as: a temporary
    file is created for its owner alone."""
    os.chmod(path, 0o644)


def _changed_source(graph: Any) -> str:
    """Which source a precompiled graph was traced from has changed since (an edited or patched
    diffusers at the same version), as torch's own package cache checks; empty if none or unknown."""
    try:
        from torch._dynamo.package import _hash_sourcelines

        for code in graph.source_info().inlined_sources:
            module = importlib.import_module(code.module)
            if _hash_sourcelines(module, code.firstlineno, code.lastlineno) != code.checksum:
                return f"its source changed: {code.module}, lines {code.firstlineno}-{code.lastlineno}"
    except Exception:  # a torch without these records, a module without its source: the key stands alone
        log.debug("cannot compare a precompiled graph's sources", exc_info=True)
        return ""
    return ""


# How a failed guard shows: dynamo's `fail_on_recompile` stance (traced graphs) and a precompiled
# graph's own check; anything else is a real error.
_GUARD_FAILURES = ("Detected recompile", "GuardManager check failed")


def _precompilable(module: torch.nn.Module) -> Callable[..., Any] | None:
    """The function a precompiled graph traces: the class's forward without its decorators.

    diffusers wraps denoisers' forwards in `apply_lora_scale`, a closure whose guards cannot be saved
    (they name the wrapped function's `__defaults__`, which a loading process cannot see). The wrapper
    only scales LoRA layers by the call's `scale`, and calls with adapters or attention arguments
    never reach a graph traced without them (adapter calls run eagerly; other arguments fail its
    guards). None where something else (e.g. accelerate's offload hooks) replaced the instance's
    forward: that is what must run, and only tracing it keeps it.
    """
    if "forward" in vars(module):
        return None
    function: Callable[..., Any] = inspect.unwrap(type(module).forward)
    return function


def _fits(graph: Any, call: tuple[tuple[Any, ...], dict[str, Any]]) -> bool:
    try:
        return bool(graph.guard_check(*call[0], **call[1]))
    except Exception:  # a graph from another version of the code may not even evaluate its guards
        log.debug("a precompiled graph's guards failed to evaluate", exc_info=True)
        return False


def _misfit(graph: Any, call: tuple[tuple[Any, ...], dict[str, Any]]) -> str:
    """The first guard of a precompiled graph that `call` fails, for the log."""
    try:
        f_locals = graph.prepare_f_locals(*call[0], **call[1])
        return str(graph._artifacts.guard_manager.check_verbose(f_locals).verbose_code_parts[:1])
    except Exception as err:
        return f"its guards failed to evaluate: {type(err).__name__}: {err}"


def _serialisable_guards(entries: list[Any]) -> list[bool]:
    """Every guard a saved graph can carry: all but those on globals and object identities, which a
    new process cannot match (the module's code and weights are checked by the cache key and the
    tensor guards instead)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        not (
            entry.is_global
            or entry.guard_type in unsupported
            or unsupported.intersection(entry.derived_guard_types or ())
            or getattr(entry.orig_guard, "_unserializable", False)
        )
        for entry in entries
    ]


def _aot_compile_enabled() -> contextlib.AbstractContextManager[Any]:
    """torch 2.11 offers `torch.compile(...).aot_compile` only with this flag set; 2.13 sets it by default."""
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _sample(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The denoiser's latents argument: first by position, else by a UNet's or a transformer's name."""
    return args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))


def _batch_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs to trace with, so that one graph serves every declared batch size of a shape: dynamo
    traces it once, not per batch.

    Each trace of a full-size UNet costs seconds of CPU (at every start, where the graph is not
    precompiled), and each graph costs Inductor a compile on an empty cache. So the batch dimension of
    every input that has it (latents, text embeddings, added conditions, ControlNet residuals) is
    marked dynamic; height and width stay static, as convolutions want them. The mark is a hint, not a
    demand: where the model's code fixes the batch (and always at batch 1, which dynamo specialises),
    dynamo traces a graph for it as before. CUDA graph trees still record one CUDA graph per batch
    size, during warm-up; only warmed shapes ever reach the compiled path.

    The marks go on aliases, not on the caller's tensors: a precompiled graph loaded by a later start
    knows nothing of them, and its guards refuse a marked tensor.
    """
    sample = _sample(args, kwargs)
    if not isinstance(sample, torch.Tensor) or sample.dim() == 0 or sample.shape[0] < 2:
        return args, kwargs
    batch = sample.shape[0]

    def marked(value: torch.Tensor) -> torch.Tensor:
        if value.dim() == 0 or value.shape[0] != batch:
            return value
        alias = value.detach()
        torch._dynamo.maybe_mark_dynamic(alias, 0)
        return alias

    aliases: tuple[tuple[Any, ...], dict[str, Any]] = tree_map_only(torch.Tensor, marked, (args, kwargs))
    return aliases


def _normalise_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Gives the denoiser its inputs in one form, whatever the pipeline and scheduler produced.

    Inputs still on the host go to the latents' device (measured on an H100: without it Z-Image's
    transformer failed, "mat1 is on cpu"): with the schedule on the host
    (`schedule_on_host`), the timestep and what the pipeline derives from it (`t.expand(batch)`,
    `t / 1000`) are host tensors, which a UNet would copy over itself but a transformer would not.

    A compiled graph guards on dtypes and strides, so each variant would be another graph:
    - image latents go in channels_last, the denoiser's own layout: the first step's latents are
      contiguous, later ones come back from the scheduler in the UNet output's channels_last;
    - the timestep goes in as float32: schedulers disagree (PNDM and DDIM yield int64 tensors, Euler
      float32, some Python numbers), and every denoiser turns it into float32 for its embedding
      anyway (UNet: `timesteps.float()`), so this changes no result.
    """
    sample = _sample(args, kwargs)
    # The device of the latents, whichever form they take (Z-Image passes a list of tensors).
    device = next((t.device for t in tree_leaves(sample) if isinstance(t, torch.Tensor)), None)
    if device is not None and device.type != "cpu":
        args, kwargs = tree_map_only(torch.Tensor, functools.partial(_to_device, device), (args, kwargs))
        sample = _sample(args, kwargs)
    if isinstance(sample, torch.Tensor) and sample.dim() == 4:
        sample = sample.contiguous(memory_format=torch.channels_last)
        if args:
            args = (sample, *args[1:])
        else:
            kwargs = {**kwargs, ("sample" if "sample" in kwargs else "hidden_states"): sample}
    if len(args) >= 2:
        timestep, where = args[1], 1
    elif "timestep" in kwargs:
        timestep, where = kwargs["timestep"], -1
    else:
        return args, kwargs
    if isinstance(timestep, (int, float)) and isinstance(sample, torch.Tensor):
        timestep = torch.tensor(float(timestep), dtype=torch.float32, device=sample.device)
    elif isinstance(timestep, torch.Tensor) and not timestep.is_floating_point():
        timestep = timestep.to(torch.float32)
    else:
        return args, kwargs
    if where == 1:
        return (args[0], timestep, *args[2:]), kwargs
    return args, {**kwargs, "timestep": timestep}


def _to_device(device: torch.device, value: torch.Tensor) -> torch.Tensor:
    return value if value.device == device else value.to(device, non_blocking=True)


def schedule_on_host(model: LoadedModel, scheduler: Any) -> None:
    """Keeps one call's timesteps on the host, where the model's denoiser runs through a dispatcher.

    Pipelines ask `set_timesteps` for the schedule on the device. Schedulers such as PNDM (SD 1.5's)
    and DDIM then index host tables with a device timestep and branch on it in Python
    (`alphas_cumprod[timestep]`, `if prev_timestep >= 0`), and each such read waits for every kernel
    queued before it: the host cannot queue a step while the GPU runs the one before, and the GPU
    idles while the host prepares the next. Measured on an H100 (SD 1.5, PNDM, the UNet compiled
    with CUDA graphs): 6.2 ms of kernels per UNet call, 8.2 ms per call on the GPU's timeline, and the
    scheduler's step 6 ms of the host's time, waiting. With the schedule on the host those reads cost
    nothing; the dispatcher moves the timestep to the device for the denoiser (`_normalise_inputs`).
    Samplers that keep their sigmas on the host already (Euler, DPM-Solver) compute the same either
    way. Call it on one call's own scheduler: the stand-in is an attribute of that instance.
    """
    report = model.acceleration
    if report is None or report.dispatcher is None:
        return  # `off`: diffusers' behaviour exactly, and no signature to derive on every call
    signature = inspect.signature(scheduler.set_timesteps)
    if "device" not in signature.parameters:
        return
    # The class's function and a weak reference: holding the bound method would make the scheduler
    # and its tensors a reference cycle, left to the cycle collector after every call.
    function, owner = type(scheduler).set_timesteps, weakref.ref(scheduler)

    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["device"] = "cpu"
        return function(owner(), *bound.args, **bound.kwargs)

    # Pipelines read its parameters (diffusers' `retrieve_timesteps`: does it take custom sigmas?).
    set_timesteps.__signature__ = signature  # type: ignore[attr-defined]

    scheduler.set_timesteps = set_timesteps


def denoiser_of(model: LoadedModel) -> torch.nn.Module | None:
    pipe = next(iter(model.tasks.values())).pipe
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return module if isinstance(module, torch.nn.Module) else None


def _cache_key(model: LoadedModel, plan: AccelerationPlan, *more: str) -> str:
    """A digest of what compiled code depends on: the model's source, torch and the device's type,
    the dtype and the compile mode (and `more`)."""
    device = model.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    source = model.spec.source
    if Path(source).exists():
        source = str(Path(source).resolve())
    return _digest(
        "\0".join([source, torch.__version__, device_name, str(model.dtype), str(plan.compile_mode), *more])
    )


def megacache_path(model: LoadedModel, plan: AccelerationPlan) -> Path | None:
    """One file per model source, torch version, device type and compile settings (None: no cache dir)."""
    if not plan.cache_dir:
        return None
    return Path(plan.cache_dir) / MEGACACHE_FOLDER / f"{_cache_key(model, plan)}.bin"


def precompiled_folder(model: LoadedModel, module: torch.nn.Module, plan: AccelerationPlan) -> Path | None:
    """The folder of one model's precompiled graphs (None: no cache dir).

    Its key adds to the mega-cache's what a saved graph holds that a guard does not check: the
    denoiser's code (diffusers' version and the class) and the device itself (the graph's tensors are
    on one device; a replica on another compiles its own rather than fail the guards of this one's).
    """
    if not plan.cache_dir:
        return None
    code = f"{__version__} {diffusers.__version__} {type(module).__module__}.{type(module).__qualname__}"
    key = _cache_key(model, plan, code, str(model.device))
    return Path(plan.cache_dir) / PRECOMPILED_FOLDER / key


def _load_megacache(path: Path | None) -> bool:
    if path is None or not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # a corrupt or foreign file only costs a compile
        log.warning("cannot load compile cache %s: %s", path, err)
        return False
    return True


def _save_megacache(path: Path | None) -> None:
    """Writes the process's compile artefacts atomically: replicas sharing a volume never read half a file."""
    if path is None:
        return
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(artifacts[0])
        tmp.flush()
        os.fsync(tmp.fileno())
    _readable(tmp.name)
    os.replace(tmp.name, path)
    log.info("saved compile cache %s (%d bytes)", path, len(artifacts[0]))


class _Messages(logging.Handler):
    """Keeps the messages a logger emits while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _cudagraph_skips(report: AccelerationReport, plan: AccelerationPlan) -> Iterator[None]:
    """Adds to the report the graphs compiled meanwhile that Inductor left without CUDA graphs."""
    if plan.compile_mode != "reduce-overhead":
        yield
        return
    before = counters["inductor"]["cudagraph_skips"]
    reasons = _Messages()
    logger = logging.getLogger(_CUDAGRAPH_LOGGER)
    logger.addHandler(reasons)
    try:
        yield
    finally:
        logger.removeHandler(reasons)
        report.cudagraph_skips += counters["inductor"]["cudagraph_skips"] - before
        if reasons.messages and not report.cudagraph_skip_reason:
            report.cudagraph_skip_reason = reasons.messages[0]


def _hot_requests(model: LoadedModel, plan: AccelerationPlan) -> Iterator[tuple[GenerationRequest, int]]:
    """One warm-up request per task, declared size and batch size (default: the model's own size)."""
    for task, target in model.tasks.items():
        sizes = plan.shapes or ((*target.default_size, None),)
        for width, height, declared in sizes:
            if width % target.size_multiple or height % target.size_multiple:
                log.warning(
                    "%s: compile shape %dx%d is not a multiple of %d; skipped",
                    model.spec.name,
                    width,
                    height,
                    target.size_multiple,
                )
                continue
            for batch in plan.batch_sizes(declared):
                image = PIL.Image.new("RGB", (width, height), (127, 127, 127))
                yield (
                    GenerationRequest(
                        model=model.spec.name,
                        task=task,
                        prompt="warm-up",
                        width=width,
                        height=height,
                        num_inference_steps=WARMUP_STEPS,
                        strength=1.0 if "strength" in target.named_arguments else None,
                        num_images=batch,
                        seed=0,
                        image=image if task is not Task.TEXT_TO_IMAGE else None,
                        mask_image=PIL.Image.new("L", (width, height), 255)
                        if task is Task.INPAINTING
                        else None,
                        control_image=warm_up_image(target, (width, height)),
                    ),
                    batch,
                )


def _prepare_denoiser(module: torch.nn.Module, model: LoadedModel) -> None:
    """The speed-ups eager and compiled calls share: channels_last convolutions and fused QKV projections.

    In place, so every task's pipeline (`from_pipe` shares the module) and every later call sees them.
    """
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fuse = getattr(module, "fuse_qkv_projections", None)
    if getattr(module, "peft_config", None):
        # Fused projections would bypass the LoRA layers wrapping to_q/to_k/to_v.
        log.info("%s: no fused QKV projections: LoRA adapters are loaded", model.spec.name)
    elif callable(fuse):
        try:
            fuse()
        except ValueError as err:  # e.g. added KV projections: the family does not support it
            log.info("%s: no fused QKV projections: %s", model.spec.name, err)


def accelerate(model: LoadedModel, plan: AccelerationPlan) -> AccelerationReport:
    """Applies the plan to a loaded model: prepares its denoiser ("eager" and "compile") and compiles
    every declared shape ("compile"); runs on the device thread, before the model's warm-up.

    Returns (and attaches to the model) the report Inspect shows. A failure to compile leaves the
    model serving eagerly, with the error in the report, rather than failing the model.
    """
    from autopipeline_server.calls import QuietHooks, run_call
    from autopipeline_server.pipelines import pin_signatures
    from autopipeline_server.prepare import prepare_with_inputs

    report = AccelerationReport(requested=plan.requested, mode=plan.mode)
    model.acceleration = report
    if plan.mode == "off":
        return report
    module = denoiser_of(model)
    if module is None:
        report.mode, report.error = "off", "the pipeline has no unet or transformer to accelerate"
        return report
    _prepare_denoiser(module, model)
    # Before anything runs or compiles: pinning sets `__signature__` on the attention processors'
    # `__call__` (the fused projections swapped in new ones), which dynamo traces; no guard may see it
    # change after its graph was built.
    pin_signatures(model)
    # Installed in both modes: it takes the inputs from a schedule kept on the host (schedule_on_host);
    # in "eager" mode no shape is ever ready, so every call runs the prepared module eagerly.
    store = precompiled_folder(model, module, plan) if plan.mode == "compile" else None
    dispatcher = DenoiserDispatcher(module, compile_mode=plan.compile_mode, store=store)
    module.forward = dispatcher
    report.dispatcher = dispatcher
    if plan.mode == "eager":
        return report
    cache_file = megacache_path(model, plan)
    report.cache_loaded = _load_megacache(cache_file)
    hits_before = counters["inductor"]["fxgraph_cache_hit"]
    misses_before = counters["inductor"]["fxgraph_cache_miss"]
    graphs_before = counters["stats"]["unique_graphs"]
    # Each declared shape (per task, where guards differ) is its own graph: allow all of them. The
    # limit counts per code object, and every model of one denoiser class (on every device, and each
    # on-demand load) shares its `forward`'s: each model adds its room to what earlier ones used, or
    # a later model's warm-up would silently run eagerly at the limit while reporting its shapes compiled.
    requests = list(_hot_requests(model, plan))
    room = 2 * len(requests)
    torch._dynamo.config.recompile_limit += room
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, torch._dynamo.config.recompile_limit
    )
    started = time.perf_counter()
    took: list[str] = []  # each warm-up request's seconds, for the log: where a start's time goes
    try:
        for request, batch in requests:
            known = set(dispatcher.ready)
            begun = time.perf_counter()
            with dispatcher.warming(request.task), _cudagraph_skips(report, plan):
                run_call(prepare_with_inputs(model, request), QuietHooks())
            assert request.width is not None
            assert request.height is not None
            seconds = time.perf_counter() - begun
            took.append(f"{request.task.value} {request.width}x{request.height}x{batch} {seconds:.1f}s")
            report.compiled_shapes.extend(
                CompiledShape(request.task, request.width, request.height, batch, _sample_shape(signature))
                for signature in dispatcher.ready.keys() - known
            )
    except Exception as err:
        log.exception("%s: compiling failed; serving eagerly", model.spec.name)
        dispatcher.disable()
        report.compiled_shapes.clear()
        report.mode, report.error = "eager", f"compiling failed: {type(err).__name__}: {err}"
        return report
    finally:
        report.compile_seconds = time.perf_counter() - started
        # A precompiled graph is a whole graph found in (or missing from) the cache dir.
        report.cache_hits = counters["inductor"]["fxgraph_cache_hit"] - hits_before + dispatcher.graphs_loaded
        report.cache_misses = (
            counters["inductor"]["fxgraph_cache_miss"] - misses_before + dispatcher.graphs_precompiled
        )
        report.graphs = counters["stats"]["unique_graphs"] - graphs_before
        report.graphs_loaded = dispatcher.graphs_loaded
        report.precompile_error = dispatcher.precompile_error
    if report.cache_misses or not report.cache_loaded:
        _save_megacache(cache_file)
    if report.cudagraph_skips:
        log.warning(
            "%s: %d compiled graphs run without CUDA graphs, about as slow as eager (%s)",
            model.spec.name,
            report.cudagraph_skips,
            report.cudagraph_skip_reason or "Inductor gave no reason; TORCH_LOGS=cudagraphs shows more",
        )
    log.info(
        "%s: compiled %d denoiser shapes in %d graphs traced and %d precompiled ones loaded for %d "
        "requests in %.1fs (%s; cache %s, %d hits, %d misses): %s",
        model.spec.name,
        len(report.compiled_shapes),
        report.graphs,
        report.graphs_loaded,
        len(requests),
        report.compile_seconds,
        plan.compile_mode or "default mode",
        "loaded" if report.cache_loaded else "not found",
        report.cache_hits,
        report.cache_misses,
        ", ".join(f"{s.task.value} {s.width}x{s.height}x{s.batch_size}" for s in report.compiled_shapes),
    )
    log.info("%s: warm-up requests took %s", model.spec.name, ", ".join(took))
    return report
