"""Hostile load through the wire: memory bounded before admission, limits on every path, slow readers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import PIL.Image
import pytest
import torch
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from autopipeline import ResourceExhaustedError, RetryPolicy
from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.settings import Limits, ModelSpec, Settings
from autopipeline_server.worker import Job

from .support import ServerThread, fault_in_denoiser, png_bytes, wait_for

MiB = 1024 * 1024
T2I, I2I, INPAINT = pb.TASK_TEXT_TO_IMAGE, pb.TASK_IMAGE_TO_IMAGE, pb.TASK_INPAINTING
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK_REQUEST = pb.GenerateRequest(task=T2I, prompt="ok", num_inference_steps=2, width=64, height=64)


def _settings(checkpoints: dict[str, Path], **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "models": (ModelSpec("sd15", str(checkpoints["sd15"])),),
        "host": "127.0.0.1",
        "port": 0,
        "device": "cpu",
        "warmup": False,
    }
    base.update(overrides)
    return Settings(**base)


@contextlib.contextmanager
def _serving(settings: Settings) -> Iterator[ServerThread]:
    server = ServerThread(settings)
    try:
        yield server
    finally:
        server.stop(grace=1)


def _details(err: grpc.RpcError) -> tuple[str, list[str], float | None]:
    """The error's reason, the fields at fault, and its RetryInfo delay (None without one)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info, bad, retry = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), None
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            unpacked = error_details_pb2.RetryInfo()
            detail.Unpack(unpacked)
            retry = unpacked.retry_delay.ToTimedelta().total_seconds()
    return info.reason, [v.field for v in bad.field_violations], retry


def _fails(stub: pb_grpc.AutoPipelineServiceStub, request: pb.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=60))
    return caught.value


def _params(values: dict[str, Any]) -> struct_pb2.Struct:
    params = struct_pb2.Struct()
    params.update(values)
    return params


def _png(size: tuple[int, int], mode: str = "RGB") -> pb.Image:
    return pb.Image(data=png_bytes(PIL.Image.new(mode, size)))


def _corrupt_png(size: tuple[int, int]) -> pb.Image:
    """A PNG whose header is sound but whose pixel data stops short: only decoding finds out."""
    data = png_bytes(PIL.Image.effect_noise(size, 64).convert("RGB"))
    return pb.Image(data=data[: data.index(b"IDAT") + 16])


