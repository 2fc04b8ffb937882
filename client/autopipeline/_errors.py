"""The SDK's exceptions, and the one place that maps gRPC errors to them.

Every failure of a call raises a subclass of `AutoPipelineError`; the class follows the gRPC
status code, `reason` is the server's stable ``ErrorInfo`` reason::

    AutoPipelineError                 message, code, reason, domain, metadata,
    │                                 field_violations, retry_after, request_id
    ├── InvalidArgumentError          INVALID_ARGUMENT, OUT_OF_RANGE
    ├── NotFoundError                 NOT_FOUND            (MODEL_NOT_FOUND)
    ├── FailedPreconditionError       FAILED_PRECONDITION  (TASK_NOT_SUPPORTED, MODEL_FAILED)
    ├── ResourceExhaustedError        RESOURCE_EXHAUSTED   (QUEUE_FULL, OUT_OF_MEMORY)
    ├── UnavailableError              UNAVAILABLE          (MODEL_LOADING, SHUTTING_DOWN, no connection)
    ├── DeadlineExceededError         DEADLINE_EXCEEDED
    ├── GenerationCancelledError      CANCELLED
    ├── UnauthenticatedError          UNAUTHENTICATED      (UNAUTHENTICATED: bad or missing token)
    ├── PermissionDeniedError         PERMISSION_DENIED
    ├── InternalError                 INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, ABORTED,
    │                                 ALREADY_EXISTS and any code not listed above
    └── ProtocolError                 raised by the SDK itself: the server's stream broke the
                                      contract (no ``completed``, image chunks out of order, ...)

Example:
    >>> try:
    ...     client.generate("a red cube", width=1000)
    ... except InvalidArgumentError as err:
    ...     print(err.reason, [(v.field, v.description) for v in err.field_violations])
    INVALID_REQUEST [('width', 'must be a multiple of 8')]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "AutoPipelineError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "GenerationCancelledError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One request field at fault and why (from ``google.rpc.BadRequest``).

    Example:
        >>> err.field_violations
        [FieldViolation(field='width', description='must be a multiple of 8')]
    """

    field: str
    description: str


class AutoPipelineError(Exception):
    """The base of every exception the SDK raises; ``str(err)`` is the message.

    Example:
        >>> try:
        ...     client.generate("a red cube", model="nope")
        ... except AutoPipelineError as err:
        ...     print(err.code, err.reason, err.message)
        NOT_FOUND MODEL_NOT_FOUND no model named 'nope'
    """

    message: str
    """What went wrong, as the server (or the SDK) said it."""
    code: str
    """The gRPC status code name, e.g. ``"INVALID_ARGUMENT"``."""
    reason: str | None
    """The server's stable UPPER_SNAKE ``ErrorInfo`` reason, e.g. ``"QUEUE_FULL"``."""
    domain: str | None
    """The ``ErrorInfo`` domain, ``"autopipeline.v1"`` for this server's own errors."""
    metadata: dict[str, str]
    """The ``ErrorInfo`` metadata."""
    field_violations: list[FieldViolation]
    """The request fields at fault (``BadRequest``)."""
    retry_after: float | None
    """Seconds to wait before retrying (``RetryInfo``), when retrying may succeed."""
    request_id: str | None
    """The id the server logged the request under, to quote when reporting a problem."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "UNKNOWN",
        reason: str | None = None,
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.retry_after = retry_after
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, reason={self.reason!r}, message={self.message!r})"


class InvalidArgumentError(AutoPipelineError):
    """The request is malformed or out of range; `field_violations` names the fields."""


class NotFoundError(AutoPipelineError):
    """The request names a model the server does not serve."""


class FailedPreconditionError(AutoPipelineError):
    """The model cannot do what was asked: it lacks the task, or it failed to load."""


class ResourceExhaustedError(AutoPipelineError):
    """The queue is full or the device ran out of memory; see `retry_after`."""


class UnavailableError(AutoPipelineError):
    """The server cannot be reached, the model is still loading, or the server is draining."""


class DeadlineExceededError(AutoPipelineError):
    """The call's timeout passed before it finished."""


class GenerationCancelledError(AutoPipelineError):
    """The call was cancelled (gRPC ``CANCELLED``).

    Named apart from `asyncio.CancelledError`, which an asyncio task cancelled by its caller raises.
    """


class UnauthenticatedError(AutoPipelineError):
    """The call's credentials were missing or rejected."""


class PermissionDeniedError(AutoPipelineError):
    """The caller may not do this."""


class InternalError(AutoPipelineError):
    """A server bug or an unexpected status; quote `request_id` when reporting it."""


class ProtocolError(AutoPipelineError):
    """The server's response broke the autopipeline.v1 contract; raised by the SDK, never sent."""

    def __init__(self, message: str) -> None:
        # No status code applies to a broken stream; the reason lets callers and the CLI tell it apart.
        super().__init__(message, code="UNKNOWN", reason="PROTOCOL_ERROR")


_CLASS_BY_CODE: dict[str, type[AutoPipelineError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": GenerationCancelledError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
}


def from_rpc_error(err: grpc.RpcError) -> AutoPipelineError:
    """Maps a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`) to its `AutoPipelineError`.

    The caller raises the result ``from err``.
    """
    code = err.code()
    code_name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details: dict[str, Any] = {}
    status = _rich_status(err)
    if status is not None:
        details = _unpack_details(status)
    if details.get("request_id") is None:
        details["request_id"] = _trailing_metadata(err).get("x-request-id")
    cls = _CLASS_BY_CODE.get(code_name, InternalError)
    return cls(err.details() or code_name, code=code_name, **details)


def _trailing_metadata(err: grpc.RpcError) -> dict[str, str]:
    """The text entries of the trailing metadata (binary ``-bin`` entries are left out)."""
    # grpc-stubs types the entries as `_Metadatum`; at run time both sync and aio give (key, value) pairs.
    entries = cast("Iterable[tuple[str, str | bytes]]", err.trailing_metadata() or ())
    return {key: value for key, value in entries if isinstance(value, str)}


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` from the trailers, or None when absent or unreadable."""
    try:
        # from_call reads only code(), details() and trailing_metadata(), which both
        # grpc.RpcError calls and grpc.aio.AioRpcError provide.
        status: status_pb2.Status | None = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, DecodeError):
        # A status that contradicts the call's code or message is not to be trusted; the code still is.
        return None
    return status


def _unpack_details(status: status_pb2.Status) -> dict[str, Any]:
    """The keyword arguments of `AutoPipelineError` that the status details carry."""
    details: dict[str, Any] = {}
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            details.update(
                reason=info.reason or None,
                domain=info.domain or None,
                metadata=dict(info.metadata),
                request_id=info.metadata.get("request_id"),
            )
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            details["field_violations"] = [
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            ]
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            details["retry_after"] = retry.retry_delay.ToTimedelta().total_seconds()
    return details
