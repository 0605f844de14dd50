"""The pass table behind ``-p NAME[:key=value,...]`` and ``edgec passes``.

A pass is a frozen dataclass subclassing ``onnx_ir.passes.InPlacePass`` with
a ``cli_name`` class attribute; its fields are its options (with defaults and
a ``help`` in the field metadata). Option values on the command line:

    float / int / str      ratio=0.4
    bool                   rearrange=false   (true/false/yes/no/1/0)
    tuple of str           exclude=conv1+conv2
    dict of str -> float   layer_ratios=conv1@0.3+conv2@0.5
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from edgec.core.errors import PassError
from edgec.passes import PASSES

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def all_passes() -> dict[str, type]:
    """CLI name -> pass class, in the order ``edgec passes`` lists them."""
    return {cls.cli_name: cls for cls in PASSES}


def describe(cls: type) -> list[dict[str, Any]]:
    """One entry per option: name, type, default, help."""
    hints = typing.get_type_hints(cls)
    options = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        options.append(
            {"name": field.name, "type": _type_name(hints[field.name]), "default": default, "help": field.metadata.get("help", "")}
        )
    return options


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "names (a+b+c)"
    if origin is dict:
        return "name@value+..."
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _convert(cls: type, name: str, hint, text: str):
    origin = typing.get_origin(hint)
    try:
        if origin is typing.Literal:
            choices = [str(choice) for choice in typing.get_args(hint)]
            if text not in choices:
                raise ValueError(f"choose one of {', '.join(choices)}")
            return text
        if origin in (tuple, list):
            return tuple(item for item in text.split("+") if item)
        if origin is dict:
            result = {}
            for item in filter(None, text.split("+")):
                key, at, value = item.partition("@")
                if not at:
                    raise ValueError("write name@value, e.g. conv1@0.3")
                result[key] = float(value)
            return result
        if hint is bool:
            lowered = text.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError("write true or false")
            return lowered in _TRUE
        if hint in (int, float, str):
            return hint(text)
        if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
            for member in typing.get_args(hint):
                if member is type(None):
                    if text.lower() in ("none", ""):
                        return None
                    continue
                try:
                    return _convert(cls, name, member, text)
                except PassError:
                    continue
            raise ValueError(f"expected {hint}")
    except ValueError as error:
        raise PassError(f"bad value {text!r} for option {name!r} of pass {cls.cli_name!r}: {error}") from None
    raise PassError(f"option {name!r} of pass {cls.cli_name!r} cannot be set from the command line")


def parse(spec: str):
    """``"fuse-filters:ratio=0.4,exclude=conv1"`` -> a configured pass instance."""
    name, _, rest = spec.strip().partition(":")
    table = all_passes()
    cls = table.get(name)
    if cls is None:
        raise PassError(f"unknown pass {name!r}; the passes are: {', '.join(table)} (see `edgec passes`)")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    kwargs = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise PassError(f"bad option {item!r} for pass {name!r}: write key=value")
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise PassError(f"pass {name!r} has no option {key!r}; its options are: {valid}")
        kwargs[key] = _convert(cls, key, hints[key], value.strip())
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise PassError(f"pass {name!r}: {error}") from None
