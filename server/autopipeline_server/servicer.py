"""The AutoPipelineService servicer: converts and validates, hands work to the runtime, streams events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

import grpc
import PIL.Image
from google.protobuf.message import Message

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline_server import convert
from autopipeline_server.admission import Admission, bounded
from autopipeline_server.calls import PipelineRejected
from autopipeline_server.codecs import encode_image
from autopipeline_server.devices import DevicePool
from autopipeline_server.domain import Finished, GenerationRequest, Preview, Progress, Queued, Started
from autopipeline_server.errors import ClientTooSlow, InvalidRequest
from autopipeline_server.observe import RequestRecord, current_request
from autopipeline_server.prepare import PreparedCall, attach_inputs, prepare_call
from autopipeline_server.settings import Settings
from autopipeline_server.status import REQUEST_ID_KEY, abort, refuse
from autopipeline_server.worker import Arrival, InferenceWorker, Job

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AutoPipelineService"].full_name
M = TypeVar("M", bound=Message)

Context = grpc.aio.ServicerContext[object, object]
# How long ending a slow reader's stream may wait to send its status before giving up on it.
SLOW_ABORT_SECONDS = 1.0


def _lenient(message: type[M]) -> Callable[[bytes], M | None]:
    """A request deserializer that yields None for bytes that are no such message.

    gRPC answers a deserializer's exception with INTERNAL; a malformed request is the caller's
    error, so the servicer answers None with INVALID_ARGUMENT instead.
    """

    def parse(data: bytes) -> M | None:
        try:
            return message.FromString(data)
        except Exception:  # DecodeError, the parser's recursion limit, invalid UTF-8 in strings
            return None

    return parse


def service_handler(
    servicer: AutoPipelineServicer, admission: Admission
) -> grpc.GenericRpcHandler[object, object]:
    """The AutoPipelineService handlers, with lenient request parsing (see `_lenient`).

    Both methods take one request, but are registered as request-streaming: gRPC then reads no
    request body until `admission` gives it a slot (see `Admission`). On the wire nothing changes.
    """

    async def generate(requests: AsyncIterator[pb.GenerateRequest | None], context: Context) -> None:
        request, release = await admission.receive(context)
        size = request.ByteSize() if request is not None else 0
        request_id = current_request().request_id
        stream = servicer.Generate(request, context, converted=release)
        del request
        try:
            async with contextlib.aclosing(stream):  # a stream ended early frees its job at once
                try:
                    async for message in stream:
                        await admission.write(context, message, request_id)
                except ClientTooSlow as err:
                    # The status cannot reach a client that reads nothing; the stream ends anyway.
                    await bounded(abort(context, err, request_id), SLOW_ABORT_SECONDS)
        except grpc.aio.AbortError:
            raise  # a slow reader's stream, ended above: its status is sent already
        except Exception as err:  # the request's error (or a bug: INTERNAL); the handler returns
            refuse(context, err, request_id)
        finally:
            del stream
            release()
            admission.returned(size)

    async def inspect(
        requests: AsyncIterator[pb.InspectRequest | None], context: Context
    ) -> pb.InspectResponse:
        request, release = await admission.receive(context)
        try:
            return await servicer.Inspect(request)
        except Exception as err:
            refuse(context, err, current_request().request_id)
            return pb.InspectResponse()  # gRPC sends no message with a status other than OK
        finally:
            release()

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Generate": grpc.stream_stream_rpc_method_handler(
                generate,
                request_deserializer=_lenient(pb.GenerateRequest),
                response_serializer=pb.GenerateResponse.SerializeToString,
            ),
            "Inspect": grpc.stream_unary_rpc_method_handler(
                inspect,
                request_deserializer=_lenient(pb.InspectRequest),
                response_serializer=pb.InspectResponse.SerializeToString,
            ),
        },
    )


def _decode_into(call: PreparedCall, request: GenerationRequest) -> None:
    attach_inputs(call, *convert.decode_inputs(request))


def _malformed(message: str) -> InvalidRequest:
    return InvalidRequest.field("request", f"is not a valid autopipeline.v1.{message} message")


class AutoPipelineServicer:
    """Implements autopipeline.v1.AutoPipelineService on top of the devices' registries and workers.

    Registered through `service_handler` (not the generated base class): requests arrive through
    admission, and errors are raised for the handlers to turn into statuses (`status.refuse`).
    """

    def __init__(self, settings: Settings, devices: DevicePool, admission: Admission) -> None:
        self._settings = settings
        self._devices = devices
        self._admission = admission

    async def Generate(
        self,
        request: pb.GenerateRequest | None,
        context: Context,
        *,
        converted: Callable[[], None] = lambda: None,
    ) -> AsyncGenerator[pb.GenerateResponse]:
        """Runs one request; `converted` is called once the request's bytes are no longer needed."""
        record = current_request()  # observability: the access layer's record of this RPC
        # Batching hook: a forming batch waits for this request until it is submitted (or fails);
        # until the request has a device, it may join any device's batch.
        arrivals = [replica.worker.arriving() for replica in self._devices.replicas]
        try:
            async for message in self._generate(request, context, record, arrivals, converted):
                yield message
        finally:
            for arrival in arrivals:
                arrival.close()

    async def _generate(
        self,
        request: pb.GenerateRequest | None,
        context: Context,
        record: RequestRecord,
        arrivals: list[Arrival],
        converted: Callable[[], None],
    ) -> AsyncIterator[pb.GenerateResponse]:
        request_id = record.request_id
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        if request is None:
            raise _malformed("GenerateRequest")
        # Only the inputs' headers are read here; their pixels are decoded once admitted, below.
        # That is cheap enough for the event loop, except a control image, which is decoded
        # here: then the work goes to a thread.
        pixels_here = request.HasField("control_image")
        domain_request = (
            await asyncio.to_thread(convert.generation_request, request, self._settings.limits)
            if pixels_here
            else convert.generation_request(request, self._settings.limits)
        )
        request.ClearField("image")  # the opened inputs hold these bytes now
        request.ClearField("mask_image")
        converted()
        replica, entry = self._devices.choose(domain_request.model, domain_request.source)
        record.model, record.task = entry.spec.name, domain_request.task.value
        if entry.model is None and not entry.pinned:
            # An on-demand model loads first; tell the caller it is waiting, as for the queue.
            depth = replica.worker.queue_depth
            yield convert.queued_event(Queued(position=depth, depth=depth + 1))
        try:
            async with replica.registry.lease(entry) as model:
                # Pixel-free, so on the loop; a control image is resized in it, so in a thread.
                call = (
                    await asyncio.to_thread(prepare_call, model, domain_request)
                    if pixels_here
                    else prepare_call(model, domain_request)
                )
                # Everything that needs no pixels has passed; now a place in the queue and the
                # input pixels are reserved, and only then are the inputs decoded.
                with self._admission.hold_pixels(convert.input_pixels(domain_request)):
                    with replica.worker.reserve():
                        if domain_request.image is not None:
                            await self._admission.decode(
                                functools.partial(_decode_into, call, domain_request)
                            )
                        job = record.job = replica.worker.submit(call, reserved=True)
                    for arrival in arrivals:
                        arrival.close()
                    del domain_request
                    async for message in self._run(replica.worker, job, request, record):
                        yield message
        except asyncio.CancelledError:
            log.info("request %s: the caller went away", request_id)
            raise
        except PipelineRejected as err:
            # Raised without a local name: one would join the error's frames in a reference cycle.
            raise InvalidRequest(f"the pipeline rejected the request: {err}") from err

    async def _run(
        self, worker: InferenceWorker, job: Job, request: pb.GenerateRequest, record: RequestRecord
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The job's stream; the job is dropped however the stream ends.

        Its inputs are freed by the worker, not here: a job cancelled just as its call starts is
        still in that call, whose arguments are built from every member's once it runs.
        """
        try:
            async for message in self._stream(job, request, record):
                yield message
                job.greeted.set()  # written: the call may start (see Job.greeted)
        finally:
            worker.cancel(job)

    async def _stream(
        self, job: Job, request: pb.GenerateRequest, record: RequestRecord
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The job's events as wire messages; images are encoded here, off the device thread."""
        fmt, quality = convert.output_format(request)
        chunk_bytes = self._settings.limits.image_chunk_bytes
        level = self._settings.png_compress_level
        async for event in job.events():
            if isinstance(event, Queued):
                yield convert.queued_event(event)
            elif isinstance(event, Started):
                yield convert.started_event(event)
            elif isinstance(event, Progress):
                yield convert.progress_event(event)
            elif isinstance(event, Preview):
                encoded = await asyncio.to_thread(encode_image, event.image, fmt, quality, level)
                yield convert.preview_event(event, encoded)
            elif isinstance(event, Finished):
                encoding_started = time.perf_counter()
                # Each decoded image goes as soon as it is encoded, not when the client has read all.
                images: list[PIL.Image.Image | None] = list(event.images)
                count = len(images)
                event = dataclasses.replace(event, images=())
                for index, seed in enumerate(event.seeds):
                    image, images[index] = images[index], None
                    assert image is not None
                    encoded = await asyncio.to_thread(encode_image, image, fmt, quality, level)
                    size = image.size
                    del image
                    for message in convert.image_events(index, seed, size, encoded, chunk_bytes):
                        yield message
                    del encoded
                now = time.perf_counter()
                record.encoding = (encoding_started, now)  # the access line logs the request
                yield convert.completed_event(
                    event,
                    encoding_seconds=now - encoding_started,
                    total_seconds=now - record.arrived,
                    num_images=count,
                )

    async def Inspect(self, request: pb.InspectRequest | None) -> pb.InspectResponse:
        """The server and its models (or the one named); raises ServingError for a bad request."""
        if request is None:
            raise _malformed("InspectRequest")
        registry = self._devices.primary.registry
        entries = list(registry.entries.values())
        if request.model or request.source:
            if request.model and request.source:
                raise InvalidRequest.field("source", "names an on-demand source; leave `model` empty")
            entries = [registry.lookup(request.model, request.source, create=False)]
        return pb.InspectResponse(
            server=convert.server_info(self._settings, self._devices),
            models=convert.models_info(self._devices, entries, registry.default_model),
        )
