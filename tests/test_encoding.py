"""The device never waits for encoding, PNG's zlib level is a setting, a lone request waits for no one."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import PIL.Image
import pytest

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server import servicer as servicer_module
from autopipeline_server.codecs import EncodedImage, OutputFormat, encode_image
from autopipeline_server.settings import ModelSpec, Settings

from .support import ServerThread

SHORT = {"task": pb.TASK_TEXT_TO_IMAGE, "num_inference_steps": 2, "width": 64, "height": 64}
# A deadlock guard, not a timing: every wait below ends on an event long before this.
DEADLOCK = 120.0


def _settings(checkpoints: dict[str, Path], **overrides: object) -> Settings:
    base: dict[str, object] = {
        "models": (ModelSpec("sd15", str(checkpoints["sd15"])),),
        "host": "127.0.0.1",
        "port": 0,
        "device": "cpu",
        "png_compress_level": 9,
    }
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lone(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    # The longest delay the settings allow: a lone request that waited for company would show it.
    server = ServerThread(_settings(checkpoints, max_batch_size=8, max_batch_delay_ms=10_000))
    yield server
    server.stop()


def test_png_compress_level_is_applied() -> None:
    image = PIL.Image.linear_gradient("L").convert("RGB")
    sizes = [len(encode_image(image, OutputFormat.PNG, png_compress_level=level).data) for level in (0, 1, 9)]
    assert sizes[0] > sizes[1] > sizes[2]
    with PIL.Image.open(io.BytesIO(encode_image(image, OutputFormat.PNG).data)) as decoded:
        assert decoded.tobytes() == image.tobytes()


def test_the_next_call_starts_while_images_are_still_encoding(
    lone: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoding = threading.Event()
    release = threading.Event()
    levels: list[int] = []
    first = threading.Lock()

    def held_encode(image: PIL.Image.Image, fmt: OutputFormat, quality: int, level: int) -> EncodedImage:
        levels.append(level)
        if first.acquire(blocking=False):  # only the first request's image is held
            encoding.set()
            assert release.wait(DEADLOCK), "the second call never started"
        return encode_image(image, fmt, quality, level)

    monkeypatch.setattr(servicer_module, "encode_image", held_encode)
    with grpc.insecure_channel(lone.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        results: dict[str, list[pb.GenerateResponse]] = {}
        worker = threading.Thread(
            target=lambda: results.update(first=list(stub.Generate(pb.GenerateRequest(prompt="a", **SHORT))))
        )
        worker.start()
        assert encoding.wait(DEADLOCK)
        # The first request's image is being encoded; the device must take the next call meanwhile.
        second = stub.Generate(pb.GenerateRequest(prompt="b", **SHORT))
        started = next(event.started for event in second if event.HasField("started"))
        release.set()
        rest = list(second)
        worker.join(DEADLOCK)
    assert started.total_steps == 2 and rest[-1].HasField("completed")
    assert results["first"][-1].HasField("completed")
    assert levels == [9, 9]  # the setting reaches the encoder


def test_a_lone_request_does_not_wait_for_company(lone: ServerThread) -> None:
    with grpc.insecure_channel(lone.target) as channel:
        events = list(
            pb_grpc.AutoPipelineServiceStub(channel).Generate(pb.GenerateRequest(prompt="x", **SHORT))
        )
    completed = events[-1].completed
    # Waiting for company would have cost the whole 10 s delay; nobody else was on the way.
    assert completed.timings.queued.ToTimedelta().total_seconds() < lone.settings.max_batch_delay_ms / 1000
