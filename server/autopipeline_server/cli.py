"""`autopipeline-server`: serve models, build tiny offline checkpoints, or run the offline demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from autopipeline_server import __version__
from autopipeline_server.settings import (
    ACCELERATIONS,
    DTYPES,
    ConfigError,
    ModelSpec,
    check_model_sources,
    load_settings,
)

LOG_FORMATS = ("text", "json")


def _model(text: str) -> ModelSpec:
    try:
        return ModelSpec.parse(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


class _TinyFamilies:
    """`tiny.FAMILIES` for argparse's `choices`, imported only when tiny-model reads it.

    Importing tiny imports torch and diffusers (seconds); `serve --help` and `health` must not pay that.
    """

    def _names(self) -> tuple[str, ...]:
        from autopipeline_server.tiny import FAMILIES

        return FAMILIES

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autopipeline-server", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="json: one JSON object per line, the access line's fields as keys (default text)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve models over gRPC until SIGTERM/SIGINT")
    serve.add_argument(
        "--model",
        dest="models",
        action="append",
        type=_model,
        metavar="NAME=SOURCE",
        help="a local checkpoint directory or a hub id to serve; repeatable; the first is the default",
    )
    serve.add_argument(
        "--controlnet",
        dest="controlnets",
        action="append",
        metavar="MODEL=SOURCE",
        help="serve MODEL's tasks through their ControlNet pipelines with this ControlNet (a directory or "
        "hub id); requests then carry a control image; repeatable",
    )
    serve.add_argument(
        "--lora",
        dest="loras",
        action="append",
        metavar="MODEL:NAME=PATH",
        help="register a LoRA adapter (a local .safetensors file) for MODEL under NAME; requests apply "
        "adapters by name and weight; repeatable",
    )
    serve.add_argument("--config", help="a TOML or YAML file with the same settings (flags win)")
    serve.add_argument("--host", help="address to bind (default [::])")
    serve.add_argument("--port", type=int, help="port to bind (default 50051; 0 picks a free one)")
    serve.add_argument("--device", help="auto, cpu, mps, cuda or cuda:N (default auto)")
    serve.add_argument("--dtype", choices=DTYPES, help="weights dtype (default auto: float16 on GPUs)")
    serve.add_argument("--max-queue", type=int, help="requests that may wait; more get RESOURCE_EXHAUSTED")
    serve.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        help="RPCs handled at once (default 256); more get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--stream-idle-timeout",
        type=float,
        help="seconds a stream may wait for its client to read (default 60; 0 = never)",
    )
    serve.add_argument("--grace", type=float, help="seconds in-flight work may finish on shutdown")
    serve.add_argument("--no-warmup", dest="warmup", action="store_const", const=False, help="skip warm-up")
    serve.add_argument("--max-batch-size", type=int, help="images per batched call (default 1: no batching)")
    serve.add_argument("--max-batch-delay-ms", type=float, help="how long a request may wait for company")
    serve.add_argument(
        "--acceleration",
        choices=ACCELERATIONS,
        help="off: diffusers as loaded; eager: the denoiser channels_last with fused QKV projections, no "
        "compiler; compile: that, compiled and CUDA-graph-captured for the --compile-shapes; "
        "auto (default): compile on CUDA, eager on CPU, off elsewhere",
    )
    serve.add_argument(
        "--compile-shapes",
        metavar="WxH[xB],...",
        help="hot shapes compiled during warm-up (default: each model's default size; batch sizes 1 and "
        "--max-batch-size); any other shape runs eagerly",
    )
    serve.add_argument(
        "--compile-cache-dir", metavar="DIR", help="persist compiled artefacts here (shareable)"
    )
    serve.add_argument("--png-compress-level", type=int, help="zlib level 0-9 for PNG output (default 1)")
    serve.add_argument(
        "--allow-source",
        dest="allow_sources",
        action="append",
        metavar="PATTERN",
        help="let requests name sources matching this glob (e.g. 'org/*', '/models/*'); loaded on demand",
    )
    serve.add_argument("--memory-budget", help="bytes on-demand models may hold, e.g. 20GiB (default: none)")
    serve.add_argument(
        "--allow-pickle",
        action="store_const",
        const=True,
        help="also load .bin (pickle) weights; by default only safetensors load",
    )
    serve.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="require 'authorization: Bearer <token>' with a token from FILE (one per line; '#' comments); "
        "tokens may also come from $AUTOPIPELINE_AUTH_TOKENS (comma-separated)",
    )
    serve.add_argument("--tls-cert", dest="tls_cert_file", metavar="FILE", help="serve TLS: PEM cert chain")
    serve.add_argument("--tls-key", dest="tls_key_file", metavar="FILE", help="serve TLS: PEM private key")
    serve.add_argument(
        "--tls-client-ca",
        dest="tls_client_ca_file",
        metavar="FILE",
        help="mutual TLS: require client certificates signed by this PEM CA",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default off; 0 picks a free port)",
    )
    serve.add_argument(
        "--otel",
        action="store_const",
        const=True,
        help="trace RPCs with OpenTelemetry, exported over OTLP (needs the tracing extra; "
        "also on when OTEL_EXPORTER_OTLP_ENDPOINT is set)",
    )
    serve.add_argument(
        "--otel-endpoint", metavar="URL", help="the OTLP endpoint (default: the exporter's own)"
    )

    serve.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="also serve the OpenAI-compatible images API over HTTP on PORT (0 picks a free one; "
        "default off)",
    )

    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight checkpoint (offline)")
    tiny.add_argument(
        "--family", default="sd15", choices=_TinyFamilies(), metavar="FAMILY", help="one of: %(choices)s"
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("out_dir", type=Path)

    lora = commands.add_parser(
        "tiny-lora", help="write a tiny random LoRA adapter for a checkpoint's UNet (offline)"
    )
    lora.add_argument("checkpoint", type=Path, help="a diffusers checkpoint directory with a unet/")
    lora.add_argument("out_file", type=Path, help="the .safetensors file to write")
    lora.add_argument("--seed", type=int, default=0)

    probe = commands.add_parser("health", help="exit 0 if a server reports SERVING (for container probes)")
    probe.add_argument("--target", default="localhost:50051")
    probe.add_argument("--service", default="", help="a model name or service; empty = the whole server")
    probe.add_argument("--timeout", type=float, default=5.0)
    probe.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting this PEM root certificate")
    probe.add_argument("--tls-cert", metavar="FILE", help="client certificate, for a mutual-TLS server")
    probe.add_argument("--tls-key", metavar="FILE", help="client private key, for a mutual-TLS server")
    probe.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name in the server's certificate, when it is not the target's host (e.g. localhost)",
    )

    demo = commands.add_parser("demo", help="build a tiny model, serve it, and generate for all three tasks")
    demo.add_argument("--out", type=Path, default=Path("autopipeline-demo"), help="where images are written")
    demo.add_argument("--family", default="sd15", help="tiny model family (sd15 or sdxl)")
    return parser


def log_formatter(log_format: str) -> logging.Formatter:
    """Plain lines, or (`json`) one JSON object per line carrying each record's extra fields."""
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(level: str, log_format: str = "text", *, quiet_libraries: bool = True) -> None:
    """Our log lines at `level`; the libraries' progress bars and advice only when debugging.

    `quiet_libraries=False` leaves diffusers and transformers alone, and unimported.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])
    # The libraries' warnings (diffusers' deprecations, torch's advice) as log records on this handler:
    # with --log-format json, a bare warning on stderr would be the one line a log shipper cannot parse.
    logging.captureWarnings(True)
    if quiet_libraries and level != "DEBUG":
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        for library in (diffusers_logging, transformers_logging):
            library.set_verbosity_error()
            library.disable_progress_bar()


def check_health(
    target: str,
    service: str,
    timeout: float,
    *,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_server_name: str | None = None,
) -> int:
    """Queries grpc.health.v1 and prints the status; 0 only for SERVING.

    Any TLS argument connects with TLS; health needs no bearer token.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca or tls_cert or tls_key or tls_server_name:
        from autopipeline import tls_credentials

        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        try:
            credentials = tls_credentials(ca_file=tls_ca, cert_file=tls_cert, key_file=tls_key)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            print(f"{target}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{target} {service or '(server)'}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def serve_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Every `serve` flag whose dest is a setting; argparse leaves the ones not given as None."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "log_level", "log_format")}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Container probes run `health` every few seconds: it must not pay for importing torch and diffusers.
    configure_logging(args.log_level, args.log_format, quiet_libraries=args.command != "health")
    if args.command == "tiny-model":
        from autopipeline_server.tiny import build_tiny_checkpoint

        try:
            path = build_tiny_checkpoint(args.family, args.out_dir, seed=args.seed)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(path)
        return 0
    if args.command == "tiny-lora":
        from autopipeline_server.tiny_lora import build_tiny_lora

        try:
            print(build_tiny_lora(args.checkpoint, args.out_file, seed=args.seed))
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "health":
        return check_health(
            args.target,
            args.service,
            args.timeout,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
        )
    if args.command == "demo":
        from autopipeline_server.demo import run_demo

        return asyncio.run(run_demo(args.out, family=args.family))

    try:
        settings = load_settings(serve_flags(args), os.environ, config_file=args.config)
        check_model_sources(settings)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from autopipeline_server.server import serve

    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