class Stuck:
    """A fake stuck step (what a CPU cannot produce on demand): the denoiser blocks until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, step: int) -> None:
        self.entered.set()
        self.release.wait(120)


@contextlib.contextmanager
def _stuck_call(server: ServerThread, request: pb.GenerateRequest) -> Iterator[Stuck]:
    """Runs `request` until it is stuck inside its first step; releases it on exit."""
    stuck = Stuck()
    with (
        fault_in_denoiser(server, "sd15", stuck),
        grpc.insecure_channel(server.target) as channel,
        ThreadPoolExecutor(1) as pool,
    ):
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        running = pool.submit(lambda: list(stub.Generate(request, timeout=120)))
        assert stuck.entered.wait(60)
        try:
            yield stuck
        finally:
            stuck.release.set()
            with contextlib.suppress(grpc.RpcError):
                running.result(120)


# ----------------------------------------------------------------------- 1. memory before authentication


def test_an_unauthenticated_request_is_refused_before_its_body_is_read(checkpoints: dict[str, Path]) -> None:
    # A body over max_request_bytes would be RESOURCE_EXHAUSTED had gRPC read it; the token check
    # comes first, from the metadata alone.
    settings = _settings(checkpoints, tokens=("secret",), limits=Limits(max_request_bytes=1 * MiB))
    big = pb.GenerateRequest(task=I2I, prompt="x", image=pb.Image(data=b"\0" * (3 * MiB)))
    with (
        _serving(settings) as server,
        grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)]) as channel,
    ):
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        for _ in range(3):
            assert _fails(stub, big).code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            stub.Inspect(pb.InspectRequest(model="m" * (2 * MiB)), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        authorized = (("authorization", "Bearer secret"),)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(big, metadata=authorized, timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert list(stub.Generate(OK_REQUEST, metadata=authorized, timeout=60))[-1].HasField("completed")


def test_concurrent_rpcs_are_bounded(checkpoints: dict[str, Path]) -> None:
    with _serving(_settings(checkpoints, max_concurrent_rpcs=1)) as server, _stuck_call(server, OK_REQUEST):
        with grpc.insecure_channel(server.target) as channel:
            err = _fails(pb_grpc.AutoPipelineServiceStub(channel), OK_REQUEST)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _noise_png(size: tuple[int, int]) -> pb.Image:
    """A PNG that does not compress: its bytes are as large as its pixels."""
    return pb.Image(data=png_bytes(PIL.Image.effect_noise(size, 128).convert("RGB")))


class _Finished(logging.Handler):
    """Counts access log lines: one is written when an RPC's handler has completely finished."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class _TracebackAsText(logging.Filter):
    """Keeps a logged error's traceback as text only, as a QueueHandler does: pytest keeps the
    records of a test, and one holding the error would keep whatever cycle it is part of from being
    garbage."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return True


def _large_garbage(
    run: Callable[[], object], rpcs: int = 1, then: Callable[[], object] = lambda: None
) -> list[str]:
    """What the `rpcs` RPCs made by `run` leave that only the cycle collector would free and that
    is large (an input's bytes or pixels, a request): with the collector off, such objects stay in
    memory until it happens to run, which a flood of large bodies outpaces (3.6 GB retained).
    `then` runs once their handlers have finished (to let a call their callers left go on)."""
    access, finished = logging.getLogger("autopipeline_server.access"), _Finished()
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(finished)
    internal, as_text = logging.getLogger("autopipeline_server.status"), _TracebackAsText()
    internal.addFilter(as_text)
    gc.collect()
    gc.disable()
    try:
        run()
        wait_for(lambda: finished.count == rpcs)  # the status can reach the client before the handler ends
        then()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
    finally:
        gc.set_debug(0)
        gc.enable()
        internal.removeFilter(as_text)
        access.removeHandler(finished)
        access.setLevel(level)
    garbage, gc.garbage[:] = list(gc.garbage), []
    large = (
        f"{type(o).__name__}"
        for o in garbage
        if (isinstance(o, (bytes, bytearray)) and len(o) >= 64 * 1024)
        or isinstance(o, (io.BytesIO, pb.GenerateRequest, pb.Image, PIL.Image.Image, torch.Tensor))
    )
    return sorted(large)


def _cancelled_after_first_step(stub: pb_grpc.AutoPipelineServiceStub, request: pb.GenerateRequest) -> str:
    call = stub.Generate(request, timeout=60)
    for event in call:
        if event.HasField("progress"):
            call.cancel()
    return grpc.StatusCode.CANCELLED.name


@pytest.mark.parametrize(
    ("fields", "outcome"),
    [
        ({"task": I2I, "image": pb.Image(data=b"\1" * (256 * 1024))}, "INVALID_ARGUMENT"),
        ({"task": I2I, "image": _corrupt_png((256, 256))}, "INVALID_ARGUMENT"),
        ({"task": I2I, "image": _noise_png((256, 256)), "scheduler": "Nope"}, "INVALID_ARGUMENT"),
        (
            {"task": I2I, "image": _noise_png((256, 256)), "parameters": _params({"nope": 1})},
            "INVALID_ARGUMENT",
        ),
        ({"task": I2I, "image": _noise_png((256, 256)), "model": "nope"}, "NOT_FOUND"),
        (
            {"task": INPAINT, "image": _noise_png((256, 256)), "mask_image": _noise_png((128, 128))},
            "INVALID_ARGUMENT",
        ),
        ({"task": I2I, "image": _noise_png((256, 256))}, "OK"),
        ({"task": I2I, "image": _noise_png((256, 256)), "num_inference_steps": 8}, "CANCELLED"),
    ],
    ids=[
        "undecodable",
        "corrupt pixels",
        "unknown scheduler",
        "unknown parameter",
        "unknown model",
        "mask of another size",
        "completed",
        "cancelled",
    ],
)
def test_a_request_leaves_nothing_large_for_the_cycle_collector(
    stub: pb_grpc.AutoPipelineServiceStub, fields: dict[str, Any], outcome: str
) -> None:
    request = pb.GenerateRequest(**{"prompt": "x", "num_inference_steps": 2, "strength": 1.0, **fields})
    seen: list[str] = []

    def run() -> None:
        try:
            if outcome == "CANCELLED":
                seen.append(_cancelled_after_first_step(stub, request))
            else:
                list(stub.Generate(request, timeout=60))
                seen.append("OK")
        except grpc.RpcError as err:
            seen.append(err.code().name)

    assert _large_garbage(run) == []
    assert seen == [outcome]


def _raising(error: Callable[[], BaseException]) -> Callable[[int], None]:
    """A denoiser fault that raises a new `error()` from the call's first forward pass."""

    def fault(step: int) -> None:
        raise error()

    return fault


def _device_thread_moved_on(server: ServerThread) -> None:
    """Returns once the device thread has let go of its last call (and the error that call raised,
    until then kept by the thread's work item): a cycle through it is garbage only from then on."""
    server.call(server.running.worker.run_on_device(lambda: None))


def _fake_cuda_oom() -> BaseException:  # a CPU cannot run out of CUDA memory; fake it mid-call
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fake)")


