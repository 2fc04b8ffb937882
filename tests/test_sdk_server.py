"""The SDK and its CLI against the real server (tiny checkpoints on localhost:0)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import pathlib
from collections.abc import Iterator

import PIL.Image
import pytest

import autopipeline
from autopipeline import (
    AsyncClient,
    Client,
    Completed,
    GeneratedImage,
    ModelState,
    Preview,
    Progress,
    Queued,
    Started,
    Task,
)
from autopipeline._cli import main

from .support import ServerThread


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target, timeout=120) as client:
        yield client


def test_inspect_is_typed(client: Client) -> None:
    info = client.inspect()
    assert (info.device, info.default_model) == ("cpu", "sd15")
    assert info.limits.max_width >= 2048
    models = {model.name: model for model in info.models}
    sd15 = models["sd15"]
    assert (sd15.state, sd15.family, sd15.is_default) == (ModelState.READY, "stable-diffusion", True)
    assert [task.task for task in sd15.tasks] == [Task.TEXT_TO_IMAGE, Task.IMAGE_TO_IMAGE, Task.INPAINTING]
    eta = next(parameter for parameter in sd15.tasks[0].parameters if parameter.name == "eta")
    assert (eta.default, eta.has_default, eta.kind, eta.schema) == (0, True, "number", {"type": "number"})
    assert models["ddpm"].state is ModelState.FAILED
    assert [model.name for model in client.inspect("sdxl").models] == ["sdxl"]
    assert (info.max_batch_images, info.allowed_sources, info.memory_budget_bytes) == (1, [], 0)
    client.generate("counted", num_inference_steps=2)
    after = client.inspect().stats
    assert after.completed >= info.stats.completed + 1
    assert after.pipeline_calls >= info.stats.pipeline_calls + 1


def test_generate_text_to_image(client: Client) -> None:
    result = client.generate("a red fox", num_inference_steps=2, seed=11, num_images=2)
    assert result.seeds == (11, 12)
    assert [(image.index, image.seed, image.mime_type) for image in result.images] == [
        (0, 11, "image/png"),
        (1, 12, "image/png"),
    ]
    assert [image.size for image in result.pil_images] == [(64, 64), (64, 64)]
    assert result.started.pipeline_class == "StableDiffusionPipeline"
    assert result.parameters["num_inference_steps"] == 2
    assert result.timings.total >= result.timings.running > 0
    again = client.generate("a red fox", num_inference_steps=2, seed=11, num_images=2)
    assert [image.data for image in again.images] == [image.data for image in result.images]


def test_stream_events_in_order_with_pil_and_path_inputs(
    client: Client, input_png: bytes, mask_png: bytes, tmp_path: pathlib.Path
) -> None:
    mask = tmp_path / "mask.png"
    mask.write_bytes(mask_png)
    events = list(
        client.stream(
            "a red fox",
            task="inpainting",
            model="sdxl",
            image=PIL.Image.open(io.BytesIO(input_png)),
            mask_image=mask,
            strength=1.0,
            num_inference_steps=4,
            preview_interval=2,
            seed=3,
            output_format="webp",
        )
    )
    kinds = [type(event) for event in events]
    assert kinds[0] is Queued
    assert kinds[kinds.index(Started) :] == [
        Started,
        *[Progress, Progress, Preview] * 2,
        GeneratedImage,
        Completed,
    ]
    *_, image, done = events
    assert isinstance(image, GeneratedImage)
    assert isinstance(done, Completed)
    assert (image.mime_type, image.image.format, image.image.size) == ("image/webp", "WEBP", (64, 64))
    assert done.pipeline_class == "StableDiffusionXLInpaintPipeline"


def test_large_image_is_reassembled(small_chunks: ServerThread) -> None:
    # The server splits images into 2 KiB chunks; the SDK joins them.
    with Client(small_chunks.target) as client:
        (image,) = client.generate("p", num_inference_steps=1, seed=5).images
    assert len(image.data) > 2048
    assert image.image.size == (64, 64)


def test_errors_are_typed(client: Client) -> None:
    with pytest.raises(autopipeline.InvalidArgumentError) as invalid:
        client.generate("x", width=65)
    assert invalid.value.reason == "INVALID_REQUEST"
    assert [violation.field for violation in invalid.value.field_violations] == ["width"]
    assert invalid.value.request_id

    with pytest.raises(autopipeline.InvalidArgumentError) as not_applicable:
        client.generate("x", strength=0.5)
    assert [violation.field for violation in not_applicable.value.field_violations] == ["strength"]

    with pytest.raises(autopipeline.NotFoundError) as not_found:
        client.generate("x", model="nope")
    assert (not_found.value.reason, not_found.value.domain) == ("MODEL_NOT_FOUND", "autopipeline.v1")

    with pytest.raises(autopipeline.FailedPreconditionError) as failed:
        client.generate("x", model="ddpm")
    assert failed.value.reason == "MODEL_FAILED"

    with pytest.raises(autopipeline.NotFoundError):
        client.inspect("nope")


def test_deadline_and_cancel_leave_the_server_serving(client: Client) -> None:
    with pytest.raises(autopipeline.DeadlineExceededError):
        client.generate("p", num_inference_steps=400, width=512, height=512, timeout=0.5)
    for event in client.stream("p", num_inference_steps=400, width=512, height=512):
        if isinstance(event, Progress):
            break
    assert client.generate("ok", num_inference_steps=2).images


def test_async_client(server: ServerThread, input_png: bytes) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.target, timeout=120) as client:
            assert (await client.inspect()).default_model == "sd15"
            result = await client.generate(
                "a red fox",
                task=Task.IMAGE_TO_IMAGE,
                image=input_png,
                strength=0.5,
                num_inference_steps=4,
                seed=2,
            )
            assert result.started.total_steps == 2
            assert result.pil_images[0].size == (64, 64)
            async with contextlib.aclosing(client.stream("p", num_inference_steps=2)) as events:
                kinds = [type(event) async for event in events]
            assert kinds[-2:] == [GeneratedImage, Completed]
            with pytest.raises(autopipeline.InvalidArgumentError):
                await client.generate("x", task="image-to-image")

    asyncio.run(scenario())


def test_cli(server: ServerThread, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", server.target]
    assert (
        main([*target, "generate", "--prompt", "a fox", "--steps", "2", "--seed", "4", "-o", str(tmp_path)])
        == 0
    )
    (path,) = capsys.readouterr().out.split()
    assert path == str(tmp_path / "image-0-seed4.png")
    with PIL.Image.open(path) as written:
        assert written.size == (64, 64)

    assert main([*target, "inspect", "--json"]) == 0
    assert {model["name"] for model in json.loads(capsys.readouterr().out)["models"]} >= {"sd15", "sdxl"}

    assert main([*target, "generate", "--prompt", "x", "--model", "nope"]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND (MODEL_NOT_FOUND): ")
