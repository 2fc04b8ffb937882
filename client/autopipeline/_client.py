"""`Client` and `AsyncClient`: the SDK's entry points, one blocking and one for asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc
import grpc.aio

from autopipeline._convert import (
    EventReader,
    GenerateCall,
    ResultCollector,
    generate_call,
    inspect_request,
    server_info,
)
from autopipeline._credentials import with_token
from autopipeline._errors import AutoPipelineError, from_rpc_error
from autopipeline._retry import Attempts, RetryPolicy
from autopipeline._types import Event, GenerationResult, ServerInfo
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "Client"]

DEFAULT_TARGET = "localhost:50051"

_P = ParamSpec("_P")
_Self = TypeVar("_Self")
_R = TypeVar("_R")


def _takes_arguments_of(
    template: Callable[_P, GenerateCall],
) -> Callable[[Callable[[_Self, GenerateCall], _R]], Callable[Concatenate[_Self, _P], _R]]:
    """Gives a method ``template``'s parameters; the method receives what ``template`` built.

    `Client` and `AsyncClient` each offer ``generate`` and ``stream`` with the same twenty
    keyword arguments: declaring them once, in `generate_call`, keeps the four in step.
    """

    def decorate(method: Callable[[_Self, GenerateCall], _R]) -> Callable[Concatenate[_Self, _P], _R]:
        @functools.wraps(method)
        def wrapper(self: _Self, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            return method(self, template(*args, **kwargs))

        # help(), IDEs and documentation tools read this rather than the (self, call) of `method`.
        template_signature = inspect.signature(template)
        self_parameter = next(iter(inspect.signature(method).parameters.values()))
        wrapper.__signature__ = template_signature.replace(  # type: ignore[attr-defined]
            parameters=[self_parameter, *template_signature.parameters.values()],
            return_annotation=inspect.signature(method).return_annotation,
        )
        return wrapper

    return decorate


_generate_arguments = _takes_arguments_of(generate_call)


@contextlib.contextmanager
def _sdk_errors(cancel: Callable[[], object] | None = None) -> Iterator[None]:
    """Raises gRPC errors as `AutoPipelineError`s; ``cancel``s the call however the block ends."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err
    finally:
        # After a normal end this is a no-op; after a break, an error or a close it stops the server's work.
        if cancel is not None:
            cancel()