def _i2i(**fields: Any) -> pb.GenerateRequest:
    """An image-to-image request: its input is large (bytes, then pixels, then tensors), so a
    cycle through the request's frames would keep something the test sees."""
    return pb.GenerateRequest(
        task=I2I, prompt="x", num_inference_steps=2, strength=1.0, image=_noise_png((256, 256)), **fields
    )


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (lambda: RuntimeError("a bug inside the pipeline call"), "INTERNAL"),
        (_fake_cuda_oom, "RESOURCE_EXHAUSTED"),
        (lambda: ValueError("the pipeline's own input checks"), "INVALID_ARGUMENT"),
    ],
    ids=["pipeline failed", "out of memory", "pipeline rejected"],
)
def test_a_failed_call_leaves_nothing_large_for_the_cycle_collector(
    limited: ServerThread,
    stub: pb_grpc.AutoPipelineServiceStub,
    error: Callable[[], BaseException],
    outcome: str,
) -> None:
    request = _i2i()
    seen: list[str] = []

    def run() -> None:
        with fault_in_denoiser(limited, "sd15", _raising(error)):
            try:
                list(stub.Generate(request, timeout=60))
            except grpc.RpcError as err:
                seen.append(err.code().name)
        _device_thread_moved_on(limited)

    assert _large_garbage(run) == []
    assert seen == [outcome]


def test_a_call_failing_after_its_caller_left_leaves_nothing_large_for_the_cycle_collector(
    limited: ServerThread, stub: pb_grpc.AutoPipelineServiceStub
) -> None:
    request, stuck = _i2i(), Stuck()
    seen: list[str] = []
    worker = limited.running.worker
    failed = worker.stats.failed

    def fault(forward_pass: int) -> None:  # the first is stuck until the caller has gone, then fails
        if forward_pass == 1:
            stuck(forward_pass)
            raise RuntimeError("a bug inside a call whose caller went away")

    def run() -> None:
        call = stub.Generate(request, timeout=60)
        assert stuck.entered.wait(60)
        call.cancel()
        seen.append(call.code().name)

    def then() -> None:
        # Nobody reads the job's events any more: the error stays in its queue.
        stuck.release.set()
        wait_for(lambda: worker.stats.failed == failed + 1)
        _device_thread_moved_on(limited)

    with fault_in_denoiser(limited, "sd15", fault):
        try:
            assert _large_garbage(run, then=then) == []
        finally:
            stuck.release.set()
    assert seen == ["CANCELLED"]
    gc.collect()
    model = limited.running.registry.entries["sd15"].model
    assert not [o for o in gc.get_objects() if type(o) is Job and o.call.model is model], (
        "an idle worker holds nothing of its last batch"
    )


