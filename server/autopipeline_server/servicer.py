"""The AutoPipelineService servicer: converts and validates, hands work to the runtime, streams events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server import convert
from autopipeline_server.calls import PipelineRejected
from autopipeline_server.codecs import encode_image
from autopipeline_server.devices import DevicePool
from autopipeline_server.domain import Finished, Preview, Progress, Queued, Started
from autopipeline_server.errors import InvalidRequest, ServingError
from autopipeline_server.observe import current_request
from autopipeline_server.prepare import prepare_call
from autopipeline_server.settings import Settings
from autopipeline_server.status import REQUEST_ID_KEY, abort
from autopipeline_server.worker import Arrival, Job

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AutoPipelineService"].full_name
M = TypeVar("M", bound=Message)

Context = grpc.aio.ServicerContext[object, object]


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


def service_handler(servicer: AutoPipelineServicer) -> grpc.GenericRpcHandler[object, object]:
    """The AutoPipelineService handlers, with lenient request parsing (see `_lenient`)."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                servicer.Generate,
                request_deserializer=_lenient(pb.GenerateRequest),
                response_serializer=pb.GenerateResponse.SerializeToString,
            ),
            "Inspect": grpc.unary_unary_rpc_method_handler(
                servicer.Inspect,
                request_deserializer=_lenient(pb.InspectRequest),
                response_serializer=pb.InspectResponse.SerializeToString,
            ),
        },
    )


def _malformed(message: str) -> InvalidRequest:
    return InvalidRequest.field("request", f"is not a valid autopipeline.v1.{message} message")


class AutoPipelineServicer(pb_grpc.AutoPipelineServiceServicer):
    """Implements autopipeline.v1.AutoPipelineService on top of the registry and the worker."""

    def __init__(self, settings: Settings, devices: DevicePool) -> None:
        self._settings = settings
        self._devices = devices

    async def Generate(
        self, request: pb.GenerateRequest | None, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        record = current_request()  # observability: the access layer's record of this RPC
        request_id, arrived = record.request_id, record.arrived
        # Batching hook: a forming batch waits for this request until it is submitted (or fails);
        # until the request has a device, it may join any device's batch.
        arrivals = [replica.worker.arriving() for replica in self._devices.replicas]
        try:
            async for message in self._generate(request, context, request_id, arrived, arrivals):
                yield message
        finally:
            for arrival in arrivals:
                arrival.close()

    async def _generate(
        self,
        request: pb.GenerateRequest | None,
        context: Context,
        request_id: str,
        arrived: float,
        arrivals: list[Arrival],
    ) -> AsyncIterator[pb.GenerateResponse]:
        record = current_request()
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        try:
            if request is None:
                raise _malformed("GenerateRequest")
            # Decoding input images (and resizing them below) is CPU work proportional to what the
            # caller sent: off the event loop, so other streams are not held up meanwhile.
            domain_request = await asyncio.to_thread(
                convert.generation_request, request, self._settings.limits
            )
            replica, entry = self._devices.choose(domain_request.model, domain_request.source)
            record.model, record.task = entry.spec.name, domain_request.task.value
        except Exception as err:
            await abort(context, err, request_id)
        if entry.model is None and not entry.pinned:
            # An on-demand model loads first; tell the caller it is waiting, as for the queue.
            depth = replica.worker.queue_depth
            yield convert.queued_event(Queued(position=depth, depth=depth + 1))
        try:
            async with replica.registry.lease(entry) as model:
                call = await asyncio.to_thread(prepare_call, model, domain_request)
                job = record.job = replica.worker.submit(call)
                for arrival in arrivals:
                    arrival.close()
                try:
                    async for message in self._stream(job, request, request_id, arrived):
                        yield message
                finally:
                    replica.worker.cancel(job)
        except asyncio.CancelledError:
            log.info("request %s: the caller went away", request_id)
            raise
        except PipelineRejected as err:
            rejected = InvalidRequest(f"the pipeline rejected the request: {err}")
            await abort(context, rejected, request_id)
        except Exception as err:
            await abort(context, err, request_id)

    async def _stream(
        self, job: Job, request: pb.GenerateRequest, request_id: str, arrived: float
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The job's events as wire messages; images are encoded here, off the device thread."""
        fmt, quality = convert.output_format(request)
        chunk_bytes = self._settings.limits.image_chunk_bytes
        async for event in job.events():
            if isinstance(event, Queued):
                yield convert.queued_event(event)
            elif isinstance(event, Started):
                yield convert.started_event(event)
            elif isinstance(event, Progress):
                yield convert.progress_event(event)
            elif isinstance(event, Preview):
                encoded = await asyncio.to_thread(
                    encode_image, event.image, fmt, quality, self._settings.png_compress_level
                )
                yield convert.preview_event(event, encoded)
            elif isinstance(event, Finished):
                encoding_started = time.perf_counter()
                for index, (image, seed) in enumerate(zip(event.images, event.seeds, strict=True)):
                    encoded = await asyncio.to_thread(
                        encode_image, image, fmt, quality, self._settings.png_compress_level
                    )
                    for message in convert.image_events(index, seed, image.size, encoded, chunk_bytes):
                        yield message
                now = time.perf_counter()
                current_request().encoding = (encoding_started, now)  # the access line logs the request
                yield convert.completed_event(
                    event, encoding_seconds=now - encoding_started, total_seconds=now - arrived
                )

    async def Inspect(self, request: pb.InspectRequest | None, context: Context) -> pb.InspectResponse:
        if request is None:
            await abort(context, _malformed("InspectRequest"), current_request().request_id)
        registry = self._devices.primary.registry
        entries = list(registry.entries.values())
        if request.model or request.source:
            try:
                if request.model and request.source:
                    raise InvalidRequest.field("source", "names an on-demand source; leave `model` empty")
                entries = [registry.lookup(request.model, request.source, create=False)]
            except ServingError as err:
                await abort(context, err, current_request().request_id)
        return pb.InspectResponse(
            server=convert.server_info(self._settings, self._devices),
            models=convert.models_info(self._devices, entries, registry.default_model),
        )
