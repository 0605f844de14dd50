"""Parse ``--input-shape`` values: ``1,3,224,224`` or ``NAME:1,3,224,224``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from edgec.core.errors import InputShapeError

InputShapes = dict[str | int, tuple[int, ...]]


def parse_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    if not sep:
        name, dims = "", text
    try:
        shape = tuple(int(dim) for dim in dims.replace("x", ",").split(",") if dim.strip())
    except ValueError:
        raise InputShapeError(
            f"bad input shape {text!r}: write comma-separated integers, e.g. 1,3,224,224 (or NAME:1,3,224,224)"
        ) from None
    if not shape:
        raise InputShapeError(f"empty input shape {text!r}: give its dimensions, e.g. 1,3,224,224 (or NAME:1,3,224,224)")
    if any(dim <= 0 for dim in shape):
        raise InputShapeError(f"bad input shape {text!r}: every dimension must be a positive integer")
    return (name or None), shape


def normalize(shapes: str | Sequence[int] | Iterable[str] | dict | None) -> InputShapes:
    """Turn what a user gave into ``{input name or position: shape}``."""
    if shapes is None:
        return {}
    if isinstance(shapes, dict):
        return {key: tuple(int(dim) for dim in value) for key, value in shapes.items()}
    if isinstance(shapes, str):
        shapes = [shapes]
    shapes = list(shapes)
    if shapes and all(isinstance(dim, int) for dim in shapes):
        return {0: tuple(shapes)}
    result: InputShapes = {}
    for position, item in enumerate(shapes):
        if isinstance(item, str):
            name, shape = parse_shape(item)
        else:
            name, shape = None, tuple(int(dim) for dim in item)
        result[name if name is not None else position] = shape
    return result


def lookup(shapes: InputShapes, position: int, name: str) -> tuple[int, ...] | None:
    return shapes.get(name, shapes.get(position))
