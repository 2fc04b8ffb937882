"""SDK unit tests: request building, event conversion, chunk reassembly, error mapping and the CLI."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import pathlib
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc
import PIL.Image
import pytest
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import autopipeline
from autopipeline import (
    Completed,
    GeneratedImage,
    ImageFormat,
    ModelState,
    Preview,
    Progress,
    ProtocolError,
    Queued,
    Started,
    Task,
    Timings,
)
from autopipeline._cli import ProgressDisplay, _plain, build_parser, format_server_info, main, parse_param
from autopipeline._client import channel_options
from autopipeline._convert import (
    EventReader,
    ResultCollector,
    combine,
    generate_call,
    inspect_request,
    server_info,
)
from autopipeline._errors import from_rpc_error
from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

OPTIONAL_SCALARS = ("width", "height", "num_inference_steps", "guidance_scale", "strength", "seed")


def png(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


def chunk(index: int, chunk_index: int, chunk_count: int, data: bytes, seed: int = 7) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        image=pb.GeneratedImage(
            index=index,
            seed=seed + index,
            width=8,
            height=8,
            image=pb.Image(data=data, mime_type="image/png"),
            chunk_index=chunk_index,
            chunk_count=chunk_count,
        )
    )


def started(seeds: Iterable[int] = (7,)) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        started=pb.Started(
            model="tiny",
            pipeline_class="StableDiffusionPipeline",
            total_steps=3,
            seeds=list(seeds),
            batch_requests=1,
            width=8,
            height=8,
            scheduler="PNDMScheduler",
            batch_images=len(list(seeds)),
        )
    )


def completed(num_images: int = 1) -> pb.GenerateResponse:
    parameters = struct_pb2.Struct()
    parameters.update(
        {"num_inference_steps": 3, "guidance_scale": 7.5, "sizes": [8, 8], "extra": {"eta": 0.0}}
    )
    return pb.GenerateResponse(
        completed=pb.Completed(
            timings=pb.Timings(
                queued=duration(0.25), running=duration(1.5), encoding=duration(0.125), total=duration(1.875)
            ),
            parameters=parameters,
            model="tiny",
            pipeline_class="StableDiffusionPipeline",
            num_images=num_images,
        )
    )


def read_all(responses: Iterable[pb.GenerateResponse]) -> list[Any]:
    reader = EventReader()
    events = [event for response in responses if (event := reader.read(response)) is not None]
    reader.close()
    return events


# ------------------------------------------------------------------------------- request building


def test_request_defaults_leave_optional_fields_unset() -> None:
    call = generate_call("a red cube")
    (request,) = call.requests
    assert call.timeout is None
    assert request.prompt == "a red cube"
    assert request.task == pb.TASK_TEXT_TO_IMAGE
    assert request.num_images == 1
    assert request.output_format == pb.IMAGE_FORMAT_PNG
    assert request.output_quality == 0
    assert request.preview_interval == 0
    for name in (*OPTIONAL_SCALARS, "image", "mask_image", "parameters"):
        assert not request.HasField(name), name


def test_request_sets_every_field(tmp_path: pathlib.Path) -> None:
    mask = tmp_path / "mask.png"
    mask.write_bytes(png((255, 255, 255)))
    call = generate_call(
        "a red cube",
        task=Task.INPAINTING,
        model="sdxl",
        negative_prompt="blurry",
        image=png(),
        mask_image=mask,
        width=512,
        height=768,
        num_inference_steps=30,
        guidance_scale=6.5,
        strength=0.75,
        num_images=3,
        seed=2**40,
        scheduler="EulerDiscreteScheduler",
        output_format=ImageFormat.WEBP,
        output_quality=80,
        preview_interval=5,
        parameters={"eta": 0.5},
        timeout=12.5,
    )
    (request,) = call.requests
    assert call.timeout == 12.5
    assert (request.model, request.task, request.prompt, request.negative_prompt) == (
        "sdxl",
        pb.TASK_INPAINTING,
        "a red cube",
        "blurry",
    )
    assert (request.width, request.height, request.num_inference_steps) == (512, 768, 30)
    assert request.guidance_scale == pytest.approx(6.5)
    assert request.strength == pytest.approx(0.75)
    assert (request.num_images, request.seed, request.scheduler) == (3, 2**40, "EulerDiscreteScheduler")
    assert (request.output_format, request.output_quality, request.preview_interval) == (
        pb.IMAGE_FORMAT_WEBP,
        80,
        5,
    )
    assert request.image.data == png()
    assert request.mask_image.data == mask.read_bytes()
    assert dict(request.parameters) == {"eta": 0.5}


@pytest.mark.parametrize("name", OPTIONAL_SCALARS)
def test_optional_scalar_zero_is_sent(name: str) -> None:
    # Zero is a value the caller chose, unlike None; `optional` lets the server tell them apart.
    request = generate_call("x", **{name: 0}).requests[0]
    assert request.HasField(name)
    others = [other for other in OPTIONAL_SCALARS if other != name]
    assert not any(request.HasField(other) for other in others)


def test_pil_image_is_sent_as_png() -> None:
    image = PIL.Image.new("RGB", (16, 8), (1, 2, 3))
    request = generate_call("x", task="image-to-image", image=image).requests[0]
    assert request.image.mime_type == "image/png"
    decoded = PIL.Image.open(io.BytesIO(request.image.data))
    assert (decoded.format, decoded.size, decoded.getpixel((0, 0))) == ("PNG", (16, 8), (1, 2, 3))


def test_bytes_and_paths_are_sent_unchanged(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "in.png"
    path.write_bytes(png((9, 9, 9)))
    for value in (path.read_bytes(), path, str(path)):
        image = generate_call("x", task="image-to-image", image=value).requests[0].image
        # The server sniffs the format; the SDK does not claim a media type it did not check.
        assert (image.data, image.mime_type) == (path.read_bytes(), "")


def test_unreadable_image_path_raises_oserror(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        generate_call("x", image=tmp_path / "missing.png")


def test_image_of_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="PIL image, bytes or a path"):
        generate_call("x", image=123)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("text-to-image", pb.TASK_TEXT_TO_IMAGE),
        ("image-to-image", pb.TASK_IMAGE_TO_IMAGE),
        ("inpainting", pb.TASK_INPAINTING),
        (Task.IMAGE_TO_IMAGE, pb.TASK_IMAGE_TO_IMAGE),
    ],
)
def test_task_accepts_enum_or_value(task: Task | str, expected: int) -> None:
    assert generate_call("x", task=task).requests[0].task == expected


@pytest.mark.parametrize(
    ("output_format", "expected"),
    [("png", pb.IMAGE_FORMAT_PNG), ("jpeg", pb.IMAGE_FORMAT_JPEG), (ImageFormat.WEBP, pb.IMAGE_FORMAT_WEBP)],
)
def test_output_format_accepts_enum_or_value(output_format: ImageFormat | str, expected: int) -> None:
    assert generate_call("x", output_format=output_format).requests[0].output_format == expected


def test_unknown_enum_value_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"task='upscale' is not one of 'text-to-image'"):
        generate_call("x", task="upscale")
    with pytest.raises(ValueError, match=r"output_format='gif'"):
        generate_call("x", output_format="gif")


def test_out_of_range_value_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"width=-8 cannot be sent"):
        generate_call("x", width=-8)


def test_parameters_become_a_struct() -> None:
    parameters = {
        "eta": 0.5,
        "clip_skip": 2,
        "flag": True,
        "none": None,
        "list": [1, "a"],
        "nested": {"k": "v"},
    }
    struct = generate_call("x", parameters=parameters).requests[0].parameters
    assert struct.fields["eta"].number_value == 0.5
    assert struct.fields["clip_skip"].number_value == 2
    assert struct.fields["flag"].bool_value is True
    assert struct.fields["none"].WhichOneof("kind") == "null_value"
    assert [v.WhichOneof("kind") for v in struct.fields["list"].list_value.values] == [
        "number_value",
        "string_value",
    ]
    assert struct.fields["nested"].struct_value.fields["k"].string_value == "v"


def test_parameters_that_json_cannot_express_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="JSON-like values"):
        generate_call("x", parameters={"latents": object()})


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        pytest.param({}, pb.TASK_TEXT_TO_IMAGE, id="no-image"),
        pytest.param({"image": b"i"}, pb.TASK_IMAGE_TO_IMAGE, id="image"),
        pytest.param({"image": b"i", "mask_image": b"m"}, pb.TASK_INPAINTING, id="image-and-mask"),
        pytest.param({"task": "text-to-image", "image": b"i"}, pb.TASK_TEXT_TO_IMAGE, id="explicit-wins"),
        pytest.param(
            {"task": Task.IMAGE_TO_IMAGE, "image": b"i", "mask_image": b"m"},
            pb.TASK_IMAGE_TO_IMAGE,
            id="explicit-wins-over-mask",
        ),
    ],
)
def test_task_is_inferred_from_the_inputs_unless_given(inputs: dict[str, Any], expected: int) -> None:
    assert generate_call("x", **inputs).requests[0].task == expected


@pytest.mark.parametrize("task", [None, "inpainting", "text-to-image"])
def test_mask_without_image_is_a_value_error(task: str | None) -> None:
    with pytest.raises(ValueError, match="mask_image was given without image"):
        generate_call("x", task=task, mask_image=b"m")


def test_prompt_list_is_one_request_per_prompt_with_following_seeds() -> None:
    call = generate_call(["a cat", "a dog", "a cow"], num_images=2, seed=10, width=512, image=b"i")
    assert [request.prompt for request in call.requests] == ["a cat", "a dog", "a cow"]
    assert [request.seed for request in call.requests] == [10, 12, 14]
    for request in call.requests:
        assert (request.num_images, request.width, request.task, request.image.data) == (
            2,
            512,
            pb.TASK_IMAGE_TO_IMAGE,
            b"i",
        )
    # num_images 0 is 1 on the wire, and seeds step by one image.
    assert [r.seed for r in generate_call(("a", "b"), num_images=0, seed=3).requests] == [3, 4]
    assert not any(request.HasField("seed") for request in generate_call(["a", "b"]).requests)


def test_prompt_list_must_hold_strings() -> None:
    with pytest.raises(ValueError, match="empty list"):
        generate_call([])
    with pytest.raises(TypeError, match="list of strings"):
        generate_call(["a", 1])  # type: ignore[list-item]


def test_inspect_request() -> None:
    assert inspect_request(None) == pb.InspectRequest()
    assert inspect_request("sdxl").model == "sdxl"


# ------------------------------------------------------------------------------- event conversion


def test_events_convert_in_order() -> None:
    responses = [
        pb.GenerateResponse(queued=pb.Queued(position=1, queue_depth=2)),
        started(seeds=[7, 8]),
        pb.GenerateResponse(progress=pb.Progress(step=1, total_steps=3, elapsed=duration(0.5))),
        pb.GenerateResponse(preview=pb.Preview(step=1, index=1, image=pb.Image(data=png(size=(4, 4))))),
        chunk(0, 0, 1, png()),
        chunk(1, 0, 1, png((0, 0, 255))),
        completed(num_images=2),
    ]
    queued, start, progress, preview, image0, image1, done = read_all(responses)
    assert queued == Queued(position=1, queue_depth=2)
    assert start == Started(
        model="tiny",
        pipeline_class="StableDiffusionPipeline",
        total_steps=3,
        seeds=(7, 8),
        batch_requests=1,
        width=8,
        height=8,
        scheduler="PNDMScheduler",
        batch_images=2,
    )
    assert progress == Progress(step=1, total_steps=3, elapsed=0.5)
    assert isinstance(preview, Preview)
    assert (preview.step, preview.index, preview.image.size) == (1, 1, (4, 4))
    assert (image0.index, image0.seed, image0.width, image0.height, image0.mime_type) == (
        0,
        7,
        8,
        8,
        "image/png",
    )
    assert image1.image.getpixel((0, 0)) == (0, 0, 255)
    assert isinstance(done, Completed)
    assert (done.timings.queued, done.timings.running, done.timings.encoding, done.timings.total) == (
        0.25,
        1.5,
        0.125,
        1.875,
    )
    assert (done.model, done.pipeline_class, done.num_images) == ("tiny", "StableDiffusionPipeline", 2)


def test_completed_parameters_keep_integers_integral() -> None:
    (done,) = read_all([completed()])
    assert done.parameters == {
        "num_inference_steps": 3,
        "guidance_scale": 7.5,
        "sizes": [8, 8],
        "extra": {"eta": 0},
    }
    assert isinstance(done.parameters["num_inference_steps"], int)


def test_event_unknown_to_this_sdk_is_skipped() -> None:
    # A newer server's event arrives as a response with no known field set.
    assert read_all([pb.GenerateResponse(), completed(num_images=0)])[0].num_images == 0


def test_undecodable_preview_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="cannot be decoded"):
        read_all([pb.GenerateResponse(preview=pb.Preview(step=1, image=pb.Image(data=b"not an image")))])


def test_events_after_completed_are_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="after `completed`"):
        read_all([completed(), pb.GenerateResponse(queued=pb.Queued())])


def test_stream_without_completed_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="without a `completed`"):
        read_all([started()])


def encoded(format: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new(mode, (8, 8), (200, 40, 40, 255)[: len(mode)]).save(buffer, format=format)
    return buffer.getvalue()


def generated(data: bytes, mime_type: str = "image/png") -> GeneratedImage:
    return GeneratedImage(index=0, seed=1, width=8, height=8, data=data, mime_type=mime_type)


def test_generated_image_decodes_lazily_and_saves_bytes(tmp_path: pathlib.Path) -> None:
    image = generated(png())
    assert "data" not in repr(image)
    assert image.image is image.image  # decoded once
    assert image.image.size == (8, 8)
    image.save(tmp_path / "out.png")
    image.save(tmp_path / "OUT.PNG")
    assert (tmp_path / "out.png").read_bytes() == (tmp_path / "OUT.PNG").read_bytes() == png()


@pytest.mark.parametrize(
    ("data", "mime_type", "name"),
    [
        (encoded("JPEG"), "image/jpeg", "out.jpg"),
        (encoded("JPEG"), "image/jpeg", "out.jpeg"),
        (encoded("WEBP"), "image/webp", "out.webp"),
    ],
)
def test_saving_under_the_received_format_writes_the_bytes(
    data: bytes, mime_type: str, name: str, tmp_path: pathlib.Path
) -> None:
    generated(data, mime_type).save(tmp_path / name)
    assert (tmp_path / name).read_bytes() == data


@pytest.mark.parametrize(
    ("data", "name", "written_format"),
    [
        (png(), "out.jpg", "JPEG"),
        (encoded("PNG", "RGBA"), "out.jpeg", "JPEG"),  # no alpha in JPEG: dropped, not an error
        (png(), "out.webp", "WEBP"),
        (encoded("WEBP"), "out.png", "PNG"),
        (png(), "out.gif", "GIF"),
    ],
)
def test_saving_under_another_extension_reencodes(
    data: bytes, name: str, written_format: str, tmp_path: pathlib.Path
) -> None:
    image = generated(data, "")  # no media type: the format is read from the bytes
    image.save(tmp_path / name)
    with PIL.Image.open(tmp_path / name) as written:
        assert (written.format, written.size) == (written_format, (8, 8))
        assert written.convert("RGB").getpixel((4, 4))[0] > 150


@pytest.mark.parametrize("name", ["out", "out.xyz", "out.png.txt"])
def test_saving_under_an_unknown_extension_is_a_value_error(name: str, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="cannot tell which image format"):
        generated(png()).save(tmp_path / name)
    assert not (tmp_path / name).exists()


def test_generated_image_with_bad_bytes_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        _ = generated(b"junk").image


# ------------------------------------------------------------------------------- chunk reassembly


def test_chunks_are_joined_in_order() -> None:
    data = png(size=(32, 32))
    parts = [data[:10], data[10:20], data[20:]]
    events = read_all([started(), *(chunk(0, i, 3, part) for i, part in enumerate(parts)), completed()])
    (image,) = [event for event in events if isinstance(event, GeneratedImage)]
    assert image.data == data
    assert image.image.size == (32, 32)


def test_chunk_count_zero_means_one_chunk() -> None:
    (image,) = read_all([chunk(0, 0, 0, png()), completed()])[:1]
    assert image.data == png()


@pytest.mark.parametrize(
    ("responses", "message"),
    [
        pytest.param(
            [chunk(0, 0, 2, b"a"), chunk(1, 0, 1, b"b")], "image 1 began before image 0", id="interleaved"
        ),
        pytest.param(
            [chunk(0, 0, 3, b"a"), chunk(0, 2, 3, b"c")], "chunk 2 of 3 arrived where chunk 1", id="gap"
        ),
        pytest.param(
            [chunk(0, 0, 2, b"a"), chunk(0, 0, 2, b"a")], "chunk 0 of 2 arrived where chunk 1", id="repeat"
        ),
        pytest.param(
            [chunk(0, 0, 2, b"a"), chunk(0, 1, 3, b"b")], "chunk 1 of 3 arrived where", id="count-changed"
        ),
        pytest.param([chunk(0, 1, 2, b"b")], "began with chunk 1, not 0", id="missing-first"),
        pytest.param(
            [chunk(0, 0, 1, png()), chunk(0, 0, 1, png())], "image 0 was sent twice", id="duplicate"
        ),
        pytest.param(
            [chunk(0, 0, 2, b"a"), pb.GenerateResponse(progress=pb.Progress(step=1))],
            "a `progress` event arrived while image 0 was incomplete",
            id="other-event-between-chunks",
        ),
        pytest.param(
            [chunk(0, 0, 2, b"a")], r"the stream ended while image 0 was incomplete \(1 of 2", id="cut-off"
        ),
    ],
)
def test_broken_chunking_is_a_protocol_error(responses: list[pb.GenerateResponse], message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as caught:
        read_all(responses)
    assert (caught.value.code, caught.value.reason) == ("UNKNOWN", "PROTOCOL_ERROR")


# ------------------------------------------------------------------------------- results


def collect(responses: list[pb.GenerateResponse], prompt: str = "p") -> autopipeline.GenerationResult:
    collector = ResultCollector(prompt)
    for event in read_all(responses):
        collector.add(event)
    return collector.result()


def test_result_collects_a_stream() -> None:
    result = collect(
        [started(seeds=[7, 8]), chunk(1, 0, 1, png((0, 0, 9))), chunk(0, 0, 1, png()), completed(2)],
        prompt="a red cube",
    )
    assert [output.index for output in result.outputs] == [0, 1]
    assert result.seeds == (7, 8)
    assert result.timings.total == 1.875
    assert result.parameters["num_inference_steps"] == 3
    assert [summary.prompt for summary in result.requests] == ["a red cube"]
    assert result.started.seeds == (7, 8)
    assert result.completed.num_images == 2


def test_result_images_are_pil_images_as_in_diffusers() -> None:
    result = collect(
        [started(seeds=[7, 8]), chunk(0, 0, 1, png()), chunk(1, 0, 1, png((0, 0, 9))), completed(2)]
    )
    assert all(type(image) is not GeneratedImage for image in result.images)
    assert all(isinstance(image, PIL.Image.Image) for image in result.images)
    assert [image.getpixel((0, 0)) for image in result.images] == [(200, 40, 40), (0, 0, 9)]
    # The same decoded objects as the outputs', decoded once.
    assert [output.image for output in result.outputs] == result.images
    assert result.images[0] is result.outputs[0].image


def test_combined_results_run_prompt_by_prompt() -> None:
    def request(first_seed: int) -> list[pb.GenerateResponse]:
        images = [chunk(index, 0, 1, png(), seed=first_seed) for index in (0, 1)]
        return [started(seeds=[first_seed, first_seed + 1]), *images, completed(2)]

    first, second = collect(request(7), "a"), collect(request(9), "b")
    result = combine([first, second])
    assert [(o.index, o.prompt_index, o.seed) for o in result.outputs] == [
        (0, 0, 7),
        (1, 0, 8),
        (2, 1, 9),
        (3, 1, 10),
    ]
    assert result.seeds == (7, 8, 9, 10)
    assert [summary.prompt for summary in result.requests] == ["a", "b"]
    assert result.started is first.started
    assert len(result.images) == 4
    assert combine([first]) is first


def test_result_without_started_is_a_protocol_error() -> None:
    collector = ResultCollector("p")
    collector.add(read_all([completed(num_images=0)])[0])
    with pytest.raises(ProtocolError, match="without a `started`"):
        collector.result()


def test_result_with_missing_images_is_a_protocol_error() -> None:
    collector = ResultCollector("p")
    for event in read_all([started(), completed(num_images=1)]):
        collector.add(event)
    with pytest.raises(ProtocolError, match="reports 1 images; the stream sent 0"):
        collector.result()


# ------------------------------------------------------------------------------- inspect


def inspect_response() -> pb.InspectResponse:
    limits = pb.Limits(
        max_width=2048,
        max_height=2048,
        max_num_inference_steps=500,
        max_num_images=16,
        max_prompt_length=4096,
        max_parameters=32,
        max_input_pixels=2**24,
        max_queue=64,
        max_request_bytes=64 << 20,
        image_chunk_bytes=1 << 20,
    )
    task = pb.TaskInfo(
        task=pb.TASK_TEXT_TO_IMAGE,
        pipeline_class="StableDiffusionPipeline",
        parameters=[
            pb.ParameterInfo(
                name="eta",
                default_value=struct_pb2.Value(number_value=0.0),
                schema=struct_pb2.Struct(fields={"type": struct_pb2.Value(string_value="number")}),
                kind=pb.VALUE_KIND_NUMBER,
            ),
            pb.ParameterInfo(name="prompt_2", kind=pb.VALUE_KIND_ANY, nullable=True),
        ],
        schedulers=["DDIMScheduler", "PNDMScheduler"],
        default_scheduler="PNDMScheduler",
        default_width=64,
        default_height=64,
        supports_previews=True,
    )
    return pb.InspectResponse(
        server=pb.ServerInfo(
            version="0.1.0",
            diffusers_version="0.42.0",
            torch_version="2.13.0",
            device="cpu",
            limits=limits,
            queue_depth=1,
            default_model="tiny",
            running=1,
        ),
        models=[
            pb.ModelInfo(
                name="tiny",
                source="/models/tiny",
                family="stable-diffusion",
                state=pb.MODEL_STATE_READY,
                dtype="float32",
                device="cpu",
                parameter_bytes=3 * 2**20,
                is_default=True,
                checkpoint_class="StableDiffusionPipeline",
                # 99 stands for a task a newer contract added.
                tasks=[task, pb.TaskInfo(task=99, pipeline_class="Future")],  # type: ignore[arg-type]
            ),
            pb.ModelInfo(name="broken", state=pb.MODEL_STATE_FAILED, state_reason="no weights"),
            pb.ModelInfo(name="odd", state=42),  # type: ignore[arg-type]
        ],
    )


def test_server_info_converts_everything() -> None:
    info = server_info(inspect_response())
    assert (info.version, info.diffusers_version, info.torch_version, info.device) == (
        "0.1.0",
        "0.42.0",
        "2.13.0",
        "cpu",
    )
    assert (info.default_model, info.queue_depth, info.running) == ("tiny", 1, 1)
    assert info.limits.max_request_bytes == 64 << 20
    assert info.limits.image_chunk_bytes == 1 << 20
    tiny, broken, odd = info.models
    assert (tiny.state, tiny.parameter_bytes, tiny.is_default, tiny.checkpoint_class) == (
        ModelState.READY,
        3 * 2**20,
        True,
        "StableDiffusionPipeline",
    )
    (task,) = tiny.tasks  # the unknown task is left out
    assert (task.task, task.pipeline_class, task.schedulers) == (
        Task.TEXT_TO_IMAGE,
        "StableDiffusionPipeline",
        ["DDIMScheduler", "PNDMScheduler"],
    )
    assert (task.default_scheduler, task.default_width, task.default_height, task.supports_previews) == (
        "PNDMScheduler",
        64,
        64,
        True,
    )
    eta, image = task.parameters
    assert (eta.name, eta.default, eta.has_default) == ("eta", 0, True)
    assert (eta.schema, eta.kind, eta.nullable) == ({"type": "number"}, "number", False)
    assert (image.default, image.has_default, image.kind, image.nullable) == (None, False, "any", True)
    assert (broken.state, broken.state_reason) == (ModelState.FAILED, "no weights")
    assert odd.state is ModelState.UNKNOWN


def test_server_info_as_table_and_json() -> None:
    info = server_info(inspect_response())
    table = format_server_info(info)
    assert "server 0.1.0 on cpu (diffusers 0.42.0, torch 2.13.0)" in table
    assert "tiny (default): ready" in table
    assert "memory:  3.0 MiB" in table
    assert "text-to-image  StableDiffusionPipeline (default 64x64, previews)" in table
    assert "schedulers: PNDMScheduler (default), DDIMScheduler" in table
    assert "parameters: eta, prompt_2" in table
    assert "limits:   2048x2048 px, 500 steps, 16 images" in table
    assert "16,777,216 px, requests of 64 MiB" in table
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "queue:    64 waiting at most; batching off" in table
    assert "reason:  no weights" in table
    plain = json.loads(json.dumps(_plain(info)))
    assert plain["models"][0]["state"] == "ready"
    assert plain["models"][0]["tasks"][0]["task"] == "text-to-image"
    assert plain["limits"]["max_width"] == 2048


# ------------------------------------------------------------------------------- errors


class FakeRpcError(grpc.RpcError):
    """A stand-in for a failed call: gRPC builds real ones only from a live channel."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str | None,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        super().__init__(details)
        self._code, self._details, self._trailing_metadata = code, details, trailing_metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing_metadata