def test_a_deadline_passed_in_the_queue_leaves_nothing_large_for_the_cycle_collector(
    limited: ServerThread, stub: pb_grpc.AutoPipelineServiceStub
) -> None:
    first, second = _i2i(), _i2i()
    seen: list[str] = []
    worker = limited.running.worker
    cancelled_queued = worker.stats.cancelled_queued

    def run() -> None:
        # The first request holds the device (stuck in its first step) until the second's deadline
        # has passed in the queue; then it is released and completes.
        with _stuck_call(limited, first):
            call = stub.Generate(second, timeout=2)
            try:
                for event in call:
                    seen.append(str(event.WhichOneof("event")))
            except grpc.RpcError as err:
                seen.append(err.code().name)

    assert _large_garbage(run, rpcs=2) == []
    assert seen == ["queued", "DEADLINE_EXCEEDED"]
    assert worker.stats.cancelled_queued == cancelled_queued + 1  # it reached the queue in time


def test_requests_ended_by_a_shutdown_leave_nothing_large_for_the_cycle_collector(
    checkpoints: dict[str, Path],
) -> None:
    first, second = _i2i(), _i2i()
    seen: list[str] = []
    server = ServerThread(_settings(checkpoints))
    worker = server.running.worker

    def run() -> None:
        # One request running (stuck in its first step) and one queued when draining gives up on
        # them: each ends with the ShuttingDown error its job was cancelled with.
        with _stuck_call(server, first), grpc.insecure_channel(server.target) as channel:
            queued = pb_grpc.AutoPipelineServiceStub(channel).Generate(second, timeout=60)
            assert next(queued).HasField("queued")
            wait_for(lambda: worker.queue_depth == 1)
            drained = asyncio.run_coroutine_threadsafe(worker.drain(0, stuck_after=60), server.loop)
            try:
                list(queued)
            except grpc.RpcError as err:
                seen.append(err.code().name)
        assert drained.result(60)
        _device_thread_moved_on(server)

    try:
        assert _large_garbage(run, rpcs=2) == []
    finally:
        server.stop(grace=1)
    assert seen == ["UNAVAILABLE"]


# ---------------------------------------------------------------------- 2. admission before decoding


