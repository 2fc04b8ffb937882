"""Wires the gRPC server: service, health, reflection, the worker and the models; runs and drains it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # grpc-stubs predate aio
from grpc_reflection.v1alpha import reflection

from autopipeline_server.admission import Admission
from autopipeline_server.auth import BearerTokenInterceptor
from autopipeline_server.domain import ModelState
from autopipeline_server.pipelines import resolve_device, resolve_dtype
from autopipeline_server.registry import ModelEntry, ModelRegistry
from autopipeline_server.servicer import SERVICE_NAME, AutoPipelineServicer, service_handler
from autopipeline_server.settings import Settings, describe, read_tls_files
from autopipeline_server.worker import STUCK_CALL_SECONDS, InferenceWorker

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
    registry: ModelRegistry
    worker: InferenceWorker
    health: health_aio.HealthServicer
    loading: asyncio.Task[None]
    admission: Admission

    async def wait_until_loaded(self) -> None:
        """Returns when every configured model has finished loading (ready or failed)."""
        await asyncio.shield(self.loading)

    async def stop(self, grace: float | None = None, *, stuck_after: float = STUCK_CALL_SECONDS) -> bool:
        """Drains: health turns NOT_SERVING, new requests get UNAVAILABLE, in-flight work gets `grace`.

        Returns within about grace + `stuck_after` + 1 seconds whatever is running; False when a
        call stuck inside a step kept the device thread (the process should then exit: see `serve`).
        """
        grace = self.settings.grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        clean = await self.worker.drain(grace, stuck_after=stuck_after)
        await self.server.stop(grace=1.0)
        self.loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.loading
        await self.worker.close(wait=clean)
        self.admission.close()
        self.registry.close()
        return clean


async def create_server(settings: Settings) -> RunningServer:
    """Builds, binds and starts the server; models load in the background while health says NOT_SERVING."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    health_servicer = health_aio.HealthServicer()

    async def publish(entry: ModelEntry) -> None:
        await health_servicer.set(
            entry.spec.name, SERVING if entry.state is ModelState.READY else NOT_SERVING
        )

    pending_updates: set[asyncio.Task[None]] = set()

    def on_state_change(entry: ModelEntry) -> None:
        task = asyncio.get_running_loop().create_task(publish(entry))
        pending_updates.add(task)
        task.add_done_callback(pending_updates.discard)

    worker = InferenceWorker(
        max_queue=settings.max_queue,
        max_batch_size=settings.max_batch_size,
        max_batch_delay=settings.max_batch_delay_ms / 1000,
    )
    registry = ModelRegistry(
        settings, device=device, dtype=dtype, worker=worker, on_state_change=on_state_change
    )
    admission = Admission(settings, worker.stats, worker.retry_hint)
    servicer = AutoPipelineServicer(settings, registry, worker, admission)

    server = grpc.aio.server(
        interceptors=[BearerTokenInterceptor(settings.tokens)] if settings.tokens else None,
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
    for name in ("", SERVICE_NAME, *registry.entries):
        await health_servicer.set(name, NOT_SERVING)
    port = _bind(server, settings)
    await server.start()
    worker.start()
    log.info(
        "listening on %s:%d (device %s, dtype %s; %s; %s)",
        settings.host,
        port,
        device,
        dtype,
        _describe_transport(settings),
        f"bearer tokens required ({len(settings.tokens)} configured)" if settings.tokens else "no auth",
    )
    log.debug("settings: %s", describe(settings))

    async def load() -> None:
        await registry.load_all(warm=settings.warmup)
        await asyncio.gather(*pending_updates)
        ready = [e for e in registry.entries.values() if e.state is ModelState.READY]
        overall = SERVING if ready else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, overall)
        log.info(
            "%d of %d models ready; health %s",
            len(ready),
            len(registry.entries),
            health_pb2.HealthCheckResponse.ServingStatus.Name(overall),
        )

    loading = asyncio.get_running_loop().create_task(load(), name="load-models")
    return RunningServer(server, port, settings, registry, worker, health_servicer, loading, admission)


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
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.grace)
    if not await running.stop():
        # The stuck device thread would keep the interpreter from exiting: leave without it.
        log.error("exiting with a call still stuck on the device thread")
        logging.shutdown()
        os._exit(1)
    log.info("stopped")