def rich_error(
    code: grpc.StatusCode, message: str, *details: Any, extra: tuple[tuple[str, str], ...] = ()
) -> FakeRpcError:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    grpc_status = rpc_status.to_status(status)
    return FakeRpcError(grpc_status.code, grpc_status.details, (*grpc_status.trailing_metadata, *extra))


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, autopipeline.InvalidArgumentError),
        (grpc.StatusCode.OUT_OF_RANGE, autopipeline.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, autopipeline.NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, autopipeline.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, autopipeline.ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, autopipeline.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, autopipeline.DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, autopipeline.GenerationCancelledError),
        (grpc.StatusCode.UNAUTHENTICATED, autopipeline.UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, autopipeline.PermissionDeniedError),
        (grpc.StatusCode.INTERNAL, autopipeline.InternalError),
        (grpc.StatusCode.UNKNOWN, autopipeline.InternalError),
        (grpc.StatusCode.DATA_LOSS, autopipeline.InternalError),
        (grpc.StatusCode.UNIMPLEMENTED, autopipeline.InternalError),
        (grpc.StatusCode.ABORTED, autopipeline.InternalError),
        (grpc.StatusCode.ALREADY_EXISTS, autopipeline.InternalError),
    ],
)
def test_each_code_maps_to_its_class(
    code: grpc.StatusCode, cls: type[autopipeline.AutoPipelineError]
) -> None:
    error = from_rpc_error(FakeRpcError(code, "it failed"))
    assert type(error) is cls
    assert (error.code, error.message, str(error)) == (code.name, "it failed", "it failed")
    assert (error.reason, error.domain, error.metadata, error.field_violations) == (None, None, {}, [])
    assert (error.retry_after, error.request_id) == (None, None)


