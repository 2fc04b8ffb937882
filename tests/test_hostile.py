"""Hostile input and faults: a battery of malformed requests, fuzzing, fault injection, broken checkpoints."""

from __future__ import annotations

import io
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import PIL.Image
import pytest
import torch
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.settings import Limits, ModelSpec, Settings

from .support import ServerThread, fault_in_denoiser, png_bytes

GENERATE = "/autopipeline.v1.AutoPipelineService/Generate"
INSPECT = "/autopipeline.v1.AutoPipelineService/Inspect"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK_REQUEST = pb.GenerateRequest(task=pb.TASK_TEXT_TO_IMAGE, prompt="ok", num_inference_steps=2)


def _png(size: tuple[int, int], mode: str = "RGB") -> pb.Image:
    return pb.Image(data=png_bytes(PIL.Image.new(mode, size)))


def _encoded(fmt: str) -> pb.Image:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 64)).save(buffer, format=fmt)
    return pb.Image(data=buffer.getvalue())


def _params(values: dict[str, Any]) -> struct_pb2.Struct:
    params = struct_pb2.Struct()
    params.update(values)
    return params


IMAGE = _png((64, 64))
MASK = _png((64, 64), "L")
T2I, I2I, INPAINT = pb.TASK_TEXT_TO_IMAGE, pb.TASK_IMAGE_TO_IMAGE, pb.TASK_INPAINTING