class _BaseClient:
    """Settings shared by `Client` and `AsyncClient`; each opens its own kind of channel."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - immutable
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        credentials, self._metadata = with_token(credentials, tuple(metadata), token)
        self._connect(target, credentials, list(options))

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> None:
        raise NotImplementedError

    def _call_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _attempts(self, timeout: float | None) -> Attempts:
        return Attempts(self.retry, self._call_timeout(timeout))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


class Client(_BaseClient):
    """A blocking client for an autopipeline-grpc server.

    Args:
        target: The server's ``host:port``.
        timeout: Default seconds each call may take (None: no limit); a call's own ``timeout`` wins.
        credentials: TLS credentials, e.g. from `tls_credentials`; None connects in plain text.
        options: gRPC channel options, e.g. ``[("grpc.max_send_message_length", 64 << 20)]``.
        metadata: Metadata sent with every call, e.g. ``[("x-tenant", "blue")]``.
        token: A bearer token sent with every call (``authorization: Bearer <token>``). With
            ``credentials`` it travels as gRPC call credentials; without them (plain text,
            where gRPC refuses call credentials) as ordinary metadata, readable on the network.
        retry: When to retry a call that fails before its first event (see `RetryPolicy`);
            ``RetryPolicy(max_attempts=1)`` turns retries off.

    Example:
        >>> from autopipeline import Client
        >>> with Client("localhost:50051") as client:
        ...     result = client.generate("a lighthouse at dawn", seed=1)
        ...     result.images[0].save("lighthouse.png")

        Over TLS, with a token:

        >>> from autopipeline import tls_credentials
        >>> with Client("models.example.com:443", credentials=tls_credentials(), token="s3cret") as client:
        ...     client.inspect()
    """

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.AutoPipelineServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calls still running are cancelled."""
        self._channel.close()

    @_generate_arguments
    def generate(self, call: GenerateCall) -> GenerationResult:
        """Generates images and returns them once all have arrived.

        Args:
            prompt: The text prompt.
            task: ``"text-to-image"`` (default), ``"image-to-image"`` or ``"inpainting"``, or a `Task`.
            model: A configured model name (see `inspect`); empty uses the server's default model.
            source: Instead of ``model``, an on-demand checkpoint the server allows (a hub id such as
                ``"org/name"`` or an absolute directory; see `ServerInfo.allowed_sources`).
            negative_prompt: What the images should not show.
            image: The input image of image-to-image and inpainting: a PIL image, bytes or a path.
            mask_image: The inpainting mask (white is repainted, black kept), as for ``image``.
            control_image: The ControlNet conditioning image (edges, depth, pose...), as for ``image``;
                required by models served with a ControlNet (`ModelInfo.controlnet`), refused by others.
            adapters: LoRA adapters to apply to this request only, by name with their weights
                (e.g. ``{"watercolor": 0.8}``); names from `ModelInfo.adapters`.
            width: Output width, a multiple of 8; None lets the server decide.
            height: Output height, a multiple of 8; None lets the server decide.
            num_inference_steps: Denoising steps; None uses the pipeline's default.
            guidance_scale: Classifier-free guidance scale; None uses the pipeline's default.
            strength: How much of ``image`` to change, in (0, 1]; image-to-image and inpainting only.
            num_images: How many images to generate.
            seed: The first image's seed (image i uses seed + i); None lets the server draw one.
            scheduler: A scheduler class name from `TaskInfo.schedulers`; empty keeps the model's own.
            output_format: ``"png"`` (default), ``"jpeg"`` or ``"webp"``, or an `ImageFormat`.
            output_quality: JPEG/WebP quality, 1-100; None uses the server's default.
            preview_interval: N > 0 sends a `Preview` every N steps (seen only through `stream`).
            parameters: Any other pipeline argument by name, JSON-like values (e.g. ``{"eta": 0.5}``).
            timeout: Seconds this call may take; None uses the client's default.

        Returns:
            The images (by index), with the `Started` and `Completed` events.

        Raises:
            AutoPipelineError: A subclass per failure, e.g. `InvalidArgumentError`, `NotFoundError`.

        Example:
            >>> result = client.generate("a red cube", num_images=2, seed=7, width=512, height=512)
            >>> result.seeds
            (7, 8)
            >>> result.pil_images[1].size
            (512, 512)
        """
        collector = ResultCollector()
        for event in self._events(call):
            collector.add(event)
        return collector.result()

    @_generate_arguments
    def stream(self, call: GenerateCall) -> Generator[Event, None, None]:
        """Generates images and yields each event as it arrives; takes the arguments of `generate`.

        Events come in order: `Queued` (repeatedly, while waiting), `Started`, a `Progress` per
        step with `Preview`s between them when asked for, each `GeneratedImage`, and `Completed`.
        Leaving the loop early (``break``, an exception, closing the iterator) cancels the call.

        Example:
            >>> for event in client.stream("a red cube", num_inference_steps=20):
            ...     if isinstance(event, Progress):
            ...         print(f"{event.step}/{event.total_steps}")
            ...     elif isinstance(event, GeneratedImage):
            ...         event.save(f"cube-{event.index}.png")
        """
        return self._events(call)

    def _events(self, call: GenerateCall) -> Generator[Event, None, None]:
        # A generator, so the RPC starts on the first next() and stops with the iterator.
        attempts = self._attempts(call.timeout)
        while True:
            rpc = self._stub.Generate(call.request, timeout=attempts.timeout(), metadata=self._metadata)
            reader = EventReader()
            try:
                with _sdk_errors(cancel=rpc.cancel):
                    for response in rpc:
                        if (event := reader.read(response)) is not None:
                            yield event
                    reader.close()
                return
            except AutoPipelineError as err:
                delay = None if reader.started else attempts.backoff(err)
                if delay is None:
                    raise
            time.sleep(delay)

    def inspect(
        self, model: str | None = None, *, source: str | None = None, timeout: float | None = None
    ) -> ServerInfo:
        """Describes the server, its limits and its models (or only ``model``, or on-demand ``source``).

        Example:
            >>> info = client.inspect()
            >>> [(m.name, m.state, [t.task for t in m.tasks]) for m in info.models]
            [('sdxl', <ModelState.READY: 'ready'>, [<Task.TEXT_TO_IMAGE: 'text-to-image'>, ...])]
        """
        attempts = self._attempts(timeout)
        while True:
            try:
                with _sdk_errors():
                    response = self._stub.Inspect(
                        inspect_request(model, source), timeout=attempts.timeout(), metadata=self._metadata
                    )
                return server_info(response)
            except AutoPipelineError as err:
                if (delay := attempts.backoff(err)) is None:
                    raise
            time.sleep(delay)