def test_status_details_are_unpacked() -> None:
    err = rich_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "2 fields are invalid",
        error_details_pb2.ErrorInfo(
            reason="INVALID_REQUEST",
            domain="autopipeline.v1",
            metadata={"request_id": "r-1", "model": "tiny"},
        ),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="width", description="must be a multiple of 8"
                ),
                error_details_pb2.BadRequest.FieldViolation(
                    field="strength", description="must be in (0, 1]"
                ),
            ]
        ),
        extra=(("x-request-id", "from-trailer"),),
    )
    error = from_rpc_error(err)
    assert isinstance(error, autopipeline.InvalidArgumentError)
    assert (error.code, error.reason, error.domain, error.message) == (
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        "autopipeline.v1",
        "2 fields are invalid",
    )
    assert error.metadata == {"request_id": "r-1", "model": "tiny"}
    # ErrorInfo's request id is the server's own statement and wins over a proxy's header.
    assert error.request_id == "r-1"
    assert error.field_violations == [
        autopipeline.FieldViolation("width", "must be a multiple of 8"),
        autopipeline.FieldViolation("strength", "must be in (0, 1]"),
    ]


def test_retry_info_gives_retry_after() -> None:
    err = rich_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the queue is full",
        error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="autopipeline.v1"),
        error_details_pb2.RetryInfo(retry_delay=duration(2.5)),
    )
    error = from_rpc_error(err)
    assert isinstance(error, autopipeline.ResourceExhaustedError)
    assert (error.reason, error.retry_after, error.request_id) == ("QUEUE_FULL", 2.5, None)


