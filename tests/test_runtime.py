"""The serving runtime under load: admission, cancellation, deadlines, batching, the model cache, drain."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import PIL.Image
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server import registry as registry_module
from autopipeline_server import worker as worker_module
from autopipeline_server.domain import Event, Finished, GenerationRequest, Started, Task
from autopipeline_server.errors import ServingError
from autopipeline_server.prepare import PreparedCall, prepare_call
from autopipeline_server.registry import MAX_REMEMBERED_SOURCES
from autopipeline_server.settings import ModelSpec, Settings
from autopipeline_server.status import REQUEST_ID_KEY
from autopipeline_server.tiny import build_tiny_checkpoint
from autopipeline_server.worker import InferenceWorker, Job

from .support import ServerThread, png_bytes, queued_together, server_info, wait_for

SHORT = {"task": pb.TASK_TEXT_TO_IMAGE, "num_inference_steps": 3, "width": 64, "height": 64}
# Long enough (hundreds of steps at 256x256) that it is still running when the test acts on it.
LONG = {"task": pb.TASK_TEXT_TO_IMAGE, "num_inference_steps": 500, "width": 256, "height": 256}


def tiny_settings(checkpoints: dict[str, Path], **overrides: object) -> Settings:
    base: dict[str, object] = {
        "models": (ModelSpec("sd15", str(checkpoints["sd15"])), ModelSpec("sdxl", str(checkpoints["sdxl"]))),
        "host": "127.0.0.1",
        "port": 0,
        "device": "cpu",
        "grace": 30.0,
    }
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small_queue(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    server = ServerThread(tiny_settings(checkpoints, max_queue=16))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def batching(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    server = ServerThread(tiny_settings(checkpoints, max_batch_size=8, max_batch_delay_ms=300))
    yield server
    server.stop()


async def collect(
    stub: pb_grpc.AutoPipelineServiceStub, request: pb.GenerateRequest, timeout: float | None = 120
) -> list[pb.GenerateResponse] | grpc.aio.AioRpcError:
    try:
        return [event async for event in stub.Generate(request, timeout=timeout)]
    except grpc.aio.AioRpcError as err:
        return err


def _prepared(server: ServerThread, prompt: str) -> PreparedCall:
    """A small text-to-image call on sd15, prepared as the servicer prepares one, for `worker.submit`."""
    model = server.running.registry.entries["sd15"].model
    assert model is not None
    request = GenerationRequest(
        model="sd15",
        task=Task.TEXT_TO_IMAGE,
        prompt=prompt,
        width=64,
        height=64,
        num_inference_steps=2,
        seed=1,
    )
    return prepare_call(model, request)


async def _ending(job: Job) -> tuple[list[Event], str]:
    """A job's events and how they ended: the last event's type, or the error they raised."""
    events: list[Event] = []
    try:
        async with asyncio.timeout(60):  # only a backstop: a job whose events never end fails the test
            async for event in job.events():
                events.append(event)
    except ServingError as err:
        return events, type(err).__name__
    return events, type(events[-1]).__name__


# ------------------------------------------------------------------------------------------ admission


def test_64_concurrent_streams_against_a_queue_of_16(small_queue: ServerThread) -> None:
    before = server_info(small_queue).stats

    async def main() -> list[list[pb.GenerateResponse] | grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(small_queue.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            requests = [pb.GenerateRequest(prompt=f"p{i}", seed=i, **SHORT) for i in range(64)]
            return await asyncio.gather(*(collect(stub, r) for r in requests))

    outcomes = asyncio.run(main())
    completed = [o for o in outcomes if isinstance(o, list)]
    rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(completed) + len(rejected) == 64
    assert completed, "nothing was served"
    assert rejected, "a queue of 16 cannot hold 64 requests"
    for events in completed:
        assert events[-1].HasField("completed")
        assert any(e.HasField("image") for e in events)
        positions = [e.queued.position for e in events if e.HasField("queued")]
        assert positions == sorted(positions, reverse=True), "positions only move forward"
    for err in rejected:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
        assert retry.retry_delay.ToMilliseconds() > 0
    with grpc.insecure_channel(small_queue.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        assert list(stub.Generate(pb.GenerateRequest(prompt="after", **SHORT)))[-1].HasField("completed")
    after = server_info(small_queue)
    assert after.queue_depth == 0
    assert after.stats.rejected_queue_full - before.rejected_queue_full == len(rejected)
    assert after.stats.completed - before.completed == len(completed) + 1
    assert after.stats.submitted - before.submitted == len(completed) + 1


# ------------------------------------------------------------------------------ cancellation, deadlines


def test_cancelled_running_request_frees_the_worker(small_queue: ServerThread) -> None:
    cancelled_before = server_info(small_queue).stats.cancelled_running
    with grpc.insecure_channel(small_queue.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        long_call = stub.Generate(pb.GenerateRequest(prompt="long", seed=1, **LONG))
        steps = []
        for event in long_call:
            if event.HasField("progress"):
                steps.append((time.perf_counter(), event.progress.step))
                if len(steps) == 3:
                    break
        per_step = (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1])
        would_finish_at = steps[-1][0] + per_step * (LONG["num_inference_steps"] - steps[-1][1])
        long_call.cancel()
        events = list(stub.Generate(pb.GenerateRequest(prompt="next", **SHORT), timeout=60))
        assert events[-1].HasField("completed")
        assert time.perf_counter() < would_finish_at, "the next request waited for the cancelled one"
    wait_for(lambda: server_info(small_queue).stats.cancelled_running == cancelled_before + 1)
    assert server_info(small_queue).running == 0


def test_queued_request_whose_deadline_passes_never_runs(small_queue: ServerThread) -> None:
    with grpc.insecure_channel(small_queue.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        blocker = stub.Generate(pb.GenerateRequest(prompt="blocker", seed=2, **LONG))
        next(e for e in blocker if e.HasField("progress"))
        before = server_info(small_queue).stats
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(prompt="late", **SHORT), timeout=0.5))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: server_info(small_queue).stats.cancelled_queued == before.cancelled_queued + 1)
        assert server_info(small_queue).queue_depth == 0
        blocker.cancel()
    wait_for(lambda: server_info(small_queue).running == 0)
    assert server_info(small_queue).stats.pipeline_calls == before.pipeline_calls, "the expired one ran"


# ------------------------------------------------------------------------------------------- batching


def _pixels(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _image(events: list[pb.GenerateResponse], index: int = 0) -> bytes:
    return b"".join(e.image.image.data for e in events if e.HasField("image") and e.image.index == index)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_batched_requests_match_solo_requests(
    batching: ServerThread, server: ServerThread, input_png: bytes, model: str
) -> None:
    variants = [
        {"prompt": "a red fox", "seed": 11},
        {"prompt": "a blue whale", "seed": 12, "num_images": 2},
        {"prompt": "a green tree", "seed": 13},
    ]

    calls_before = server_info(batching).stats.batched_calls
    results = _concurrently(
        batching,
        *(pb.GenerateRequest(model=model, **SHORT, **v) for v in variants),  # type: ignore[arg-type]
    )
    assert server_info(batching).stats.batched_calls > calls_before
    with grpc.insecure_channel(server.target) as channel:
        solo_stub = pb_grpc.AutoPipelineServiceStub(channel)
        for variant, events in zip(variants, results, strict=True):
            assert isinstance(events, list), events
            started = next(e.started for e in events if e.HasField("started"))
            assert started.batch_requests > 1, "the requests did not share a call"
            count = int(variant.get("num_images", 1))
            assert list(started.seeds) == [int(variant["seed"]) + i for i in range(count)]
            for index in range(count):
                solo = list(
                    solo_stub.Generate(
                        pb.GenerateRequest(
                            model=model,
                            **SHORT,
                            prompt=str(variant["prompt"]),
                            seed=int(variant["seed"]) + index,
                        )
                    )
                )
                difference = np.abs(_pixels(_image(events, index)) - _pixels(_image(solo))).max()
                assert difference <= 1, f"batched image differs from solo by {difference}/255"


def test_batched_image_to_image_keeps_each_input(batching: ServerThread, server: ServerThread) -> None:
    inputs = [PIL.Image.new("RGB", (64, 64), colour) for colour in ((200, 30, 30), (30, 30, 200))]
    requests = [
        pb.GenerateRequest(
            task=pb.TASK_IMAGE_TO_IMAGE,
            prompt="p",
            seed=5,
            strength=0.5,
            num_inference_steps=4,
            image=pb.Image(data=png_bytes(image)),
        )
        for image in inputs
    ]

    results = _concurrently(batching, *requests)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        for request, events in zip(requests, results, strict=True):
            assert isinstance(events, list), events
            assert next(e.started for e in events if e.HasField("started")).batch_requests == 2
            solo = list(stub.Generate(request))
            assert np.abs(_pixels(_image(events)) - _pixels(_image(solo))).max() <= 1


def test_cancelled_batch_member_does_not_spoil_the_others(batching: ServerThread) -> None:
    async def main() -> tuple[list[pb.GenerateResponse] | grpc.aio.AioRpcError, bool]:
        async with grpc.aio.insecure_channel(batching.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            slow = {**SHORT, "num_inference_steps": 60}
            blocker = stub.Generate(BLOCKER)
            async for event in blocker:
                if event.HasField("progress"):
                    break
            keeper = asyncio.ensure_future(collect(stub, pb.GenerateRequest(prompt="keep", seed=1, **slow)))
            leaver = stub.Generate(pb.GenerateRequest(prompt="leave", seed=2, **slow))
            while (await stub.Inspect(pb.InspectRequest())).server.queue_depth < 2:
                await asyncio.sleep(0.005)
            blocker.cancel()
            async for event in leaver:
                if event.HasField("progress"):
                    assert event.progress.step >= 1
                    leaver.cancel()
                    break
            return await keeper, leaver.cancelled()

    kept, cancelled = asyncio.run(main())
    assert cancelled
    assert isinstance(kept, list), kept
    assert next(e.started for e in kept if e.HasField("started")).batch_requests == 2
    assert kept[-1].HasField("completed") and _image(kept)


def test_incompatible_requests_are_not_batched(batching: ServerThread) -> None:
    async def main() -> list[list[pb.GenerateResponse] | grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(batching.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            return await asyncio.gather(
                collect(stub, pb.GenerateRequest(prompt="a", **SHORT)),
                collect(stub, pb.GenerateRequest(prompt="b", **{**SHORT, "num_inference_steps": 4})),
            )

    for events in asyncio.run(main()):
        assert isinstance(events, list), events
        assert next(e.started for e in events if e.HasField("started")).batch_requests == 1


def inspect_models(server: ServerThread) -> list[pb.ModelInfo]:
    with grpc.insecure_channel(server.target) as channel:
        return list(pb_grpc.AutoPipelineServiceStub(channel).Inspect(pb.InspectRequest()).models)


# Holds the device (256x256, never batched with the 64x64 requests below); see `queued_together`.
BLOCKER = pb.GenerateRequest(prompt="blocker", **LONG)


def _concurrently(server: ServerThread, *requests: pb.GenerateRequest) -> list[list[pb.GenerateResponse]]:
    return queued_together(server, requests, blocker=BLOCKER)


def _started(events: list[pb.GenerateResponse]) -> pb.Started:
    return next(e.started for e in events if e.HasField("started"))


class _HandlersFinished(logging.Handler):
    """The request ids of RPCs whose handlers have finished: each writes its access line last."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.request_ids: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.request_ids.add(str(getattr(record, "request_id", "")))


