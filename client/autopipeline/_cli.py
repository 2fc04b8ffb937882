"""The ``autopipeline`` command: generate images and inspect a server from the shell."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import json
import os
import pathlib
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, TextIO

import grpc
from PIL import Image
from tqdm import tqdm

from autopipeline._client import DEFAULT_TARGET, Client
from autopipeline._credentials import tls_credentials
from autopipeline._errors import AutoPipelineError, UnavailableError
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
        metavar="TARGET",
        help="the server as HOST:PORT, or several as dns:///NAME:PORT or ipv4:HOST:PORT,HOST:PORT "
        "(calls are spread round-robin); default: $AUTOPIPELINE_TARGET or %(default)s",
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
        help="a .png/.jpg/.jpeg/.webp file for one image, else a directory (default: .)",
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
            args.image_data = _read_input("--image", args.image)
            args.mask_data = _read_input("--mask", args.mask)
        except OSError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
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
        _print_error(err, args.target)
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
        if not output.is_dir() and output.suffix.lower() in Image.registered_extensions():
            # An image name the server cannot produce, e.g. x.gif: not a directory to create.
            parser.error(
                f"-o {output}: the server writes {', '.join(_FORMAT_BY_SUFFIX)} files, "
                f"not {output.suffix}; give one of those, or a directory"
            )
        return None, args.format or ImageFormat.PNG.value
    if args.num_images != 1:
        parser.error(f"-o {output} names one file, but --num-images is {args.num_images}; give a directory")
    if args.format is not None and args.format != implied.value:
        parser.error(f"-o {output} implies --format {implied.value}, not {args.format}")
    return output, implied.value


def _read_input(flag: str, path: pathlib.Path | None) -> bytes | None:
    """The bytes of an input file, read before connecting; the error names the flag and the file."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise OSError(f"{flag} {path}: {err.strerror or err}") from err


def _generate(client: Client, args: argparse.Namespace) -> None:
    # No --task: the SDK infers it from the inputs (inpainting with --mask, image-to-image with --image).
    stream = client.stream(
        args.prompt,
        task=args.task,
        model=args.model,
        source=args.source,
        negative_prompt=args.negative_prompt,
        image=args.image_data,
        mask_image=args.mask_data,
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
    progress = ProgressDisplay(sys.stderr)
    with stream as events, contextlib.closing(progress):
        for event in events:
            progress.update(event)
            if isinstance(event, GeneratedImage):
                path = args.output_file or _image_path(args.output, event, args.format)
                path.parent.mkdir(parents=True, exist_ok=True)
                event.save(path)
                print(path, flush=True)


def _image_path(directory: pathlib.Path, image: GeneratedImage, requested_format: str) -> pathlib.Path:
    suffix = _SUFFIX_BY_MIME_TYPE.get(image.mime_type, requested_format)
    return directory / f"image-{image.index}-seed{image.seed}.{suffix}"


class ProgressDisplay:
    """Shows a stream's progress on stderr: a tqdm bar on a terminal, plain lines otherwise.

    On a terminal, denoising steps drive a tqdm bar (steps, rate and ETA) and each other phase
    prints one line. Elsewhere (a log file, a pipe), where a bar redrawn with carriage returns
    would be one unreadable line, each phase prints one line and steps print a line per tenth of
    the way. Queue positions are shown 1-based ("position 1 of 3" runs next).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._interactive = stream.isatty()
        self._bar: tqdm[Any] | None = None
        self._last_line: str | None = None
        self._tenth = -1

    def update(self, event: Event) -> None:
        """Shows ``event``, if it says something about progress."""
        if isinstance(event, Progress):
            self._progress(event)
            return
        # Denoising is over: the bar is finished before anything else is printed.
        self.close()
        text = _describe(event)
        if text is not None and text != self._last_line:
            self._write(text)

    def close(self) -> None:
        """Closes the bar, if one is showing, so that what follows starts on its own line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _progress(self, event: Progress) -> None:
        if self._interactive:
            if self._bar is None:
                self._bar = tqdm(
                    total=event.total_steps,
                    desc="denoising",
                    unit="step",
                    file=self._stream,
                    dynamic_ncols=True,
                )
            self._bar.update(event.step - self._bar.n)
            return
        total = max(event.total_steps, 1)
        tenth = 10 * min(event.step, total) // total
        if tenth == self._tenth:
            return
        self._tenth = tenth
        rate = event.step / event.elapsed if event.elapsed > 0 else 0.0
        left = f", about {(total - event.step) / rate:.1f}s left" if rate > 0 else ""
        self._write(
            f"step {event.step}/{event.total_steps} in {event.elapsed:.1f}s ({rate:.2f} steps/s{left})"
        )

    def _write(self, text: str) -> None:
        self._last_line = text
        self._stream.write(text + "\n")
        self._stream.flush()


def _describe(event: Event) -> str | None:
    if isinstance(event, Queued):
        # The wire's (and the SDK's) position is 0-based; people count from 1.
        return f"queued: position {event.position + 1} of {event.queue_depth}"
    if isinstance(event, Started):
        return f"started: {event.pipeline_class}, {event.width}x{event.height}, {event.total_steps} steps"
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
    """A readable description of the server: its software and limits, then a block per model."""
    limits = info.limits
    batching = (
        f"up to {info.max_batch_images} images per call, waiting {info.max_batch_delay * 1000:g} ms"
        if info.max_batch_images > 1
        else "off"
    )
    lines = [
        f"server {info.version} on {info.device} (diffusers {info.diffusers_version}, "
        f"torch {info.torch_version}); queue {info.queue_depth}, running {info.running}",
        *_wrapped(
            "limits:   ",
            f"{limits.max_width}x{limits.max_height} px, {limits.max_num_inference_steps} steps, "
            f"{limits.max_num_images} images, prompts of {limits.max_prompt_length} chars, "
            f"{limits.max_parameters} parameters, inputs of {limits.max_input_pixels:,} px, "
            f"requests of {limits.max_request_bytes / 2**20:g} MiB",
        ),
        f"queue:    {limits.max_queue} waiting at most; batching {batching}",
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
            previews = ", previews" if task.supports_previews else ""
            lines.append(
                f"  {task.task.value:<{width}}  {task.pipeline_class} "
                f"(default {task.default_width}x{task.default_height}{previews})"
            )
            others = [name for name in task.schedulers if name != task.default_scheduler]
            schedulers = ", ".join([f"{task.default_scheduler} (default)", *others])
            lines.extend(_wrapped("    schedulers: ", schedulers))
            if task.parameters:
                names = ", ".join(parameter.name for parameter in task.parameters)
                lines.extend(_wrapped("    parameters: ", names))
    return "\n".join(lines)


def _wrapped(label: str, text: str) -> list[str]:
    """``label`` then ``text``, wrapped at commas to 100 columns, continued under the text's start."""
    indent = " " * len(label)
    return textwrap.wrap(
        text, width=100, initial_indent=label, subsequent_indent=indent, break_long_words=False
    )


def _print_error(err: AutoPipelineError, target: str) -> None:
    reason = f" ({err.reason})" if err.reason else ""
    print(f"error: {err.code}{reason}: {err.message}", file=sys.stderr)
    if isinstance(err, UnavailableError) and err.reason is None and err.request_id is None:
        # No server answered: UNAVAILABLE from the server itself carries a reason and a request id.
        print(f"  is the server running at {target}?", file=sys.stderr)
    for violation in err.field_violations:
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    if err.retry_after is not None:
        print(f"  retry after {err.retry_after:g}s", file=sys.stderr)
    if err.request_id:
        print(f"  request id: {err.request_id}", file=sys.stderr)
