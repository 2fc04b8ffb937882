"""Wires the gRPC server: service, health, reflection, the worker and the models; runs and drains it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # grpc-stubs predate aio
from grpc_reflection.v1alpha import reflection

from autopipeline_server.acceleration import configure_cache
from autopipeline_server.admission import Admission
from autopipeline_server.auth import BearerTokenInterceptor
from autopipeline_server.devices import DevicePool
from autopipeline_server.domain import ModelState
from autopipeline_server.metrics import MetricsEndpoint, ServerMetrics
from autopipeline_server.observe import AccessInterceptor
from autopipeline_server.openai_http import OpenAIDoor
from autopipeline_server.registry import ModelEntry, ModelRegistry
from autopipeline_server.servicer import SERVICE_NAME, AutoPipelineServicer, service_handler
from autopipeline_server.settings import Settings, describe, read_tls_files
from autopipeline_server.worker import STUCK_CALL_SECONDS, InferenceWorker

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from autopipeline_server.tracing import Tracing

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningServer:
    """A started server: the gRPC server, its bound port, and the parts that need shutting down."""

    server: grpc.aio.Server
    port: int
    settings: Settings
    devices: DevicePool
    health: health_aio.HealthServicer
    loading: asyncio.Task[None]
    admission: Admission
    # The OpenAI-compatible HTTP door, when `settings.http_port` turns it on.
    http: OpenAIDoor | None = None

    @property
    def registry(self) -> ModelRegistry:
        """The first device's models (the only device's, unless several are configured)."""
        return self.devices.primary.registry

    @property
    def worker(self) -> InferenceWorker:
        """The first device's worker."""
        return self.devices.primary.worker

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port of the OpenAI-compatible door; None when it is off."""
        return self.http.port if self.http is not None else None

    metrics: ServerMetrics | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    tracing: Tracing | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on (the real one when settings asked for 0); None when off."""
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    async def wait_until_loaded(self) -> None:
        """Returns when every configured model has finished loading (ready or failed)."""
        await asyncio.shield(self.loading)

    async def stop(self, grace: float | None = None, *, stuck_after: float = STUCK_CALL_SECONDS) -> bool:
        """Drains: health turns NOT_SERVING, new requests get UNAVAILABLE, in-flight work gets `grace`.

        Returns within about grace + `stuck_after` + 1 seconds whatever is running; False when a
        call stuck inside a step kept the device thread (the process should then exit: see `serve`).
        """
        grace = self.settings.grace if grace is None else grace
        if self.http is not None:
            self.http.start_draining()
        await self.health.enter_graceful_shutdown()
        clean = await self.devices.drain(grace, stuck_after=stuck_after)
        if self.http is not None:
            await self.http.close()  # before the gRPC server, which its in-flight requests still use
        await self.server.stop(grace=1.0)
        self.loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.loading
        await self.devices.close(wait=clean)
        self.admission.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        return clean


