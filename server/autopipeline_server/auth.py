"""Bearer-token authentication: a server interceptor that turns away calls without a configured token."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from autopipeline_server.errors import Unauthenticated
from autopipeline_server.observe import current_request
from autopipeline_server.status import refuse

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
# Probes and tooling (load balancers, Kubernetes, grpcurl) reach these without a token; they
# reveal only whether the server serves and what the (public) contract is.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_MISSING = "missing credentials: send the metadata 'authorization: Bearer <token>'"
_REJECTED = "the bearer token was not accepted"

# grpc-stubs make these generic; the runtime classes are not subscriptable.
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


def _digest(token: str) -> bytes:
    # Comparing digests keeps the comparison constant-time even in the token's length.
    return hashlib.sha256(token.encode()).digest()


class BearerTokenInterceptor(_ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` naming one of ``tokens`` on every call but probes.

    A call without it ends with UNAUTHENTICATED (reason ``UNAUTHENTICATED``), decided from its
    metadata before its request body is read; the status never repeats what the caller sent.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(token) for token in tokens)
        if not self._digests:
            raise ValueError("BearerTokenInterceptor needs at least one token")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # No handler: gRPC answers UNIMPLEMENTED itself, which says nothing about our service.
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        problem = self._check(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        return _rejecting(handler, method, problem)

    def _check(self, metadata: Iterable[Any] | None) -> str | None:
        """None when the metadata carries an accepted token, else what is wrong with it."""
        values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
        if not values:
            return _MISSING
        if len(values) != 1 or not isinstance(values[0], str):
            return _REJECTED
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return _MISSING
        presented = _digest(token.strip())
        accepted = False
        # Every configured token is compared, so the time taken does not say which one came close.
        for digest in self._digests:
            accepted |= hmac.compare_digest(presented, digest)
        return None if accepted else _REJECTED


def _rejecting(handler: Handler, method: str, message: str) -> Handler:
    """A handler of ``handler``'s kind that ends the call with UNAUTHENTICATED."""

    def reject(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        request_id = current_request().request_id
        log.info("request %s: unauthenticated call to %s from %s", request_id, method, context.peer())
        refuse(context, Unauthenticated(message), request_id)

    async def unary(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        reject(context)

    async def streaming(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        reject(context)
        return
        yield  # pragma: no cover  # makes this an async generator, as streaming handlers are

    # Request-streaming whatever the method: gRPC then reads no request body before the handler
    # asks for one, and this one never does. (A unary-request handler would have gRPC receive the
    # whole message first: up to max_request_bytes per unauthenticated call.)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    return grpc.stream_unary_rpc_method_handler(unary)