# (id, request fields, expected code, expected field violations)
BATTERY: list[tuple[str, dict[str, Any], grpc.StatusCode, list[str]]] = [
    ("no task", {}, INVALID, ["task"]),
    ("unknown task value", {"task": 9}, INVALID, ["task"]),
    ("negative task value", {"task": -3}, INVALID, ["task"]),
    ("img2img without image", {"task": I2I}, INVALID, ["image"]),
    (
        "img2img garbage image",
        {"task": I2I, "image": pb.Image(data=b"\x89PNG not really")},
        INVALID,
        ["image"],
    ),
    ("img2img GIF image", {"task": I2I, "image": _encoded("GIF")}, INVALID, ["image"]),
    ("img2img BMP image", {"task": I2I, "image": _encoded("BMP")}, INVALID, ["image"]),
    ("img2img truncated PNG", {"task": I2I, "image": pb.Image(data=IMAGE.data[:60])}, INVALID, ["image"]),
    ("img2img with a mask", {"task": I2I, "image": IMAGE, "mask_image": MASK}, INVALID, ["mask_image"]),
    ("inpaint without mask", {"task": INPAINT, "image": IMAGE}, INVALID, ["mask_image"]),
    ("inpaint without image", {"task": INPAINT, "mask_image": MASK}, INVALID, ["image"]),
    (
        "inpaint garbage mask",
        {"task": INPAINT, "image": IMAGE, "mask_image": pb.Image(data=b"x")},
        INVALID,
        ["mask_image"],
    ),
    (
        "inpaint mask of another size",
        {"task": INPAINT, "image": IMAGE, "mask_image": _png((32, 64), "L")},
        INVALID,
        ["mask_image"],
    ),
    ("t2i with an image", {"task": T2I, "image": IMAGE}, INVALID, ["image"]),
    ("t2i with a mask", {"task": T2I, "mask_image": MASK}, INVALID, ["mask_image"]),
    ("t2i with strength", {"task": T2I, "strength": 0.5}, INVALID, ["strength"]),
    ("width not a multiple of 8", {"task": T2I, "width": 65}, INVALID, ["width"]),
    ("height not a multiple of 8", {"task": T2I, "height": 100}, INVALID, ["height"]),
    ("width over the limit", {"task": T2I, "width": 4096}, INVALID, ["width"]),
    ("height over the limit", {"task": T2I, "height": 2**32 - 1}, INVALID, ["height"]),
    ("zero width", {"task": T2I, "width": 0}, INVALID, ["width"]),
    ("zero height", {"task": T2I, "height": 0}, INVALID, ["height"]),
    ("steps over the limit", {"task": T2I, "num_inference_steps": 501}, INVALID, ["num_inference_steps"]),
    ("zero steps", {"task": T2I, "num_inference_steps": 0}, INVALID, ["num_inference_steps"]),
    ("too many images", {"task": T2I, "num_images": 9}, INVALID, ["num_images"]),
    ("strength above 1", {"task": I2I, "image": IMAGE, "strength": 1.5}, INVALID, ["strength"]),
    ("zero strength", {"task": I2I, "image": IMAGE, "strength": 0.0}, INVALID, ["strength"]),
    ("negative strength", {"task": I2I, "image": IMAGE, "strength": -0.5}, INVALID, ["strength"]),
    ("NaN strength", {"task": I2I, "image": IMAGE, "strength": math.nan}, INVALID, ["strength"]),
    (
        "strength leaving no step",
        {"task": I2I, "image": IMAGE, "strength": 0.1, "num_inference_steps": 5},
        INVALID,
        ["strength"],
    ),
    ("NaN guidance", {"task": T2I, "guidance_scale": math.nan}, INVALID, ["guidance_scale"]),
    ("infinite guidance", {"task": T2I, "guidance_scale": math.inf}, INVALID, ["guidance_scale"]),
    ("negative guidance", {"task": T2I, "guidance_scale": -2.0}, INVALID, ["guidance_scale"]),
    ("unknown scheduler", {"task": T2I, "scheduler": "NoSuchScheduler"}, INVALID, ["scheduler"]),
    ("scheduler path injection", {"task": T2I, "scheduler": "../../os.system"}, INVALID, ["scheduler"]),
    (
        "unknown parameter",
        {"task": T2I, "parameters": _params({"no_such_argument": 1})},
        INVALID,
        ["parameters.no_such_argument"],
    ),
    (
        "generator parameter",
        {"task": T2I, "parameters": _params({"generator": 1})},
        INVALID,
        ["parameters.generator"],
    ),
    (
        "latents parameter",
        {"task": T2I, "parameters": _params({"latents": [1, 2]})},
        INVALID,
        ["parameters.latents"],
    ),
    (
        "callback parameter",
        {"task": T2I, "parameters": _params({"callback_on_step_end": "print"})},
        INVALID,
        ["parameters.callback_on_step_end"],
    ),
    (
        "output_type parameter",
        {"task": T2I, "parameters": _params({"output_type": "latent"})},
        INVALID,
        ["parameters.output_type"],
    ),
    (
        "field passed as parameter",
        {"task": T2I, "parameters": _params({"num_inference_steps": 3})},
        INVALID,
        ["parameters.num_inference_steps"],
    ),
    (
        "string for a float",
        {"task": T2I, "parameters": _params({"eta": "fast"})},
        INVALID,
        ["parameters.eta"],
    ),
    ("bool for a float", {"task": T2I, "parameters": _params({"eta": True})}, INVALID, ["parameters.eta"]),
    ("list for a float", {"task": T2I, "parameters": _params({"eta": [0.1]})}, INVALID, ["parameters.eta"]),
    (
        "fraction for an int",
        {"task": T2I, "parameters": _params({"clip_skip": 1.5})},
        INVALID,
        ["parameters.clip_skip"],
    ),
    (
        "string for a dict",
        {"task": T2I, "parameters": _params({"cross_attention_kwargs": "scale"})},
        INVALID,
        ["parameters.cross_attention_kwargs"],
    ),
    (
        "wrong tuple arity",
        {"task": T2I, "model": "sdxl", "parameters": _params({"original_size": [64]})},
        INVALID,
        ["parameters.original_size"],
    ),
    (
        "too many parameters",
        {"task": T2I, "parameters": _params({f"p{i}": i for i in range(33)})},
        INVALID,
        ["parameters"],
    ),
    ("prompt over the limit", {"task": T2I, "prompt": "x" * 10_001}, INVALID, ["prompt"]),
    (
        "negative prompt over the limit",
        {"task": T2I, "negative_prompt": "y" * 10_001},
        INVALID,
        ["negative_prompt"],
    ),
    (
        "quality over 100",
        {"task": T2I, "output_format": pb.IMAGE_FORMAT_JPEG, "output_quality": 101},
        INVALID,
        ["output_quality"],
    ),
    ("quality for PNG", {"task": T2I, "output_quality": 50}, INVALID, ["output_quality"]),
    ("unknown output format", {"task": T2I, "output_format": 7}, INVALID, ["output_format"]),
    ("input over the pixel limit", {"task": I2I, "image": _png((5000, 4000), "1")}, INVALID, ["image"]),
    ("seed overflow", {"task": T2I, "seed": 2**64 - 1, "num_images": 2}, INVALID, ["seed"]),
    (
        "several problems at once",
        {"task": T2I, "width": 4096, "num_inference_steps": 0, "image": IMAGE},
        INVALID,
        ["num_inference_steps", "image", "width"],
    ),
    ("unknown model", {"task": T2I, "model": "nope"}, grpc.StatusCode.NOT_FOUND, []),
    ("absolute path as model", {"task": T2I, "model": "/etc"}, grpc.StatusCode.NOT_FOUND, []),
    ("parent path as model", {"task": T2I, "model": "../../etc/passwd"}, grpc.StatusCode.NOT_FOUND, []),
    ("URL as model", {"task": T2I, "model": "https://example.com/weights"}, grpc.StatusCode.NOT_FOUND, []),
    ("hub id not served", {"task": T2I, "model": "org/some-model"}, grpc.StatusCode.NOT_FOUND, []),
    ("source not allowed", {"task": T2I, "source": "org/some-model"}, grpc.StatusCode.NOT_FOUND, []),
    ("source and model both", {"task": T2I, "model": "sd15", "source": "org/m"}, INVALID, ["source"]),
    ("model name too long", {"task": T2I, "model": "m" * 8000}, INVALID, ["model"]),
    ("source too long", {"task": T2I, "source": "/" + "s" * 5000}, INVALID, ["source"]),
    (
        "task the model cannot do",
        {"task": I2I, "model": "sd15-inpainting", "image": IMAGE},
        grpc.StatusCode.FAILED_PRECONDITION,
        [],
    ),
    ("model that failed to load", {"task": T2I, "model": "ddpm"}, grpc.StatusCode.FAILED_PRECONDITION, []),
]