@contextlib.contextmanager
def _handlers_finished() -> Iterator[_HandlersFinished]:
    access, finished = logging.getLogger("autopipeline_server.access"), _HandlersFinished()
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(finished)
    try:
        yield finished
    finally:
        access.removeHandler(finished)
        access.setLevel(level)


async def _hold_device(worker: InferenceWorker, gate: threading.Event) -> asyncio.Future[bool]:
    """Queues a wait for `gate` on the device thread, behind the call running there."""
    held = asyncio.ensure_future(worker.run_on_device(gate.wait, 120))
    await asyncio.sleep(0)  # the wait's first step hands it to the device thread
    return held


def test_a_member_leaving_as_its_call_starts_takes_no_input_the_call_reads(batching: ServerThread) -> None:
    worker, gate = batching.running.worker, threading.Event()
    keep, leave = (
        pb.GenerateRequest(
            task=pb.TASK_IMAGE_TO_IMAGE,
            prompt=prompt,
            seed=5,
            strength=0.5,
            num_inference_steps=4,
            image=pb.Image(data=png_bytes(PIL.Image.new("RGB", (64, 64), colour))),
        )
        for prompt, colour in (("keep", (200, 30, 30)), ("leave", (30, 30, 200)))
    )

    async def main() -> list[pb.GenerateResponse] | grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(batching.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            blocker = stub.Generate(BLOCKER)
            async for event in blocker:
                if event.HasField("progress"):
                    break
            # Once the blocker's call has stopped, the device thread waits for the gate: the two
            # requests' call is committed then, but has not read their inputs yet.
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(_hold_device(worker, gate), batching.loop)
            )
            keeper = asyncio.ensure_future(collect(stub, keep))
            leaver = stub.Generate(leave)
            leaver_id = dict(await leaver.initial_metadata())[REQUEST_ID_KEY]
            while (await stub.Inspect(pb.InspectRequest())).server.queue_depth < 2:
                await asyncio.sleep(0.005)
            calls = worker.stats.pipeline_calls
            blocker.cancel()
            while worker.stats.pipeline_calls == calls:
                await asyncio.sleep(0.005)
            leaver.cancel()
            while leaver_id not in finished.request_ids:  # its handler has let go of its job
                await asyncio.sleep(0.005)
            gate.set()
            return await keeper

    with _handlers_finished() as finished:
        try:
            kept = asyncio.run(main())
        finally:
            gate.set()
    assert isinstance(kept, list), kept
    assert _started(kept).batch_requests == 2 and kept[-1].HasField("completed")


