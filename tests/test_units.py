"""Unit tests for the pure parts: settings, argument coercion, codecs, error mapping, stub freshness."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import numpy as np
import PIL.Image
import pytest
from google.rpc import error_details_pb2

from autopipeline_server.arguments import coerce
from autopipeline_server.codecs import OutputFormat, chunk_count, chunks, decode_image, encode_image
from autopipeline_server.domain import Task
from autopipeline_server.errors import InvalidRequest, QueueFull, ServingError
from autopipeline_server.pipelines import LoadedModel, family_of, skip_hook_walks, task_classes
from autopipeline_server.settings import ConfigError, ModelSpec, load_settings
from autopipeline_server.status import to_status

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_stubs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ settings


def test_model_spec_parsing() -> None:
    assert ModelSpec.parse("fast=/models/sd") == ModelSpec("fast", "/models/sd")
    assert ModelSpec.parse("org/repo") == ModelSpec("repo", "org/repo")
    with pytest.raises(ConfigError):
        ModelSpec.parse("bad name=/x")
    with pytest.raises(ConfigError):
        ModelSpec.parse("name=")


def test_settings_precedence_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'port = 6000\ndevice = "cpu"\nmax_queue = 5\n[[models]]\nname = "a"\nsource = "/a"\n'
        "[limits]\nmax_width = 1024\n"
    )
    settings = load_settings({}, {}, config_file=config)
    assert settings.port == 6000 and settings.max_queue == 5 and settings.limits.max_width == 1024
    assert settings.default_model == "a"
    env = {"AUTOPIPELINE_PORT": "7000", "AUTOPIPELINE_MAX_WIDTH": "512"}
    settings = load_settings({}, env, config_file=config)
    assert settings.port == 7000 and settings.limits.max_width == 512
    settings = load_settings(
        {"port": 8000, "models": [ModelSpec("b", "/b")], "host": None}, env, config_file=config
    )
    assert settings.port == 8000 and settings.default_model == "b" and settings.host == "[::]"


def test_settings_from_yaml_and_env_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  - x=/x\n  - name: y\n    source: /y\nwarmup: false\n")
    settings = load_settings({}, {"AUTOPIPELINE_CONFIG": str(config)})
    assert [m.name for m in settings.models] == ["x", "y"] and settings.warmup is False


def test_example_config_is_valid() -> None:
    settings = load_settings({}, {}, config_file=ROOT / "examples" / "config.toml")
    assert settings.default_model == "photoreal"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "no model configured"),
        ({"models": "a=/a,a=/b"}, "unique"),
        ({"models": "a=/a", "device": "tpu"}, "device"),
        ({"models": "a=/a", "dtype": "int8"}, "dtype"),
        ({"models": "a=/a", "port": "http"}, "port must be a int"),
        ({"models": "a=/a", "max_queue": 0}, "max_queue"),
        ({"models": "a=/a", "colour": "blue"}, "unknown setting"),
        ({"models": "a=/a", "limits": {"max_sides": 3}}, "unknown limit"),
        ({"models": "a=/a", "image_chunk_bytes": 5 * 1024 * 1024}, "4 MiB"),
    ],
)
def test_invalid_settings_are_explained(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(values, {})


# --------------------------------------------------------------------------------- call arguments


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (3.0, int, 3),
        (0.5, float, 0.5),
        (2, float, 2.0),
        (True, bool, True),
        ("x", str, "x"),
        (None, int | None, None),
        (4.0, int | None, 4),
        ([1.0, 2.0], tuple[int, int], (1, 2)),
        ([0.1, 0.2], list[float], [0.1, 0.2]),
        ({"scale": 0.5}, dict[str, Any], {"scale": 0.5}),
        ("p", str | list[str] | None, "p"),
    ],
)
def test_coerce_accepts_json_values(value: Any, annotation: Any, expected: Any) -> None:
    assert coerce(value, annotation) == expected


@pytest.mark.parametrize(
    ("value", "annotation"),
    [
        (3.5, int),
        (True, int),
        ("1", float),
        (float("nan"), float),
        (1, str),
        ([1], tuple[int, int]),
        ("x", list[int]),
    ],
)
def test_coerce_rejects_wrong_types(value: Any, annotation: Any) -> None:
    with pytest.raises(TypeError):
        coerce(value, annotation)


def test_resolution_uses_diffusers_mappings() -> None:
    assert family_of("StableDiffusionXLPipeline") == "stable-diffusion-xl"
    classes = task_classes("StableDiffusionPipeline")
    assert {t: c.__name__ for t, c in classes.items()} == {
        Task.TEXT_TO_IMAGE: "StableDiffusionPipeline",
        Task.IMAGE_TO_IMAGE: "StableDiffusionImg2ImgPipeline",
        Task.INPAINTING: "StableDiffusionInpaintPipeline",
    }
    assert family_of("DDPMPipeline") is None and task_classes("DDPMPipeline") == {}


# ------------------------------------------------------------------------------------------- codecs


def test_decode_composites_transparency_on_white() -> None:
    image = PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), field="image", max_pixels=64)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)


def test_decode_rejects_oversized_and_garbage() -> None:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (10, 10)).save(buffer, format="PNG")
    with pytest.raises(InvalidRequest, match="pixels"):
        decode_image(buffer.getvalue(), field="image", max_pixels=99)
    with pytest.raises(InvalidRequest) as caught:
        decode_image(buffer.getvalue()[:40], field="mask_image", max_pixels=1000)
    assert caught.value.violations[0].field == "mask_image"
    gif = io.BytesIO()
    PIL.Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(InvalidRequest, match="PNG, JPEG or WebP"):
        decode_image(gif.getvalue(), field="image", max_pixels=1000)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16", "P", "1"])
@pytest.mark.parametrize("level", [0, 1, 3, 6, 9])
def test_png_output_decodes_to_the_same_pixels(mode: str, level: int) -> None:
    rng = np.random.default_rng(level)
    source = PIL.Image.fromarray(rng.integers(0, 256, (24, 40, 4), dtype=np.uint8), "RGBA")
    image = (
        source.convert(mode)
        if mode != "I;16"
        else PIL.Image.fromarray(rng.integers(0, 65536, (24, 40), dtype=np.uint16))
    )
    encoded = encode_image(image, OutputFormat.PNG, png_compress_level=level)
    with PIL.Image.open(io.BytesIO(encoded.data)) as decoded:
        assert decoded.format == "PNG" and decoded.size == image.size
        # Modes PNG stores as they are come back as they were; others as RGB (RGBA where transparent)
        # with the same colours.
        if mode in ("P", "1"):
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        assert decoded.mode == image.mode
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_encode_and_chunk() -> None:
    image = PIL.Image.new("RGB", (16, 16), (1, 2, 3))
    for fmt in OutputFormat:
        encoded = encode_image(image, fmt, 80)
        assert encoded.mime_type == f"image/{fmt.value.lower()}"
        with PIL.Image.open(io.BytesIO(encoded.data)) as decoded:
            assert decoded.format == fmt.value
    data = bytes(range(256)) * 40
    pieces = list(chunks(data, 1000))
    assert b"".join(pieces) == data and len(pieces) == chunk_count(data, 1000) == 11
    assert list(chunks(b"", 10)) == [b""] and chunk_count(b"", 10) == 1


# ------------------------------------------------------------------------------------ error mapping


def _details(status: grpc.Status) -> list[Any]:
    from grpc_status import rpc_status

    class _Call:
        def code(self) -> grpc.StatusCode:
            return status.code

        def details(self) -> str:
            return status.details

        def trailing_metadata(self) -> Any:
            return status.trailing_metadata

    decoded = rpc_status.from_call(_Call())  # type: ignore[arg-type]
    assert decoded is not None
    return list(decoded.details)


def test_errors_map_to_codes_with_details() -> None:
    status = to_status(InvalidRequest.field("width", "must be a multiple of 8"), "rid")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in _details(status) if d.Is(bad.DESCRIPTOR))
    assert bad.field_violations[0].field == "width"

    status = to_status(QueueFull("full", retry_after=2.5), "rid")
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in _details(status) if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.ToMilliseconds() == 2500


def test_bugs_become_internal_without_their_message(caplog: pytest.LogCaptureFixture) -> None:
    status = to_status(KeyError("secret internals"), "req-42")
    assert status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in status.details and "req-42" in status.details
    assert "req-42" in caplog.text
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in _details(status) if d.Is(info.DESCRIPTOR))
    assert info.reason == ServingError.reason == "INTERNAL_ERROR" and info.domain == "autopipeline.v1"


def test_every_error_reason_is_documented_in_the_readme_and_the_proto() -> None:
    """Callers branch on ErrorInfo.reason: each one the server can send is in both error tables."""
    source = "\n".join(p.read_text() for p in (ROOT / "server" / "autopipeline_server").glob("*.py"))
    reasons = set(re.findall(r'reason\s*=\s*"([A-Z_]+)"', source)) | set(
        re.findall(r'NOT_APPLICABLE = "([A-Z_]+)"', source)
    )
    reasons.discard("CANCELLED")  # a cancelled call gets gRPC's own CANCELLED, with no details
    assert {"MODEL_LOAD_FAILED", "FIELD_NOT_APPLICABLE", "UNKNOWN_PARAMETER", "INVALID_IMAGE"} <= reasons
    readme = (ROOT / "README.md").read_text()
    proto = (ROOT / "proto" / "autopipeline" / "v1" / "autopipeline.proto").read_text()
    assert {r for r in reasons if f"`{r}`" not in readme} == set(), "missing from the README's table"
    assert {r for r in reasons if f"| {r} " not in proto} == set(), "missing from the proto's table"


def test_a_component_with_diffusers_hooks_keeps_diffusers_walk() -> None:
    """pipelines.skip_hook_walks marks only hook-free components: a group-offloaded one is left to
    diffusers' own search, which still finds its hook."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.hooks import apply_group_offloading, group_offloading

    config = {"block_out_channels": (8,), "norm_num_groups": 8, "latent_channels": 4, "layers_per_block": 1}
    hooked, plain = AutoencoderKL(**config), AutoencoderKL(**config)
    apply_group_offloading(
        hooked, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    pipe = SimpleNamespace(components={"hooked": hooked, "plain": plain, "scheduler": object()})
    skip_hook_walks(cast(LoadedModel, SimpleNamespace(base=pipe, tasks={})))
    assert "_autopipeline_hook_free" not in hooked.__dict__
    assert plain.__dict__["_autopipeline_hook_free"] is True
    assert group_offloading._is_group_offload_enabled(hooked)
    assert not group_offloading._is_group_offload_enabled(plain)
    assert hooked.device == plain.device == torch.device("cpu")


def test_progress_on_cuda_waits_for_the_previous_step_before_reporting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """calls._ProgressReporter on CUDA: each step's report waits for the GPU to finish the step
    before it (the host stays at most one step ahead), recorded on the model's device's stream."""
    import torch

    from autopipeline_server import calls

    log: list[str] = []

    class FakeEvent:
        count = 0

        def __init__(self) -> None:
            FakeEvent.count += 1
            self.name = f"event{FakeEvent.count}"

        def record(self, stream: str) -> None:
            log.append(f"record {self.name} on {stream}")

        def synchronize(self) -> None:
            log.append(f"wait {self.name}")

    class Hooks(calls.QuietHooks):
        def step(self, step: int, total_steps: int) -> None:
            log.append(f"report {step}/{total_steps}")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    reporter = calls._ProgressReporter(Hooks(), 0, None, device=torch.device("cuda", 1))
    for _ in reporter(range(3)):
        pass
    assert log == [
        "record event1 on stream of cuda:1",
        "report 1/3",
        "record event2 on stream of cuda:1",
        "wait event1",
        "report 2/3",
        "record event3 on stream of cuda:1",
        "wait event2",
        "report 3/3",
    ]
    log.clear()
    for _ in calls._ProgressReporter(Hooks(), 0, None, device=torch.device("cpu"))(range(2)):
        pass
    assert log == ["report 1/2", "report 2/2"]  # nothing to wait for off CUDA


def test_a_scheduler_that_cannot_be_built_is_not_offered_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from autopipeline_server import pipelines

    class Unbuildable:  # as EDMEulerScheduler from an SDXL Euler config on one torch build
        @classmethod
        def from_config(cls, config: object) -> None:
            raise TypeError("unsupported operand type(s) for ** or pow(): 'NoneType' and 'float'")

    class Buildable:
        @classmethod
        def from_config(cls, config: object) -> None:
            return None

    with caplog.at_level("INFO", logger="autopipeline_server.pipelines"):
        for _ in Task:  # each task's pipeline asks about the same schedulers
            assert not pipelines._usable(Unbuildable, {})
            assert pipelines._usable(Buildable, {})
    said = [r.getMessage() for r in caplog.records if "Unbuildable" in r.getMessage()]
    assert said == ["not offering Unbuildable: it cannot be built here (TypeError: unsupported operand "
                    "type(s) for ** or pow(): 'NoneType' and 'float')"]  # fmt: skip