def test_request_id_from_trailing_metadata() -> None:
    err = FakeRpcError(grpc.StatusCode.INTERNAL, "bug", (("x-request-id", "abc"),))
    assert from_rpc_error(err).request_id == "abc"


def test_inconsistent_or_corrupt_status_is_ignored() -> None:
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="other")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="MODEL_NOT_FOUND"))
    mismatched = FakeRpcError(
        grpc.StatusCode.INTERNAL, "bug", (("grpc-status-details-bin", status.SerializeToString()),)
    )
    corrupt = FakeRpcError(grpc.StatusCode.INTERNAL, "bug", (("grpc-status-details-bin", b"\xff\xff"),))
    for err in (mismatched, corrupt):
        error = from_rpc_error(err)
        assert (type(error), error.reason) == (autopipeline.InternalError, None)


def test_missing_details_fall_back_to_the_code_name() -> None:
    assert from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, None)).message == "UNAVAILABLE"


def test_every_public_error_is_an_autopipeline_error() -> None:
    names = [name for name in autopipeline.__all__ if name.endswith("Error")]
    assert len(names) == 12
    assert all(issubclass(getattr(autopipeline, name), autopipeline.AutoPipelineError) for name in names)


# ------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("eta=0.5", ("eta", 0.5)),
        ("clip_skip=2", ("clip_skip", 2)),
        ("flag=true", ("flag", True)),
        ("none=null", ("none", None)),
        ("sizes=[1, 2]", ("sizes", [1, 2])),
        ('nested={"a": 1}', ("nested", {"a": 1})),
        ('quoted="2"', ("quoted", "2")),
        ("output_type=pil", ("output_type", "pil")),
        ("empty=", ("empty", "")),
        ("expr=a=b", ("expr", "a=b")),
    ],
)
def test_parse_param(text: str, expected: tuple[str, Any]) -> None:
    assert parse_param(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=1", " =1"])
def test_parse_param_rejects_missing_name_or_value(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_param(text)


def test_generate_arguments_parse() -> None:
    args = build_parser().parse_args(
        shlex.split(
            "--target gpu:50051 --timeout 30 generate --task inpainting --prompt 'a cat'"
            " --negative-prompt dog --image in.png --mask mask.png --model sdxl --seed 3 --steps 20"
            " --width 512 --height 256"
            " --guidance-scale 5 --strength 0.6 --num-images 2 --scheduler DDIMScheduler --format jpeg"
            " --quality 85 --param eta=0.5 --param output_type=pil -o out"
        )
    )
    assert (args.target, args.timeout, args.command, args.task) == (
        "gpu:50051",
        30.0,
        "generate",
        "inpainting",
    )
    assert (args.prompt, args.negative_prompt, args.image, args.mask) == (
        "a cat",
        "dog",
        pathlib.Path("in.png"),
        pathlib.Path("mask.png"),
    )
    assert (args.model, args.seed, args.steps, args.width, args.height) == ("sdxl", 3, 20, 512, 256)
    assert (args.guidance_scale, args.strength, args.num_images, args.scheduler) == (
        5.0,
        0.6,
        2,
        "DDIMScheduler",
    )
    assert (args.format, args.quality, args.output) == ("jpeg", 85, pathlib.Path("out"))
    assert dict(args.param) == {"eta": 0.5, "output_type": "pil"}


def test_target_defaults_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOPIPELINE_TARGET", raising=False)
    assert build_parser().parse_args(["inspect"]).target == "localhost:50051"
    monkeypatch.setenv("AUTOPIPELINE_TARGET", "remote:1234")
    args = build_parser().parse_args(["inspect", "--model", "m", "--json"])
    assert (args.target, args.model, args.json) == ("remote:1234", "m", True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate"], "--prompt"),
        (["generate", "--prompt", "x", "--task", "upscale"], "invalid choice"),
        (["generate", "--prompt", "x", "--param", "novalue"], "expected NAME=VALUE"),
        (["generate", "--prompt", "x", "--num-images", "2", "-o", "one.png"], "names one file"),
        (["generate", "--prompt", "x", "--format", "png", "-o", "one.jpg"], "implies --format jpeg"),
        (["generate", "--prompt", "x", "-o", "never-created.gif"], "not .gif; give one of those"),
        (["generate", "--prompt", "x", "-o", "never-created.TIFF"], "not .TIFF"),
        (["--tls-cert", "c.pem", "inspect"], "--tls-cert and --tls-key go together"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not pathlib.Path("never-created.gif").exists()


def test_progress_prints_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = ProgressDisplay(stream)
    steps = [
        pb.GenerateResponse(progress=pb.Progress(step=step, total_steps=20, elapsed=duration(step / 4)))
        for step in range(1, 21)
    ]
    queued = [pb.GenerateResponse(queued=pb.Queued(position=p, queue_depth=3)) for p in (1, 1, 0)]
    for event in read_all([*queued, started(), *steps, chunk(0, 0, 1, png()), completed(1)]):
        progress.update(event)
    progress.close()
    lines = stream.getvalue().splitlines()
    # 1-based for people: position 0 on the wire runs next, "position 1 of 3".
    assert lines[:3] == ["queued: position 2 of 3", "queued: position 1 of 3", lines[2]]
    assert lines[2].startswith("started: StableDiffusionPipeline")
    step_lines = lines[3:-2]
    # The first step, then one line per tenth of the way.
    assert [line.split(" in ")[0] for line in step_lines] == [f"step {n}/20" for n in (1, *range(2, 21, 2))]
    assert step_lines[1] == "step 2/20 in 0.5s (4.00 steps/s, about 4.5s left)"
    assert step_lines[-1] == "step 20/20 in 5.0s (4.00 steps/s, about 0.0s left)"
    assert lines[-2:] == ["received image 0 (seed 7)", "completed in 1.88s"]
    assert "\r" not in stream.getvalue()


def test_progress_is_a_tqdm_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = ProgressDisplay(stream)
    progress.update(Queued(position=0, queue_depth=1))
    for step in (1, 2, 3):
        progress.update(Progress(step=step, total_steps=3, elapsed=0.1 * step))
    progress.update(Completed(Timings(0, 0, 0, 0.5), {}, "m", "P", 0))
    progress.close()
    text = stream.getvalue()
    assert text.startswith("queued: position 1 of 1\n")
    assert "\r" in text  # redrawn in place
    last_bar = text.split("\r")[-1]
    # tqdm's own bar: steps done of total, elapsed<remaining, and the rate in steps per second.
    assert "denoising: 100%" in last_bar
    assert "3/3 [" in last_bar
    assert "step/s]" in last_bar
    assert last_bar.endswith("\ncompleted in 0.50s\n")


# ------------------------------------------------------------------------------- packaging


def test_import_does_not_import_torch() -> None:
    code = "import sys, autopipeline._cli\nprint(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert output.strip() == "[]"


def test_public_names_are_exported() -> None:
    for name in autopipeline.__all__:
        assert getattr(autopipeline, name) is not None, name
    assert {"Client", "AsyncClient", "Event", "GenerationResult", "ServerInfo"} <= set(autopipeline.__all__)


# ------------------------------------------------------------------- clients over a scripted fake
#
# A fake, on purpose: it replays whatever stream a test scripts, including streams that break the
# contract, which the real server never sends. Tests against the real server are in test_sdk_server.py.


class ScriptedServicer(pb_grpc.AutoPipelineServiceServicer):
    """Replays `responses`, then ends with `status` (or OK), or holds the call open until it is cancelled."""

    def __init__(self) -> None:
        self.responses: list[pb.GenerateResponse] = []
        self.status: status_pb2.Status | None = None
        self.hold = False
        self.requests: list[Any] = []
        self.metadata: list[dict[str, Any]] = []
        self.time_remaining: list[float | None] = []
        self.ended = threading.Event()
        # When set, each Generate waits here until as many calls are in flight as the barrier's parties.
        self.gate: threading.Barrier | None = None
        # Generate calls with these prompts end with the status at once (after the gate).
        self.fail_prompts: dict[str, status_pb2.Status] = {}
        # Set when a held call ended because its caller went away.
        self.saw_cancel = threading.Event()

    def _record(self, request: Any, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        self.time_remaining.append(context.time_remaining())

    def _finish(self, context: grpc.ServicerContext) -> None:
        if self.status is not None:
            context.abort_with_status(rpc_status.to_status(self.status))

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        self._record(request, context)
        try:
            if self.gate is not None:
                self.gate.wait(timeout=30)
            if request.prompt in self.fail_prompts:
                context.abort_with_status(rpc_status.to_status(self.fail_prompts[request.prompt]))
            yield from self.responses
            while self.hold and context.is_active():
                time.sleep(0.01)
            self._finish(context)
        finally:
            # The caller may go away while the stream waits at a `yield` (gRPC then closes it there)
            # or while it is held: either way this call ends inactive. Failed prompts ended themselves.
            if request.prompt not in self.fail_prompts and not context.is_active():
                self.saw_cancel.set()
            self.ended.set()

    def Inspect(self, request: pb.InspectRequest, context: grpc.ServicerContext) -> pb.InspectResponse:
        self._record(request, context)
        self._finish(context)
        return inspect_response()


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedServicer, str]]:
    servicer = ScriptedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AutoPipelineServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def good_stream(num_images: int = 2) -> list[pb.GenerateResponse]:
    data = png(size=(16, 16))
    return [
        pb.GenerateResponse(queued=pb.Queued(position=0, queue_depth=1)),
        started(seeds=range(7, 7 + num_images)),
        pb.GenerateResponse(progress=pb.Progress(step=3, total_steps=3, elapsed=duration(0.5))),
        *[
            chunk(i, part, 2, half)
            for i in range(num_images)
            for part, half in enumerate((data[:20], data[20:]))
        ],
        completed(num_images),
    ]


def invalid_width_status() -> status_pb2.Status:
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="width must be a multiple of 8")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="INVALID_REQUEST", domain="autopipeline.v1"))
    status.details.add().Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="width", description="must be a multiple of 8"
                )
            ]
        )
    )
    return status


