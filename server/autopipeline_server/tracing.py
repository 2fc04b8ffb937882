"""OpenTelemetry tracing (optional): the gRPC server instrumentation and each request's child spans.

Imported only when tracing is on, so a server without it never imports OpenTelemetry. The server
span of every AutoPipelineService RPC comes from opentelemetry-instrumentation-grpc, which also
continues a caller's W3C `traceparent`. Under it, the access layer adds `autopipeline.queue`,
`autopipeline.pipeline` and `autopipeline.encode` when the request ends: their times are known
exactly by then, and the pipeline call ran on the device thread, outside the request's context.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Status, StatusCode

from autopipeline_server import __version__
from autopipeline_server.settings import Settings

if TYPE_CHECKING:
    import grpc.aio

    from autopipeline_server.observe import RequestRecord

INSTRUMENTATION_NAME = "autopipeline_server"


def otlp_exporter(settings: Settings) -> SpanExporter:
    """The OTLP span exporter the settings name (grpc or http/protobuf, and an endpoint)."""
    endpoint = settings.otel_endpoint or None
    if settings.otel_protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        if endpoint is not None and urlsplit(endpoint).path in ("", "/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"  # a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT
        return HttpExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=endpoint)


class Tracing:
    """A server's tracer: the gRPC interceptor that makes server spans, and the per-request spans."""

    def __init__(self, provider: trace.TracerProvider, *, owned: bool) -> None:
        self._provider = provider
        self._owned = owned
        self.tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
        # Only our service: health probes every few seconds would drown the traces that matter.
        self.interceptor: grpc.aio.ServerInterceptor[Any, Any] = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=provider, filter_=filters.service_prefix("autopipeline.")
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        """A tracer exporting in batches over OTLP, as the settings say."""
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.otel_service_name}))
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter(settings)))
        return cls(provider, owned=True)

    def start_request(self, record: RequestRecord) -> None:
        """Notes the RPC's server span (current when the RPC starts) in its record."""
        record.span = trace.get_current_span()
        if record.span.is_recording():
            record.span.set_attribute("autopipeline.request_id", record.request_id)

    def trace_id(self, record: RequestRecord) -> str | None:
        """The request's trace id (hex), for log lines; None when it is not traced."""
        context = _server_span(record).get_span_context()
        return trace.format_trace_id(context.trace_id) if context.is_valid else None

    def finish_request(self, record: RequestRecord, code: str, now: float) -> None:
        """Annotates the request's server span and adds its child spans, with their real times.

        `now` is the `perf_counter` reading the request's end was measured at. The children name
        their parent explicitly: a cancelled request may be finished outside the RPC's context.
        """
        server_span = _server_span(record)
        attributes = {"autopipeline.model": record.model, "autopipeline.task": record.task}
        if server_span.is_recording():  # a cancelled call's span may have ended already
            for key, value in attributes.items():
                if value:
                    server_span.set_attribute(key, value)
        parent = trace.set_span_in_context(server_span)
        wall = time.time_ns()

        def to_ns(moment: float) -> int:
            return wall - int((now - moment) * 1e9)

        job = record.job
        if job is not None:
            queued = self.tracer.start_span(
                "autopipeline.queue", parent, start_time=to_ns(job.arrived), attributes=attributes
            )
            queued.end(to_ns(job.started if job.started is not None else now))
            if job.started is not None:
                call = job.call
                pipeline = self.tracer.start_span(
                    "autopipeline.pipeline",
                    parent,
                    start_time=to_ns(job.started),
                    attributes={
                        **attributes,
                        "autopipeline.pipeline_class": call.target.pipeline_class,
                        "autopipeline.images": job.images,
                        "autopipeline.width": call.width,
                        "autopipeline.height": call.height,
                    },
                )
                if code != "OK":
                    pipeline.set_status(Status(StatusCode.ERROR, code))
                pipeline.end(to_ns(job.finished if job.finished is not None else now))
        if record.encoding is not None:
            began, ended = record.encoding
            encode = self.tracer.start_span(
                "autopipeline.encode", parent, start_time=to_ns(began), attributes=attributes
            )
            encode.end(to_ns(ended))

    def shutdown(self) -> None:
        """Flushes and stops a tracer this server built; one passed in belongs to its owner."""
        if self._owned and isinstance(self._provider, TracerProvider):
            self._provider.shutdown()


def _server_span(record: RequestRecord) -> trace.Span:
    span = record.span
    return span if isinstance(span, trace.Span) else trace.INVALID_SPAN