def test_a_negative_prompt_splits_batches_only_by_presence(batching: ServerThread) -> None:
    """SDXL treats an absent negative prompt (zeros) unlike any given one, so presence is in the key."""
    mixed = _concurrently(
        batching,
        pb.GenerateRequest(model="sdxl", prompt="a", **SHORT),
        pb.GenerateRequest(model="sdxl", prompt="b", negative_prompt="blurry", **SHORT),
    )
    assert [_started(events).batch_requests for events in mixed] == [1, 1]
    both = _concurrently(
        batching,
        pb.GenerateRequest(model="sdxl", prompt="a", negative_prompt="dark", **SHORT),
        pb.GenerateRequest(model="sdxl", prompt="b", negative_prompt="blurry", **SHORT),
    )
    assert [(_started(e).batch_requests, _started(e).batch_images) for e in both] == [(2, 2), (2, 2)]


def test_batched_previews_reach_each_member(batching: ServerThread) -> None:
    steps = 2
    request = {**SHORT, "num_inference_steps": steps, "preview_interval": 1}
    results = _concurrently(
        batching,
        pb.GenerateRequest(prompt="one", num_images=1, **request),
        pb.GenerateRequest(prompt="two", num_images=2, **request),
    )
    for events, images in zip(results, (1, 2), strict=True):
        assert (_started(events).batch_requests, _started(events).batch_images) == (2, 3)
        previews = [(e.preview.step, e.preview.index) for e in events if e.HasField("preview")]
        assert sorted(previews) == [(step, i) for step in range(1, steps + 1) for i in range(images)]
        for event in events:
            if event.HasField("preview"):
                with PIL.Image.open(io.BytesIO(event.preview.image.data)) as preview:
                    assert preview.size == (64, 64)


