"""autopipeline: a typed client for autopipeline-grpc, image generation with diffusers' AutoPipeline.

Example:
    >>> from autopipeline import Client
    >>> with Client("localhost:50051") as client:
    ...     client.generate("a lighthouse at dawn", seed=1).images[0].save("lighthouse.png")
"""

from __future__ import annotations

from autopipeline._client import AsyncClient, Client
from autopipeline._credentials import tls_credentials
from autopipeline._errors import (
    AutoPipelineError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
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
    "AutoPipelineError",
    "CancelledError",
    "Client",
    "Completed",
    "DeadlineExceededError",
    "Event",
    "FailedPreconditionError",
    "FieldViolation",
    "GeneratedImage",
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
