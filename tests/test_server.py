"""The server end to end over real gRPC: resolution, streaming, determinism, chunking, validation."""

from __future__ import annotations

import inspect
import io
import math
from pathlib import Path

import grpc
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoPipelineForImage2Image
from diffusers.hooks import group_offloading
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.domain import Task
from autopipeline_server.settings import ModelSpec, Settings

from .support import Generate, ServerThread

TASKS = [pb.TASK_TEXT_TO_IMAGE, pb.TASK_IMAGE_TO_IMAGE, pb.TASK_INPAINTING]
EXPECTED_CLASSES = {
    "sd15": ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"],
    "sdxl": [
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ],
}


def kinds(events: list[pb.GenerateResponse]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def images(events: list[pb.GenerateResponse]) -> dict[int, bytes]:
    """Reassembles chunked image events by index."""
    assembled: dict[int, bytes] = {}
    for event in events:
        if event.HasField("image"):
            assembled[event.image.index] = assembled.get(event.image.index, b"") + event.image.image.data
    return assembled


def task_inputs(task: int, input_png: bytes, mask_png: bytes) -> dict[str, object]:
    if task == pb.TASK_TEXT_TO_IMAGE:
        return {}
    inputs: dict[str, object] = {"image": pb.Image(data=input_png, mime_type="image/png")}
    if task == pb.TASK_INPAINTING:
        inputs["mask_image"] = pb.Image(data=mask_png)
    return inputs


def status_details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return info, fields


# ---------------------------------------------------------------------------------------- Inspect


def test_inspect_describes_server_and_models(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    response = stub.Inspect(pb.InspectRequest())
    assert response.server.version
    assert response.server.diffusers_version.startswith("0.42")
    assert response.server.device == "cpu"
    assert response.server.default_model == "sd15"
    assert response.server.limits.max_width >= 2048
    assert response.server.limits.image_chunk_bytes < 4 * 1024 * 1024
    models = {m.name: m for m in response.models}
    assert set(models) == {"sd15", "sdxl", "sd15-inpainting", "ddpm"}
    for name, classes in EXPECTED_CLASSES.items():
        model = models[name]
        assert model.state == pb.MODEL_STATE_READY
        assert model.family == ("stable-diffusion" if name == "sd15" else "stable-diffusion-xl")
        assert model.dtype == "float32"
        assert model.parameter_bytes > 0
        assert [t.task for t in model.tasks] == TASKS
        assert [t.pipeline_class for t in model.tasks] == classes
        for info in model.tasks:
            assert info.default_scheduler in info.schedulers
            assert (info.default_width, info.default_height) == (64, 64)
            assert "eta" in {p.name for p in info.parameters}
            assert not {"generator", "latents", "callback_on_step_end", "prompt"} & {
                p.name for p in info.parameters
            }
    assert models["sd15"].is_default and not models["sdxl"].is_default
    eta = next(p for p in models["sd15"].tasks[0].parameters if p.name == "eta")
    assert eta.HasField("default_value") and eta.default_value.number_value == 0.0
    assert eta.kind == pb.VALUE_KIND_NUMBER and not eta.nullable
    assert json_format.MessageToDict(eta.schema) == {"type": "number"}


def test_inspect_one_model_and_unknown_model(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    assert [m.name for m in stub.Inspect(pb.InspectRequest(model="sdxl")).models] == ["sdxl"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Inspect(pb.InspectRequest(model="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_inpainting_unet_offers_only_inpainting(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    (model,) = stub.Inspect(pb.InspectRequest(model="sd15-inpainting")).models
    assert model.checkpoint_class == "StableDiffusionInpaintPipeline"
    assert [t.task for t in model.tasks] == [pb.TASK_INPAINTING]


def test_unsupported_checkpoint_fails_alone(
    stub: pb_grpc.AutoPipelineServiceStub, generate: Generate
) -> None:
    (model,) = stub.Inspect(pb.InspectRequest(model="ddpm")).models
    assert model.state == pb.MODEL_STATE_FAILED
    assert "DDPMPipeline" in model.state_reason and "AutoPipeline" in model.state_reason
    with pytest.raises(grpc.RpcError) as caught:
        generate(model="ddpm", task=pb.TASK_TEXT_TO_IMAGE, prompt="x")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert status_details(caught.value)[0].reason == "MODEL_FAILED"
    assert generate(task=pb.TASK_TEXT_TO_IMAGE, prompt="x", num_inference_steps=2)[-1].HasField("completed")


# --------------------------------------------------------------------------------------- Generate


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("task", TASKS, ids=["t2i", "i2i", "inpaint"])
def test_generate_every_family_and_task(
    stub: pb_grpc.AutoPipelineServiceStub,
    generate: Generate,
    input_png: bytes,
    mask_png: bytes,
    model: str,
    task: int,
) -> None:
    inspected = stub.Inspect(pb.InspectRequest(model=model)).models[0]
    expected_class = next(t.pipeline_class for t in inspected.tasks if t.task == task)
    strength = 0.5 if task != pb.TASK_TEXT_TO_IMAGE else None
    events = generate(
        model=model,
        task=task,
        prompt="a red fox",
        num_inference_steps=6,
        seed=1234,
        strength=strength,
        **task_inputs(task, input_png, mask_png),
    )
    names = kinds(events)
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "completed"
    started = events[1].started
    assert started.pipeline_class == expected_class
    assert started.model == model and started.seeds == [1234]
    assert (started.batch_requests, started.batch_images) == (1, 1)
    expected_steps = int(6 * 0.5) if strength is not None else 6
    assert started.total_steps == expected_steps
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == list(range(1, expected_steps + 1))
    assert all(p.total_steps == expected_steps for p in progress)
    (png,) = images(events).values()
    with PIL.Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (64, 64)
    completed = events[-1].completed
    assert completed.pipeline_class == expected_class and completed.num_images == 1
    assert completed.parameters["num_inference_steps"] == 6
    assert "seeds" not in completed.parameters  # typed fields only: JSON numbers lose seeds > 2^53
    assert completed.timings.running.ToNanoseconds() > 0
    if strength is not None:
        assert math.isclose(completed.parameters["strength"], 0.5)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_same_seed_same_bytes_different_seed_different_bytes(generate: Generate, model: str) -> None:
    def run(seed: int) -> bytes:
        return images(
            generate(model=model, task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=3, seed=seed)
        )[0]

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other


def test_image_i_uses_seed_plus_i(generate: Generate) -> None:
    events = generate(task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=3, seed=100, num_images=3)
    assert events[1].started.seeds == [100, 101, 102]
    batch = images(events)
    assert sorted(batch) == [0, 1, 2]
    assert [e.image.seed for e in events if e.HasField("image")] == [100, 101, 102]
    alone = images(generate(task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=3, seed=101))[0]
    assert _max_pixel_difference(batch[1], alone) <= 1


def _max_pixel_difference(a: bytes, b: bytes) -> int:
    with PIL.Image.open(io.BytesIO(a)) as first, PIL.Image.open(io.BytesIO(b)) as second:
        difference = np.asarray(first.convert("RGB"), np.int16) - np.asarray(second.convert("RGB"), np.int16)
        return int(np.abs(difference).max())


def test_seed_is_drawn_and_echoed_when_absent(generate: Generate) -> None:
    events = generate(task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=2, num_images=2)
    seeds = list(events[1].started.seeds)
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1
    assert [e.image.seed for e in events if e.HasField("image")] == seeds


@pytest.mark.parametrize(
    ("fmt", "quality", "pil_format"),
    [(pb.IMAGE_FORMAT_JPEG, 70, "JPEG"), (pb.IMAGE_FORMAT_WEBP, 0, "WEBP"), (pb.IMAGE_FORMAT_PNG, 0, "PNG")],
)
def test_output_formats(generate: Generate, fmt: int, quality: int, pil_format: str) -> None:
    events = generate(
        task=pb.TASK_TEXT_TO_IMAGE,
        prompt="p",
        num_inference_steps=2,
        seed=1,
        output_format=fmt,
        output_quality=quality,
    )
    image_event = next(e.image for e in events if e.HasField("image"))
    assert image_event.image.mime_type == f"image/{pil_format.lower()}"
    with PIL.Image.open(io.BytesIO(image_event.image.data)) as decoded:
        assert decoded.format == pil_format


def test_explicit_size_and_img2img_resize(generate: Generate, input_png: bytes) -> None:
    events = generate(
        task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=2, width=96, height=48, seed=1
    )
    with PIL.Image.open(io.BytesIO(images(events)[0])) as decoded:
        assert decoded.size == (96, 48)
    assert events[1].started.width == 96 and events[1].started.height == 48
    events = generate(
        task=pb.TASK_IMAGE_TO_IMAGE,
        prompt="p",
        num_inference_steps=4,
        image=pb.Image(data=input_png),
        width=80,
        height=80,
    )
    with PIL.Image.open(io.BytesIO(images(events)[0])) as decoded:
        assert decoded.size == (80, 80)


def test_previews_every_n_steps(generate: Generate) -> None:
    events = generate(
        task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=4, seed=3, preview_interval=2
    )
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [p.step for p in previews] == [2, 4]
    with PIL.Image.open(io.BytesIO(previews[0].image.data)) as decoded:
        assert max(decoded.size) <= 256


def test_parameters_are_validated_and_passed(generate: Generate) -> None:
    params = struct_pb2.Struct()
    params.update({"eta": 0.3, "guidance_rescale": 0.5})
    events = generate(
        task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=2, seed=1, parameters=params
    )
    resolved = events[-1].completed.parameters
    assert math.isclose(resolved["eta"], 0.3) and math.isclose(resolved["guidance_rescale"], 0.5)


def test_scheduler_can_be_chosen(stub: pb_grpc.AutoPipelineServiceStub, generate: Generate) -> None:
    info = stub.Inspect(pb.InspectRequest(model="sd15")).models[0].tasks[0]
    other = next(
        s
        for s in ("DDIMScheduler", "EulerDiscreteScheduler")
        if s in info.schedulers and s != info.default_scheduler
    )
    events = generate(task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=3, seed=1, scheduler=other)
    assert events[1].started.scheduler == other
    assert events[-1].completed.parameters["scheduler"] == other
    default = generate(task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=3, seed=1)
    assert default[1].started.scheduler == info.default_scheduler
    assert images(events)[0] != images(default)[0]


def test_large_image_is_chunked_under_the_message_limit(small_chunks: ServerThread) -> None:
    # The server's image_chunk_bytes is 2 KiB: a 64x64 PNG of noise (~12 KB) needs several chunks.
    with grpc.insecure_channel(small_chunks.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        request = pb.GenerateRequest(task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=1, seed=5)
        events = list(stub.Generate(request, timeout=60))
    chunks = [e.image for e in events if e.HasField("image")]
    assert len(chunks) >= 2
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert {c.chunk_count for c in chunks} == {len(chunks)}
    assert all(len(c.image.data) <= 2048 for c in chunks)
    data = images(events)[0]
    assert len(data) > 2048
    with PIL.Image.open(io.BytesIO(data)) as decoded:
        assert decoded.size == (64, 64)


def test_task_pipelines_share_modules(server: ServerThread) -> None:
    model = server.running.registry.entries["sdxl"].model
    assert model is not None
    pipes = [model.tasks[task].pipe for task in Task]
    names = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    for name in names:
        assert len({id(getattr(p, name)) for p in pipes}) == 1, name
    weights = {p.unet.conv_in.weight.data_ptr() for p in pipes}
    assert len(weights) == 1


# ------------------------------------------------------------------------------------- validation

# The table of malformed requests lives in test_hostile.py.


def test_decompression_bomb_is_refused_before_decoding(generate: Generate) -> None:
    # A PNG header claiming 30000x30000 pixels: refused on the header, not after decoding 2.7 GB.
    huge = PIL.Image.new("1", (30000, 30000))
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 1024 * 1024
    with pytest.raises(grpc.RpcError) as caught:
        generate(task=pb.TASK_IMAGE_TO_IMAGE, prompt="x", image=pb.Image(data=buffer.getvalue()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pixels" in caught.value.details()


# ------------------------------------------------------------------------------- health, reflection


def test_health_overall_and_per_model(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="autopipeline.v1.AutoPipelineService")).status
        == serving
    )
    assert health.Check(health_pb2.HealthCheckRequest(service="sdxl")).status == serving
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="ddpm")).status
        == health_pb2.HealthCheckResponse.NOT_SERVING
    )


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert "autopipeline.v1.AutoPipelineService" in services
    assert "grpc.health.v1.Health" in services


def test_deadline_exceeded_is_reported_and_server_recovers(
    stub: pb_grpc.AutoPipelineServiceStub, generate: Generate
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(
            stub.Generate(
                pb.GenerateRequest(
                    task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=400, width=512, height=512
                ),
                timeout=0.5,
            )
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert kinds(generate(task=pb.TASK_TEXT_TO_IMAGE, prompt="ok", num_inference_steps=2))[-1] == "completed"


@pytest.mark.filterwarnings("ignore:`upcast_vae` is deprecated:FutureWarning")  # diffusers' own SDXL decode
def test_float16_sdxl_previews_work_and_the_shared_vae_keeps_its_dtype(checkpoints: dict[str, Path]) -> None:
    settings = Settings(
        models=(ModelSpec("xl16", str(checkpoints["sdxl"])),),
        host="127.0.0.1",
        port=0,
        device="cpu",
        dtype="float16",
    )
    server = ServerThread(settings)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AutoPipelineServiceStub(channel)
            request = pb.GenerateRequest(
                task=pb.TASK_TEXT_TO_IMAGE, prompt="p", num_inference_steps=2, preview_interval=1
            )
            events = list(stub.Generate(request, timeout=60))
        previews = [e.preview for e in events if e.HasField("preview")]
        assert [p.step for p in previews] == [1, 2]
        with PIL.Image.open(io.BytesIO(previews[-1].image.data)) as preview:
            assert np.asarray(preview).std() > 0, "the preview decoded to a flat (NaN) image"
        vae = server.running.registry.entries["xl16"].model.tasks[Task.TEXT_TO_IMAGE].pipe.vae  # type: ignore[union-attr]
        assert vae.dtype == torch.float16
    finally:
        server.stop()


# ------------------------------------------------------------------------------------- step counts

STRENGTHS = (0.3, 0.6, 0.7, 0.75, 0.8)
STEP_COUNTS = (10, 20, 25, 30, 50)


def test_image_to_image_runs_the_steps_diffusers_runs(
    stub: pb_grpc.AutoPipelineServiceStub, checkpoints: dict[str, Path], input_png: bytes
) -> None:
    """`strength` is a double on the wire: 10 steps at 0.7 run 7, as in diffusers (a float ran 6)."""
    pipe = AutoPipelineForImage2Image.from_pretrained(str(checkpoints["sd15"]), local_files_only=True)
    expected: dict[tuple[float, int], int] = {}
    float32_differs = False
    for strength in STRENGTHS:
        for steps in STEP_COUNTS:
            pipe.scheduler.set_timesteps(steps)
            _, expected[strength, steps] = pipe.get_timesteps(steps, strength, "cpu")
            float32_differs |= int(steps * float(np.float32(strength))) != expected[strength, steps]
    assert float32_differs, "no case tells a double from a float; the test would not catch a regression"

    for (strength, steps), total in expected.items():
        call = stub.Generate(
            pb.GenerateRequest(
                task=pb.TASK_IMAGE_TO_IMAGE,
                prompt="x",
                image=pb.Image(data=input_png),
                strength=strength,
                num_inference_steps=steps,
            ),
            timeout=60,
        )
        started = next(e.started for e in call if e.HasField("started"))
        call.cancel()  # only the step count matters here
        assert started.total_steps == total, (strength, steps)


def test_a_served_model_skips_diffusers_hook_walks_with_the_same_answers(server: ServerThread) -> None:
    """pipelines.skip_hook_walks: every component of a served model is marked hook-free, so diffusers'
    search for group-offloading hooks answers at once, without iterating the module tree, and the
    devices diffusers derives are what its full walk gives."""
    model = server.running.registry.entries["sd15"].model
    assert model is not None
    shortcut = group_offloading._get_top_level_group_offload_hook
    walk = shortcut.__wrapped__  # type: ignore[attr-defined]
    components = {n: c for n, c in model.base.components.items() if isinstance(c, torch.nn.Module)}
    assert {"unet", "vae", "text_encoder"} <= set(components)
    for name, component in components.items():
        assert component.__dict__.get("_autopipeline_hook_free"), name
        assert walk(component) is None, name  # the full walk agrees: there is no hook
    unet = components["unet"]
    walked: list[torch.nn.Module] = []
    original_modules = unet.modules
    unet.modules = lambda: walked.append(unet) or original_modules()  # type: ignore[method-assign]
    try:
        assert shortcut(unet) is None
        assert unet.device == torch.device("cpu")
        for target in model.tasks.values():
            assert target.pipe._execution_device == torch.device("cpu")
    finally:
        del unet.modules
    assert walked == []


def test_signatures_diffusers_derives_on_every_call_are_pinned_and_true(server: ServerThread) -> None:
    """pipelines.pin_signatures: each attention processor's and scheduler's signature is derived
    once at load and kept as `__signature__`; it must be what inspect derives itself."""
    model = server.running.registry.entries["sd15"].model
    assert model is not None
    functions = {type(m.processor).__call__ for m in model.base.unet.modules() if hasattr(m, "processor")}
    functions |= {type(model.base.scheduler).step, type(model.base.scheduler).set_timesteps}
    assert len(functions) >= 3
    for function in functions:
        pinned = function.__dict__["__signature__"]
        del function.__signature__
        try:
            assert inspect.signature(function) == pinned
        finally:
            function.__signature__ = pinned