def test_a_request_queued_behind_a_batch_waits_for_that_batch_s_clients(checkpoints: dict[str, Path]) -> None:
    """Closed-loop clients stay in one batch: the request that waited through a call of several
    does not start alone as the call ends, while that call's clients are still being answered."""
    server = ServerThread(tiny_settings(checkpoints, max_batch_size=8))
    worker = server.running.worker
    worker.max_batch_delay = 600.0  # beyond the test: every wait below ends by the company arriving

    async def scenario() -> tuple[int, list[str]]:
        calls = worker.stats.pipeline_calls
        device = threading.Event()
        held = asyncio.ensure_future(worker.run_on_device(device.wait, 60))  # the device is busy
        arrival = worker.arriving()  # the three come as one: a batch forms until they are all in
        first = [worker.submit(_prepared(server, f"client {i}")) for i in range(3)]
        arrival.close()
        while worker.queue_depth:
            await asyncio.sleep(0)
        late = worker.submit(_prepared(server, "queued behind them"))  # waits through their call
        device.set()
        await held
        endings = [await _ending(job) for job in first]  # their clients are answered, and come back
        again = [worker.submit(_prepared(server, f"client {i} again")) for i in range(3)]
        endings += [await _ending(job) for job in (late, *again)]
        return worker.stats.pipeline_calls - calls, [ending for _, ending in endings]

    try:
        calls, endings = server.call(scenario())
    finally:
        server.stop()
    assert endings == ["Finished"] * 7
    assert calls == 2  # the three, then the late one with the three back; not the late one alone