def _violations(err: grpc.RpcError) -> tuple[str, list[str]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
    assert info.domain == "autopipeline.v1" and info.reason.isupper()
    return info.reason, [v.field for v in bad.field_violations]


@pytest.mark.parametrize(
    ("fields", "code", "violations"), [c[1:] for c in BATTERY], ids=[c[0] for c in BATTERY]
)
def test_malformed_request_battery(
    stub: pb_grpc.AutoPipelineServiceStub,
    fields: dict[str, Any],
    code: grpc.StatusCode,
    violations: list[str],
) -> None:
    request = pb.GenerateRequest(prompt="x", num_inference_steps=2)
    for name, value in fields.items():
        if isinstance(value, (pb.Image, struct_pb2.Struct)):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=60))
    assert caught.value.code() == code, caught.value.details()
    _, fields_at_fault = _violations(caught.value)
    assert sorted(fields_at_fault) == sorted(violations)
    assert "Traceback" not in caught.value.details()
    assert list(stub.Generate(OK_REQUEST, timeout=60))[-1].HasField("completed")


def test_a_request_over_the_size_limit_is_refused(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    too_big = pb.GenerateRequest(
        task=I2I, prompt="x", image=pb.Image(data=b"\0" * (Limits().max_request_bytes + 1))
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(too_big, timeout=60))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list(stub.Generate(OK_REQUEST, timeout=60))[-1].HasField("completed")


def test_bytes_that_are_no_request_get_invalid_argument(channel: grpc.Channel) -> None:
    raw = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
    # A length running past the end, an invalid tag, and an overlong varint length.
    for data in (b"\x0a\x10short", b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f"):
        with pytest.raises(grpc.RpcError) as caught:
            list(raw(data, timeout=10))
        assert caught.value.code() == INVALID, data
        assert _violations(caught.value)[1] == ["request"]
    raw_inspect = channel.unary_unary(INSPECT, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        raw_inspect(b"\xff\xff", timeout=10)
    assert caught.value.code() == INVALID


# ------------------------------------------------------------------------------------------- fuzzing

SAFE_SIZES = st.sampled_from([None, 64, 72])
BAD_SIZES = st.integers(0, 2**32 - 1).filter(lambda v: v == 0 or v > 2048 or v % 8 != 0)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True)
    | st.integers(-(2**40), 2**40)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
PARAMETER_NAMES = st.sampled_from(
    [
        "eta",
        "guidance_rescale",
        "clip_skip",
        "timesteps",
        "sigmas",
        "cross_attention_kwargs",
        "generator",
        "x",
    ]
)


EXPECTED_REJECTIONS = {INVALID, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


def _outcome(call: Callable[[], list[Any]]) -> list[Any] | grpc.RpcError:
    try:
        return call()
    except grpc.RpcError as err:
        return err


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=draw(st.sampled_from(["", "sd15", "sdxl", "sd15-inpainting", "ddpm", "nope", "../x"])),
        task=draw(st.integers(-1, 5)),
        prompt=draw(st.text(max_size=40)),
        negative_prompt=draw(st.text(max_size=10)),
        num_images=draw(st.integers(0, 2) | st.integers(3, 2**32 - 1)),
        scheduler=draw(st.sampled_from(["", "DDIMScheduler", "EulerDiscreteScheduler", "Nope"])),
        output_format=draw(st.integers(0, 5)),
        output_quality=draw(st.integers(0, 120)),
        preview_interval=draw(st.integers(0, 3)),
    )
    for name in ("width", "height"):
        value = draw(SAFE_SIZES | BAD_SIZES)
        if value is not None:
            setattr(request, name, value)
    steps = draw(st.none() | st.integers(1, 3) | st.integers(0, 2**32 - 1))
    if steps is not None:
        request.num_inference_steps = steps
    for name in ("guidance_scale", "strength"):
        value = draw(st.none() | st.floats(width=32))
        if value is not None:
            setattr(request, name, value)
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, 2**64 - 1))
    for name in ("image", "mask_image"):
        choice = draw(st.sampled_from(["none", "png", "garbage"]))
        if choice == "png":
            getattr(request, name).data = (IMAGE if name == "image" else MASK).data
        elif choice == "garbage":
            getattr(request, name).data = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        request.parameters.update(draw(st.dictionaries(PARAMETER_NAMES, JSON, max_size=3)))
    return request


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=generate_requests())
def test_fuzzed_requests_never_fail_internally(
    stub: pb_grpc.AutoPipelineServiceStub, request: pb.GenerateRequest
) -> None:
    if request.num_inference_steps > 3 and request.num_inference_steps <= 500:
        request.num_inference_steps = 3  # keep accepted requests cheap; rejected ranges stay rejected
    outcome = _outcome(lambda: list(stub.Generate(request, timeout=60)))
    if isinstance(outcome, grpc.RpcError):
        assert outcome.code() in EXPECTED_REJECTIONS, (outcome.code(), outcome.details())
        _violations(outcome)
    else:
        assert outcome[-1].HasField("completed")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=256))