def test_client_generate_sends_the_request_and_returns_the_result(
    scripted: tuple[ScriptedServicer, str],
) -> None:
    servicer, target = scripted
    servicer.responses = good_stream()
    with autopipeline.Client(target, timeout=30, metadata=[("authorization", "Bearer t")]) as client:
        result = client.generate("a red cube", num_images=2, seed=7, parameters={"eta": 0.5})
        client.generate("again", timeout=300)
    assert servicer.requests[0].prompt == "a red cube"
    assert (servicer.requests[0].seed, dict(servicer.requests[0].parameters)) == (7, {"eta": 0.5})
    assert all(metadata["authorization"] == "Bearer t" for metadata in servicer.metadata)
    # The client's timeout, then the call's own (gRPC rounds deadlines up a little).
    assert servicer.time_remaining == [pytest.approx(30, abs=2), pytest.approx(300, abs=2)]
    assert result.seeds == (7, 8)
    assert [output.data for output in result.outputs] == [png(size=(16, 16))] * 2


def test_client_stream_yields_typed_events(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    servicer.responses = good_stream(num_images=1)
    with autopipeline.Client(target) as client:
        kinds = [type(event) for event in client.stream("x")]
    assert kinds == [Queued, Started, Progress, GeneratedImage, Completed]


def test_leaving_a_stream_block_cancels_the_call(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    servicer.responses, servicer.hold = good_stream()[:2], True
    with autopipeline.Client(target) as client:
        with client.stream("x") as events:
            assert isinstance(events, autopipeline.EventStream)
            for event in events:
                if isinstance(event, Started):
                    break
        assert servicer.ended.wait(5), "the server never saw the call end"
        # Closed, the stream yields nothing more.
        assert list(events) == []


def test_stream_takes_one_prompt(scripted: tuple[ScriptedServicer, str]) -> None:
    _, target = scripted
    with autopipeline.Client(target) as client, pytest.raises(TypeError, match="one prompt"):
        client.stream(["a", "b"])


def test_generate_runs_a_request_per_prompt_in_order(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    servicer.responses = good_stream(num_images=2)
    with autopipeline.Client(target) as client:
        result = client.generate(["a cat", "a dog"], num_images=2, seed=7)
    assert [(request.prompt, request.seed) for request in servicer.requests] == [("a cat", 7), ("a dog", 9)]
    assert [(output.index, output.prompt_index) for output in result.outputs] == [
        (0, 0),
        (1, 0),
        (2, 1),
        (3, 1),
    ]
    assert [summary.prompt for summary in result.requests] == ["a cat", "a dog"]
    assert len(result.images) == 4


def test_channel_options_choose_round_robin_unless_the_caller_chose() -> None:
    (option,) = channel_options([])
    assert option[0] == "grpc.service_config"
    assert json.loads(option[1]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    mine = [("grpc.max_receive_message_length", 1 << 20)]
    assert channel_options(mine) == [*mine, option]
    for name in ("grpc.lb_policy_name", "grpc.service_config"):
        assert channel_options([(name, "pick_first")]) == [(name, "pick_first")]


@pytest.mark.parametrize("target", ["ipv4:127.0.0.1:{port},127.0.0.1:{port}", "dns:///127.0.0.1:{port}"])
def test_client_accepts_multi_address_targets(scripted: tuple[ScriptedServicer, str], target: str) -> None:
    servicer, address = scripted
    servicer.responses = good_stream(num_images=1)
    port = address.rsplit(":", 1)[1]
    with autopipeline.Client(target.format(port=port)) as client:
        assert len(client.generate("x").images) == 1


def test_client_raises_mapped_errors_from_the_original(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    servicer.responses, servicer.status = good_stream()[:1], invalid_width_status()
    with autopipeline.Client(target) as client:
        for call in (lambda: client.generate("x", width=100), lambda: client.inspect("tiny")):
            with pytest.raises(autopipeline.InvalidArgumentError) as caught:
                call()
            assert (caught.value.reason, caught.value.field_violations) == (
                "INVALID_REQUEST",
                [autopipeline.FieldViolation("width", "must be a multiple of 8")],
            )
            assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_client_deadline(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    servicer.hold = True
    with autopipeline.Client(target) as client, pytest.raises(autopipeline.DeadlineExceededError):
        client.generate("x", timeout=0.2)


@pytest.mark.parametrize(
    ("responses", "message"),
    [
        pytest.param(good_stream()[:-1], "without a `completed`", id="no-completed"),
        pytest.param(good_stream()[:4], "ended while image 0 was incomplete", id="cut-off-image"),
        pytest.param([completed(0)], "without a `started`", id="no-started"),
    ],
)
def test_client_raises_protocol_errors(
    scripted: tuple[ScriptedServicer, str], responses: list[pb.GenerateResponse], message: str
) -> None:
    servicer, target = scripted
    servicer.responses = responses
    with autopipeline.Client(target) as client, pytest.raises(ProtocolError, match=message):
        client.generate("x")


def test_client_inspect(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    with autopipeline.Client(target) as client:
        info = client.inspect("tiny")
    assert servicer.requests[0].model == "tiny"
    assert info == server_info(inspect_response())


def test_async_client_mirrors_the_client(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted

    async def scenario() -> None:
        async with autopipeline.AsyncClient(target, metadata=[("authorization", "Bearer t")]) as client:
            servicer.responses = good_stream()
            result = await client.generate("x", num_images=2, seed=7)
            assert result.seeds == (7, 8)
            kinds = [type(event) async for event in client.stream("x", num_images=2)]
            assert kinds == [Queued, Started, Progress, GeneratedImage, GeneratedImage, Completed]
            assert (await client.inspect()).default_model == "tiny"

            servicer.responses, servicer.hold = good_stream()[:2], True
            async with client.stream("x") as events:
                assert isinstance(events, autopipeline.AsyncEventStream)
                async for event in events:
                    if isinstance(event, Started):
                        break
            assert await asyncio.to_thread(servicer.ended.wait, 5)
            with pytest.raises(TypeError, match="one prompt"):
                client.stream(["a", "b"])

            servicer.responses, servicer.hold, servicer.status = [], False, invalid_width_status()
            with pytest.raises(autopipeline.InvalidArgumentError) as caught:
                await client.generate("x")
            assert caught.value.field_violations[0].field == "width"
            assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)

    asyncio.run(scenario())
    assert all(metadata["authorization"] == "Bearer t" for metadata in servicer.metadata)


def test_async_client_runs_the_prompts_of_a_list_concurrently(
    scripted: tuple[ScriptedServicer, str],
) -> None:
    servicer, target = scripted
    servicer.responses = good_stream(num_images=1)
    # Each call waits until all three are in flight at once: only concurrent requests get through.
    servicer.gate = threading.Barrier(3)

    async def scenario() -> autopipeline.GenerationResult:
        async with autopipeline.AsyncClient(target) as client:
            return await client.generate(["a", "b", "c"], seed=5)

    result = asyncio.run(scenario())
    assert sorted((request.prompt, request.seed) for request in servicer.requests) == [
        ("a", 5),
        ("b", 6),
        ("c", 7),
    ]
    assert [summary.prompt for summary in result.requests] == ["a", "b", "c"]
    assert [(output.index, output.prompt_index) for output in result.outputs] == [(0, 0), (1, 1), (2, 2)]


def test_async_client_cancels_the_other_prompts_when_one_fails(
    scripted: tuple[ScriptedServicer, str],
) -> None:
    servicer, target = scripted
    # Both calls reach the server; "bad" then fails while "good" is held open.
    servicer.responses, servicer.hold = good_stream()[:2], True
    servicer.gate = threading.Barrier(2)
    servicer.fail_prompts = {"bad": invalid_width_status()}

    async def scenario() -> None:
        async with autopipeline.AsyncClient(target) as client:
            with pytest.raises(autopipeline.InvalidArgumentError):
                await client.generate(["good", "bad"])
            assert await asyncio.to_thread(servicer.saw_cancel.wait, 60), "the good call was not cancelled"

    asyncio.run(scenario())
    with pytest.raises(TypeError), autopipeline.Client(target) as client:
        # A list with a non-string fails before anything is sent.
        client.generate(["a", None])  # type: ignore[list-item]
    assert sorted(request.prompt for request in servicer.requests) == ["bad", "good"]


def test_cli_generate_writes_images(
    scripted: tuple[ScriptedServicer, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, target = scripted
    servicer.responses = good_stream()
    argv = ["--target", target, "generate", "--prompt", "a cat", "--num-images", "2", "--seed", "7"]
    assert main([*argv, "--param", "eta=0.5", "-o", str(tmp_path / "out")]) == 0
    request = servicer.requests[0]
    assert (request.task, request.num_images, request.seed, dict(request.parameters)) == (
        pb.TASK_TEXT_TO_IMAGE,
        2,
        7,
        {"eta": 0.5},
    )
    captured = capsys.readouterr()
    paths = captured.out.split()
    assert paths == [str(tmp_path / "out" / "image-0-seed7.png"), str(tmp_path / "out" / "image-1-seed8.png")]
    assert all(pathlib.Path(path).read_bytes() == png(size=(16, 16)) for path in paths)
    assert "completed in" in captured.err


def test_cli_generate_to_one_file_infers_task_and_format(
    scripted: tuple[ScriptedServicer, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, target = scripted
    servicer.responses = good_stream(num_images=1)
    source = tmp_path / "in.png"
    source.write_bytes(png())
    out = tmp_path / "nested" / "cat.jpg"
    assert (
        main(["--target", target, "generate", "--prompt", "a cat", "--image", str(source), "-o", str(out)])
        == 0
    )
    request = servicer.requests[0]
    assert (request.task, request.output_format, request.image.data) == (
        pb.TASK_IMAGE_TO_IMAGE,
        pb.IMAGE_FORMAT_JPEG,
        png(),
    )
    assert capsys.readouterr().out.split() == [str(out)]
    assert out.exists()


def test_cli_reports_errors(
    scripted: tuple[ScriptedServicer, str], capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, target = scripted
    servicer.status = invalid_width_status()
    assert main(["--target", target, "generate", "--prompt", "x", "--width", "100"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: INVALID_ARGUMENT (INVALID_REQUEST): width must be a multiple of 8",
        "  width: must be a multiple of 8",
    ]


@pytest.mark.parametrize("flag", ["--image", "--mask"])
def test_cli_names_a_missing_input_file(
    flag: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.png"
    present = tmp_path / "present.png"
    present.write_bytes(png())
    other = "--mask" if flag == "--image" else "--image"
    argv = ["--target", "127.0.0.1:1", "generate", "--prompt", "x", flag, str(missing), other, str(present)]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"error: {flag} {missing}: No such file or directory\n"


def test_cli_connection_failure_asks_whether_the_server_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing listens on port 1; the default retries end after well under a second.
    assert main(["--target", "127.0.0.1:1", "inspect"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error: UNAVAILABLE: ")
    assert lines[1:] == ["  is the server running at 127.0.0.1:1?"]


def test_cli_inspect(scripted: tuple[ScriptedServicer, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, target = scripted
    assert main(["--target", target, "inspect"]) == 0
    assert "tiny (default): ready" in capsys.readouterr().out
    assert main(["--target", target, "inspect", "--model", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["name"] == "tiny"
