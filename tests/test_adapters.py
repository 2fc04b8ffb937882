"""ControlNet and per-request LoRA adapters through the real server, with tiny offline checkpoints."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from autopipeline import Client
from autopipeline._cli import build_parser
from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.domain import GenerationRequest, Task
from autopipeline_server.prepare import prepare_with_inputs
from autopipeline_server.settings import AdapterSpec, ConfigError, ModelSpec, Settings, load_settings
from autopipeline_server.tiny import build_tiny_checkpoint
from autopipeline_server.tiny_lora import build_tiny_lora

from .support import ServerThread, png_bytes, queued_together
from .test_server import status_details

SHORT: dict[str, Any] = {"num_inference_steps": 2, "width": 64, "height": 64, "seed": 5}
CONTROL_TASKS = {
    pb.TASK_TEXT_TO_IMAGE: "StableDiffusionControlNetPipeline",
    pb.TASK_IMAGE_TO_IMAGE: "StableDiffusionControlNetImg2ImgPipeline",
    pb.TASK_INPAINTING: "StableDiffusionControlNetInpaintPipeline",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    sd15 = build_tiny_checkpoint("sd15", root / "sd15", seed=0)
    return {
        "sd15": sd15,
        "controlnet": build_tiny_checkpoint("sd15-controlnet", root / "sd15-controlnet", seed=0),
        "style": build_tiny_lora(sd15, root / "loras" / "style.safetensors", seed=1),
        "other": build_tiny_lora(sd15, root / "loras" / "other.safetensors", seed=2),
    }


@pytest.fixture(scope="module")
def server(files: dict[str, Path]) -> Iterator[ServerThread]:
    adapters = (AdapterSpec("style", str(files["style"])), AdapterSpec("other", str(files["other"])))
    settings = Settings(
        models=(
            ModelSpec("sd15", str(files["sd15"])),
            ModelSpec("lora", str(files["sd15"]), adapters=adapters),
            ModelSpec("cn", str(files["controlnet"])),
            # The same base and ControlNet, put together by the server (--controlnet) instead.
            ModelSpec(
                "cn-configured", str(files["sd15"]), controlnet=str(files["controlnet"] / "controlnet")
            ),
        ),
        host="127.0.0.1",
        port=0,
        device="cpu",
        max_batch_size=4,
        # Only a cap: a batch's head waits for company only while other requests are arriving.
        max_batch_delay_ms=2000,
    )
    running = ServerThread(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.AutoPipelineServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.AutoPipelineServiceStub(channel)


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> pb.Image:
    image = PIL.Image.new("RGB", size, (20, 20, 20))
    image.paste(colour, (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4))
    return pb.Image(data=png_bytes(image))


CONTROL = _png((250, 250, 250))
OTHER_CONTROL = _png((250, 0, 0))


def _run(stub: pb_grpc.AutoPipelineServiceStub, **fields: Any) -> list[pb.GenerateResponse]:
    defaults = {"prompt": "a cube", "task": pb.TASK_TEXT_TO_IMAGE, **SHORT}
    return list(stub.Generate(pb.GenerateRequest(**{**defaults, **fields}), timeout=120))


def _image(events: list[pb.GenerateResponse]) -> bytes:
    return b"".join(e.image.image.data for e in events if e.HasField("image") and e.image.index == 0)


def _started(events: list[pb.GenerateResponse]) -> pb.Started:
    return next(e.started for e in events if e.HasField("started"))


def _pixels(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _rejected(stub: pb_grpc.AutoPipelineServiceStub, **fields: Any) -> tuple[str, list[str], str]:
    with pytest.raises(grpc.RpcError) as caught:
        _run(stub, **fields)
    err = caught.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    info, violations = status_details(err)
    return info.reason, violations, str(err.details())


def _task_inputs(task: int) -> dict[str, Any]:
    inputs: dict[str, Any] = {"task": task}
    if task != pb.TASK_TEXT_TO_IMAGE:
        inputs["image"] = _png((30, 120, 200))
    if task == pb.TASK_INPAINTING:
        mask = PIL.Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        inputs["mask_image"] = pb.Image(data=png_bytes(mask))
    return inputs


# Holds the device (256x256, never batched with the 64x64 requests); see `queued_together`.
BLOCKER = pb.GenerateRequest(
    model="lora", task=pb.TASK_TEXT_TO_IMAGE, prompt="blocker", num_inference_steps=500, width=256, height=256
)


def _concurrently(server: ServerThread, *requests: pb.GenerateRequest) -> list[list[pb.GenerateResponse]]:
    return queued_together(server, requests, blocker=BLOCKER)


# ------------------------------------------------------------------------------------------ ControlNet


@pytest.mark.parametrize("model", ["cn", "cn-configured"])
@pytest.mark.parametrize("task", list(CONTROL_TASKS))
def test_every_task_of_a_controlnet_model_runs_its_controlnet_pipeline(
    stub: pb_grpc.AutoPipelineServiceStub, model: str, task: int
) -> None:
    # Two images: a call for several images from one control (and input) image runs per image.
    events = _run(stub, model=model, control_image=CONTROL, num_images=2, **_task_inputs(task))
    started = _started(events)
    assert started.pipeline_class == CONTROL_TASKS[task]
    assert _pixels(_image(events)).shape == (64, 64, 3)
    assert sorted({e.image.index for e in events if e.HasField("image")}) == [0, 1]
    assert events[-1].HasField("completed")


def test_a_configured_controlnet_equals_the_checkpoint_saved_with_it(
    stub: pb_grpc.AutoPipelineServiceStub,
) -> None:
    # Both hold the same tiny SD 1.5 (seed 0) and ControlNet: the two routes give the same bytes.
    saved = _image(_run(stub, model="cn", control_image=CONTROL))
    assert _image(_run(stub, model="cn-configured", control_image=CONTROL)) == saved


def test_the_control_image_and_its_scale_reach_the_pipeline(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    first = _image(_run(stub, model="cn", control_image=CONTROL))
    assert _image(_run(stub, model="cn", control_image=OTHER_CONTROL)) != first
    # At scale 0 the ControlNet adds nothing, so the control image no longer matters.
    off: dict[str, Any] = {"model": "cn", "parameters": {"controlnet_conditioning_scale": 0.0}}
    assert _image(_run(stub, control_image=CONTROL, **off)) == _image(
        _run(stub, control_image=OTHER_CONTROL, **off)
    )


def test_the_control_image_sizes_text_to_image_when_no_size_is_given(
    stub: pb_grpc.AutoPipelineServiceStub,
) -> None:
    events = list(
        stub.Generate(
            pb.GenerateRequest(
                model="cn",
                task=pb.TASK_TEXT_TO_IMAGE,
                prompt="p",
                num_inference_steps=2,
                seed=1,
                control_image=_png((9, 9, 9), (99, 70)),
            ),
            timeout=120,
        )
    )
    assert (_started(events).width, _started(events).height) == (96, 64)
    assert _pixels(_image(events)).shape == (64, 96, 3)


def test_a_controlnet_model_requires_a_control_image(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    for model in ("cn", "cn-configured"):
        reason, fields, message = _rejected(stub, model=model)
        assert (reason, fields) == ("INVALID_REQUEST", ["control_image"]), message


def test_a_model_without_controlnet_refuses_a_control_image(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    reason, fields, message = _rejected(stub, model="sd15", control_image=CONTROL)
    assert (reason, fields) == ("FIELD_NOT_APPLICABLE", ["control_image"]), message
    reason, fields, _ = _rejected(stub, model="cn", control_image=pb.Image(data=b"not an image"))
    assert (reason, fields) == ("INVALID_IMAGE", ["control_image"])


def test_batched_controlnet_requests_keep_each_control_image(
    server: ServerThread, stub: pb_grpc.AutoPipelineServiceStub
) -> None:
    requests = [
        pb.GenerateRequest(
            model="cn", task=pb.TASK_TEXT_TO_IMAGE, prompt=f"p{i}", control_image=control, **SHORT
        )
        for i, control in enumerate((CONTROL, OTHER_CONTROL))
    ]
    batched = _concurrently(server, *requests)
    assert [_started(events).batch_requests for events in batched] == [2, 2]
    for request, events in zip(requests, batched, strict=True):
        solo = list(stub.Generate(request, timeout=120))
        assert _started(solo).batch_requests == 1
        assert np.abs(_pixels(_image(events)) - _pixels(_image(solo))).max() <= 1


@pytest.mark.parametrize(
    ("task", "inputs"),
    [
        (Task.TEXT_TO_IMAGE, ["image"]),  # where `image` is the control image
        (Task.IMAGE_TO_IMAGE, ["control_image", "image"]),
        (Task.INPAINTING, ["control_image", "image", "mask_image"]),
    ],
)
def test_a_released_call_lets_go_of_its_control_image(
    server: ServerThread, task: Task, inputs: list[str]
) -> None:
    model = server.running.registry.entries["cn"].model
    assert model is not None
    request = GenerationRequest(
        model="cn",
        task=task,
        prompt="a cube",
        image=PIL.Image.new("RGB", (64, 64)) if "control_image" in inputs else None,
        mask_image=PIL.Image.new("L", (64, 64), 255) if "mask_image" in inputs else None,
        control_image=PIL.Image.new("RGB", (64, 64)),
    )
    call = prepare_with_inputs(model, request)

    def images() -> list[str]:
        return sorted(name for name, value in call.kwargs.items() if isinstance(value, PIL.Image.Image))

    assert images() == inputs
    call.release_inputs()  # the call has ended; its job may live on (in a handler, a log record)
    assert images() == []


# ---------------------------------------------------------------------------------------------- LoRA


def _unet_state(server: ServerThread) -> dict[str, torch.Tensor]:
    model = server.running.registry.entries["lora"].model
    assert model is not None
    return {name: tensor.clone() for name, tensor in model.base.unet.state_dict().items()}


def test_adapters_apply_per_request_and_leave_the_base_model_exact(
    server: ServerThread, stub: pb_grpc.AutoPipelineServiceStub
) -> None:
    style = [pb.AdapterWeight(name="style", weight=1.0)]
    plain = _image(_run(stub, model="sd15"))
    before_state = _unet_state(server)
    # Registered but not applied: the same bytes as a model without adapters.
    assert _image(_run(stub, model="lora")) == plain
    styled = _image(_run(stub, model="lora", adapters=style))
    assert styled != plain
    mixed = _image(
        _run(
            stub,
            model="lora",
            adapters=[pb.AdapterWeight(name="other", weight=0.7), pb.AdapterWeight(name="style", weight=0.3)],
        )
    )
    assert mixed not in (plain, styled)
    assert _image(_run(stub, model="lora")) == plain
    assert _image(_run(stub, model="lora", adapters=style)) == styled
    after_state = _unet_state(server)
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[name], after_state[name]) for name in before_state)


def test_only_requests_with_equal_adapters_share_a_call(server: ServerThread) -> None:
    def request(prompt: str, *weights: tuple[str, float]) -> pb.GenerateRequest:
        adapters = [pb.AdapterWeight(name=name, weight=weight) for name, weight in weights]
        return pb.GenerateRequest(
            model="lora", task=pb.TASK_TEXT_TO_IMAGE, prompt=prompt, adapters=adapters, **SHORT
        )

    mixed = _concurrently(server, request("a"), request("b", ("style", 1.0)), request("c", ("style", 0.5)))
    assert [_started(events).batch_requests for events in mixed] == [1, 1, 1]
    # The same set in another order is the same set.
    same = _concurrently(
        server,
        request("a", ("style", 0.5), ("other", 1.0)),
        request("b", ("other", 1.0), ("style", 0.5)),
    )
    assert [_started(events).batch_requests for events in same] == [2, 2]


def test_unknown_adapters_and_bad_weights_are_invalid(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    reason, fields, message = _rejected(
        stub, model="lora", adapters=[pb.AdapterWeight(name="style", weight=1), pb.AdapterWeight(name="x")]
    )
    assert (reason, fields) == ("INVALID_REQUEST", ["adapters[1].name"])
    assert "registered: style, other" in message
    _, fields, message = _rejected(stub, model="sd15", adapters=[pb.AdapterWeight(name="style", weight=1)])
    assert fields == ["adapters[0].name"] and "registered: none" in message
    for weight in (float("nan"), float("inf")):
        _, fields, _ = _rejected(stub, model="lora", adapters=[pb.AdapterWeight(name="style", weight=weight)])
        assert fields == ["adapters[0].weight"]
    _, fields, _ = _rejected(
        stub, model="lora", adapters=[pb.AdapterWeight(name="style"), pb.AdapterWeight(name="style")]
    )
    assert fields == ["adapters[1].name"]


def test_inspect_lists_adapters_and_controlnets(
    stub: pb_grpc.AutoPipelineServiceStub, files: dict[str, Path]
) -> None:
    models = {m.name: m for m in stub.Inspect(pb.InspectRequest(), timeout=30).models}
    assert [(a.name, list(a.components)) for a in models["lora"].adapters] == [
        ("style", ["unet"]),
        ("other", ["unet"]),
    ]
    assert not models["sd15"].adapters and not models["sd15"].controlnet
    assert not any(task.requires_control_image for task in models["sd15"].tasks)
    assert models["cn"].controlnet == str(files["controlnet"])
    assert models["cn-configured"].controlnet == str(files["controlnet"] / "controlnet")
    for name in ("cn", "cn-configured"):
        assert models[name].family == "stable-diffusion-controlnet"
        assert [t.pipeline_class for t in models[name].tasks] == list(CONTROL_TASKS.values())
        assert all(task.requires_control_image for task in models[name].tasks)
        parameters = {p.name for p in models[name].tasks[0].parameters}
        assert {
            "controlnet_conditioning_scale",
            "control_guidance_start",
            "control_guidance_end",
        } <= parameters


# ------------------------------------------------------------------------------------------- the SDK


def test_sdk_passes_control_images_and_adapters(
    server: ServerThread, stub: pb_grpc.AutoPipelineServiceStub
) -> None:
    control = PIL.Image.open(io.BytesIO(CONTROL.data))
    with Client(server.target, timeout=120) as client:
        result = client.generate("a cube", model="cn", control_image=control, **SHORT)
        assert result.outputs[0].data == _image(_run(stub, model="cn", control_image=CONTROL))
        styled = client.generate("a cube", model="lora", adapters={"style": 1.0}, **SHORT)
        assert styled.outputs[0].data == _image(
            _run(stub, model="lora", adapters=[pb.AdapterWeight(name="style", weight=1.0)])
        )
        models = {model.name: model for model in client.inspect().models}
    assert [(a.name, a.components) for a in models["lora"].adapters] == [
        ("style", ["unet"]),
        ("other", ["unet"]),
    ]
    assert models["cn"].controlnet and all(task.requires_control_image for task in models["cn"].tasks)
    args = build_parser().parse_args(
        ["generate", "--prompt", "p", "--control-image", "c.png", "--adapter", "style=0.5", "--adapter", "x"]
    )
    assert (str(args.control_image), dict(args.adapter)) == ("c.png", {"style": 0.5, "x": 1.0})


# --------------------------------------------------------------------------------------------- settings


def test_flags_and_config_register_controlnets_and_loras(tmp_path: Path, files: dict[str, Path]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "base",
                        "source": str(files["sd15"]),
                        "controlnet": "org/controlnet",
                        "loras": {"style": str(files["style"])},
                    },
                    {"name": "plain", "source": str(files["sd15"])},
                ]
            }
        )
    )
    flags = {
        "controlnets": ["plain=/cn"],
        "loras": [f"plain:other={files['other']}", f"base:style={files['other']}"],
    }
    settings = load_settings(flags, {}, config_file=config)
    base, plain = settings.models
    assert (base.controlnet, base.adapters) == (
        "org/controlnet",
        (AdapterSpec("style", str(files["other"])),),
    )
    assert (plain.controlnet, plain.adapters) == ("/cn", (AdapterSpec("other", str(files["other"])),))
    env = {"AUTOPIPELINE_MODELS": f"m={files['sd15']}", "AUTOPIPELINE_LORAS": f"m:a={files['style']}"}
    assert load_settings({}, env).models[0].adapters == (AdapterSpec("a", str(files["style"])),)
    bad = {
        "loras": [f"nobody:a={files['style']}"],
        "controlnets": ["m"],
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError):
            load_settings({"models": [f"m={files['sd15']}"], key: value}, {})
    for lora in (f"m:a.b={files['style']}", "m:a=/missing.safetensors", f"m:a={files['sd15']}"):
        with pytest.raises(ConfigError):
            load_settings({"models": [f"m={files['sd15']}"], "loras": [lora]}, {})