def test_fuzzed_wire_bytes_never_fail_internally(channel: grpc.Channel, data: bytes) -> None:
    raw = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
    outcome = _outcome(lambda: list(raw(data, timeout=30)))
    if isinstance(outcome, grpc.RpcError):
        assert outcome.code() in EXPECTED_REJECTIONS, (outcome.code(), outcome.details())


def test_server_is_alive_after_fuzzing(stub: pb_grpc.AutoPipelineServiceStub) -> None:
    assert list(stub.Generate(OK_REQUEST, timeout=60))[-1].HasField("completed")


# ------------------------------------------------------------------------------------ fault injection


def test_out_of_memory_fails_only_that_request(
    server: ServerThread, stub: pb_grpc.AutoPipelineServiceStub
) -> None:
    def fake_cuda_oom(step: int) -> None:  # a CPU cannot run out of CUDA memory; fake it mid-call
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fake)")

    with fault_in_denoiser(server, "sd15", fake_cuda_oom), pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(task=T2I, prompt="x", num_inference_steps=4), timeout=60))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert _violations(caught.value)[0] == "OUT_OF_MEMORY"
    assert list(stub.Generate(OK_REQUEST, timeout=60))[-1].HasField("completed")


def test_a_bug_inside_a_call_is_internal_without_details(
    server: ServerThread, stub: pb_grpc.AutoPipelineServiceStub
) -> None:
    def bug(step: int) -> None:
        raise KeyError("secret internal state")

    with fault_in_denoiser(server, "sd15", bug), pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(task=T2I, prompt="x", num_inference_steps=2), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details()
    request_id = dict(caught.value.trailing_metadata() or ())["x-request-id"]
    assert request_id in caught.value.details()
    assert list(stub.Generate(OK_REQUEST, timeout=60))[-1].HasField("completed")


# ------------------------------------------------------------------------------------ broken checkpoints


@pytest.fixture(scope="module")
def broken_checkpoints(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    missing = root / "missing-unet"
    shutil.copytree(checkpoints["sd15"], missing)
    shutil.rmtree(missing / "unet")
    shap_e = root / "shap-e"
    shap_e.mkdir()
    (shap_e / "model_index.json").write_text(
        '{"_class_name": "ShapEImg2ImgPipeline", "_diffusers_version": "0.42.1"}'
    )
    pickled = root / "pickle-only"
    shutil.copytree(checkpoints["sd15"], pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    no_index = root / "no-index"
    no_index.mkdir()
    return {"missing-unet": missing, "shap-e": shap_e, "pickle-only": pickled, "no-index": no_index}


@pytest.fixture(scope="module")
def broken_server(
    checkpoints: dict[str, Path], broken_checkpoints: dict[str, Path]
) -> Iterator[ServerThread]:
    models = (
        ModelSpec("sd15", str(checkpoints["sd15"])),
        *(ModelSpec(name, str(path)) for name, path in broken_checkpoints.items()),
    )
    server = ServerThread(Settings(models=models, host="127.0.0.1", port=0, device="cpu", limits=Limits()))
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("missing-unet", "unet"),
        ("shap-e", "ShapEImg2ImgPipeline"),
        ("pickle-only", "safetensors"),
        ("no-index", "model_index.json"),
    ],
)
def test_broken_checkpoints_fail_alone_with_the_reason(
    broken_server: ServerThread, name: str, reason: str
) -> None:
    with grpc.insecure_channel(broken_server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        (info,) = stub.Inspect(pb.InspectRequest(model=name)).models
        assert info.state == pb.MODEL_STATE_FAILED
        assert reason.lower() in info.state_reason.lower(), info.state_reason
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb.GenerateRequest(model=name, task=T2I, prompt="x")))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert list(stub.Generate(OK_REQUEST, timeout=60))[-1].HasField("completed")
