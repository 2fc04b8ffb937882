"""The ``autopipeline`` command: generate images and inspect a server from the shell."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import grpc

from autopipeline._client import DEFAULT_TARGET, Client
from autopipeline._credentials import tls_credentials
from autopipeline._errors import AutoPipelineError
from autopipeline._types import (
    Completed,
    Event,
    GeneratedImage,
    ImageFormat,
    Progress,
    Queued,
    ServerInfo,
    Started,
    Task,
)

__all__ = ["main"]

_FORMAT_BY_SUFFIX = {
    ".png": ImageFormat.PNG,
    ".jpg": ImageFormat.JPEG,
    ".jpeg": ImageFormat.JPEG,
    ".webp": ImageFormat.WEBP,
}
_SUFFIX_BY_MIME_TYPE = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_BAR_WIDTH = 30


def parse_param(text: str) -> tuple[str, Any]:
    """Parses ``--param NAME=VALUE``: the value as JSON, or as a plain string when it is not JSON."""
    name, equals, raw = text.partition("=")
    name = name.strip()
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        # So that `--param output_type=pil` needs no JSON quoting.
        value = raw
    return name, value


def parse_adapter(text: str) -> tuple[str, float]:
    """Parses ``--adapter NAME=WEIGHT`` (a bare NAME applies the adapter at weight 1)."""
    name, equals, raw = (part.strip() for part in text.partition("="))
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT, got {text!r}")
    try:
        return name, float(raw) if equals else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the weight of adapter {name!r} must be a number, got {raw!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autopipeline`` command."""
    parser = argparse.ArgumentParser(
        prog="autopipeline", description="Generate images with an autopipeline-grpc server."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("AUTOPIPELINE_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help="the server (default: $AUTOPIPELINE_TARGET or %(default)s)",
    )
    parser.add_argument("--timeout", type=float, metavar="S", help="seconds each call may take")
    parser.add_argument("--tls", action="store_true", help="connect with TLS using the system's roots")
    parser.add_argument("--tls-ca", type=pathlib.Path, metavar="FILE", help="TLS with this root certificate")
    parser.add_argument("--tls-cert", type=pathlib.Path, metavar="FILE", help="client certificate (mTLS)")
    parser.add_argument("--tls-key", type=pathlib.Path, metavar="FILE", help="client private key (mTLS)")
    parser.add_argument(
        "--token",
        default=os.environ.get("AUTOPIPELINE_TOKEN") or None,
        metavar="TOKEN",
        help="bearer token sent with every call (default: $AUTOPIPELINE_TOKEN, which keeps it out of `ps`)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images and write them to files")
    generate.add_argument(
        "--task",
        choices=[task.value for task in Task],
        help="default: inpainting with --mask, image-to-image with --image, else text-to-image",
    )
    generate.add_argument("--prompt", required=True, metavar="TEXT")
    generate.add_argument("--negative-prompt", default="", metavar="TEXT")
    generate.add_argument("--image", type=pathlib.Path, metavar="FILE", help="input image")
    generate.add_argument(
        "--mask", type=pathlib.Path, metavar="FILE", help="inpainting mask (white = repaint)"
    )
    generate.add_argument(
        "--control-image", type=pathlib.Path, metavar="FILE", help="ControlNet conditioning image"
    )
    generate.add_argument(
        "--adapter",
        type=parse_adapter,
        action="append",
        default=[],
        metavar="NAME=WEIGHT",
        help="apply a LoRA adapter the model registers, at this weight (default 1); repeatable",
    )
    generate.add_argument("--model", default="", metavar="NAME", help="default: the server's default model")
    generate.add_argument(
        "--source", default="", metavar="HUB_ID_OR_PATH", help="an on-demand checkpoint the server allows"
    )
    generate.add_argument("--seed", type=int, metavar="N")
    generate.add_argument("--steps", type=int, metavar="N", help="denoising steps")
    generate.add_argument("--width", type=int, metavar="PX")
    generate.add_argument("--height", type=int, metavar="PX")
    generate.add_argument("--guidance-scale", type=float, metavar="G")
    generate.add_argument("--strength", type=float, metavar="S", help="image-to-image/inpainting, in (0, 1]")
    generate.add_argument("--num-images", type=int, default=1, metavar="N")
    generate.add_argument("--scheduler", default="", metavar="NAME", help="a scheduler class name")
    generate.add_argument(
        "--format", choices=[f.value for f in ImageFormat], help="default: from -o's extension, else png"
    )
    generate.add_argument("--quality", type=int, metavar="Q", help="JPEG/WebP quality, 1-100")
    generate.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="another pipeline argument, the value as JSON (else a string); repeatable",
    )
    generate.add_argument(
        "-o",
        "--output",
        type=pathlib.Path,
        default=pathlib.Path("."),
        metavar="PATH",
        help="a .png/.jpg/.webp file for one image, else a directory (default: .)",
    )

    inspect = commands.add_parser("inspect", help="describe the server and its models")
    inspect.add_argument("--model", metavar="NAME", help="only this model")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (1 for a failed call, 2 for bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.command == "generate":
        args.output_file, args.format = _output_file(parser, args)
    try:
        client = Client(args.target, timeout=args.timeout, credentials=_credentials(args), token=args.token)
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        with client:
            if args.command == "generate":
                _generate(client, args)
            else:
                _inspect(client, args)
    except AutoPipelineError as err:
        _print_error(err)
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Leaving the stream cancelled the call on the server; the traceback would add nothing.
        return 130
    return 0


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return tls_credentials(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)


def _output_file(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[pathlib.Path | None, str]:
    """Whether ``-o`` names a file (with the format its extension implies) or a directory."""
    output: pathlib.Path = args.output
    implied = _FORMAT_BY_SUFFIX.get(output.suffix.lower())
    if implied is None or output.is_dir():
        return None, args.format or ImageFormat.PNG.value
    if args.num_images != 1:
        parser.error(f"-o {output} names one file, but --num-images is {args.num_images}; give a directory")
    if args.format is not None and args.format != implied.value:
        parser.error(f"-o {output} implies --format {implied.value}, not {args.format}")
    return output, implied.value


def _task(args: argparse.Namespace) -> str:
    if args.task is not None:
        return str(args.task)
    if args.mask is not None:
        return Task.INPAINTING.value
    return Task.IMAGE_TO_IMAGE.value if args.image is not None else Task.TEXT_TO_IMAGE.value


def _generate(client: Client, args: argparse.Namespace) -> None:
    events = client.stream(
        args.prompt,
        task=_task(args),
        model=args.model,
        source=args.source,
        negative_prompt=args.negative_prompt,
        image=args.image,
        mask_image=args.mask,
        control_image=args.control_image,
        adapters=dict(args.adapter),
        width=args.width,
        height=args.height,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        strength=args.strength,
        num_images=args.num_images,
        seed=args.seed,
        scheduler=args.scheduler,
        output_format=args.format,
        output_quality=args.quality,
        parameters=dict(args.param),
    )
    progress = ProgressLine(sys.stderr)
    try:
        for event in events:
            progress.update(event)
            if isinstance(event, GeneratedImage):
                path = args.output_file or _image_path(args.output, event, args.format)
                path.parent.mkdir(parents=True, exist_ok=True)
                event.save(path)
                progress.clear()
                print(path, flush=True)
    finally:
        progress.close()


def _image_path(directory: pathlib.Path, image: GeneratedImage, requested_format: str) -> pathlib.Path:
    suffix = _SUFFIX_BY_MIME_TYPE.get(image.mime_type, requested_format)
    return directory / f"image-{image.index}-seed{image.seed}.{suffix}"


class ProgressLine:
    """Shows a stream's progress on one terminal line, or as one line per phase when not a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        # Carriage-return updates would turn a log file into one unreadable line.
        self._interactive = stream.isatty()
        self._last_kind: type[Event] | None = None
        self._width = 0

    def update(self, event: Event) -> None:
        """Shows ``event``, if it says something about progress."""
        text = _describe(event)
        if text is None:
            return
        if self._interactive:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif type(event) is not self._last_kind:
            self._stream.write(text + "\n")
        self._last_kind = type(event)
        self._stream.flush()

    def clear(self) -> None:
        """Blanks the terminal line, so that a line printed to stdout does not land in the middle of it."""
        if self._interactive and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0

    def close(self) -> None:
        """Ends the terminal line so that what follows starts on its own."""
        if self._interactive and self._width:
            self._stream.write("\n")
            self._stream.flush()


def _describe(event: Event) -> str | None:
    if isinstance(event, Queued):
        return f"queued: position {event.position + 1} of {event.queue_depth}"
    if isinstance(event, Started):
        return f"started: {event.pipeline_class}, {event.width}x{event.height}, {event.total_steps} steps"
    if isinstance(event, Progress):
        total = max(event.total_steps, 1)
        filled = _BAR_WIDTH * min(event.step, total) // total
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        return f"[{bar}] {event.step}/{event.total_steps} steps, {event.elapsed:.1f}s"
    if isinstance(event, GeneratedImage):
        return f"received image {event.index} (seed {event.seed})"
    if isinstance(event, Completed):
        return f"completed in {event.timings.total:.2f}s"
    return None


def _inspect(client: Client, args: argparse.Namespace) -> None:
    info = client.inspect(args.model)
    if args.json:
        print(json.dumps(_plain(info), indent=2))
    else:
        print(format_server_info(info))


def _plain(value: Any) -> Any:
    """Dataclasses, enums and containers as JSON-ready values (enums as their values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def format_server_info(info: ServerInfo) -> str:
    """A readable description of the server: one line for itself, a block per model."""
    lines = [
        f"server {info.version} on {info.device} (diffusers {info.diffusers_version}, "
        f"torch {info.torch_version}); queue {info.queue_depth}, running {info.running}"
    ]
    for model in info.models:
        default = " (default)" if model.is_default else ""
        lines.append("")
        lines.append(f"{model.name}{default}: {model.state.value}")
        if model.state_reason:
            lines.append(f"  reason:  {model.state_reason}")
        lines.append(f"  family:  {model.family} ({model.checkpoint_class})")
        lines.append(f"  dtype:   {model.dtype} on {model.device}")
        lines.append(f"  memory:  {model.parameter_bytes / 2**20:.1f} MiB")
        if model.controlnet:
            lines.append(f"  controlnet: {model.controlnet} (requests need a control image)")
        if model.adapters:
            lines.append(f"  adapters: {', '.join(adapter.name for adapter in model.adapters)}")
        width = max((len(task.task.value) for task in model.tasks), default=0)
        for task in model.tasks:
            lines.append(f"  {task.task.value:<{width}}  {task.pipeline_class}")
    return "\n".join(lines)


def _print_error(err: AutoPipelineError) -> None:
    reason = f" ({err.reason})" if err.reason else ""
    print(f"error: {err.code}{reason}: {err.message}", file=sys.stderr)
    for violation in err.field_violations:
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    if err.retry_after is not None:
        print(f"  retry after {err.retry_after:g}s", file=sys.stderr)
    if err.request_id:
        print(f"  request id: {err.request_id}", file=sys.stderr)
