"""autopipeline: a typed client for autopipeline-grpc, image generation with diffusers' AutoPipeline.

Example:
    >>> from autopipeline import Client
    >>> with Client("localhost:50051") as client:
    ...     result = client.generate("a lighthouse at dawn", seed=1)
    ...     result.images[0].save("lighthouse.png")  # a PIL image, as `pipe(...).images[0]` in diffusers
    ...     result.outputs[0].seed
    1
"""

from __future__ import annotations

from autopipeline._client import AsyncClient, AsyncEventStream, Client, EventStream
from autopipeline._credentials import tls_credentials
from autopipeline._errors import (
    AutoPipelineError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    GenerationCancelledError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from autopipeline._retry import RetryPolicy
from autopipeline._types import (
    AdapterInfo,
    Completed,
    DeviceInfo,
    Event,
    GeneratedImage,
    GenerationResult,
    ImageFormat,
    ImageInput,
    Limits,
    ModelInfo,
    ModelState,
    ParameterInfo,
    Preview,
    Progress,
    Queued,
    RequestSummary,
    ServerInfo,
    ServerStats,
    Started,
    Task,
    TaskInfo,
    Timings,
)

__all__ = [
    "AdapterInfo",
    "AsyncClient",
    "AsyncEventStream",
    "AutoPipelineError",
    "Client",
    "Completed",
    "DeadlineExceededError",
    "DeviceInfo",
    "Event",
    "EventStream",
    "FailedPreconditionError",
    "FieldViolation",
    "GeneratedImage",
    "GenerationCancelledError",
    "GenerationResult",
    "ImageFormat",
    "ImageInput",
    "InternalError",
    "InvalidArgumentError",
    "Limits",
    "ModelInfo",
    "ModelState",
    "NotFoundError",
    "ParameterInfo",
    "PermissionDeniedError",
    "Preview",
    "Progress",
    "ProtocolError",
    "Queued",
    "RequestSummary",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServerInfo",
    "ServerStats",
    "Started",
    "Task",
    "TaskInfo",
    "Timings",
    "UnauthenticatedError",
    "UnavailableError",
    "tls_credentials",
]
