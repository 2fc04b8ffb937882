"""The OpenAI-compatible HTTP door, driven by the official `openai` client against a real server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import openai
import PIL.Image
import pytest

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.cli import build_parser
from autopipeline_server.errors import InvalidRequest
from autopipeline_server.openai_http import openai_mask_to_ours
from autopipeline_server.settings import ConfigError, Limits, ModelSpec, Settings, load_settings

from .support import ServerThread, fault_in_denoiser, png_bytes

STEPS = {"num_inference_steps": 2}
TOKEN = "door-token-1"
MAX_REQUEST_BYTES = 256 * 1024


def _settings(checkpoints: dict[str, Path], **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "models": (ModelSpec("sd15", str(checkpoints["sd15"])), ModelSpec("ddpm", str(checkpoints["ddpm"]))),
        "host": "127.0.0.1",
        "port": 0,
        "http_port": 0,
        "device": "cpu",
        "grace": 5.0,
        "max_queue": 1,
        "limits": Limits(max_num_images=4, max_request_bytes=MAX_REQUEST_BYTES),
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="module")
def door(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    running = ServerThread(_settings(checkpoints))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def token_door(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    running = ServerThread(_settings(checkpoints, tokens=(TOKEN,)))
    yield running
    running.stop()


def _base_url(server: ServerThread) -> str:
    assert server.running.http_port
    return f"http://127.0.0.1:{server.running.http_port}/v1"


def _client(server: ServerThread, api_key: str = "unused") -> openai.OpenAI:
    # No retries: a test must see the first answer, and 429/503 would otherwise be retried.
    return openai.OpenAI(base_url=_base_url(server), api_key=api_key, max_retries=0)


@pytest.fixture
def client(door: ServerThread) -> Iterator[openai.OpenAI]:
    with _client(door) as c:
        yield c


def _decode(b64: str | None) -> PIL.Image.Image:
    assert b64 is not None
    image = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _grpc_images(server: ServerThread, **fields: Any) -> list[bytes]:
    """The same request through the gRPC service: the door must return exactly these bytes."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        events = list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))
    images: dict[int, bytes] = {}
    for event in events:
        if event.HasField("image"):
            images[event.image.index] = images.get(event.image.index, b"") + event.image.image.data
    return [images[i] for i in sorted(images)]


def _rgba_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> bytes:
    """OpenAI's convention: opaque everywhere but a fully transparent `box`, the area to edit."""
    mask = PIL.Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return png_bytes(mask)


def _our_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> bytes:
    mask = PIL.Image.new("L", size, 0)
    mask.paste(255, box)
    return png_bytes(mask)