@pytest.fixture(scope="module")
def busy_server(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    limits = Limits(max_input_pixels=256 * 256, max_inflight_pixels=2 * 256 * 256)
    with _serving(_settings(checkpoints, max_queue=1, limits=limits)) as server:
        yield server


def test_checks_that_need_no_pixels_come_before_decoding(busy_server: ServerThread) -> None:
    with grpc.insecure_channel(busy_server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        request = pb.GenerateRequest(task=I2I, prompt="x", image=_corrupt_png((64, 64)), scheduler="Nope")
        err = _fails(stub, request)
        assert (err.code(), _details(err)[1]) == (INVALID, ["scheduler"])  # the pixels were never decoded
        request.scheduler = ""
        err = _fails(stub, request)
        assert (err.code(), _details(err)[:2]) == (INVALID, ("INVALID_IMAGE", ["image"]))


def test_a_full_queue_refuses_before_decoding(busy_server: ServerThread) -> None:
    slow = pb.GenerateRequest(task=T2I, prompt="x", num_inference_steps=2, width=64, height=64)
    with _stuck_call(busy_server, slow), grpc.insecure_channel(busy_server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        queued = stub.Generate(OK_REQUEST, timeout=120)
        assert next(queued).HasField("queued")
        err = _fails(stub, pb.GenerateRequest(task=I2I, prompt="x", image=_corrupt_png((64, 64))))
        reason, _, retry = _details(err)
        assert (err.code(), reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
        # The hint is one the SDK's default policy honours (it waits at most 5 s).
        assert retry is not None and 0 < retry <= RetryPolicy().max_backoff
        queued.cancel()


def test_input_pixels_in_flight_are_bounded(busy_server: ServerThread) -> None:
    holding = pb.GenerateRequest(task=I2I, prompt="x", num_inference_steps=2, image=_png((256, 256)))
    with _stuck_call(busy_server, holding), grpc.insecure_channel(busy_server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        err = _fails(
            stub,
            pb.GenerateRequest(
                task=INPAINT, prompt="x", image=_png((256, 256)), mask_image=_png((256, 256), "L")
            ),
        )
        reason, _, retry = _details(err)
        assert (err.code(), reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "INPUTS_BUSY")
        assert retry is not None
        stats = stub.Inspect(pb.InspectRequest(), timeout=30).server.stats
        assert stats.rejected_inputs_busy >= 1
    with grpc.insecure_channel(busy_server.target) as channel:  # the pixels came back with the call
        done = list(pb_grpc.AutoPipelineServiceStub(channel).Generate(holding, timeout=60))
        assert done[-1].HasField("completed")


# -------------------------------------------------------------------------- 3. limits on every path


@pytest.fixture(scope="module")
def limited(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    limits = Limits(max_width=256, max_height=256, max_num_inference_steps=20)
    with _serving(_settings(checkpoints, limits=limits)) as server:
        yield server


@pytest.fixture(scope="module")
def stub(limited: ServerThread) -> Iterator[pb_grpc.AutoPipelineServiceStub]:
    with grpc.insecure_channel(limited.target) as ch:
        yield pb_grpc.AutoPipelineServiceStub(ch)


@pytest.mark.parametrize(
    ("fields", "violations"),
    [
        ({"task": I2I, "image": _png((1024, 8))}, ["image"]),
        ({"task": INPAINT, "image": _png((8, 1024)), "mask_image": _png((8, 1024), "L")}, ["image"]),
        (
            {"task": T2I, "parameters": _params({"timesteps": list(range(999, 0, -40))})},
            ["parameters.timesteps"],
        ),
        (
            {"task": T2I, "parameters": _params({"sigmas": [float(30 - i) for i in range(25)]})},
            ["parameters.sigmas"],
        ),
        (
            {"task": T2I, "scheduler": "EulerDiscreteScheduler", "parameters": _params({"sigmas": []})},
            ["parameters.sigmas"],
        ),
        (
            {
                "task": T2I,
                "scheduler": "EulerDiscreteScheduler",
                "parameters": _params({"timesteps": [5, 5, 5]}),
            },
            ["parameters.timesteps"],
        ),
        (
            {
                "task": T2I,
                "scheduler": "EulerDiscreteScheduler",
                "parameters": _params({"timesteps": [1, 500]}),
            },
            ["parameters.timesteps"],
        ),
        (
            {
                "task": T2I,
                "scheduler": "EulerDiscreteScheduler",
                "parameters": _params({"timesteps": [5000, 1]}),
            },
            ["parameters.timesteps"],
        ),
        (
            {"task": T2I, "scheduler": "DDIMScheduler", "parameters": _params({"timesteps": [900, 1]})},
            ["parameters.timesteps"],
        ),
    ],
    ids=[
        "img2img wide input",
        "inpainting tall input",
        "timesteps over the step limit",
        "sigmas over the step limit",
        "empty sigmas",
        "repeated timesteps",
        "rising timesteps",
        "timesteps past training",
        "scheduler without custom timesteps",
    ],
)
def test_every_path_honours_the_limits(
    stub: pb_grpc.AutoPipelineServiceStub, fields: dict[str, Any], violations: list[str]
) -> None:
    request = pb.GenerateRequest(prompt="x", num_inference_steps=2, **fields)
    err = _fails(stub, request)
    assert (err.code(), _details(err)[1]) == (INVALID, violations), err.details()


def test_a_custom_schedule_sets_the_steps(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    params = _params({"timesteps": [900, 500, 100]})
    request = pb.GenerateRequest(
        task=T2I, prompt="x", width=64, height=64, scheduler="EulerDiscreteScheduler", parameters=params
    )
    events = list(stub.Generate(request, timeout=60))
    assert next(e.started for e in events if e.HasField("started")).total_steps == 3


def test_exif_orientation_of_an_input_is_applied(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    image = PIL.Image.new("RGB", (64, 32), (200, 30, 30))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright it is 32 wide and 64 tall
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    request = pb.GenerateRequest(
        task=I2I, prompt="x", num_inference_steps=2, image=pb.Image(data=buffer.getvalue())
    )
    started = next(e.started for e in stub.Generate(request, timeout=60) if e.HasField("started"))
    assert (started.width, started.height) == (32, 64)


# --------------------------------------------------------- 5. no INTERNAL for what Inspect advertises


def _valid_value(info: pb.ParameterInfo) -> Any:
    """A value the parameter's schema admits, preferring its own default."""
    default = json_format.MessageToDict(info.default_value) if info.HasField("default_value") else None
    known: dict[str, Any] = {
        "timesteps": [900, 500],
        "sigmas": [10.0, 1.0],
        "cross_attention_kwargs": {"scale": 0.5},
        "clip_skip": 1,
    }
    if info.name in known:
        return known[info.name]
    if default is not None:
        return default
    return {
        pb.VALUE_KIND_NUMBER: 0.5,
        pb.VALUE_KIND_INTEGER: 1,
        pb.VALUE_KIND_BOOLEAN: True,
        pb.VALUE_KIND_STRING: "x",
        pb.VALUE_KIND_ARRAY: [1],
        pb.VALUE_KIND_OBJECT: {},
    }.get(info.kind)


def test_every_advertised_scheduler_and_parameter_runs_or_is_invalid(
    stub: pb_grpc.AutoPipelineServiceStub,
) -> None:
    (model,) = stub.Inspect(pb.InspectRequest(model="sd15"), timeout=30).models
    inputs = {
        I2I: {"image": _png((64, 64))},
        INPAINT: {"image": _png((64, 64)), "mask_image": _png((64, 64), "L")},
    }
    requests: list[pb.GenerateRequest] = []
    for task in model.tasks:
        base = {
            "task": task.task,
            "prompt": "x",
            "num_inference_steps": 2,
            "width": 64,
            "height": 64,
            **inputs.get(task.task, {}),
        }
        if task.task != T2I:
            base["strength"] = 1.0
        requests += [pb.GenerateRequest(scheduler=name, **base) for name in task.schedulers]
        for info in task.parameters:
            requests.append(pb.GenerateRequest(parameters=_params({info.name: _valid_value(info)}), **base))
    assert len(requests) > 40

    def outcome(request: pb.GenerateRequest) -> tuple[str, grpc.StatusCode, str]:
        parameters = json_format.MessageToJson(request.parameters, indent=None)
        label = f"{pb.Task.Name(request.task)} {request.scheduler} {parameters}"
        try:
            list(stub.Generate(request, timeout=120))
        except grpc.RpcError as err:
            return label, err.code(), err.details()
        return label, grpc.StatusCode.OK, ""

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(outcome, requests))
    failures = [r for r in results if r[1] not in (grpc.StatusCode.OK, INVALID)]
    assert not failures, failures
    ran = {r[0] for r in results if r[1] is grpc.StatusCode.OK}
    for option in ("LMSDiscreteScheduler", "DPMSolverSDEScheduler", "clip_skip", '"scale": 0.5'):
        assert any(option in label for label in ran), option


# --------------------------------------------------------------------------- 6. drain past its grace


def test_drain_returns_within_grace_plus_a_bound_when_a_call_is_stuck(checkpoints: dict[str, Path]) -> None:
    server = ServerThread(_settings(checkpoints))
    try:
        with _stuck_call(server, OK_REQUEST):
            # The call ignores its cancellation (it never leaves the step); stop gives up on it.
            assert server.call(server.running.stop(0.2, stuck_after=0.5)) is False
    finally:
        server.close_loop()


# -------------------------------------------------------------------------- 4. slow and silent readers


def test_a_silent_reader_is_ended_and_counted(checkpoints: dict[str, Path]) -> None:
    settings = _settings(checkpoints, stream_idle_timeout=0.3)
    # A client window far smaller than one image: the server's writes wait for the client to read.
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    request = pb.GenerateRequest(
        task=T2I, prompt="x", num_inference_steps=2, width=256, height=256, num_images=4
    )
    with _serving(settings) as server, grpc.insecure_channel(server.target, options=small_window) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        call = stub.Generate(request, timeout=120)
        next(call)
        stats = server.running.worker.stats
        ended = threading.Event()

        def watch() -> None:
            while not ended.is_set() and stats.ended_client_too_slow == 0:
                ended.wait(0.05)
            ended.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        ended.wait(60)
        watcher.join()
        assert stats.ended_client_too_slow == 1
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _details(caught.value)[0] == "CLIENT_TOO_SLOW"
        assert server.running.admission.pixels == 0
        assert list(stub.Generate(OK_REQUEST, timeout=60))[-1].HasField("completed")


# --------------------------------------------------------------------------------- 7. smaller ones


def test_names_are_bounded_in_replies_and_logs(
    stub: pb_grpc.AutoPipelineServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        for request in (
            pb.GenerateRequest(task=T2I, prompt="x", model="m" * 100),
            pb.GenerateRequest(task=T2I, prompt="x", model="m" * 8000),
            pb.GenerateRequest(task=T2I, prompt="x", scheduler="s" * 100_000),
            pb.GenerateRequest(task=T2I, prompt="x", parameters=_params({"p" * 1_000_000: 1})),
            pb.GenerateRequest(task=T2I, prompt="x", parameters=_params({"eta": "e" * 1_000_000})),
        ):
            err = _fails(stub, request)
            assert len(err.details()) < 1500, err.details()[:300]
    assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 1500


def test_spellings_of_one_allowed_folder_load_once(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = checkpoints["sd15"].resolve()
    parent, name = str(folder.parent), folder.name
    spellings = {
        f"{prefix}{parent}{sep}{middle}{name}{suffix}"
        for prefix in ("", "/")
        for sep in ("/", "//")
        for middle in ("", "./")
        for suffix in ("", "/", "/.")
    }
    spellings = sorted(spellings)[:24]
    assert len(spellings) == 24
    with _serving(_settings(checkpoints, allow_sources=(f"{parent}/*",))) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            for source in spellings:
                request = pb.GenerateRequest(
                    task=T2I, prompt="x", source=source, num_inference_steps=2, width=64, height=64
                )
                assert list(stub.Generate(request, timeout=60))[-1].HasField("completed"), source
        on_demand = [e for e in server.running.registry.entries.values() if not e.pinned]
        assert [(e.spec.source, e.loads) for e in on_demand] == [(str(folder), 1)]


def test_model_names_are_public_through_health(checkpoints: dict[str, Path]) -> None:
    """Documented: per-model health answers without a token (names are not secret); work does not."""
    with (
        _serving(_settings(checkpoints, tokens=("secret",))) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        health = health_pb2_grpc.HealthStub(ch)
        answer = health.Check(health_pb2.HealthCheckRequest(service="sd15"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_sdk_retries_of_a_full_queue_are_spread() -> None:
    error = ResourceExhaustedError("full", code="RESOURCE_EXHAUSTED", reason="QUEUE_FULL", retry_after=1.0)
    delays = {RetryPolicy().delay(1, error) for _ in range(20)}
    assert all(d is not None and 1.0 <= d <= 1.2 for d in delays)
    assert len(delays) > 1
