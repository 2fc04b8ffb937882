"""`Client` and `AsyncClient`: the SDK's entry points, one blocking and one for asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
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
    combine,
    generate_call,
    inspect_request,
    server_info,
)
from autopipeline._credentials import with_token
from autopipeline._errors import AutoPipelineError, from_rpc_error
from autopipeline._retry import Attempts, RetryPolicy
from autopipeline._types import Event, GenerationResult, ServerInfo
from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncEventStream", "Client", "EventStream"]

DEFAULT_TARGET = "localhost:50051"

# Spreads calls over every address a target resolves to (a headless Service's pods, or an
# `ipv4:a:1,b:2` list); gRPC's default, pick_first, would send them all to the first address.
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_LB_OPTIONS = ("grpc.service_config", "grpc.lb_policy_name")

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


def channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's channel options, plus the round_robin policy unless they choose a policy themselves."""
    chosen = list(options)
    if not any(name in _LB_OPTIONS for name, _ in chosen):
        chosen.append(("grpc.service_config", _ROUND_ROBIN))
    return chosen


def _one_request(call: GenerateCall) -> pb.GenerateRequest:
    if len(call.requests) != 1:
        raise TypeError("stream() takes one prompt, a string; generate() takes a list of prompts")
    return call.requests[0]


