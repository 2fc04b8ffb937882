"""An OpenAI-compatible HTTP door: images and models endpoints served through our own gRPC service.

The door owns only translation. Each HTTP request becomes an autopipeline.v1 request sent, with the
caller's `Authorization` header as metadata (as grpc-gateway does), over a private Unix socket of
the very same gRPC server; so validation, limits, auth, queueing and draining are the service's,
and its status (code, ErrorInfo, BadRequest, RetryInfo) is turned into an OpenAI-style JSON error.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import re
import shutil
import socket
import ssl
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from aiohttp import HttpVersion11, hdrs, web
from google.rpc import error_details_pb2, status_pb2
from multidict import MultiDictProxy

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.auth import AUTHORIZATION_KEY
from autopipeline_server.codecs import decode_image
from autopipeline_server.errors import InvalidRequest, ServingError, ShuttingDown, Violations
from autopipeline_server.settings import Settings
from autopipeline_server.status import REQUEST_ID_KEY, to_status

log = logging.getLogger(__name__)

OWNED_BY = "autopipeline"
_DETAILS_KEY = "grpc-status-details-bin"
# How long in-flight HTTP requests may take to finish once the worker has drained.
_SHUTDOWN_SECONDS = 5.0
# How long the rest of a body answered before it was read (a 413 once max_request_bytes is passed)
# is read and discarded before the connection is closed (aiohttp's lingering close). Closing with
# unread data would reset the connection, and a client still uploading could lose its answer; a
# client that sends on and on is cut off after this.
_DRAIN_SECONDS = 10.0

# grpc-gateway's mapping of canonical codes to HTTP statuses (runtime.HTTPStatusFromCode).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# The OpenAI error `type` for an HTTP status.
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}

# Request fields the service names differently from the OpenAI API, for `error.param`.
_PARAMS = {"num_images": "n", "width": "size", "height": "size", "mask_image": "mask"}

# The body fields each endpoint takes, with their JSON types; anything else is refused (400) rather
# than ignored, as the service refuses fields it would not use. `user` (OpenAI's end-user id for
# abuse monitoring) is accepted and not used: it does not change the images.
_GENERATION_FIELDS: dict[str, type] = {
    "prompt": str,
    "model": str,
    "n": int,
    "size": str,
    "response_format": str,
    "output_format": str,
    "user": str,
    # Extensions from the Stable Diffusion world (send them with the OpenAI SDK's `extra_body`).
    "negative_prompt": str,
    "seed": int,
    "num_inference_steps": int,
    "guidance_scale": float,
    "scheduler": str,
}
_EDIT_FIELDS: dict[str, type] = {**_GENERATION_FIELDS, "strength": float}
_FILE_FIELDS = ("image", "mask")

_OUTPUT_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "webp": pb.IMAGE_FORMAT_WEBP}
_SIZE = re.compile(r"^(\d{1,9})x(\d{1,9})$")
# What gRPC accepts as a metadata value; anything else is not forwarded.
_METADATA_VALUE = re.compile(r"^[\x20-\x7e]*$")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number"}
# OpenAI's mask marks the area to edit with alpha 0; ours paints it white on black.
_ALPHA_TO_MASK = [255] + [0] * 255

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (key, value) pairs; grpc-stubs type each pair as its own Metadatum class.
Metadata = Iterable[Any]


class OpenAIDoor:
    """Serves the OpenAI images API over HTTP by calling this server's own gRPC service.

    Construct it before the gRPC server starts (it adds a private port to it), then `start`.
    """

    def __init__(self, settings: Settings, server: grpc.aio.Server) -> None:
        self._settings = settings
        # A directory only this user can enter holds the socket; auth is still the interceptor's.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="autopipeline-http-"))
        self._target = f"unix:{self._socket_dir / 'grpc.sock'}"
        if server.add_insecure_port(self._target) == 0:
            raise OSError(f"cannot bind {self._target}")
        self._draining = False
        self._created = int(time.time())
        self._channel: grpc.aio.Channel | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Opens the channel and the HTTP listener; returns the bound HTTP port."""
        self._channel = grpc.aio.insecure_channel(self._target)
        self._stub = pb_grpc.AutoPipelineServiceStub(self._channel)
        app = web.Application(
            middlewares=[self._errors], client_max_size=self._settings.limits.max_request_bytes
        )
        app.router.add_post("/v1/images/generations", self._generations, expect_handler=self._expect)
        app.router.add_post("/v1/images/edits", self._edits, expect_handler=self._expect)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        # Cancelling the handler when its client disconnects cancels the gRPC call, and so the work.
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_SECONDS,
            lingering_time=_DRAIN_SECONDS,
        )
        await self._runner.setup()
        sock = _listen(self._settings.host, self._settings.http_port or 0)
        site = web.SockSite(self._runner, sock, ssl_context=_tls_context(self._settings))
        await site.start()
        self.port = sock.getsockname()[1]
        return self.port

    def start_draining(self) -> None:
        """New HTTP requests get 503 from now on; those in flight go on."""
        self._draining = True

    async def close(self) -> None:
        """Stops listening, lets in-flight requests finish, closes the channel and the socket directory."""
        self._draining = True
        if self._runner is not None:
            await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close(None)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------ handlers

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError as err:
            raise InvalidRequest(f"the body must be a JSON object ({err})") from err
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        values = {key: value for key, value in body.items() if value is not None}
        message = generate_request(values, _GENERATION_FIELDS, task=pb.TASK_TEXT_TO_IMAGE, from_text=False)
        return await self._generate(request, message)

    async def _edits(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "multipart/form-data":
            raise InvalidRequest("images/edits takes a multipart/form-data body, as OpenAI's API does")
        form = await request.post()
        files = {name: _one_file(form, name) for name in _FILE_FIELDS}
        texts = {key: value for key, value in form.items() if key not in (*_FILE_FIELDS, "image[]")}
        for key, value in texts.items():
            if not isinstance(value, str):
                raise InvalidRequest.field(key, "must be a text field, not a file")
        task = pb.TASK_INPAINTING if files["mask"] is not None else pb.TASK_IMAGE_TO_IMAGE
        message = generate_request(texts, _EDIT_FIELDS, task=task, from_text=True)
        if files["image"] is None:
            raise InvalidRequest.field("image", "is required: the image to edit, as a file")
        message.image.data = files["image"]
        if files["mask"] is not None:
            message.mask_image.data = await asyncio.to_thread(
                openai_mask_to_ours, files["mask"], self._settings.limits.max_input_pixels
            )
        return await self._generate(request, message)

    async def _generate(self, request: web.Request, message: pb.GenerateRequest) -> web.StreamResponse:
        call = self._stub.Generate(message, metadata=_forwarded(request))
        images: dict[int, list[bytes]] = {}
        seeds: dict[int, int] = {}
        try:
            async for event in call:
                if event.WhichOneof("event") == "image":
                    images.setdefault(event.image.index, []).append(event.image.image.data)
                    seeds[event.image.index] = event.image.seed
        except grpc.aio.AioRpcError as err:
            return _grpc_error(err.code(), err.details() or "", err.trailing_metadata())
        finally:
            call.cancel()  # a no-op once the call has ended; otherwise the work stops
        data = [
            {"b64_json": base64.b64encode(b"".join(images[index])).decode("ascii"), "seed": seeds[index]}
            for index in sorted(images)
        ]
        return web.json_response(
            {"created": int(time.time()), "data": data},
            headers=_request_id_header(await call.initial_metadata()),
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        try:
            response = await self._stub.Inspect(pb.InspectRequest(), metadata=_forwarded(request))
        except grpc.aio.AioRpcError as err:
            return _grpc_error(err.code(), err.details() or "", err.trailing_metadata())
        return web.json_response({"object": "list", "data": [self._model_object(m) for m in response.models]})

    async def _model(self, request: web.Request) -> web.StreamResponse:
        inspect = pb.InspectRequest(model=request.match_info["model"])
        try:
            response = await self._stub.Inspect(inspect, metadata=_forwarded(request))
        except grpc.aio.AioRpcError as err:
            return _grpc_error(err.code(), err.details() or "", err.trailing_metadata())
        return web.json_response(self._model_object(response.models[0]))

    def _model_object(self, model: pb.ModelInfo) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": self._created, "owned_by": OWNED_BY}

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue` (curl's way with large bodies): a body declared over the limit is
        refused before the client sends it; any other gets aiohttp's usual 100 Continue.

        A client that does not ask first (the openai client) has its body read up to the limit
        instead: refusing it on the declared length alone would leave the whole body, rather than
        its excess, to the time-bounded drain (_DRAIN_SECONDS), which a slow upload may outlast.
        """
        if request.version != HttpVersion11:  # HTTP/1.0 has no 100 Continue: the body comes anyway
            return None
        expect = request.headers[hdrs.EXPECT]
        limit = self._settings.limits.max_request_bytes
        error: web.HTTPException
        if expect.lower() != "100-continue":
            error = web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
        elif request.content_length is not None and request.content_length > limit:
            error = web.HTTPRequestEntityTooLarge(limit, request.content_length)
        else:  # as aiohttp's own handler does
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
            return None
        response = _http_error(error, request)
        # The body is not coming, so the connection cannot carry another request (RFC 9110, 10.1.1).
        response.force_close()
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Draining, the door's own translation errors and HTTP errors, as OpenAI-style JSON errors."""
        try:
            if self._draining:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            return await handler(request)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            return _http_error(err, request)
        except Exception as err:  # ServingErrors are the caller's; anything else is a bug, logged once
            request_id = uuid.uuid4().hex
            status = to_status(err, request_id)
            if isinstance(err, ServingError):
                log.info("request %s %s: %s", request_id, status.code.name, status.details)
            response = _grpc_error(status.code, status.details or "", status.trailing_metadata)
            response.headers[REQUEST_ID_KEY] = request_id
            if isinstance(err, ShuttingDown):
                response.force_close()
            return response


# ---------------------------------------------------------------------------------------- translation


def generate_request(
    values: Mapping[str, Any], accepted: Mapping[str, type], *, task: pb.Task.ValueType, from_text: bool
) -> pb.GenerateRequest:
    """An autopipeline.v1 request from OpenAI body fields (JSON values, or text from a form).

    Only what the wire needs is checked here (types, `size` syntax, ranges a protobuf integer
    holds, the OpenAI-only `response_format`); every rule of the service stays the service's.
    All problems are reported at once.
    """
    message = pb.GenerateRequest(task=task)
    problems = Violations()
    for name, raw in values.items():
        try:
            if name not in accepted:
                raise InvalidRequest.field(
                    name,
                    f"is not a parameter of this endpoint; accepted: {', '.join(sorted(accepted))}",
                    reason="UNKNOWN_PARAMETER",
                )
            _apply(message, name, _typed(name, raw, accepted[name], from_text))
        except InvalidRequest as err:
            problems.caught(err)
    problems.raise_if_any()
    return message


def _typed(name: str, value: Any, kind: type, from_text: bool) -> Any:
    if from_text and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise InvalidRequest.field(name, f"must be {_TYPE_NAMES[kind]}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise InvalidRequest.field(name, f"must be {_TYPE_NAMES[kind]}, got {json.dumps(value)[:40]}")
    return value


def _apply(message: pb.GenerateRequest, name: str, value: Any) -> None:
    if name in ("prompt", "negative_prompt", "model", "scheduler"):
        setattr(message, name, value)
    elif name == "n":
        # 1 at least: the service reads 0 as "unset", so an explicit 0 must not become 1.
        message.num_images = _unsigned(name, value, minimum=1, bits=32)
    elif name == "size":
        match = _SIZE.match(value)
        if value != "auto" and not match:
            raise InvalidRequest.field(name, f"must be WIDTHxHEIGHT (e.g. 512x512) or auto, got {value!r}")
        if match:
            message.width, message.height = int(match.group(1)), int(match.group(2))
    elif name == "response_format":
        if value == "url":
            raise InvalidRequest.field(
                name, "url is not supported: this server does not host files; use b64_json"
            )
        if value != "b64_json":
            raise InvalidRequest.field(name, f"must be b64_json, got {value!r}")
    elif name == "output_format":
        if value not in _OUTPUT_FORMATS:
            raise InvalidRequest.field(name, f"must be png, jpeg or webp, got {value!r}")
        message.output_format = _OUTPUT_FORMATS[value]
    elif name in ("seed", "num_inference_steps"):
        setattr(message, name, _unsigned(name, value, minimum=0, bits=64 if name == "seed" else 32))
    elif name in ("guidance_scale", "strength"):
        setattr(message, name, value)
    # `user` is accepted and unused (see _GENERATION_FIELDS).


def _unsigned(name: str, value: int, *, minimum: int, bits: int) -> int:
    if not minimum <= value < 2**bits:
        raise InvalidRequest.field(name, f"must be between {minimum} and {2**bits - 1}, got {value}")
    return value


def _one_file(form: MultiDictProxy[Any], name: str) -> bytes | None:
    """The bytes of the one file under `name` (the SDK sends `image[]` for lists); None when absent."""
    parts = [*form.getall(name, []), *(form.getall(f"{name}[]", []) if name == "image" else [])]
    if len(parts) > 1:
        raise InvalidRequest.field(name, "takes one file; this server edits one image per request")
    if not parts:
        return None
    if not isinstance(parts[0], web.FileField):
        raise InvalidRequest.field(name, "must be a file upload")
    data: bytes = parts[0].file.read()
    return data


def openai_mask_to_ours(data: bytes, max_pixels: int) -> bytes:
    """OpenAI's mask (fully transparent pixels are edited) as ours (white repaints, black keeps), as PNG."""
    mask = decode_image(data, field="mask", max_pixels=max_pixels, mode=None)
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise InvalidRequest.field(
            "mask", "must have an alpha channel: its fully transparent pixels mark the area to edit"
        )
    ours = mask.convert("RGBA").getchannel("A").point(_ALPHA_TO_MASK)
    buffer = io.BytesIO()
    ours.save(buffer, format="PNG")
    return buffer.getvalue()


def _forwarded(request: web.Request) -> list[tuple[str, str]]:
    """The caller's credentials and request id as gRPC metadata, as grpc-gateway forwards them."""
    metadata: list[tuple[str, str]] = []
    for header, key in (("Authorization", AUTHORIZATION_KEY), ("X-Request-Id", REQUEST_ID_KEY)):
        # Every value is forwarded, so the interceptor sees what the caller sent (two are refused);
        # one gRPC cannot carry is dropped, and a call left without credentials is refused as such.
        values = request.headers.getall(header, [])
        metadata.extend((key, value) for value in values if _METADATA_VALUE.match(value))
    return metadata


# ---------------------------------------------------------------------------------------- errors


def _grpc_error(code: grpc.StatusCode, message: str, trailing: Metadata | None) -> web.Response:
    """The OpenAI-style error for a gRPC status, its google.rpc details and request id included."""
    reason = param = None
    retry_after: int | None = None
    headers = _request_id_header(trailing)
    for key, value in trailing or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                if bad_request.field_violations:
                    field = bad_request.field_violations[0].field
                    param = _PARAMS.get(field, field)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = max(1, math.ceil(retry.retry_delay.ToNanoseconds() / 1e9))
    status = HTTP_STATUS.get(code, 500)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and reason is None:
        # gRPC's own message-size limit, not our queue: retrying the same request cannot help.
        status = 413
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    code_name = (reason or code.name).lower()
    return _json_error(status, message, param=param, code=code_name, headers=headers)


def _http_error(err: web.HTTPException, request: web.Request) -> web.Response:
    """The OpenAI-style error for one of aiohttp's HTTP errors (413, 404, 405, ...)."""
    code = "request_too_large" if err.status == 413 else err.reason.lower().replace(" ", "_")
    message = err.text or err.reason
    if err.status in (404, 405):
        message = f"{err.reason}: {request.method} {request.path}"
    return _json_error(err.status, message, param=None, code=code)


def _json_error(
    status: int, message: str, *, param: str | None, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _request_id_header(metadata: Metadata | None) -> dict[str, str]:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return {REQUEST_ID_KEY: value}
    return {}


# ---------------------------------------------------------------------------------------- transport


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; "[::]" takes IPv4 as well on the same port, as gRPC's listener does."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    """HTTPS with the gRPC listener's certificate, and its client CA for mutual TLS; None without TLS."""
    if not settings.tls_cert_file:
        return None
    # Not create_default_context: for CLIENT_AUTH it would also trust the system's CAs for clients.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=settings.tls_client_ca_file)
    return context
