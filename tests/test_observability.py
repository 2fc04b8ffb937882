"""Observability on a real server: Prometheus metrics, OpenTelemetry spans, request ids and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.cli import build_parser, log_formatter, serve_flags
from autopipeline_server.observe import request_id_from
from autopipeline_server.settings import ConfigError, ModelSpec, load_settings

from .conftest import make_settings
from .support import ServerThread, fault_in_denoiser

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
T2I = pb.TASK_TEXT_TO_IMAGE
SMALL = {"task": T2I, "width": 64, "height": 64, "num_inference_steps": 2}
GENERATE_SPAN = "/autopipeline.v1.AutoPipelineService/Generate"


def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    """Waits for something the server does after the client has seen the end of a call."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def observed(checkpoints: dict[str, Path], spans: InMemorySpanExporter) -> Iterator[ServerThread]:
    """One model, metrics on a free port, and every span kept in memory."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = make_settings(
        checkpoints, models=(ModelSpec("sd15", str(checkpoints["sd15"])),), metrics_port=0
    )
    running = ServerThread(settings, tracer_provider=provider)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def observed_stub(observed: ServerThread) -> Iterator[pb_grpc.AutoPipelineServiceStub]:
    with grpc.insecure_channel(observed.target) as channel:
        yield pb_grpc.AutoPipelineServiceStub(channel)


def metrics_port(server: ServerThread) -> int:
    port = server.running.metrics_port
    assert port is not None and port > 0
    return port


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_count_requests_outcomes_batches_and_cancellations(
    observed: ServerThread, observed_stub: pb_grpc.AutoPipelineServiceStub
) -> None:
    port = metrics_port(observed)
    before = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(scrape(port), name, **labels) - value(before, name, **labels)

    ok = list(
        observed_stub.Generate(pb.GenerateRequest(prompt="a", num_images=2, seed=1, **SMALL), timeout=60)
    )
    assert ok[-1].HasField("completed")
    with pytest.raises(grpc.RpcError) as invalid:  # 60 is no multiple of 8: the model's rule (prepare.py)
        list(
            observed_stub.Generate(pb.GenerateRequest(prompt="a", task=T2I, width=60, height=64), timeout=60)
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    observed_stub.Inspect(pb.InspectRequest())

    # One request is held inside its denoiser while another waits behind it; the waiting one is
    # cancelled in the queue, then the held one while running. The hold starts at the third pass:
    # every scheduler has reported a step by then (PNDM's first report follows its second pass).
    release = threading.Event()
    with fault_in_denoiser(observed, "sd15", lambda n: None if n < 3 else release.wait(60)):
        running = observed_stub.Generate(
            pb.GenerateRequest(prompt="held", task=T2I, width=64, height=64, num_inference_steps=20),
            timeout=60,
        )
        assert any(event.HasField("progress") for event in running)  # stops at the first
        queued = observed_stub.Generate(pb.GenerateRequest(prompt="waits", **SMALL), timeout=60)
        assert any(event.HasField("queued") for event in queued)
        queued.cancel()
        wait_for(lambda: observed.running.worker.queue_depth == 0)
        running.cancel()
        release.set()
        # The held call stops at its next step, after the callers have seen their cancellations.
        wait_for(lambda: delta("autopipeline_cancellations_total", where="running") == 1)
        wait_for(
            lambda: (
                delta(
                    "autopipeline_requests_total",
                    rpc="Generate",
                    task="text-to-image",
                    model="sd15",
                    code="CANCELLED",
                )
                == 2
            )
        )

    after = scrape(port)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    generate = {"rpc": "Generate", "task": "text-to-image", "model": "sd15"}
    assert grew("autopipeline_requests_total", **generate, code="OK") == 1
    assert grew("autopipeline_requests_total", **generate, code="INVALID_ARGUMENT") == 1
    assert grew("autopipeline_requests_total", rpc="Inspect", task="", model="", code="OK") == 1
    assert grew("autopipeline_request_duration_seconds_count", rpc="Generate", code="OK") == 1
    assert grew("autopipeline_images_generated_total", model="sd15", task="text-to-image") == 2
    assert grew("autopipeline_cancellations_total", where="queued") == 1
    assert grew("autopipeline_cancellations_total", where="running") == 1
    # Two pipeline calls ran (the OK one with 2 images, the held one with 1); the queued one never did.
    assert grew("autopipeline_batch_images_count") == 2 and grew("autopipeline_batch_images_sum") == 3
    assert grew("autopipeline_batch_requests_count") == 2 and grew("autopipeline_batch_requests_sum") == 2
    assert grew("autopipeline_queue_wait_seconds_count", model="sd15") == 2
    assert grew("autopipeline_time_to_first_step_seconds_count", model="sd15") == 2
    assert grew("autopipeline_step_duration_seconds_count", model="sd15") >= 3
    assert grew("autopipeline_step_duration_seconds_sum", model="sd15") > 0
    assert value(after, "autopipeline_queue_depth") == 0
    assert value(after, "autopipeline_model_state", model="sd15", state="ready") == 1
    assert value(after, "autopipeline_model_state", model="sd15", state="loading") == 0
    assert value(after, "autopipeline_model_parameter_bytes", model="sd15") > 0
    assert value(after, "autopipeline_model_load_seconds", model="sd15") > 0


def test_servers_in_one_process_keep_their_own_metrics(
    checkpoints: dict[str, Path], observed: ServerThread
) -> None:
    settings = make_settings(
        checkpoints, models=(ModelSpec("other", str(checkpoints["sd15"])),), metrics_port=0
    )
    second = ServerThread(settings)
    try:
        assert metrics_port(second) != metrics_port(observed)
        with grpc.insecure_channel(second.target) as channel:
            list(pb_grpc.AutoPipelineServiceStub(channel).Generate(pb.GenerateRequest(prompt="a", **SMALL)))
        mine, theirs = scrape(metrics_port(second)), scrape(metrics_port(observed))
        ok = {"rpc": "Generate", "task": "text-to-image", "code": "OK"}
        assert value(mine, "autopipeline_requests_total", **ok, model="other") == 1
        assert value(theirs, "autopipeline_requests_total", **ok, model="other") == 0
        assert ("autopipeline_model_state", frozenset({("model", "other"), ("state", "ready")})) not in theirs
    finally:
        second.stop()


def test_metrics_are_off_by_default(server: ServerThread) -> None:
    assert server.running.metrics_port is None and server.running.metrics is None


# ------------------------------------------------------------------------------------------ tracing


def finished_spans(spans: InMemorySpanExporter, request_id: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The server span of the request with this id, and its children."""

    def server_span() -> ReadableSpan | None:
        for span in spans.get_finished_spans():
            if span.attributes and span.attributes.get("autopipeline.request_id") == request_id:
                return span
        return None

    wait_for(lambda: server_span() is not None)
    parent = server_span()
    assert parent is not None
    children = [
        s
        for s in spans.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return parent, children


def test_a_callers_traceparent_continues_its_trace(
    observed_stub: pb_grpc.AutoPipelineServiceStub, spans: InMemorySpanExporter
) -> None:
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    metadata = (("traceparent", f"00-{trace_id}-{parent_id}-01"), ("x-request-id", "traced-1"))
    list(
        observed_stub.Generate(pb.GenerateRequest(prompt="a", seed=3, **SMALL), metadata=metadata, timeout=60)
    )
    server, children = finished_spans(spans, "traced-1")
    assert server.name == GENERATE_SPAN and server.kind is trace.SpanKind.SERVER
    assert trace.format_trace_id(server.context.trace_id) == trace_id
    assert server.parent is not None and trace.format_span_id(server.parent.span_id) == parent_id
    assert server.attributes is not None and server.attributes["autopipeline.model"] == "sd15"
    by_name = {span.name: span for span in children}
    assert set(by_name) == {"autopipeline.queue", "autopipeline.pipeline", "autopipeline.encode"}
    queue, pipeline, encode = (by_name[f"autopipeline.{n}"] for n in ("queue", "pipeline", "encode"))
    assert all(span.context.trace_id == server.context.trace_id for span in children)
    assert pipeline.attributes is not None and pipeline.attributes["autopipeline.pipeline_class"] == (
        "StableDiffusionPipeline"
    )
    # The children follow one another and lie inside the request's span.
    times = [server.start_time, queue.start_time, queue.end_time, pipeline.start_time]
    times += [pipeline.end_time, encode.start_time, encode.end_time, server.end_time]
    assert times == sorted(times), times


def test_failed_and_untraced_requests(
    observed_stub: pb_grpc.AutoPipelineServiceStub, spans: InMemorySpanExporter
) -> None:
    with pytest.raises(grpc.RpcError):
        list(
            observed_stub.Generate(
                pb.GenerateRequest(prompt="a", task=T2I, width=60, height=64),
                metadata=(("x-request-id", "traced-2"),),
            )
        )
    server, children = finished_spans(spans, "traced-2")
    # OpenTelemetry's conventions leave a server span's status unset for the caller's errors.
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 3
    assert server.attributes["autopipeline.model"] == "sd15" and not children  # it never queued
    assert server.parent is None  # no traceparent: a trace of its own


# ------------------------------------------------------------------------------------------ request ids


def test_request_id_from_metadata() -> None:
    assert request_id_from((("x-request-id", "abc-123_/:=."),)) == "abc-123_/:=."
    assert request_id_from((("x-request-id", "x" * 128),)) == "x" * 128
    for unacceptable in ("x" * 129, "has space", "", "tab\there", "é"):
        minted = request_id_from((("other", "v"), ("x-request-id", unacceptable)))
        assert minted != unacceptable and len(minted) == 32
    assert request_id_from(None) != request_id_from(None)


def test_a_callers_request_id_is_echoed_and_logged(
    observed_stub: pb_grpc.AutoPipelineServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autopipeline_server.access")
    call = observed_stub.Generate(
        pb.GenerateRequest(prompt="a", **SMALL), metadata=(("x-request-id", "mine-1"),)
    )
    list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "mine-1"

    with pytest.raises(grpc.RpcError) as caught:
        list(
            observed_stub.Generate(
                pb.GenerateRequest(prompt="a", task=T2I, width=60, height=64),
                metadata=(("x-request-id", "mine-2"),),
            )
        )
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.metadata["request_id"] == "mine-2"
    assert dict(caught.value.trailing_metadata() or ())["x-request-id"] == "mine-2"

    too_long = "y" * 129
    call = observed_stub.Generate(
        pb.GenerateRequest(prompt="a", **SMALL), metadata=(("x-request-id", too_long),)
    )
    list(call)
    minted = dict(call.initial_metadata())["x-request-id"]
    assert minted != too_long and len(minted) == 32

    def outcomes() -> dict[object, object]:
        return {getattr(r, "request_id", None): getattr(r, "status", None) for r in caplog.records}

    wait_for(lambda: "mine-2" in outcomes())  # an error status reaches the caller before the log line
    assert outcomes()["mine-1"] == "OK" and outcomes()["mine-2"] == "INVALID_ARGUMENT"
    assert outcomes()[minted] == "OK"


# ------------------------------------------------------------------------------------------ JSON logs


def test_json_log_lines_carry_the_access_fields(observed_stub: pb_grpc.AutoPipelineServiceStub) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log_formatter("json"))
    logger = logging.getLogger("autopipeline_server")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        list(
            observed_stub.Generate(
                pb.GenerateRequest(prompt="a", num_images=2, **SMALL), metadata=(("x-request-id", "json-1"),)
            )
        )
        with pytest.raises(grpc.RpcError):
            observed_stub.Inspect(pb.InspectRequest(model="nope"), metadata=(("x-request-id", "json-2"),))
        # gRPC sends an error status before the handler's exception unwinds to the access layer.
        wait_for(lambda: '"json-2"' in stream.getvalue())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = {line["request_id"]: line for line in lines if "request_id" in line}
    ok = access["json-1"]
    assert ok["logger"] == "autopipeline_server.access" and ok["level"] == "INFO"
    assert (ok["rpc"], ok["model"], ok["task"], ok["status"], ok["images"]) == (
        "Generate",
        "sd15",
        "text-to-image",
        "OK",
        2,
    )
    for timing in ("queued_seconds", "running_seconds", "encoding_seconds", "total_seconds"):
        assert isinstance(ok[timing], float) and ok[timing] >= 0, timing
    assert ok["total_seconds"] >= ok["queued_seconds"] + ok["running_seconds"]
    assert len(ok["trace_id"]) == 32  # this server traces
    missing = access["json-2"]
    assert (missing["rpc"], missing["status"]) == ("Inspect", "NOT_FOUND") and "nope" in missing["details"]


def test_library_warnings_are_json_log_lines_too() -> None:
    """A library's warning goes through the server's handler, so every stderr line of a JSON log parses."""
    code = (
        "import warnings; from autopipeline_server.cli import configure_logging; "
        "configure_logging('INFO', 'json', quiet_libraries=False); "
        "warnings.warn('`upcast_vae` is deprecated', FutureWarning)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [("py.warnings", "WARNING")], result.stderr
    assert "`upcast_vae` is deprecated" in lines[0]["message"]


# ------------------------------------------------------------------------------------------ settings


def test_observability_settings_and_flags() -> None:
    base = {"models": "m=/m"}
    assert load_settings(base, {}).metrics_port is None
    assert load_settings(base, {"AUTOPIPELINE_METRICS_PORT": "9100"}).metrics_port == 9100
    assert load_settings({**base, "metrics_port": 0}, {"AUTOPIPELINE_METRICS_PORT": "9100"}).metrics_port == 0
    assert load_settings(base, {"AUTOPIPELINE_METRICS_PORT": "off"}).metrics_port is None
    with pytest.raises(ConfigError, match="metrics_port"):
        load_settings({**base, "metrics_port": 70000}, {})

    assert load_settings(base, {}).otel is False
    otel = load_settings(
        base, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SERVICE_NAME": "gen"}
    )
    assert (otel.otel, otel.otel_endpoint, otel.otel_service_name) == (True, "http://collector:4317", "gen")
    traces_first = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b",
    }
    assert load_settings(base, traces_first).otel_endpoint == "http://b"
    disabled = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_SDK_DISABLED": "true"}
    assert load_settings(base, disabled).otel is False
    assert load_settings(base, {**disabled, "AUTOPIPELINE_OTEL": "1"}).otel is True  # ours win over OTEL_*
    with pytest.raises(ConfigError, match="otel_protocol"):
        load_settings(base, {"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"})

    args = build_parser().parse_args(
        [
            "--log-format",
            "json",
            "serve",
            "--model",
            "m=/m",
            "--metrics-port",
            "0",
            "--otel",
            "--otel-endpoint",
            "x:1",
        ]
    )
    assert args.log_format == "json"
    settings = load_settings(serve_flags(args), {})
    assert (settings.metrics_port, settings.otel, settings.otel_endpoint) == (0, True, "x:1")


def test_otlp_exporters_follow_the_protocol() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    from autopipeline_server.tracing import Tracing, otlp_exporter

    base = {"models": "m=/m", "otel": True}
    grpc_exporter = otlp_exporter(load_settings({**base, "otel_endpoint": "localhost:4317"}, {}))
    assert isinstance(grpc_exporter, GrpcExporter)
    grpc_exporter.shutdown()
    http = load_settings(
        {**base, "otel_protocol": "http/protobuf", "otel_endpoint": "http://collector:4318"}, {}
    )
    http_exporter = otlp_exporter(http)
    assert isinstance(http_exporter, HttpExporter)
    assert http_exporter._endpoint == "http://collector:4318/v1/traces"
    http_exporter.shutdown()
    tracing = Tracing.from_settings(http)
    tracing.shutdown()


def test_a_server_without_tracing_never_imports_opentelemetry(checkpoints: dict[str, Path]) -> None:
    """Tracing stays optional: a fresh interpreter serves a request without loading OpenTelemetry."""
    script = f"""
import asyncio, sys
import grpc
from autopipeline.v1 import autopipeline_pb2 as pb, autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.server import create_server
from autopipeline_server.settings import ModelSpec, Settings

async def main():
    settings = Settings(models=(ModelSpec("m", {str(checkpoints["sd15"])!r}),), host="127.0.0.1", port=0,
                        device="cpu", metrics_port=0, warmup=False)
    running = await create_server(settings)
    await running.wait_until_loaded()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{{running.port}}") as channel:
        request = pb.GenerateRequest(prompt="a", task=pb.TASK_TEXT_TO_IMAGE, width=64, height=64,
                                     num_inference_steps=1)
        events = [e async for e in pb_grpc.AutoPipelineServiceStub(channel).Generate(request)]
    assert events[-1].HasField("completed")
    await running.stop(1)
    print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