class AsyncClient(_BaseClient):
    """The asyncio twin of `Client`: the same arguments, awaited.

    Create it inside a running event loop (as `grpc.aio` requires) and close it there.

    Example:
        >>> from autopipeline import AsyncClient
        >>> async with AsyncClient("localhost:50051") as client:
        ...     result = await client.generate("a lighthouse at dawn", seed=1)
        ...     async for event in client.stream("a lighthouse at dusk"):
        ...         print(event)
    """

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.AutoPipelineServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls still running are cancelled."""
        await self._channel.close(None)

    @_generate_arguments
    async def generate(self, call: GenerateCall) -> GenerationResult:
        """Generates images and returns them once all have arrived; see `Client.generate`.

        Example:
            >>> result = await client.generate("a red cube", seed=7)
            >>> result.images[0].save("cube.png")
        """
        collector = ResultCollector()
        async for event in self._events(call):
            collector.add(event)
        return collector.result()

    @_generate_arguments
    def stream(self, call: GenerateCall) -> AsyncGenerator[Event, None]:
        """Generates images and yields each event as it arrives; see `Client.stream`.

        Leaving the loop early cancels the call once the iterator is closed: wrap it in
        `contextlib.aclosing` to cancel at once rather than when the iterator is collected.

        Example:
            >>> async with contextlib.aclosing(client.stream("a red cube")) as events:
            ...     async for event in events:
            ...         print(event)
        """
        return self._events(call)

    async def _events(self, call: GenerateCall) -> AsyncGenerator[Event, None]:
        attempts = self._attempts(call.timeout)
        while True:
            rpc = self._stub.Generate(call.request, timeout=attempts.timeout(), metadata=self._metadata)
            reader = EventReader()
            try:
                with _sdk_errors(cancel=rpc.cancel):
                    async for response in rpc:
                        if (event := reader.read(response)) is not None:
                            yield event
                    reader.close()
                return
            except AutoPipelineError as err:
                delay = None if reader.started else attempts.backoff(err)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def inspect(
        self, model: str | None = None, *, source: str | None = None, timeout: float | None = None
    ) -> ServerInfo:
        """Describes the server and its models (or only ``model``/``source``); see `Client.inspect`.

        Example:
            >>> info = await client.inspect()
            >>> info.default_model
            'sdxl'
        """
        attempts = self._attempts(timeout)
        while True:
            try:
                with _sdk_errors():
                    response = await self._stub.Inspect(
                        inspect_request(model, source), timeout=attempts.timeout(), metadata=self._metadata
                    )
                return server_info(response)
            except AutoPipelineError as err:
                if (delay := attempts.backoff(err)) is None:
                    raise
            await asyncio.sleep(delay)