def test_a_different_kind_of_request_does_not_wait_for_the_last_batch_s_clients(
    checkpoints: dict[str, Path],
) -> None:
    server = ServerThread(tiny_settings(checkpoints, max_batch_size=8))
    worker = server.running.worker
    worker.max_batch_delay = 600.0  # waiting for company would hang the test until the backstop

    async def scenario() -> list[str]:
        arrival = worker.arriving()
        first = [worker.submit(_prepared(server, f"client {i}")) for i in range(2)]
        arrival.close()
        endings = [await _ending(job) for job in first]
        other = prepare_call(
            _prepared(server, "x").model,
            GenerationRequest(model="sd15", task=Task.TEXT_TO_IMAGE, prompt="other", width=64, height=64,
                              num_inference_steps=3, seed=1),
        )  # fmt: skip
        endings.append(await _ending(worker.submit(other)))  # another number of steps: another batch
        return [ending for _, ending in endings]

    try:
        assert server.call(scenario()) == ["Finished"] * 3
    finally:
        server.stop()


# --------------------------------------------------------------------------------------- model cache


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    for seed in (1, 2, 3):
        build_tiny_checkpoint("sd15", root / f"m{seed}", seed=seed)
    return root


@pytest.fixture
def cache_server(checkpoints: dict[str, Path], allowed_dir: Path) -> Iterator[ServerThread]:
    model_bytes = sum(f.stat().st_size for f in (allowed_dir / "m1").rglob("*.safetensors"))
    server = ServerThread(
        tiny_settings(
            checkpoints,
            allow_sources=(f"{allowed_dir}/*",),
            # Room for one on-demand model at a time.
            memory_budget=int(model_bytes * 1.5),
        )
    )
    yield server
    server.stop()