class EventStream:
    """The events of one generation: an iterator, and a context manager that cancels on leaving.

    The call starts on the first ``next()``. Leaving a ``with`` block (normally, by ``break`` or by
    an exception) or calling `close` cancels the server's work at once, if it is still running.
    Plain iteration works as well; the call is then cancelled when the iterator is collected.

    Example:
        >>> with client.stream("a red cube", num_inference_steps=30) as events:
        ...     for event in events:
        ...         if isinstance(event, Progress) and event.step == 10:
        ...             break  # the server stops at its next step
    """

    def __init__(self, events: Generator[Event, None, None]) -> None:
        self._events = events

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Cancels the call if it is still running; a no-op after the stream ended."""
        self._events.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncEventStream:
    """The asyncio twin of `EventStream`: an async iterator, and an async context manager.

    Example:
        >>> async with client.stream("a red cube") as events:
        ...     async for event in events:
        ...         if isinstance(event, Started):
        ...             break  # cancelled on the server as the block ends
    """

    def __init__(self, events: AsyncGenerator[Event, None]) -> None:
        self._events = events

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> Event:
        return await anext(self._events)

    async def aclose(self) -> None:
        """Cancels the call if it is still running; a no-op after the stream ended."""
        await self._events.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


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
        self._connect(target, credentials, channel_options(options))

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
        target: The server's ``host:port``, or any gRPC target naming several: ``dns:///name:port``
            (every address the name resolves to, e.g. a Kubernetes headless Service) or
            ``ipv4:10.0.0.1:50051,10.0.0.2:50051``. Calls are spread over all the addresses with
            gRPC's ``round_robin`` policy, unless ``options`` sets ``grpc.service_config`` or
            ``grpc.lb_policy_name``.
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
        ...     result.images[0].save("lighthouse.png")  # a PIL image, as in diffusers

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
            prompt: The text prompt, or a list of prompts: one request per prompt, run one after
                another, each making ``num_images`` images (diffusers' ``num_images_per_prompt``);
                the result holds them prompt by prompt.
            task: ``"text-to-image"``, ``"image-to-image"`` or ``"inpainting"``, or a `Task`.
                None (default) infers it from the inputs: ``image`` and ``mask_image`` mean
                inpainting, ``image`` alone image-to-image, neither text-to-image. An explicit task wins.
            model: A configured model name (see `inspect`); empty uses the server's default model.
            source: Instead of ``model``, an on-demand checkpoint the server allows (a hub id such as
                ``"org/name"`` or an absolute directory; see `ServerInfo.allowed_sources`).
            negative_prompt: What the images should not show.
            image: The input image of image-to-image and inpainting: a PIL image, bytes or a path.
            mask_image: The inpainting mask (white is repainted, black kept), as for ``image``;
                without ``image`` it raises `ValueError` before anything is sent.
            control_image: The ControlNet conditioning image (edges, depth, pose...), as for ``image``;
                required by models served with a ControlNet (`ModelInfo.controlnet`), refused by others.
            adapters: LoRA adapters to apply to this request only, by name with their weights
                (e.g. ``{"watercolor": 0.8}``); names from `ModelInfo.adapters`.
            width: Output width, a multiple of 8; None lets the server decide.
            height: Output height, a multiple of 8; None lets the server decide.
            num_inference_steps: Denoising steps; None uses the pipeline's default.
            guidance_scale: Classifier-free guidance scale; None uses the pipeline's default.
            strength: How much of ``image`` to change, in (0, 1]; image-to-image and inpainting only.
            num_images: How many images to generate per prompt.
            seed: The first image's seed (image i of the call uses seed + i, across prompts too);
                None lets the server draw one per request.
            scheduler: A scheduler class name from `TaskInfo.schedulers`; empty keeps the model's own.
            output_format: ``"png"`` (default), ``"jpeg"`` or ``"webp"``, or an `ImageFormat`.
            output_quality: JPEG/WebP quality, 1-100; None uses the server's default.
            preview_interval: N > 0 sends a `Preview` every N steps (seen only through `stream`).
            parameters: Any other pipeline argument by name, JSON-like values (e.g. ``{"eta": 0.5}``).
            timeout: Seconds this call may take, all prompts together; None uses the client's default.

        Returns:
            ``images`` (PIL images, as diffusers returns them), ``outputs`` (the same images with
            their seeds and encoded bytes) and a `RequestSummary` per request.

        Raises:
            AutoPipelineError: A subclass per failure, e.g. `InvalidArgumentError`, `NotFoundError`.

        Example:
            >>> result = client.generate("a red cube", num_images=2, seed=7, width=512, height=512)
            >>> result.seeds
            (7, 8)
            >>> result.images[1].size
            (512, 512)
            >>> result = client.generate(["a cat", "a dog"], num_images=2, seed=1)
            >>> [(output.prompt_index, output.seed) for output in result.outputs]
            [(0, 1), (0, 2), (1, 3), (1, 4)]
        """
        timeout = self._call_timeout(call.timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for request in call.requests:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            collector = ResultCollector(request.prompt)
            for event in self._events(request, left):
                collector.add(event)
            results.append(collector.result())
        return combine(results)

    @_generate_arguments
    def stream(self, call: GenerateCall) -> EventStream:
        """Generates images and yields each event as it arrives; takes the arguments of `generate`.

        Events come in order: `Queued` (repeatedly, while waiting), `Started`, a `Progress` per
        step with `Preview`s between them when asked for, each `GeneratedImage`, and `Completed`.
        `Queued.position` is 0-based (0: next to run). Use it as a context manager: leaving the
        block early (``break``, an exception) cancels the server's work at once. ``prompt`` must be
        one string here (a list raises `TypeError`; `generate` takes lists).

        Example:
            >>> with client.stream("a red cube", num_inference_steps=20) as events:
            ...     for event in events:
            ...         if isinstance(event, Progress):
            ...             print(f"{event.step}/{event.total_steps}")
            ...         elif isinstance(event, GeneratedImage):
            ...             event.save(f"cube-{event.index}.png")
        """
        return EventStream(self._events(_one_request(call), self._call_timeout(call.timeout)))

    def _events(self, request: pb.GenerateRequest, timeout: float | None) -> Generator[Event, None, None]:
        # A generator, so the RPC starts on the first next() and stops with the iterator.
        attempts = Attempts(self.retry, timeout)
        while True:
            rpc = self._stub.Generate(request, timeout=attempts.timeout(), metadata=self._metadata)
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
        ...     async with client.stream("a lighthouse at dusk") as events:
        ...         async for event in events:
        ...             print(event)
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

        A list of prompts runs as concurrent requests (the server may batch them); the result
        holds their images in prompt order. If one fails, the others are cancelled.

        Example:
            >>> result = await client.generate("a red cube", seed=7)
            >>> result.images[0].save("cube.png")
        """
        timeout = self._call_timeout(call.timeout)
        tasks = [asyncio.ensure_future(self._collect(request, timeout)) for request in call.requests]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return combine(results)

    async def _collect(self, request: pb.GenerateRequest, timeout: float | None) -> GenerationResult:
        collector = ResultCollector(request.prompt)
        async with contextlib.aclosing(self._events(request, timeout)) as events:
            async for event in events:
                collector.add(event)
        return collector.result()

    @_generate_arguments
    def stream(self, call: GenerateCall) -> AsyncEventStream:
        """Generates images and yields each event as it arrives; see `Client.stream`.

        Use it as an async context manager: leaving the block early cancels the server's work at
        once. Plain ``async for`` works too; the call is then cancelled when the iterator is closed
        or collected.

        Example:
            >>> async with client.stream("a red cube") as events:
            ...     async for event in events:
            ...         print(event)
        """
        return AsyncEventStream(self._events(_one_request(call), self._call_timeout(call.timeout)))

    async def _events(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[Event, None]:
        attempts = Attempts(self.retry, timeout)
        while True:
            rpc = self._stub.Generate(request, timeout=attempts.timeout(), metadata=self._metadata)
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
