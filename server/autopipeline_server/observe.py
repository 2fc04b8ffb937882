"""The access layer: every AutoPipelineService RPC gets a request id, one access log line, metrics and spans.

`AccessInterceptor` wraps each RPC of our service. It takes the caller's `x-request-id` when it is
acceptable (else mints one) and starts a `RequestRecord`, which the servicer finds with
`current_request()` and fills in as it learns the model, the task, the queued job and the encoding
time. When the RPC ends, however it ends, the record's outcome is turned into metrics
(`metrics.py`), spans (`tracing.py`) and one log line whose fields JSON logging keeps.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio

from autopipeline_server.status import REQUEST_ID_KEY

if TYPE_CHECKING:
    from autopipeline_server.metrics import ServerMetrics
    from autopipeline_server.tracing import Tracing
    from autopipeline_server.worker import Job

    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
    StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

log = logging.getLogger("autopipeline_server.access")

# A caller's id is used as sent only when it is printable ASCII without spaces and at most 128
# characters: it goes into log lines and error details, where anything else could mislead a reader.
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(metadata: Iterable[Any] | None) -> str:
    """The caller's `x-request-id` if it is acceptable (see `_REQUEST_ID`), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return value if isinstance(value, str) and _REQUEST_ID.match(value) else new_request_id()
    return new_request_id()


@dataclass
class RequestRecord:
    """What the access line, the metrics and the spans of one RPC say; the servicer fills it in."""

    rpc: str
    request_id: str
    arrived: float = field(default_factory=time.perf_counter)
    model: str = ""
    task: str = ""
    job: Job | None = None
    # perf_counter readings around encoding the result images
    encoding: tuple[float, float] | None = None
    # The RPC's server span when tracing (tracing.py); kept because the record may be finished
    # outside the RPC's context (see `_outcome`).
    span: Any = None


_current: contextvars.ContextVar[RequestRecord] = contextvars.ContextVar("autopipeline_request")


def current_request() -> RequestRecord:
    """The record of the RPC this task handles (each gRPC call runs in its own task).

    Outside the access layer (a servicer called directly) it is a fresh record with a new id.
    """
    try:
        return _current.get()
    except LookupError:
        record = RequestRecord(rpc="", request_id=new_request_id())
        _current.set(record)
        return record


def _outcome(context: Context, error: BaseException | None) -> tuple[grpc.StatusCode, str]:
    """The status an RPC ended with: what the servicer set or aborted with, or why it was cancelled.

    A cancelled call either cancels the handler's task (CancelledError) or, when the handler was
    suspended between two responses, leaves its generator to be closed later (GeneratorExit), from
    the event loop's finaliser: in another context, after the server span has ended.
    """
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED), ""
    code = context.code()
    details = context.details() or ""
    if isinstance(code, grpc.StatusCode) and (error is None or code is not grpc.StatusCode.OK):
        return code, details if isinstance(details, str) else details.decode(errors="replace")
    # An exception that escaped the servicer: gRPC answers it with UNKNOWN.
    return (grpc.StatusCode.OK, "") if error is None else (grpc.StatusCode.UNKNOWN, "")


