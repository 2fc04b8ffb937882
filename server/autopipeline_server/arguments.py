"""Pipeline call arguments: which a request may set through `parameters`, and JSON-to-Python coercion."""

from __future__ import annotations

import inspect
import json
import math
import types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any

FIELD_ARGUMENTS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "height": "height",
    "width": "width",
    "num_inference_steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "strength": "strength",
    "num_images_per_prompt": "num_images",
    "image": "image",
    "mask_image": "mask_image",
    "control_image": "control_image",
}
# List-valued arguments that set the denoising schedule: each entry is one step.
SCHEDULE_ARGUMENTS = ("timesteps", "sigmas")
# Call arguments the server owns: callbacks, randomness, output control and tensors.
RESERVED_ARGUMENTS = frozenset(
    {
        "generator",
        "latents",
        "output_type",
        "return_dict",
        "callback",
        "callback_steps",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "ip_adapter_image",
        "ip_adapter_image_embeds",
        "masked_image_latents",
    }
)


def _json_type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def coerce(value: Any, annotation: Any) -> Any:
    """Converts a JSON value (from a protobuf Struct) to `annotation`, or raises TypeError.

    Only JSON-expressible annotations are supported: bool, int, float, str, None, unions, lists,
    tuples and dicts of those. Struct numbers arrive as floats, so integral floats become ints.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is None or annotation is type(None):
        if value is None:
            return None
        raise TypeError("null")
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg)
            except TypeError:
                continue
        raise TypeError(_json_type_name(annotation))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("a boolean")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("an integer")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise TypeError("an integer")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError("a finite number")
        return float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list):
            raise TypeError("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TypeError(f"a list of {len(args)} items")
            return tuple(coerce(v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        items = [coerce(v, item) for v in value]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise TypeError("an object")
        return value
    raise TypeError(f"not settable over the wire ({_json_type_name(annotation)})")


def _is_json_expressible(annotation: Any) -> bool:
    if annotation in (Any, None, type(None), bool, int, float, str, list, tuple, dict):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return all(a is Ellipsis or _is_json_expressible(a) for a in typing.get_args(annotation))
    if origin is dict:
        key, *_ = typing.get_args(annotation) or (str,)
        return key is str
    return False


def jsonable(value: Any) -> tuple[bool, Any]:
    if value is None or isinstance(value, (bool, int, str)):
        return True, value
    if isinstance(value, float):
        return math.isfinite(value), value
    if isinstance(value, (list, tuple)):
        converted = [jsonable(v) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    return False, None


class ValueKind(Enum):
    """The JSON kind of a parameter's (non-null) value, for clients in any language."""

    NUMBER = "number"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    STRING = "string"
    ARRAY = "array"
    OBJECT = "object"
    ANY = "any"


_SCALAR_TYPES: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def json_schema(annotation: Any) -> dict[str, Any]:
    """A JSON Schema fragment for the JSON values `coerce` accepts for `annotation` ({} = anything)."""
    if annotation is Any:
        return {}
    if annotation is None or annotation is type(None):
        return {"type": "null"}
    if annotation in _SCALAR_TYPES:
        return {"type": _SCALAR_TYPES[annotation]}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [json_schema(arg) for arg in args]}
    if origin is tuple and args and args[-1] is not Ellipsis:
        return {
            "type": "array",
            "prefixItems": [json_schema(arg) for arg in args],
            "minItems": len(args),
            "maxItems": len(args),
        }
    if origin in (list, tuple) or annotation in (list, tuple):
        items = json_schema(args[0]) if args else {}
        return {"type": "array", "items": items} if items else {"type": "array"}
    if origin is dict or annotation is dict:
        return {"type": "object"}
    return {}


def _kinds(schema: dict[str, Any]) -> set[str]:
    if "anyOf" in schema:
        return {kind for member in schema["anyOf"] for kind in _kinds(member)}
    return {schema["type"]} if "type" in schema else {"any"}


def value_kind(schema: dict[str, Any]) -> tuple[ValueKind, bool]:
    """The single JSON kind a schema accepts besides null (ANY when several), and whether null is accepted."""
    kinds = _kinds(schema)
    nullable = "null" in kinds or "any" in kinds
    kinds.discard("null")
    if kinds == {"integer", "number"}:  # every integer is a number
        kinds = {"number"}
    if len(kinds) == 1 and "any" not in kinds:
        return ValueKind(kinds.pop()), nullable
    return ValueKind.ANY, nullable


@dataclass(frozen=True)
class ParameterInfo:
    """One argument a request may pass through `parameters`."""

    name: str
    annotation: Any
    has_default: bool
    default: Any

    @property
    def schema(self) -> dict[str, Any]:
        return json_schema(self.annotation)

    def describe(self) -> str:
        """How a caller should write the value, for error messages: the JSON Schema fragment."""
        return json.dumps(self.schema, separators=(",", ":")) if self.schema else "any JSON value"


def call_parameters(
    pipeline_class: type[Any],
) -> tuple[dict[str, inspect.Parameter], dict[str, ParameterInfo]]:
    """All named `__call__` arguments, and the subset a request may set through `parameters`."""
    call = pipeline_class.__call__
    signature = inspect.signature(call)
    try:
        hints = typing.get_type_hints(call)
    except Exception:  # some pipelines annotate with names that only resolve under TYPE_CHECKING
        hints = {}
    named = {
        name: p
        for name, p in signature.parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    accepted: dict[str, ParameterInfo] = {}
    for name, p in named.items():
        if name in FIELD_ARGUMENTS or name in RESERVED_ARGUMENTS:
            continue
        annotation = hints.get(name, p.annotation)
        if annotation is inspect.Parameter.empty or not _is_json_expressible(annotation):
            continue
        has_default, default = (False, None) if p.default is p.empty else jsonable(p.default)
        accepted[name] = ParameterInfo(name, annotation, has_default, default)
    return named, accepted
