"""When the SDK retries a call: only before the server sent anything, boundedly, honouring RetryInfo."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from autopipeline._errors import AutoPipelineError, ResourceExhaustedError, UnavailableError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a `Client` retries calls that fail before their first event.

    Retried: ``UNAVAILABLE`` (the server is starting, draining, loading the model, or
    unreachable), with exponential backoff; and ``RESOURCE_EXHAUSTED`` when the server sent a
    ``RetryInfo`` (its queue is full, or the device ran out of memory), after at least the delay it
    asked for. Nothing is retried once the server has sent an event: the request may have run.
    A call's ``timeout`` bounds all its attempts together. ``RetryPolicy(max_attempts=1)``
    turns retries off.

    Example:
        >>> from autopipeline import Client, RetryPolicy
        >>> client = Client("localhost:50051", retry=RetryPolicy(max_attempts=5, max_backoff=10))
    """

    max_attempts: int = 3
    """Attempts in all, the first included."""
    initial_backoff: float = 0.25
    """Seconds before the first retry of an UNAVAILABLE call."""
    multiplier: float = 2.0
    """Growth of the backoff from one retry to the next."""
    max_backoff: float = 5.0
    """The longest wait before a retry; a RetryInfo asking for longer is not waited for."""
    jitter: float = 0.2
    """The backoff varies by up to this fraction, so clients do not retry in lockstep."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if (
            self.initial_backoff < 0
            or self.max_backoff < 0
            or self.multiplier < 1
            or not 0 <= self.jitter <= 1
        ):
            raise ValueError("backoffs must be >= 0, multiplier >= 1 and jitter in [0, 1]")

    def delay(self, attempt: int, error: AutoPipelineError) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` after ``error``, or None to give up."""
        if attempt >= self.max_attempts:
            return None
        backoff = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        backoff *= 1 + random.uniform(-self.jitter, self.jitter)
        if isinstance(error, UnavailableError):
            return max(backoff, error.retry_after or 0.0)
        if isinstance(error, ResourceExhaustedError) and error.retry_after is not None:
            if error.retry_after > self.max_backoff:
                return None
            # Never sooner than asked, but spread out: clients refused together retry apart.
            return max(error.retry_after, backoff) * (1 + random.uniform(0, self.jitter))
        return None


class Attempts:
    """Counts one call's attempts against its policy and its overall deadline."""

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.number = 1

    def timeout(self) -> float | None:
        """What is left of the call's timeout for this attempt."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def backoff(self, error: AutoPipelineError) -> float | None:
        """The wait before the next attempt, or None when ``error`` should be raised."""
        delay = self._policy.delay(self.number, error)
        if delay is None or (self._deadline is not None and time.monotonic() + delay >= self._deadline):
            return None
        self.number += 1
        return delay