class AccessInterceptor(_ServerInterceptor):
    """Wraps the RPCs of one service with request ids, access logs, metrics and spans."""

    def __init__(self, service: str, *, metrics: ServerMetrics | None, tracing: Tracing | None) -> None:
        self._prefix = f"/{service}/"
        self._metrics = metrics
        self._tracing = tracing

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        rpc = details.method[len(self._prefix) :]
        request_id = request_id_from(details.invocation_metadata)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                # grpc-stubs describe the sync server's behaviours; on grpc.aio they are coroutines.
                self._unary(cast("UnaryBehavior", handler.unary_unary), rpc, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(cast("StreamBehavior", handler.unary_stream), rpc, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Our RPCs take one request, but are registered as request-streaming so that admission
        # decides when a body is read (see `admission.Admission`).
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(cast("UnaryBehavior", handler.stream_unary), rpc, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            behavior = cast("Any", handler.stream_stream)
            # A handler that writes its responses (context.write) is a coroutine, not a generator;
            # it is presented as a generator that yields nothing, as gRPC and OpenTelemetry expect.
            wrapped = (
                self._streaming(behavior, rpc, request_id)
                if inspect.isasyncgenfunction(behavior)
                else self._writing(behavior, rpc, request_id)
            )
            return grpc.stream_stream_rpc_method_handler(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, behavior: UnaryBehavior, rpc: str, request_id: str) -> UnaryBehavior:
        async def observed(request: Any, context: Context) -> Any:
            record = self._start(rpc, request_id)
            try:
                response = await behavior(request, context)
            except BaseException as err:
                self._finish(record, context, err)
                raise
            self._finish(record, context, None)
            return response

        return observed

    def _streaming(self, behavior: StreamBehavior, rpc: str, request_id: str) -> StreamBehavior:
        async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
            record = self._start(rpc, request_id)
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as err:
                self._finish(record, context, err)
                raise
            self._finish(record, context, None)

        return observed

    def _writing(self, behavior: UnaryBehavior, rpc: str, request_id: str) -> StreamBehavior:
        async def observed(request: Any, context: Context) -> AsyncIterator[Any]:
            record = self._start(rpc, request_id)
            try:
                await behavior(request, context)
            except BaseException as err:
                self._finish(record, context, err)
                raise
            self._finish(record, context, None)
            return
            yield  # pragma: no cover  # an async generator; the responses went out through context.write

        return observed

    def _start(self, rpc: str, request_id: str) -> RequestRecord:
        record = RequestRecord(rpc=rpc, request_id=request_id)
        _current.set(record)
        if self._tracing is not None:
            self._tracing.start_request(record)
        return record

    def _finish(self, record: RequestRecord, context: Context, error: BaseException | None) -> None:
        """Records how the RPC ended; never raises, so it cannot change the caller's status."""
        try:
            status, details = _outcome(context, error)
            now = time.perf_counter()
            code = status.name
            if self._tracing is not None:
                self._tracing.finish_request(record, code, now)
            job = record.job
            images = job.images if job is not None and status is grpc.StatusCode.OK else 0
            if self._metrics is not None:
                self._metrics.request_finished(
                    rpc=record.rpc,
                    task=record.task,
                    model=record.model,
                    code=code,
                    seconds=now - record.arrived,
                    images=images,
                )
            _log_access(record, code, details, now, images, self._tracing)
        except Exception:
            log.exception("request %s: recording its outcome failed", record.request_id)


def _log_access(
    record: RequestRecord, code: str, details: str, now: float, images: int, tracing: Tracing | None
) -> None:
    """One line per RPC; its fields (see README "Metrics and tracing") are kept by JSON logging."""
    fields: dict[str, Any] = {"request_id": record.request_id, "rpc": record.rpc, "status": code}
    if record.model:
        fields["model"] = record.model
    if record.task:
        fields["task"] = record.task
    job = record.job
    if job is not None:
        fields["images"] = images
        fields["width"], fields["height"] = job.call.width, job.call.height
        fields["pipeline_class"] = job.call.target.pipeline_class
        fields["queued_seconds"] = (job.started if job.started is not None else now) - job.arrived
        if job.started is not None:
            fields["running_seconds"] = (job.finished if job.finished is not None else now) - job.started
    if record.encoding is not None:
        fields["encoding_seconds"] = record.encoding[1] - record.encoding[0]
    fields["total_seconds"] = now - record.arrived
    if details:
        fields["details"] = details
    trace_id = tracing.trace_id(record) if tracing is not None else None
    if trace_id is not None:
        fields["trace_id"] = trace_id
    text = " ".join(
        f"{key}={value:.3f}s" if key.endswith("_seconds") else f"{key}={value}"
        for key, value in fields.items()
        if key not in ("request_id", "rpc", "status", "details")
    )
    message = f"request {record.request_id} {record.rpc} {code}: {text}"
    log.info(message + (f"; {details}" if details else ""), extra=fields)