def _raw(
    server: ServerThread, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A plain HTTP request, for what the openai client will not send; (status, headers, JSON body)."""
    request = urllib.request.Request(_base_url(server) + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


# ------------------------------------------------------------------------------------ generations


def test_generate_returns_n_pngs_of_the_requested_size(door: ServerThread, client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        prompt="a lighthouse",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={**STEPS, "seed": 7, "negative_prompt": "fog"},
    )
    assert raw.headers["x-request-id"]
    result = raw.parse()
    assert result.created > 0
    assert len(result.data) == 2
    for item, seed in zip(result.data, (7, 8), strict=True):
        image = _decode(item.b64_json)
        assert (image.format, image.size) == ("PNG", (64, 64))
        assert item.model_extra == {"seed": seed}
    expected = _grpc_images(
        door,
        task=pb.TASK_TEXT_TO_IMAGE,
        prompt="a lighthouse",
        negative_prompt="fog",
        num_images=2,
        width=64,
        height=64,
        seed=7,
        **STEPS,
    )
    assert [base64.b64decode(item.b64_json or "") for item in result.data] == expected


def test_output_format_and_default_response_format(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="x", size="64x64", output_format="jpeg", extra_body=STEPS)
    assert _decode(result.data[0].b64_json).format == "JPEG"


@pytest.mark.parametrize(
    ("arguments", "param", "code"),
    [
        ({"size": "65x64"}, "size", "invalid_request"),  # the service's rule (a multiple of 8)
        ({"size": "4096x64"}, "size", "invalid_request"),  # the service's limit
        ({"size": "large"}, "size", "invalid_request"),  # the door's syntax
        ({"n": 0}, "n", "invalid_request"),
        ({"n": 5}, "n", "invalid_request"),  # the server's max_num_images is 4
        ({"response_format": "url"}, "response_format", "invalid_request"),
        ({"extra_body": {"quality_boost": True}}, "quality_boost", "unknown_parameter"),
        ({"extra_body": {"guidance_scale": "high"}}, "guidance_scale", "invalid_request"),
        ({"extra_body": {"strength": 0.5}}, "strength", "unknown_parameter"),
        ({"extra_body": {"scheduler": "NoSuchScheduler"}}, "scheduler", "invalid_request"),
    ],
)
def test_bad_generations_are_bad_requests_naming_the_param(
    client: openai.OpenAI, arguments: dict[str, Any], param: str, code: str
) -> None:
    extra_body = {**STEPS, **arguments.pop("extra_body", {})}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", **{"size": "64x64", **arguments}, extra_body=extra_body)
    error = caught.value
    assert (error.status_code, error.param, error.code, error.type) == (
        400,
        param,
        code,
        "invalid_request_error",
    )
    assert error.response.headers["x-request-id"]


def test_url_is_refused_because_nothing_is_hosted(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not host files"):
        client.images.generate(prompt="x", size="64x64", response_format="url", extra_body=STEPS)


def test_every_problem_is_reported_at_once(door: ServerThread) -> None:
    body = json.dumps({"prompt": "x", "size": "big", "n": "two", "style": "vivid"}).encode()
    status, _, error = _raw(door, "/images/generations", body, {"Content-Type": "application/json"})
    assert status == 400
    assert error["error"]["param"] == "size"
    for name in ("size", "n", "style"):
        assert name in error["error"]["message"]


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"prompt"'])
def test_a_body_that_is_no_json_object_is_a_bad_request(door: ServerThread, body: bytes) -> None:
    status, _, error = _raw(door, "/images/generations", body, {"Content-Type": "application/json"})
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"


def test_user_is_accepted_and_nulls_are_absent(door: ServerThread) -> None:
    body = json.dumps({"prompt": "x", "size": "64x64", "user": "u-1", "seed": None, **STEPS}).encode()
    status, _, result = _raw(door, "/images/generations", body, {"Content-Type": "application/json"})
    assert status == 200, result
    assert len(result["data"]) == 1


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="x", model="dall-e-3", size="64x64", extra_body=STEPS)
    assert caught.value.code == "model_not_found"
    assert "sd15" in caught.value.message


def test_a_model_that_failed_to_load_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", model="ddpm", size="64x64", extra_body=STEPS)
    assert caught.value.code == "model_failed"


# ------------------------------------------------------------------------------------------ edits


@pytest.fixture(scope="module")
def photo() -> bytes:
    image = PIL.Image.new("RGB", (64, 64), (30, 120, 200))
    image.paste((240, 200, 40), (16, 16, 48, 48))
    return png_bytes(image)


def test_edit_without_a_mask_is_image_to_image(
    door: ServerThread, client: openai.OpenAI, photo: bytes
) -> None:
    result = client.images.edit(
        image=("photo.png", photo, "image/png"),
        prompt="at night",
        size="64x64",
        extra_body={**STEPS, "seed": 3, "strength": 0.5},
    )
    expected = _grpc_images(
        door,
        task=pb.TASK_IMAGE_TO_IMAGE,
        prompt="at night",
        image=pb.Image(data=photo),
        width=64,
        height=64,
        seed=3,
        strength=0.5,
        **STEPS,
    )
    assert [base64.b64decode(item.b64_json or "") for item in result.data] == expected
    assert _decode(result.data[0].b64_json).size == (64, 64)


def test_edit_with_a_mask_inpaints_its_transparent_area(
    door: ServerThread, client: openai.OpenAI, photo: bytes
) -> None:
    box = (8, 8, 40, 56)
    result = client.images.edit(
        image=("photo.png", photo, "image/png"),
        mask=("mask.png", _rgba_mask((64, 64), box), "image/png"),
        prompt="a window",
        n=2,
        size="64x64",
        extra_body={**STEPS, "seed": 11},
    )
    expected = _grpc_images(
        door,
        task=pb.TASK_INPAINTING,
        prompt="a window",
        image=pb.Image(data=photo),
        mask_image=pb.Image(data=_our_mask((64, 64), box)),
        num_images=2,
        width=64,
        height=64,
        seed=11,
        **STEPS,
    )
    assert [base64.b64decode(item.b64_json or "") for item in result.data] == expected


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (png_bytes(PIL.Image.new("L", (64, 64), 255)), "alpha channel"),
        (_rgba_mask((32, 32), (0, 0, 8, 8)), "size of image"),
        (b"not an image", "cannot be decoded"),
    ],
)
def test_a_bad_mask_is_a_bad_request(client: openai.OpenAI, photo: bytes, mask: bytes, message: str) -> None:
    with pytest.raises(openai.BadRequestError, match=message) as caught:
        client.images.edit(
            image=("photo.png", photo, "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt="x",
            extra_body=STEPS,
        )
    assert caught.value.param == "mask"


def test_an_edit_needs_an_image(door: ServerThread) -> None:
    boundary = "b0undary"
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--{boundary}--\r\n'
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, error = _raw(door, "/images/edits", body.encode(), headers)
    assert (status, error["error"]["param"]) == (400, "image")


def test_a_body_over_max_request_bytes_is_refused(client: openai.OpenAI) -> None:
    noise = PIL.Image.frombytes("RGB", (320, 320), random.Random(0).randbytes(320 * 320 * 3))
    big = png_bytes(noise)
    assert len(big) > MAX_REQUEST_BYTES
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.edit(image=("big.png", big, "image/png"), prompt="x")
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"


def _connect(server: ServerThread) -> socket.socket:
    """A plain TCP connection to the door, for exchanges no HTTP client would stage."""
    return socket.create_connection(("127.0.0.1", server.running.http_port or 0), timeout=60)


def _read_response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """The next response on a connection: (status, headers by lower-case name, body)."""
    status_line = stream.readline()
    assert status_line, "the server closed the connection"
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, stream.read(int(headers.get("content-length", 0)))


def test_the_rest_of_a_refused_body_is_drained_for_a_client_still_sending(door: ServerThread) -> None:
    # The race of a client still uploading when its 413 is written, made deterministic: the body's
    # rest is sent only once the 413 has been read. Closing with it unread would reset the
    # connection (and can lose the 413 of a client that reads only once it has sent everything);
    # the door reads and discards it instead, so the same connection serves the next request.
    declared, first = 2 * MAX_REQUEST_BYTES, MAX_REQUEST_BYTES + 1
    head = "POST /v1/images/generations HTTP/1.1\r\nHost: door\r\nContent-Type: application/json\r\n"
    with _connect(door) as sock, sock.makefile("rb") as stream:
        sock.sendall(f"{head}Content-Length: {declared}\r\n\r\n".encode() + b" " * first)
        status, headers, body = _read_response(stream)
        assert (status, json.loads(body)["error"]["code"]) == (413, "request_too_large")
        assert headers.get("connection", "").lower() != "close"
        sock.sendall(b" " * (declared - first))
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: door\r\n\r\n")
        status, _, body = _read_response(stream)
        assert (status, json.loads(body)["object"]) == (200, "list")


def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(door: ServerThread) -> None:
    # curl's way with large bodies: the headers ask first (Expect: 100-continue); no body follows.
    head = (
        "POST /v1/images/edits HTTP/1.1\r\nHost: door\r\nExpect: 100-continue\r\n"
        f"Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: {MAX_REQUEST_BYTES + 1}\r\n"
    )
    with _connect(door) as sock, sock.makefile("rb") as stream:
        sock.sendall(f"{head}\r\n".encode())
        status, headers, body = _read_response(stream)
    assert status == 413  # not 100 Continue
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert headers["connection"].lower() == "close"


def test_a_body_within_the_limit_is_continued(door: ServerThread) -> None:
    body = json.dumps({"prompt": "x", "n": "two"}).encode()
    head = "POST /v1/images/generations HTTP/1.1\r\nHost: door\r\nExpect: 100-continue\r\n"
    with _connect(door) as sock, sock.makefile("rb") as stream:
        sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        assert _read_response(stream)[0] == 100
        sock.sendall(body)
        status, _, answer = _read_response(stream)
    assert (status, json.loads(answer)["error"]["param"]) == (400, "n")


def test_the_mask_convention_is_converted() -> None:
    box = (2, 4, 6, 8)
    converted = PIL.Image.open(io.BytesIO(openai_mask_to_ours(_rgba_mask((10, 12), box), 10_000)))
    assert converted.mode == "L"
    assert converted.tobytes() == PIL.Image.open(io.BytesIO(_our_mask((10, 12), box))).tobytes()
    # A palette image with a transparent index carries its alpha in `info`.
    palette = PIL.Image.new("P", (4, 4), 1)
    palette.putpixel((0, 0), 0)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    converted = PIL.Image.open(io.BytesIO(openai_mask_to_ours(buffer.getvalue(), 100)))
    assert (converted.getpixel((0, 0)), converted.getpixel((1, 0))) == (255, 0)
    with pytest.raises(InvalidRequest, match="alpha"):
        openai_mask_to_ours(png_bytes(PIL.Image.new("RGB", (4, 4))), 100)


# ----------------------------------------------------------------------------------------- models


def test_models_lists_the_served_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models] == ["sd15", "ddpm"]
    assert {m.object for m in models} == {"model"}
    assert client.models.retrieve("sd15").id == "sd15"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_unknown_routes_get_openai_style_errors(door: ServerThread) -> None:
    status, _, error = _raw(door, "/chat/completions", b"{}", {"Content-Type": "application/json"})
    assert status == 404
    assert error["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------- auth


def test_a_call_without_a_token_is_unauthenticated(token_door: ServerThread) -> None:
    for path, body in (("/models", None), ("/images/generations", b'{"prompt": "x"}')):
        status, headers, error = _raw(token_door, path, body, {"Content-Type": "application/json"})
        assert status == 401
        assert error["error"]["type"] == "authentication_error"
        assert error["error"]["code"] == "unauthenticated"
        assert headers["x-request-id"]


def test_a_wrong_token_is_unauthenticated(token_door: ServerThread) -> None:
    with _client(token_door, api_key="wrong") as client, pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="x", size="64x64", extra_body=STEPS)


def test_the_api_key_is_sent_as_the_bearer_token(token_door: ServerThread) -> None:
    with _client(token_door, api_key=TOKEN) as client:
        result = client.images.generate(prompt="x", size="64x64", extra_body=STEPS)
        assert _decode(result.data[0].b64_json).size == (64, 64)
        assert [m.id for m in client.models.list()] == ["sd15", "ddpm"]


# ---------------------------------------------------------------------------- queue limits and drain


def _hold_first_step(server: ServerThread) -> tuple[threading.Event, threading.Event, Any]:
    """A fake, to hold a real call on its first step: (started, release, context manager)."""
    started, release = threading.Event(), threading.Event()

    def fault(calls: int) -> None:
        if calls == 1:
            started.set()
            assert release.wait(60), "the test never released the held call"

    return started, release, fault_in_denoiser(server, "sd15", fault)


def _wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    """Waits for a condition the test cannot be told about directly (not a fixed sleep)."""
    done = threading.Event()
    for _ in range(int(timeout * 100)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("condition never held")


def test_a_full_queue_is_429_with_retry_after(door: ServerThread, client: openai.OpenAI) -> None:
    started, release, holding = _hold_first_step(door)
    worker = door.running.worker
    with holding, ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(client.images.generate, prompt="a", size="64x64", extra_body=STEPS)
            assert started.wait(60)
            queued = pool.submit(client.images.generate, prompt="b", size="64x64", extra_body=STEPS)
            _wait_for(lambda: worker.queue_depth == 1)  # the queue (max_queue 1) is now full
            with pytest.raises(openai.RateLimitError) as caught:
                client.images.generate(prompt="c", size="64x64", extra_body=STEPS)
        finally:
            release.set()
        assert running.result(60).data and queued.result(60).data
    assert caught.value.code == "queue_full"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_a_caller_who_hangs_up_cancels_its_work(door: ServerThread, client: openai.OpenAI) -> None:
    started, release, holding = _hold_first_step(door)
    worker = door.running.worker
    cancelled_before = worker.stats.cancelled_queued
    body = json.dumps({"prompt": "hang up", "size": "64x64", **STEPS}).encode()
    head = "POST /v1/images/generations HTTP/1.1\r\nHost: door\r\nContent-Type: application/json\r\n"
    with holding, ThreadPoolExecutor(1) as pool:
        try:
            running = pool.submit(client.images.generate, prompt="a", size="64x64", extra_body=STEPS)
            assert started.wait(60)
            with socket.create_connection(("127.0.0.1", door.running.http_port or 0)) as sock:
                sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                _wait_for(lambda: worker.queue_depth == 1)
            # The connection is gone: its request leaves the queue without ever running.
            _wait_for(lambda: worker.stats.cancelled_queued == cancelled_before + 1)
        finally:
            release.set()
        assert running.result(60).data


def test_draining_refuses_new_requests_and_finishes_those_in_flight(checkpoints: dict[str, Path]) -> None:
    server = ServerThread(_settings(checkpoints))
    started, release, holding = _hold_first_step(server)
    try:
        with holding, _client(server) as client, ThreadPoolExecutor(1) as pool:
            try:
                in_flight = pool.submit(client.images.generate, prompt="a", size="64x64", extra_body=STEPS)
                assert started.wait(60)
                stopping: Future[None] = asyncio.run_coroutine_threadsafe(
                    server.running.stop(60), server.loop
                )
                _wait_for(lambda: _raw(server, "/models")[0] == 503)
                with pytest.raises(openai.InternalServerError) as caught:
                    client.images.generate(prompt="late", size="64x64", extra_body=STEPS)
            finally:
                release.set()
            assert len(in_flight.result(60).data) == 1
            stopping.result(60)
        assert (caught.value.status_code, caught.value.code) == (503, "shutting_down")
    finally:
        server.close_loop()


# --------------------------------------------------------------------------------------- settings


def test_http_port_is_off_by_default_and_follows_the_precedence_chain(tmp_path: Path) -> None:
    model = {"models": "m=/models/m"}
    assert load_settings(model, {}).http_port is None
    config = tmp_path / "server.toml"
    config.write_text("http_port = 8081\n")
    assert load_settings(model, {}, config_file=config).http_port == 8081
    environ = {"AUTOPIPELINE_HTTP_PORT": "8082"}
    assert load_settings(model, environ, config_file=config).http_port == 8082
    assert load_settings({**model, "http_port": 0}, environ, config_file=config).http_port == 0
    args = build_parser().parse_args(["serve", "--model", "m=/models/m", "--http-port", "0"])
    assert args.http_port == 0
    for bad in ({"http_port": 70000}, {"http_port": 50051, "port": 50051}):
        with pytest.raises(ConfigError, match="http_port"):
            load_settings({**model, **bad}, {})
    with pytest.raises(ConfigError, match="http_port"):
        load_settings(model, {"AUTOPIPELINE_HTTP_PORT": "eighty"})
    example = (Path(__file__).parents[1] / "examples" / "config.toml").read_text()
    assert "# http_port = 8080" in example
    config.write_text(example.replace("# http_port = 8080", "http_port = 8080"))
    assert load_settings(model, {}, config_file=config).http_port == 8080
