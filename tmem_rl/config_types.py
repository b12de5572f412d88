"""Does a value read from YAML / JSON fit a config dataclass field's type hint? One check for recipes and for
the agent's settings file (lists stand for tuples). And a recipe record's settings by dotted key."""

from __future__ import annotations

import types
import typing
from typing import Any


def value_fits(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(value_fits(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(value_fits(v, args[0]) for v in value) if args else True
    if origin is dict or annotation is dict:
        args = typing.get_args(annotation)
        return isinstance(value, dict) and (not args or all(value_fits(v, args[1]) for v in value.values()))
    return True


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def dotted_leaves(record: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every setting; a mapping's keys are settings too (env.kwargs.num_facts)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