def test_on_demand_models_load_once_and_are_evicted_lru(
    cache_server: ServerThread, allowed_dir: Path
) -> None:
    m1, m2 = str(allowed_dir / "m1"), str(allowed_dir / "m2")

    async def concurrently(model: str, n: int) -> list[list[pb.GenerateResponse] | grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(cache_server.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            return await asyncio.gather(
                *(collect(stub, pb.GenerateRequest(source=model, prompt=str(i), **SHORT)) for i in range(n))
            )

    first = asyncio.run(concurrently(m1, 5))
    for events in first:
        assert isinstance(events, list), events
        assert events[0].HasField("queued") and events[-1].HasField("completed")
    loads = {m.name: m.loads for m in inspect_models(cache_server)}
    assert loads[m1] == 1, "concurrent first requests loaded the model more than once"

    with grpc.insecure_channel(cache_server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        assert list(stub.Generate(pb.GenerateRequest(source=m2, prompt="x", **SHORT)))[-1].HasField(
            "completed"
        )
        models = {m.name: m for m in stub.Inspect(pb.InspectRequest()).models}
        assert models[m1].state == pb.MODEL_STATE_EVICTED
        assert models[m2].state == pb.MODEL_STATE_READY and models[m2].parameter_bytes > 0
        assert models["sd15"].state == pb.MODEL_STATE_READY, "configured models are pinned"
        assert stub.Inspect(pb.InspectRequest()).server.memory_budget_bytes > 0

        assert list(stub.Generate(pb.GenerateRequest(source=m1, prompt="again", **SHORT)))[-1].HasField(
            "completed"
        )
    models = {m.name: m for m in inspect_models(cache_server)}
    assert models[m1].loads == 2 and models[m1].load_duration.ToNanoseconds() > 0
    assert models[m2].state == pb.MODEL_STATE_EVICTED


def test_a_served_model_keeps_serving_while_another_loads(
    cache_server: ServerThread, allowed_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading weights happens off the device thread: it must not stall requests to a ready model.

    The slow model's load is held inside the real loader until the served model has answered
    three requests; were the load on the device thread, those requests could never run.
    """
    gate = threading.Event()
    real_load = registry_module.load_model

    def held_load(spec: ModelSpec, **kwargs: Any) -> Any:
        if spec.source.endswith("m3"):
            gate.wait(120)
        return real_load(spec, **kwargs)

    monkeypatch.setattr(registry_module, "load_model", held_load)
    slow = str(allowed_dir / "m3")
    try:
        with grpc.insecure_channel(cache_server.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            loading = stub.Generate(pb.GenerateRequest(source=slow, prompt="slow", **SHORT), timeout=120)
            assert next(iter(loading)).HasField("queued")
            for i in range(3):
                request = pb.GenerateRequest(model="sd15", prompt=str(i), **SHORT)
                assert list(stub.Generate(request, timeout=60))[-1].HasField("completed")
            (info,) = stub.Inspect(pb.InspectRequest(source=slow)).models
            assert info.state == pb.MODEL_STATE_LOADING
            gate.set()
            assert list(loading)[-1].HasField("completed")
    finally:
        gate.set()


def test_the_registry_remembers_a_bounded_number_of_sources(
    cache_server: ServerThread, allowed_dir: Path
) -> None:
    """Callers naming ever new (failing) sources cannot grow the registry without bound."""
    with grpc.insecure_channel(cache_server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        for i in range(MAX_REMEMBERED_SOURCES + 8):
            request = pb.GenerateRequest(source=str(allowed_dir / f"missing-{i}"), prompt="x", **SHORT)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request, timeout=60))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        on_demand = [m for m in stub.Inspect(pb.InspectRequest()).models if m.on_demand]
        assert len(on_demand) == MAX_REMEMBERED_SOURCES
        assert str(allowed_dir / f"missing-{MAX_REMEMBERED_SOURCES + 7}") in {m.name for m in on_demand}


def test_only_allowed_sources_can_be_named(
    cache_server: ServerThread, allowed_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(allowed_dir / "m3", outside)
    link = allowed_dir / "link-to-outside"
    link.symlink_to(outside, target_is_directory=True)
    with grpc.insecure_channel(cache_server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        for name in (
            str(outside),
            f"{allowed_dir}/../outside",
            str(link),
            "https://example.com/model",
            "relative/dir/../../etc",
            "/etc/passwd",
        ):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(pb.GenerateRequest(source=name, prompt="x", **SHORT)))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, name
            # `model` names configured models only, never a path, even an allowed one.
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(pb.GenerateRequest(model=str(allowed_dir / "m3"), prompt="x", **SHORT)))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, name
    assert not [e for e in cache_server.running.registry.entries.values() if "outside" in e.spec.source]


def test_on_demand_load_failure_is_unavailable_with_the_reason(
    cache_server: ServerThread, allowed_dir: Path
) -> None:
    broken = allowed_dir / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    with grpc.insecure_channel(cache_server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(source=str(broken), prompt="x", **SHORT)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "DDPMPipeline" in caught.value.details()
        (info,) = stub.Inspect(pb.InspectRequest(source=str(broken))).models
        assert info.state == pb.MODEL_STATE_FAILED and "DDPMPipeline" in info.state_reason


# ---------------------------------------------------------------------------------------------- drain


def test_drain_finishes_in_flight_work_and_refuses_new(checkpoints: dict[str, Path]) -> None:
    server = ServerThread(tiny_settings(checkpoints))
    try:

        async def main() -> tuple[list[object], list[object], int, int]:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.AutoPipelineServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                slow = {**SHORT, "num_inference_steps": 40}
                in_flight = [
                    asyncio.ensure_future(collect(stub, pb.GenerateRequest(prompt=str(i), seed=i, **slow)))
                    for i in range(3)
                ]
                # Drain only once all three are in the queue (preparing them takes a while on a busy
                # machine; a request not yet admitted when draining starts is rightly refused).
                info = (await stub.Inspect(pb.InspectRequest())).server
                while info.stats.submitted < 3:
                    info = (await stub.Inspect(pb.InspectRequest())).server
                stopping = asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(server.running.stop(120), server.loop)
                )
                status = health_pb2.HealthCheckResponse.SERVING
                while status == health_pb2.HealthCheckResponse.SERVING:
                    status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
                late = [await collect(stub, pb.GenerateRequest(prompt="late", **SHORT))]
                done = await asyncio.gather(*in_flight)
                await stopping
                return list(done), late, status, info.queue_depth + info.running

        done, late, status, in_flight_when_draining = asyncio.run(main())
        assert in_flight_when_draining >= 1
        for events in done:
            assert isinstance(events, list), events
            assert events[-1].HasField("completed")
        assert isinstance(late[0], grpc.aio.AioRpcError)
        assert late[0].code() == grpc.StatusCode.UNAVAILABLE
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.close_loop()


def test_drain_cancels_what_outlives_the_grace_period(checkpoints: dict[str, Path]) -> None:
    server = ServerThread(tiny_settings(checkpoints))
    try:

        async def main() -> list[pb.GenerateResponse] | grpc.aio.AioRpcError:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.AutoPipelineServiceStub(channel)
                call = asyncio.ensure_future(collect(stub, pb.GenerateRequest(prompt="too long", **LONG)))
                while (await stub.Inspect(pb.InspectRequest())).server.running == 0:
                    pass
                await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(server.running.stop(0.5), server.loop)
                )
                return await call

        outcome = asyncio.run(main())
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert outcome.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close_loop()


def test_a_drain_ends_every_job_of_a_forming_batch_as_shutting_down(checkpoints: dict[str, Path]) -> None:
    server = ServerThread(tiny_settings(checkpoints, max_batch_size=8))
    worker = server.running.worker
    worker.max_batch_delay = 600.0  # beyond the test: the batch forms until the arrival below is closed

    async def scenario() -> list[str]:
        calls = worker.stats.pipeline_calls
        arrival = worker.arriving()  # a request on its way: the forming batch waits for it
        try:
            jobs = [worker.submit(_prepared(server, prompt)) for prompt in ("head", "companion")]
            while worker.queue_depth:  # both taken into one forming batch
                await asyncio.sleep(0)
            draining = asyncio.ensure_future(worker.drain(0, stuck_after=60))
            while not all(job.cancelled() for job in jobs):
                await asyncio.sleep(0)
            assert worker.stats.pipeline_calls == calls, "the batch was still forming when the drain gave up"
        finally:
            arrival.close()
        assert await draining
        return [(await _ending(job))[1] for job in jobs]

    try:
        # ShuttingDown is UNAVAILABLE on the wire, as for every other job a drain ends.
        assert server.call(scenario()) == ["ShuttingDown", "ShuttingDown"]
    finally:
        server.stop(grace=1)


# ---------------------------------------------------------------------------------- health, start-up


def test_not_serving_until_the_configured_models_are_warm(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_load = registry_module.load_model

    def gated_load(*args: object, **kwargs: object) -> object:
        gate.wait(60)  # holds the first load so the test can look at the server meanwhile
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(registry_module, "load_model", gated_load)
    server = ServerThread(tiny_settings(checkpoints), wait_until_loaded=False)
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", "autopipeline.v1.AutoPipelineService", "sd15", "sdxl"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == not_serving
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(pb.GenerateRequest(prompt="early", **SHORT)))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in caught.value.details()
            (info,) = stub.Inspect(pb.InspectRequest(model="sd15")).models
            assert info.state == pb.MODEL_STATE_LOADING
            gate.set()
            server.call(server.running.wait_until_loaded())
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
            assert list(stub.Generate(pb.GenerateRequest(prompt="now", **SHORT)))[-1].HasField("completed")
    finally:
        gate.set()
        server.stop()


def test_cancelling_leaks_no_threads_or_queue_slots(small_queue: ServerThread) -> None:
    with grpc.insecure_channel(small_queue.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        list(stub.Generate(pb.GenerateRequest(prompt="warm", **SHORT)))
        threads = threading.active_count()
        for i in range(5):
            call = stub.Generate(pb.GenerateRequest(prompt=f"gone {i}", **LONG))
            next(e for e in call if e.HasField("progress"))
            queued = stub.Generate(pb.GenerateRequest(prompt=f"queued {i}", **SHORT))
            next(e for e in queued if e.HasField("queued"))
            queued.cancel()
            call.cancel()
        assert list(stub.Generate(pb.GenerateRequest(prompt="after", **SHORT)))[-1].HasField("completed")
        wait_for(lambda: server_info(small_queue).running == 0)
        assert server_info(small_queue).queue_depth == 0
        assert threading.active_count() <= threads


# ------------------------------------------------------------------------------ the first event first


def _job_events(server: ServerThread, *, greet_after: int | None) -> tuple[bool, bool]:
    """Submits a call straight to the worker; `greet_after` loop turns later it says its first event
    is written (None: never). Returns whether the call had started before that, and whether it finished."""
    call = _prepared(server, "x")

    async def scenario() -> tuple[bool, bool]:
        job = server.running.worker.submit(call)
        for _ in range(greet_after or 0):  # enough turns for the worker to take the job
            await asyncio.sleep(0)
        started_before = job.started is not None
        if greet_after is not None:
            job.greeted.set()
        events = [event async for event in job.events()]
        return started_before, isinstance(events[-1], Finished)

    result: tuple[bool, bool] = server.call(scenario())
    return result


def test_a_call_starts_once_its_first_event_is_written(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "GREETING_WAIT", 120.0)
    assert _job_events(server, greet_after=50) == (False, True)


def test_a_call_waits_for_its_first_event_only_briefly(server: ServerThread) -> None:
    assert _job_events(server, greet_after=None) == (False, True)  # never greeted, still runs


def test_a_call_whose_callers_left_while_it_awaited_their_first_events_never_starts(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "GREETING_WAIT", 120.0)
    worker = server.running.worker

    async def scenario() -> tuple[str, int, float | None]:
        calls = worker.stats.pipeline_calls
        job = worker.submit(_prepared(server, "gone"))
        while worker.queue_depth:  # taken for a call, which awaits its caller's first event
            await asyncio.sleep(0)
        worker.cancel(job)  # the caller went away meanwhile
        _, ending = await _ending(job)
        return ending, worker.stats.pipeline_calls - calls, job.started

    assert server.call(scenario()) == ("RequestCancelled", 0, None)


def test_members_that_left_while_their_call_awaited_first_events_are_left_out_of_it(
    batching: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "GREETING_WAIT", 120.0)
    worker = batching.running.worker

    async def scenario() -> tuple[list[Event], str, str]:
        stayer, leaver = (worker.submit(_prepared(batching, prompt)) for prompt in ("stay", "leave"))
        while worker.queue_depth:  # both taken for one call, which awaits their first events
            await asyncio.sleep(0)
        worker.cancel(leaver)  # its caller went away meanwhile
        stayer.greeted.set()
        (events, ending), (_, left) = await _ending(stayer), await _ending(leaver)
        return events, ending, left

    events, ending, left = batching.call(scenario())
    assert (ending, left) == ("Finished", "RequestCancelled")
    started = next(event for event in events if isinstance(event, Started))
    assert (started.batch_requests, started.seeds) == (1, (1,))