async def create_server(
    settings: Settings, *, tracer_provider: TracerProvider | None = None
) -> RunningServer:
    """Builds, binds and starts the server; models load in the background while health says NOT_SERVING.

    `tracer_provider` traces every RPC with an OpenTelemetry provider the caller owns (an embedding
    application's, or a test's); without one, `settings.otel` builds one exporting over OTLP.
    """
    configure_cache(settings.compile_cache_dir)
    health_servicer = health_aio.HealthServicer()

    async def publish(entry: ModelEntry) -> None:
        # A model serves while any device serves it.
        state = devices.state(entry.spec.name)
        await health_servicer.set(entry.spec.name, SERVING if state is ModelState.READY else NOT_SERVING)

    pending_updates: set[asyncio.Task[None]] = set()

    metrics = (
        ServerMetrics(spec.name for spec in settings.models) if settings.metrics_port is not None else None
    )
    tracing = _tracing(settings, tracer_provider)

    def on_state_change(entry: ModelEntry) -> None:
        if metrics is not None:  # observability: load times and evictions
            metrics.model_state_changed(entry)
        task = asyncio.get_running_loop().create_task(publish(entry))
        pending_updates.add(task)
        task.add_done_callback(pending_updates.discard)

    devices = DevicePool.create(settings, on_state_change, metrics=metrics)
    # Admission (request bytes, pixels, decodes) is the server's; its refusals count on the first device.
    primary = devices.primary.worker
    admission = Admission(settings, primary.stats, primary.retry_hint)
    servicer = AutoPipelineServicer(settings, devices, admission)
    # Outermost first: the tracing span, then the access layer (request id, log line, metrics), so
    # both see calls that authentication turns away.
    interceptors: list[Any] = [] if tracing is None else [tracing.interceptor]
    interceptors.append(AccessInterceptor(SERVICE_NAME, metrics=metrics, tracing=tracing))
    if settings.tokens:
        interceptors.append(BearerTokenInterceptor(settings.tokens))

    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", settings.limits.max_request_bytes),
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
            ("grpc.so_reuseport", 0),
            # No bandwidth-delay probing: it grows every stream's receive window to megabytes, so
            # bodies waiting for a receive slot would be buffered by the transport after all.
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    server.add_generic_rpc_handlers((service_handler(servicer, admission),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    for name in ("", SERVICE_NAME, *devices.primary.registry.entries):
        await health_servicer.set(name, NOT_SERVING)
    # The door adds a private port to the server, so it is built before the server starts.
    http = OpenAIDoor(settings, server) if settings.http_port is not None else None
    port = _bind(server, settings)
    endpoint = None
    if metrics is not None:
        metrics.watch(devices)
        endpoint = MetricsEndpoint(metrics, settings.host, settings.metrics_port or 0)
        log.info("serving Prometheus metrics on http://%s:%d/metrics", settings.host, endpoint.port)
    await server.start()
    if http is not None:
        try:
            await http.start()
        except BaseException:
            await http.close()
            await server.stop(None)
            raise
        log.info("OpenAI-compatible HTTP on %s:%d", settings.host, http.port)
    devices.start()
    log.info(
        "listening on %s:%d (%s; %s; %s)",
        settings.host,
        port,
        ", ".join(f"{r.device} {str(r.registry.dtype).removeprefix('torch.')}" for r in devices.replicas),
        _describe_transport(settings),
        f"bearer tokens required ({len(settings.tokens)} configured)" if settings.tokens else "no auth",
    )
    log.debug("settings: %s", describe(settings))

    async def load() -> None:
        await devices.load_all(warm=settings.warmup)
        await asyncio.gather(*pending_updates)
        names = list(devices.primary.registry.entries)
        ready = [name for name in names if devices.state(name) is ModelState.READY]
        overall = SERVING if ready else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, overall)
        log.info(
            "%d of %d models ready; health %s",
            len(ready),
            len(names),
            health_pb2.HealthCheckResponse.ServingStatus.Name(overall),
        )

    loading = asyncio.get_running_loop().create_task(load(), name="load-models")
    return RunningServer(
        server, port, settings, devices, health_servicer, loading, admission, http, metrics, endpoint, tracing
    )


def _tracing(settings: Settings, provider: TracerProvider | None) -> Tracing | None:
    """The server's tracer, or None; OpenTelemetry is imported only when tracing is on."""
    if provider is None and not settings.otel:
        return None
    try:
        from autopipeline_server.tracing import Tracing
    except ImportError as err:
        raise RuntimeError(
            f"tracing is on but OpenTelemetry is not installed ({err.name} is missing): "
            "pip install 'autopipeline-grpc[server,tracing]'"
        ) from err
    return Tracing(provider, owned=False) if provider is not None else Tracing.from_settings(settings)


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Adds the listening port, with TLS (and client certificates) when configured; returns its number."""
    address = f"{settings.host}:{settings.port}"
    tls = read_tls_files(settings)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        cert_chain, private_key, client_ca = tls
        credentials = grpc.ssl_server_credentials(
            [(private_key, cert_chain)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port


def _describe_transport(settings: Settings) -> str:
    if settings.tls_client_ca_file:
        return "mutual TLS"
    return "TLS" if settings.tls_cert_file else "plaintext"


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains within `settings.grace` seconds."""
    running = await create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"autopipeline-server listening on {settings.host}:{running.port}", flush=True)
    if running.http_port is not None:
        print(f"autopipeline-server OpenAI HTTP on {settings.host}:{running.http_port}", flush=True)
    if running.metrics_port is not None:
        print(
            f"autopipeline-server metrics on http://{settings.host}:{running.metrics_port}/metrics",
            flush=True,
        )
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.grace)
    if not await running.stop():
        # The stuck device thread would keep the interpreter from exiting: leave without it.
        log.error("exiting with a call still stuck on the device thread")
        logging.shutdown()
        os._exit(1)
    log.info("stopped")
