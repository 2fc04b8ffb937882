"""The SDK and its CLI against the real server (tiny checkpoints on localhost:0)."""

from __future__ import annotations

import asyncio
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
from autopipeline_server.settings import ModelSpec

from .conftest import make_settings
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
    assert [(output.index, output.seed, output.mime_type) for output in result.outputs] == [
        (0, 11, "image/png"),
        (1, 12, "image/png"),
    ]
    # As `pipe(...).images` in diffusers: PIL images, nothing wrapped.
    assert all(isinstance(image, PIL.Image.Image) for image in result.images)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.started.pipeline_class == "StableDiffusionPipeline"
    assert result.parameters["num_inference_steps"] == 2
    assert result.timings.total >= result.timings.running > 0
    again = client.generate("a red fox", num_inference_steps=2, seed=11, num_images=2)
    assert [output.data for output in again.outputs] == [output.data for output in result.outputs]


def test_task_is_inferred_from_the_inputs(client: Client, input_png: bytes, mask_png: bytes) -> None:
    image_only = client.generate("a fox", image=input_png, strength=0.5, num_inference_steps=2)
    assert image_only.started.pipeline_class == "StableDiffusionImg2ImgPipeline"
    with_mask = client.generate("a fox", image=input_png, mask_image=mask_png, num_inference_steps=2)
    assert with_mask.started.pipeline_class == "StableDiffusionInpaintPipeline"
    # An explicit task wins, and the server refuses the image it would otherwise ignore.
    with pytest.raises(autopipeline.InvalidArgumentError):
        client.generate("a fox", task=Task.TEXT_TO_IMAGE, image=input_png)


def test_prompt_list_gives_the_images_of_each_prompt_in_order(client: Client) -> None:
    result = client.generate(["a red fox", "a blue whale"], num_images=2, seed=3, num_inference_steps=2)
    assert result.seeds == (3, 4, 5, 6)
    assert [(output.index, output.prompt_index) for output in result.outputs] == [
        (0, 0),
        (1, 0),
        (2, 1),
        (3, 1),
    ]
    assert [summary.prompt for summary in result.requests] == ["a red fox", "a blue whale"]
    # Each prompt's images are those it gets on its own with the same seeds.
    whale = client.generate("a blue whale", num_images=2, seed=5, num_inference_steps=2)
    assert [output.data for output in result.outputs[2:]] == [output.data for output in whale.outputs]
    fox = client.generate("a red fox", num_images=2, seed=3, num_inference_steps=2)
    assert [output.data for output in result.outputs[:2]] == [output.data for output in fox.outputs]


def test_leaving_a_stream_block_cancels_the_running_request(client: Client) -> None:
    before = client.inspect().stats
    with client.stream("p", num_inference_steps=400) as events:
        for event in events:
            if isinstance(event, Progress):
                break
    # One worker runs one call at a time: this finishes only after the abandoned call has ended.
    client.generate("next", num_inference_steps=2)
    after = client.inspect().stats
    assert after.cancelled_running == before.cancelled_running + 1
    assert after.completed == before.completed + 1


def test_leaving_an_async_stream_block_cancels_the_running_request(server: ServerThread) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.target, timeout=120) as client:
            before = (await client.inspect()).stats
            async with client.stream("p", num_inference_steps=400) as events:
                async for event in events:
                    if isinstance(event, Progress):
                        break
            await client.generate("next", num_inference_steps=2)
            after = (await client.inspect()).stats
            assert after.cancelled_running == before.cancelled_running + 1
            assert after.completed == before.completed + 1

    asyncio.run(scenario())


def test_round_robin_spreads_requests_over_two_servers(
    server: ServerThread,
    checkpoints: dict[str, pathlib.Path],
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    second = ServerThread(make_settings(checkpoints, models=(ModelSpec("sd15", str(checkpoints["sd15"])),)))
    try:
        replicas = [server, second]

        def completed() -> list[int]:
            counts = []
            for replica in replicas:
                with Client(replica.target) as direct:
                    counts.append(direct.inspect().stats.completed)
            return counts

        start = completed()
        target = f"ipv4:{server.target},{second.target}"
        with Client(target, timeout=120) as client:
            # Both connections come up within the first requests; from then on picks alternate.
            for _ in range(20):
                client.generate("spread", model="sd15", num_inference_steps=2)
                if all(now > then for now, then in zip(completed(), start, strict=True)):
                    break
            middle = completed()
            assert all(now > then for now, then in zip(middle, start, strict=True))
            for _ in range(4):
                client.generate("spread", model="sd15", num_inference_steps=2)
        end = completed()
        assert [after - before for after, before in zip(end, middle, strict=True)] == [2, 2]

        # The CLI takes the same target.
        out = tmp_path / "spread.png"
        assert main(["--target", target, "generate", "--prompt", "x", "--steps", "2", "-o", str(out)]) == 0
        assert capsys.readouterr().out.split() == [str(out)]
    finally:
        second.stop()


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
        (output,) = client.generate("p", num_inference_steps=1, seed=5).outputs
    assert len(output.data) > 2048
    assert output.image.size == (64, 64)


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
            assert result.images[0].size == (64, 64)
            kinds = [type(event) async for event in client.stream("p", num_inference_steps=2)]
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
