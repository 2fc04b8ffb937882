"""Every AutoPipeline family with a tiny checkpoint, through a real server: tasks, sizes, events, previews."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import PIL.Image
import pytest
from google.protobuf import struct_pb2
from grpc_status import rpc_status

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.settings import ConfigError, ModelSpec, Settings, load_settings
from autopipeline_server.tiny import build_tiny_checkpoint

from .support import ServerThread, png_bytes, server_info, wait_for

T2I, I2I, INPAINT = pb.TASK_TEXT_TO_IMAGE, pb.TASK_IMAGE_TO_IMAGE, pb.TASK_INPAINTING
# What each family offers with its tiny checkpoint: tasks, size multiple, default size (from the
# pipeline's own defaults: Kandinsky's signature says 512, Flux/Qwen default_sample_size 128 x 8,
# Z-Image hard-codes 1024, tiny SD/SDXL/SD3/IF sample sizes give 64, PixArt 256, Sana 32 x 32 = 1024).
FAMILIES: dict[str, tuple[tuple[int, ...], int, int]] = {
    "sd15": ((T2I, I2I, INPAINT), 8, 64),
    "sdxl": ((T2I, I2I, INPAINT), 8, 64),
    "sd15-inpainting": ((INPAINT,), 8, 64),
    "lcm": ((T2I, I2I), 8, 64),
    "sdxl-pag": ((T2I, I2I, INPAINT), 8, 64),
    "kandinsky21": ((T2I, I2I), 64, 512),
    "kandinsky22": ((T2I, I2I), 64, 512),
    "kandinsky22-inpainting": ((INPAINT,), 64, 512),
    "if": ((T2I, I2I, INPAINT), 2, 64),
    "sd3": ((T2I, I2I, INPAINT), 16, 64),
    "flux": ((T2I, I2I, INPAINT), 16, 1024),
    "flux2-klein": ((T2I, I2I), 16, 1024),
    "z-image": ((T2I, I2I, INPAINT), 16, 1024),
    "qwen-image": ((T2I, I2I, INPAINT), 16, 1024),
    "pixart-sigma": ((T2I,), 16, 256),
    "sana": ((T2I,), 32, 1024),
}
# A few servers, each holding several families, so a failure names its group and loads stay parallel-free.
GROUPS = (
    ("sd15", "sdxl", "sd15-inpainting", "lcm", "sdxl-pag"),
    ("kandinsky21", "kandinsky22", "kandinsky22-inpainting", "if"),
    ("sd3", "flux", "flux2-klein", "z-image", "qwen-image", "pixart-sigma", "sana"),
)
KANDINSKY = ("kandinsky21", "kandinsky22", "kandinsky22-inpainting")
SIZE = 64
# Where the family servers run, and how: the suite runs them on the CPU ("auto" is "eager" there). On a
# machine with a GPU, AUTOPIPELINE_TEST_DEVICE=cuda AUTOPIPELINE_TEST_ACCELERATION=eager runs every family
# there, through the dispatcher and with the schedule on the host ("auto" would compile every family).
DEVICE = os.environ.get("AUTOPIPELINE_TEST_DEVICE", "cpu")
ACCELERATION = os.environ.get("AUTOPIPELINE_TEST_ACCELERATION", "auto")
CASES = [(family, task) for family, (tasks, _, _) in FAMILIES.items() for task in tasks]

pytestmark = [
    # Kandinsky 2.2's combined pipelines pass the deprecated `callback_steps` to their decoder.
    pytest.mark.filterwarnings("ignore:`callback_steps` is deprecated:FutureWarning"),
]


@pytest.fixture(scope="session")
def family_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerThread]]:
    root = tmp_path_factory.mktemp("families")
    servers: dict[str, ServerThread] = {}
    running: list[ServerThread] = []
    try:
        for group in GROUPS:
            models = tuple(
                # Flux runs with VAE tiling, as an operator would configure it for big images.
                ModelSpec(
                    family,
                    str(build_tiny_checkpoint(family, root / family, seed=0)),
                    vae_tiling=family == "flux",
                )
                for family in group
            )
            settings = Settings(
                models=models, host="127.0.0.1", port=0, device=DEVICE, acceleration=ACCELERATION, grace=5.0
            )
            server = ServerThread(settings)
            running.append(server)
            servers.update(dict.fromkeys(group, server))
        yield servers
    finally:
        for server in running:
            server.stop()


def _stub(server: ServerThread) -> Iterator[pb_grpc.AutoPipelineServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.AutoPipelineServiceStub(channel)


@pytest.fixture(scope="session")
def stubs(family_servers: dict[str, ServerThread]) -> Iterator[dict[str, pb_grpc.AutoPipelineServiceStub]]:
    channels = {id(s): grpc.insecure_channel(s.target) for s in family_servers.values()}
    try:
        yield {f: pb_grpc.AutoPipelineServiceStub(channels[id(s)]) for f, s in family_servers.items()}
    finally:
        for channel in channels.values():
            channel.close()


def _inputs(task: int, size: int = SIZE) -> dict[str, Any]:
    image = PIL.Image.new("RGB", (size, size), (30, 120, 200))
    mask = PIL.Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    fields: dict[str, Any] = {}
    if task != T2I:
        fields["image"] = pb.Image(data=png_bytes(image))
    if task == INPAINT:
        fields["mask_image"] = pb.Image(data=png_bytes(mask))
    return fields


def _request(family: str, task: int, *, size: int = SIZE, **fields: Any) -> pb.GenerateRequest:
    parameters = struct_pb2.Struct()
    if family in KANDINSKY:
        parameters.update({"prior_num_inference_steps": 2})
    fields.setdefault("num_inference_steps", 2)
    if task == I2I and family != "flux2-klein":  # Flux.2's image-to-image takes no strength
        fields.setdefault("strength", 1.0)  # the default 0.3 leaves no step of 2
    return pb.GenerateRequest(
        model=family,
        task=task,
        prompt="a tiny red cube",
        width=size,
        height=size,
        seed=1,
        parameters=parameters,
        **_inputs(task, size),
        **fields,
    )


def _events(stub: pb_grpc.AutoPipelineServiceStub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(stub.Generate(request, timeout=120))


def _check_stream(events: list[pb.GenerateResponse]) -> tuple[pb.Started, list[PIL.Image.Image]]:
    """started once, progress 1..total, images whose decoded size is what the events say, completed last."""
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("started") == 1 and kinds[-1] == "completed" and kinds.count("completed") == 1
    started = next(e.started for e in events if e.HasField("started"))
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert steps == list(range(1, started.total_steps + 1))
    assert all(e.progress.total_steps == started.total_steps for e in events if e.HasField("progress"))
    images = []
    for event in events:
        if event.HasField("image"):
            decoded = PIL.Image.open(io.BytesIO(event.image.image.data))
            assert decoded.size == (event.image.width, event.image.height) == (started.width, started.height)
            images.append(decoded)
    assert images
    return started, images


def _error(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[str]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    fields: list[str] = []
    if status is not None:
        from google.rpc import error_details_pb2

        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields += [v.field for v in bad.field_violations]
    return err.code(), err.details() or "", fields


def test_inspect_derives_tasks_and_size_rules(stubs: dict[str, pb_grpc.AutoPipelineServiceStub]) -> None:
    for family, (tasks, multiple, default) in FAMILIES.items():
        (model,) = stubs[family].Inspect(pb.InspectRequest(model=family), timeout=30).models
        assert model.state == pb.MODEL_STATE_READY, (family, model.state_reason)
        assert tuple(t.task for t in model.tasks) == tasks, family
        for info in model.tasks:
            assert (info.size_multiple, info.default_width, info.default_height) == (
                multiple,
                default,
                default,
            )
            assert info.min_size == max(multiple, 8)
            assert info.stages == (2 if family in KANDINSKY else 1)
            assert info.fixed_size == (family == "if" and info.task != T2I)


@pytest.mark.parametrize(
    ("family", "task"), CASES, ids=[f"{f}-{pb.Task.Name(t)[5:].lower()}" for f, t in CASES]
)
def test_every_offered_task_runs(
    family: str, task: int, stubs: dict[str, pb_grpc.AutoPipelineServiceStub]
) -> None:
    # Two images from one input image: SD 3's and Kandinsky 2.1's image-to-image broke on that.
    started, images = _check_stream(_events(stubs[family], _request(family, task, num_images=2)))
    assert (started.width, started.height) == (SIZE, SIZE)
    assert len(images) == 2
    if family in KANDINSKY:
        assert started.total_steps == 4  # 2 prior + 2 decoder steps


@pytest.mark.parametrize("family", [f for f, (tasks, _, _) in FAMILIES.items() if T2I in tasks])
def test_72_pixels_runs_where_the_family_allows_it(
    family: str, stubs: dict[str, pb_grpc.AutoPipelineServiceStub]
) -> None:
    multiple = FAMILIES[family][1]
    request = _request(family, T2I, size=72)
    if 72 % multiple == 0:
        _started, images = _check_stream(_events(stubs[family], request))
        assert images[0].size == (72, 72)
        return
    with pytest.raises(grpc.RpcError) as caught:
        _events(stubs[family], request)
    code, message, fields = _error(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"width", "height"} <= set(fields)
    assert f"multiple of {multiple}" in message


@pytest.mark.parametrize("family", [f for f, (tasks, _, _) in FAMILIES.items() if len(tasks) < 3])
def test_missing_tasks_are_failed_precondition(
    family: str, stubs: dict[str, pb_grpc.AutoPipelineServiceStub]
) -> None:
    tasks = FAMILIES[family][0]
    for task in {T2I, I2I, INPAINT} - set(tasks):
        with pytest.raises(grpc.RpcError) as caught:
            _events(stubs[family], _request(family, task))
        code, message, _ = _error(caught.value)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        for offered in tasks:
            assert pb.Task.Name(offered)[5:].lower().replace("_", "-") in message


def test_if_image_tasks_return_their_native_size_only(
    stubs: dict[str, pb_grpc.AutoPipelineServiceStub],
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _events(stubs["if"], _request("if", I2I, size=32))
    code, message, fields = _error(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "width" in fields and "64" in message
    # Unset sizes take the native size whatever the input image's size.
    request = _request("if", I2I, size=96)
    request.ClearField("width")
    request.ClearField("height")
    _started, images = _check_stream(_events(stubs["if"], request))
    assert images[0].size == (64, 64)


def test_kandinsky_prior_steps_below_two_are_invalid(
    stubs: dict[str, pb_grpc.AutoPipelineServiceStub],
) -> None:
    request = _request("kandinsky22", T2I)
    request.parameters.update({"prior_num_inference_steps": 1})
    with pytest.raises(grpc.RpcError) as caught:
        _events(stubs["kandinsky22"], request)
    code, _, fields = _error(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["parameters.prior_num_inference_steps"]


def test_kandinsky_cancel_mid_prior_stops_before_the_decoder(
    family_servers: dict[str, ServerThread], stubs: dict[str, pb_grpc.AutoPipelineServiceStub]
) -> None:
    server = family_servers["kandinsky22"]
    model = server.running.registry.entries["kandinsky22"].model
    assert model is not None
    prior = model.base.prior_prior
    decoder_unet = model.base.unet
    in_prior, cancelled = threading.Event(), threading.Event()
    decoder_calls = 0
    real_prior, real_unet = prior.forward, decoder_unet.forward

    # A fake, for what a CPU is too fast to show: the prior's second step waits until the server
    # has seen the cancel, so the stand-in's next check (between prior steps) is the one that stops it.
    def slow_prior(*args: Any, **kwargs: Any) -> Any:
        if in_prior.is_set():
            cancelled.wait(60)
        in_prior.set()
        return real_prior(*args, **kwargs)

    def counting_unet(*args: Any, **kwargs: Any) -> Any:
        nonlocal decoder_calls
        decoder_calls += 1
        return real_unet(*args, **kwargs)

    before = server_info(server).stats.cancelled_running
    prior.forward, decoder_unet.forward = slow_prior, counting_unet
    try:
        request = _request("kandinsky22", T2I)
        request.parameters.update({"prior_num_inference_steps": 5})
        call = stubs["kandinsky22"].Generate(request, timeout=60)
        events = iter(call)
        kinds = []
        for event in events:
            kinds.append(event.WhichOneof("event"))
            if event.HasField("started"):
                assert event.started.total_steps == 5 + 2
            if event.HasField("progress"):
                assert event.progress.step == 1  # a prior step
                break
        call.cancel()
        worker = server.running.worker
        wait_for(lambda: all(job.cancelled() for job in worker._running))
        cancelled.set()
        wait_for(lambda: server_info(server).stats.cancelled_running == before + 1)
    finally:
        cancelled.set()
        del prior.forward, decoder_unet.forward
    assert "started" in kinds
    assert decoder_calls == 0
    # The model still serves.
    _check_stream(_events(stubs["kandinsky22"], _request("kandinsky22", T2I)))


@pytest.mark.parametrize("family", ["flux", "sd3", "sd15", "z-image", "kandinsky22", "if"])
def test_previews(family: str, stubs: dict[str, pb_grpc.AutoPipelineServiceStub]) -> None:
    (model,) = stubs[family].Inspect(pb.InspectRequest(model=family), timeout=30).models
    assert model.tasks[0].supports_previews
    events = _events(stubs[family], _request(family, model.tasks[0].task, preview_interval=1))
    started, _ = _check_stream(events)
    previews = [e.preview for e in events if e.HasField("preview")]
    # Kandinsky previews its decoder's steps (the prior's latents are image embeddings, not pixels).
    first = 3 if family in KANDINSKY else 1
    assert [p.step for p in previews] == list(range(first, started.total_steps + 1))
    for preview in previews:
        assert PIL.Image.open(io.BytesIO(preview.image.data)).size == (SIZE, SIZE)


PACKED_DECODERS = ("flux2-klein", "qwen-image")  # previews by the pipeline's own unpack and full decode


@pytest.mark.parametrize(
    ("family", "task"), [(f, t) for f, t in CASES if f in PACKED_DECODERS], ids=lambda v: str(v)
)
def test_packed_previews_at_the_interval_for_every_task(
    family: str, task: int, stubs: dict[str, pb_grpc.AutoPipelineServiceStub]
) -> None:
    (model,) = stubs[family].Inspect(pb.InspectRequest(model=family), timeout=30).models
    assert all(t.supports_previews for t in model.tasks)
    strength = {"strength": 1.0} if task == INPAINT else {}  # so that all 4 steps run, ending on one due
    request = _request(family, task, num_inference_steps=4, preview_interval=2, **strength)
    events = _events(stubs[family], request)
    started, images = _check_stream(events)
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [p.step for p in previews] == list(range(2, started.total_steps + 1, 2))
    assert previews and previews[-1].step == started.total_steps
    for preview in previews:
        decoded = PIL.Image.open(io.BytesIO(preview.image.data))
        assert decoded.format in ("PNG", "JPEG") and decoded.size == (SIZE, SIZE)
    # The last step's latents are the ones the pipeline decodes: its preview is the image itself.
    last = PIL.Image.open(io.BytesIO(previews[-1].image.data)).convert("RGB")
    assert last.tobytes() == images[0].convert("RGB").tobytes()


@pytest.mark.parametrize("family", PACKED_DECODERS)
def test_packed_previews_keep_the_aspect_within_256_pixels(
    family: str, stubs: dict[str, pb_grpc.AutoPipelineServiceStub]
) -> None:
    request = _request(family, T2I, size=320, preview_interval=1)
    request.height = 256
    events = _events(stubs[family], request)
    _check_stream(events)
    sizes = {PIL.Image.open(io.BytesIO(e.preview.image.data)).size for e in events if e.HasField("preview")}
    assert sizes == {(256, 205)}  # 320 x 256 scaled by 256 / 320


@pytest.mark.parametrize("family", PACKED_DECODERS)
def test_packed_previews_denormalise_as_the_pipeline_does(family: str, tmp_path: Path) -> None:
    """With non-trivial VAE statistics (the tiny ones are 0 and 1), the last preview is the output."""
    import diffusers
    import numpy as np
    import torch

    from autopipeline_server.previews import Previewer

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(build_tiny_checkpoint(family, tmp_path, seed=0)))
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    if family == "flux2-klein":  # batch-normalised patch latents
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    else:  # the video VAE's per-channel latents_mean / latents_std
        channels = vae.config.z_dim
        vae.register_to_config(
            latents_mean=torch.linspace(-0.5, 0.5, channels).tolist(),
            latents_std=torch.linspace(0.5, 2.0, channels).tolist(),
        )
    seen: list[torch.Tensor] = []

    def keep(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append(tensors["latents"].clone())
        return {}

    width, height = 64, 48  # not square, so a transposed unpack shows
    (image,) = pipe(
        prompt="a tiny red cube",
        width=width,
        height=height,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images
    (preview,) = Previewer(pipe, width, height)(seen[-1])
    assert preview.size == image.size == (width, height)
    assert np.array_equal(np.asarray(preview), np.asarray(image))
    # A preview that skipped the de-normalisation would differ.
    assert not np.array_equal(np.asarray(Previewer(pipe, width, height)(seen[0])[0]), np.asarray(image))


def test_load_options_come_from_config_tables_and_show_in_inspect(
    tmp_path: Path, stubs: dict[str, pb_grpc.AutoPipelineServiceStub]
) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        '[[models]]\nname = "flux"\nsource = "/m/flux"\ndtype = "bfloat16"\nvae_tiling = true\n'
        '[[models]]\nname = "sd15"\nsource = "/m/sd15"\n'
    )
    settings = load_settings({}, {}, config_file=config)
    assert settings.models[0] == ModelSpec("flux", "/m/flux", dtype="bfloat16", vae_tiling=True)
    assert settings.models[1] == ModelSpec("sd15", "/m/sd15")
    config.write_text('[[models]]\nname = "x"\nsource = "/m/x"\ntiling = true\n')
    with pytest.raises(ConfigError, match="vae_tiling"):
        load_settings({}, {}, config_file=config)
    (flux,) = stubs["flux"].Inspect(pb.InspectRequest(model="flux"), timeout=30).models
    (sd3,) = stubs["sd3"].Inspect(pb.InspectRequest(model="sd3"), timeout=30).models
    assert (flux.vae_tiling, sd3.vae_tiling, flux.cpu_offload) == (True, False, False)
