"""Server settings: one frozen object built from defaults, a config file, environment variables and flags."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MiB = 1024 * 1024
ENV_PREFIX = "AUTOPIPELINE_"
# Ports of optional endpoints: None keeps them off.
OPTIONAL_PORTS = ("http_port", "metrics_port")
DEVICES = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# How the denoiser runs: as loaded, prepared and eager, or also compiled and graph-captured for
# declared shapes (acceleration.py).
ACCELERATIONS = ("auto", "off", "eager", "compile")
_HOT_SHAPE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")
# A hub repository id ("org/name"); anything else that is not a directory is no source.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# peft keys adapters by name in torch ModuleDicts, which refuse '.' in keys.
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Per-model options given as flags or environment variables ("NAME=SOURCE", "MODEL:NAME=PATH"); in a
# config file they are fields of the model entry (see `ModelSpec.from_table`).
MODEL_OPTIONS = ("controlnets", "loras")
# A bearer token travels as gRPC metadata: printable ASCII, and no spaces so "Bearer <token>" parses.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
# Secrets come from `auth_token_file` or this variable, never from a config file or a flag
# (config files get committed, flags show in `ps`).
TOKENS_VARIABLE = f"{ENV_PREFIX}AUTH_TOKENS"
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
# OpenTelemetry's own variables (the names every OTel SDK reads), mapped onto settings between the
# config file and AUTOPIPELINE_* variables; the first one present of each list wins.
_OTEL_VARIABLES = {
    "otel_endpoint": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    "otel_protocol": ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    "otel_service_name": ("OTEL_SERVICE_NAME",),
}


class ConfigError(ValueError):
    """The operator's configuration is invalid; the message says which setting and why."""


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter registered for a model: the name requests use and its local safetensors file."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """Parses `NAME=PATH`."""
        name, sep, path = (part.strip() for part in text.partition("="))
        if not sep or not path:
            raise ConfigError(f"LoRA adapter {text!r} must be NAME=PATH")
        if not _ADAPTER_NAME.match(name):
            raise ConfigError(f"LoRA adapter name {name!r} must be 1-64 letters, digits, '_' or '-'")
        return cls(name=name, path=path)


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: the name requests use and where its weights are (a directory or a hub id)."""

    name: str
    source: str
    # A ControlNet (directory or hub id) to serve the model's ControlNet pipelines with; empty: none
    # beyond one the checkpoint itself holds.
    controlnet: str = ""
    # LoRA adapters loaded with the model, which requests may apply by name.
    adapters: tuple[AdapterSpec, ...] = ()
    # Per-model load options (config file only; `--model NAME=SOURCE` takes the defaults).
    # dtype: "auto" follows the server-wide `dtype`; Flux and other DiTs want "bfloat16".
    dtype: str = "auto"
    # A weights variant such as "fp16" (files named *.fp16.safetensors); empty: the default weights.
    variant: str = ""
    # Decode big images in tiles / one image at a time, to fit small GPUs.
    vae_tiling: bool = False
    vae_slicing: bool = False
    # Keep modules on the host until they run (needs an accelerator; ignored on a CPU).
    cpu_offload: bool = False

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> ModelSpec:
        """A config-file model entry: {name, source} and any load options, e.g. {dtype = "bfloat16"}."""
        known = ({f.name for f in dataclasses.fields(cls)} - {"adapters"}) | {"loras"}
        unknown = sorted(set(table) - known)
        if unknown or not {"name", "source"} <= set(table):
            raise ConfigError(
                "a model entry needs name and source and may set "
                f"{', '.join(sorted(known - {'name', 'source'}))}; got {dict(table)!r}"
            )
        base = cls.parse(f"{table['name']}={table['source']}")
        options: dict[str, Any] = {}
        controlnet = table.get("controlnet", "")
        if not isinstance(controlnet, str):
            raise ConfigError(
                f"model {base.name!r}: controlnet must be a directory or hub id, got {controlnet!r}"
            )
        options["controlnet"] = controlnet.strip()
        # `loras` maps adapter names to safetensors files ({style = "/loras/style.safetensors"}), or
        # lists NAME=PATH strings.
        loras = table.get("loras", ())
        if isinstance(loras, Mapping):
            texts = [f"{name}={path}" for name, path in loras.items()]
        elif isinstance(loras, Sequence) and not isinstance(loras, str):
            texts = [str(text) for text in loras]
        else:
            raise ConfigError(f"model {base.name!r}: loras must map names to files, got {loras!r}")
        options["adapters"] = tuple(AdapterSpec.parse(text) for text in texts)
        for key in ("dtype", "variant"):
            if key in table:
                if not isinstance(table[key], str):
                    raise ConfigError(f"model {base.name!r}: {key} must be a string, got {table[key]!r}")
                options[key] = table[key]
        for key in ("vae_tiling", "vae_slicing", "cpu_offload"):
            if key in table:
                options[key] = _coerce(f"model {base.name!r}: {key}", table[key], False)
        if options.get("dtype", "auto") not in DTYPES:
            raise ConfigError(
                f"model {base.name!r}: dtype {options['dtype']!r} must be one of {', '.join(DTYPES)}"
            )
        return dataclasses.replace(base, **options)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parses `NAME=SOURCE`; a bare SOURCE is named after its last path component."""
        name, sep, source = text.partition("=")
        if not sep:
            source = text
            name = Path(text.rstrip("/")).name
        name, source = name.strip(), source.strip()
        if not _MODEL_NAME.match(name):
            raise ConfigError(f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        if not source:
            raise ConfigError(f"model {name!r} has no source")
        return cls(name=name, source=source)


@dataclass(frozen=True)
class Limits:
    """Request limits; defaults admit what users of SDXL-class models ask for."""

    max_width: int = 2048
    max_height: int = 2048
    max_num_inference_steps: int = 500
    max_num_images: int = 32
    max_prompt_length: int = 10_000
    max_parameters: int = 32
    max_input_pixels: int = 4096 * 4096
    max_request_bytes: int = 32 * MiB
    # Image bytes per response message: keeps every message under 4 MiB, any client's default.
    image_chunk_bytes: int = 3 * MiB
    # Request bodies being received at once: bodies are read only in slots of max_request_bytes
    # each, so a flood of large (or unauthenticated) requests cannot hold more than this.
    max_inflight_request_bytes: int = 256 * MiB
    # Decoded input pixels (images and masks) that admitted requests may hold at once; beyond it a
    # request gets RESOURCE_EXHAUSTED before its images are decoded.
    max_inflight_pixels: int = 4 * 4096 * 4096
    # Input images decoded at once, on their own threads, so decoding cannot starve other work.
    max_concurrent_decodes: int = 1

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"limits.{f.name} must be a positive integer, got {value!r}")
        if self.max_inflight_request_bytes < self.max_request_bytes:
            raise ConfigError("limits.max_inflight_request_bytes must be at least max_request_bytes")
        if self.max_inflight_pixels < 2 * self.max_input_pixels:
            raise ConfigError(
                "limits.max_inflight_pixels must hold an image and its mask (2 x max_input_pixels)"
            )
        if self.image_chunk_bytes > 4 * MiB - 64 * 1024:
            raise ConfigError("limits.image_chunk_bytes must leave room under the 4 MiB message limit")


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start; nothing else reads the environment."""

    models: tuple[ModelSpec, ...] = ()
    host: str = "[::]"
    port: int = 50051
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = 64
    # RPCs of any kind handled at once (gRPC's maximum_concurrent_rpcs); more get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 256
    # Seconds a stream may wait for its client to read before it ends with CLIENT_TOO_SLOW; 0 = never.
    stream_idle_timeout: float = 60.0
    warmup: bool = True
    grace: float = 30.0
    allow_pickle: bool = False
    # Micro-batching: 1 turns it off; compatible requests share a call of up to this many images.
    max_batch_size: int = 1
    max_batch_delay_ms: float = 0.0
    # On-demand models: sources requests may name beyond the configured ones (glob patterns over
    # hub ids such as "org/*", or over absolute local paths such as "/models/*").
    allow_sources: tuple[str, ...] = ()
    # Parameter bytes loaded on-demand models may hold together before the least recently used
    # is evicted; 0 means no budget. Configured models are pinned and not counted.
    memory_budget: int = 0
    # Bearer tokens any of which admits a call; empty turns authentication off. `load_settings`
    # gathers them from `auth_token_file` and AUTOPIPELINE_AUTH_TOKENS; never logged (see `describe`).
    auth_token_file: str = ""
    tokens: tuple[str, ...] = field(default=(), repr=False)
    # TLS: a PEM certificate chain and its private key. A client CA as well makes it mutual TLS:
    # callers must present a certificate signed by it.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Acceleration (see acceleration.py and the README's "Performance"): auto = compile on CUDA, eager on
    # CPU, off elsewhere.
    acceleration: str = "auto"
    # Hot shapes compiled during warm-up: "WxH" (batch sizes 1 and max_batch_size) or "WxHxB";
    # empty = each model's default size. Any other shape runs eagerly.
    compile_shapes: tuple[str, ...] = ()
    # Where compiled artefacts persist across restarts (TORCHINDUCTOR_CACHE_DIR, precompiled graphs and
    # one mega-cache file per model); several replicas may share it. Empty = torch's Inductor cache dir
    # ($TORCHINDUCTOR_CACHE_DIR, else a per-user temp folder): per machine.
    compile_cache_dir: str = ""
    # zlib level for PNG output (libpng's default is 6). Levels 1-3 use libpng's fast recipe (codecs.
    # RLE_UP_TO_LEVEL); 4-9 choose a filter per row for smaller files, several times slower: see
    # `benchmarks/encoding.py`.
    png_compress_level: int = 1
    # The OpenAI-compatible HTTP door (openai_http.py): None keeps it off; 0 picks a free port.
    http_port: int | None = None
    # Prometheus: serve /metrics over plain HTTP on this port of `host` (0 picks a free one); None: off.
    metrics_port: int | None = None
    # OpenTelemetry tracing of every RPC, exported over OTLP to `otel_endpoint` (empty: the
    # exporter's default, localhost:4317 for grpc). Needs the `tracing` extra.
    otel: bool = False
    otel_endpoint: str = ""
    otel_protocol: str = "grpc"
    otel_service_name: str = "autopipeline-server"
    limits: Limits = field(default_factory=Limits)

    @property
    def default_model(self) -> str:
        return self.models[0].name if self.models else ""

    @property
    def hot_shapes(self) -> tuple[tuple[int, int, int | None], ...]:
        """`compile_shapes` parsed: (width, height, batch size or None for the defaults)."""
        return tuple(parse_hot_shape(text) for text in self.compile_shapes)

    def validate(self) -> Settings:
        if not self.models:
            raise ConfigError(
                "no model configured: pass --model NAME=SOURCE or list models in the config file"
            )
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"model names must be unique: {', '.join(duplicates)}")
        devices = [d.strip() for d in self.device.split(",")]
        if not (devices == ["all"] or all(DEVICES.match(d) for d in devices)):
            raise ConfigError(
                f"device {self.device!r} must be auto, cpu, mps, cuda, cuda:N, a comma-separated list "
                "of those (one worker each), or all (every CUDA device)"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} must be one of {', '.join(DTYPES)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port {self.http_port} is out of range")
        if self.http_port and self.http_port == self.port:
            raise ConfigError(f"http_port and port must differ, both are {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} is out of range")
        if self.otel_protocol not in OTLP_PROTOCOLS:
            raise ConfigError(
                f"otel_protocol {self.otel_protocol!r} must be one of {', '.join(OTLP_PROTOCOLS)}"
            )
        if self.max_queue < 1:
            raise ConfigError("max_queue must be at least 1")
        if self.max_concurrent_rpcs < 1:
            raise ConfigError("max_concurrent_rpcs must be at least 1")
        if self.stream_idle_timeout < 0:
            raise ConfigError("stream_idle_timeout must not be negative (0 turns it off)")
        if self.grace < 0:
            raise ConfigError("grace must not be negative")
        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size must be at least 1 (1 turns batching off)")
        if not 0 <= self.max_batch_delay_ms <= 10_000:
            raise ConfigError("max_batch_delay_ms must be between 0 and 10000")
        if self.memory_budget < 0:
            raise ConfigError("memory_budget must not be negative")
        for pattern in self.allow_sources:
            if "://" in pattern or ".." in Path(pattern).parts or not pattern.strip("*/"):
                raise ConfigError(f"allow_sources pattern {pattern!r} must be a hub id or absolute path glob")
        if self.acceleration not in ACCELERATIONS:
            raise ConfigError(f"acceleration {self.acceleration!r} must be one of {', '.join(ACCELERATIONS)}")
        for width, height, batch in self.hot_shapes:
            if width > self.limits.max_width or height > self.limits.max_height:
                raise ConfigError(f"compile shape {width}x{height} exceeds the size limits")
            if batch is not None and batch > max(self.max_batch_size, self.limits.max_num_images):
                raise ConfigError(f"compile shape batch size {batch} can never occur")
        if not 0 <= self.png_compress_level <= 9:
            raise ConfigError("png_compress_level must be between 0 and 9")
        self._validate_security()
        for model in self.models:
            _validate_model_options(model)
        self.limits.validate()
        return self

    def _validate_security(self) -> None:
        for number, token in enumerate(self.tokens, 1):
            # The message numbers the token rather than quoting it: it is a secret.
            if not _TOKEN.match(token):
                raise ConfigError(
                    f"auth token {number} of {len(self.tokens)} must be non-empty printable ASCII "
                    "without whitespace"
                )
        if self.auth_token_file and not self.tokens:
            # Failing closed: an operator who names a token file means to require a token.
            raise ConfigError(f"auth_token_file {self.auth_token_file} holds no token")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path:
                _read_pem(name, path)


def _validate_model_options(model: ModelSpec) -> None:
    names = [adapter.name for adapter in model.adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model {model.name!r}: LoRA adapter names must be unique: {', '.join(duplicates)}")
    for adapter in model.adapters:
        path = Path(adapter.path)
        if path.suffix != ".safetensors" or not path.is_file():
            raise ConfigError(
                f"model {model.name!r}: LoRA adapter {adapter.name!r} must be a local .safetensors file, "
                f"got {adapter.path!r}"
            )


def parse_hot_shape(text: str) -> tuple[int, int, int | None]:
    """Parses "512x768" (width x height) or "512x768x4" (and a batch size of 4 images per call)."""
    match = _HOT_SHAPE.match(text.strip().lower())
    numbers = [int(g) for g in match.groups() if g is not None] if match else []
    if not match or min(numbers) < 1:
        raise ConfigError(f"compile shape {text!r} must be WIDTHxHEIGHT or WIDTHxHEIGHTxBATCH")
    return numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None


def check_model_sources(settings: Settings) -> None:
    """Fails at start-up for a configured source that is neither a local directory nor a hub id.

    Without this, a mistyped path ("./no-such-dir") would be tried as a hub id and the model
    would sit FAILED while the server stayed NOT_SERVING.
    """
    for spec in settings.models:
        if Path(spec.source).expanduser().is_dir():
            continue
        if spec.source.startswith((".", "/", "~")) or not HUB_ID.match(spec.source):
            raise ConfigError(
                f"model {spec.name!r}: {spec.source!r} is neither an existing checkpoint directory "
                "nor a hub id (org/name)"
            )


def _read_pem(name: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{name}: cannot read {path}: {err.strerror}") from err
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{name}: {path} is not a PEM file")
    return data


def read_tls_files(settings: Settings) -> tuple[bytes, bytes, bytes | None] | None:
    """The PEM certificate chain, private key and client CA (None: no mTLS); None without TLS."""
    if not settings.tls_cert_file:
        return None
    client_ca = settings.tls_client_ca_file
    return (
        _read_pem("tls_cert_file", settings.tls_cert_file),
        _read_pem("tls_key_file", settings.tls_key_file),
        _read_pem("tls_client_ca_file", client_ca) if client_ca else None,
    )


def read_token_file(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The tokens in a file: one per line, surrounding whitespace, blank lines and `#` comments ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read auth_token_file {path}: {why}") from err
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a TOML (.toml) or YAML (.yaml/.yml) config file into a plain mapping."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from err
    try:
        data: Any = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {p} is not valid: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Parses a byte count such as 8589934592, "8GiB" or "512 MB"."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(text)
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def _coerce(name: str, value: Any, target: Any) -> Any:
    """Converts a config/env value to the type of the default it replaces."""
    # Optional ports are off (None) by default, so their default says nothing about their type.
    kind = int if name in OPTIONAL_PORTS else type(target)
    try:
        if name == "memory_budget":
            return parse_size(value)
        if name in OPTIONAL_PORTS:  # off by default: None, empty or "off" keeps them off
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off")):
                return None
            return int(value)
        if kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r}") from err


def _models_from(value: Any) -> tuple[ModelSpec, ...]:
    if isinstance(value, str):
        return tuple(ModelSpec.parse(part) for part in value.split(",") if part.strip())
    if isinstance(value, Mapping):
        return tuple(ModelSpec.parse(f"{k}={v}") for k, v in value.items())
    if isinstance(value, Sequence):
        specs = []
        for item in value:
            if isinstance(item, ModelSpec):
                specs.append(item)
            elif isinstance(item, str):
                specs.append(ModelSpec.parse(item))
            elif isinstance(item, Mapping):
                specs.append(ModelSpec.from_table(item))
            else:
                raise ConfigError(f"a model entry must be NAME=SOURCE or {{name, source}}, got {item!r}")
        return tuple(specs)
    raise ConfigError(f"models must be a list, got {value!r}")


def _split_model_options(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings, and the per-model options (`MODEL_OPTIONS`) given beside them, apart."""
    rest = {k: v for k, v in values.items() if k not in MODEL_OPTIONS}
    options = {k: v for k, v in values.items() if k in MODEL_OPTIONS and v is not None}
    return rest, options


def _attach_model_options(
    models: tuple[ModelSpec, ...], options: Mapping[str, Any], origin: str
) -> tuple[ModelSpec, ...]:
    """Folds `--controlnet MODEL=SOURCE` and `--lora MODEL:NAME=PATH` into the configured models."""
    by_name = {model.name: model for model in models}

    def model(name: str, text: str) -> ModelSpec:
        if name not in by_name:
            served = ", ".join(by_name) or "none"
            raise ConfigError(f"{origin}: {text!r} names model {name!r}, which is not configured ({served})")
        return by_name[name]

    for text in _coerce("controlnets", options.get("controlnets", ()), ()):
        name, sep, source = (part.strip() for part in text.partition("="))
        if not sep or not source:
            raise ConfigError(f"{origin}: controlnet {text!r} must be MODEL=SOURCE")
        by_name[name] = dataclasses.replace(model(name, text), controlnet=source)
    for text in _coerce("loras", options.get("loras", ()), ()):
        name, sep, rest = (part.strip() for part in text.partition(":"))
        if not sep:
            raise ConfigError(f"{origin}: lora {text!r} must be MODEL:NAME=PATH")
        adapter = AdapterSpec.parse(rest)
        spec = model(name, text)
        kept = tuple(a for a in spec.adapters if a.name != adapter.name)
        by_name[name] = dataclasses.replace(spec, adapters=(*kept, adapter))
    return tuple(by_name[model.name] for model in models)


def _apply(settings: Settings, values: Mapping[str, Any], origin: str) -> Settings:
    top = {f.name: f for f in dataclasses.fields(Settings)}
    limit_names = {f.name for f in dataclasses.fields(Limits)}
    changes: dict[str, Any] = {}
    limits = settings.limits
    for key, value in values.items():
        if key == "models":
            changes["models"] = _models_from(value)
        elif key == "limits":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: limits must be a mapping")
            for lkey, lvalue in value.items():
                if lkey not in limit_names:
                    raise ConfigError(
                        f"{origin}: unknown limit {lkey!r}; known: {', '.join(sorted(limit_names))}"
                    )
                limits = dataclasses.replace(
                    limits, **{lkey: _coerce(f"limits.{lkey}", lvalue, getattr(limits, lkey))}
                )
        elif key in limit_names:
            limits = dataclasses.replace(limits, **{key: _coerce(key, value, getattr(limits, key))})
        elif key == "tokens":
            raise ConfigError(
                f"{origin}: tokens are secrets; put them in auth_token_file or {TOKENS_VARIABLE}"
            )
        elif key in top:
            changes[key] = _coerce(key, value, getattr(settings, key))
        else:
            known = sorted([*top, *limit_names])
            raise ConfigError(f"{origin}: unknown setting {key!r}; known: {', '.join(known)}")
    return dataclasses.replace(settings, limits=limits, **changes)


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    config_file: str | os.PathLike[str] | None = None,
) -> Settings:
    """Builds validated settings: defaults < config file < AUTOPIPELINE_* variables < flags.

    `flags` holds only the flags the operator gave (None values are ignored); `models` flags replace
    the configured list rather than extending it, so the first `--model` is the default model.
    """
    settings = Settings()
    config_path = config_file or environ.get(f"{ENV_PREFIX}CONFIG")
    if config_path:
        settings = _apply(settings, read_config_file(config_path), str(config_path))
    env_values = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key not in (f"{ENV_PREFIX}CONFIG", TOKENS_VARIABLE)
    }
    settings = _apply(settings, _otel_values(environ), "OpenTelemetry environment")
    env_values, env_options = _split_model_options(env_values)
    flag_values, flag_options = _split_model_options({k: v for k, v in flags.items() if v is not None})
    settings = _apply(settings, env_values, "environment")
    settings = _apply(settings, flag_values, "flags")
    # Per-model options apply to the final model list, whichever layer named the models.
    models = _attach_model_options(settings.models, env_options, "environment")
    settings = dataclasses.replace(settings, models=_attach_model_options(models, flag_options, "flags"))
    # Tokens from both places admit calls; the order is kept only so errors can number them.
    tokens = _coerce("tokens", environ.get(TOKENS_VARIABLE, ""), ())
    if settings.auth_token_file:
        tokens = (*read_token_file(settings.auth_token_file), *tokens)
    settings = dataclasses.replace(settings, tokens=tuple(dict.fromkeys(tokens)))
    return settings.validate()


def _otel_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from OpenTelemetry's standard variables: an OTLP endpoint turns tracing on,
    OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it off."""
    values: dict[str, Any] = {}
    for name, variables in _OTEL_VARIABLES.items():
        present = [environ[v] for v in variables if environ.get(v, "").strip()]
        if present:
            values[name] = present[0].strip()
    if "otel_endpoint" in values:
        values["otel"] = True
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or "none" in exporters:
        values["otel"] = False
    return values


def describe(settings: Settings) -> str:
    """A one-line JSON summary for the start-up log; the tokens appear only as a count."""
    summary = dataclasses.asdict(settings)
    summary["tokens"] = f"<{len(settings.tokens)} redacted>"
    return json.dumps(summary, default=str, sort_keys=True)
