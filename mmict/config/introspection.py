"""Schema introspection: every valid dotted key with its annotation, field types of a section, and readable type
names, used by the key checks, the did-you-mean suggestions and the error messages.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any

from mmict.config.schema import ExperimentConfig


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, nullable) for ``Optional[X]``; (tp, False) otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


@functools.cache
def _fields(dc: type) -> dict[str, Any]:
    """Field name -> resolved annotation (``from __future__ import annotations`` makes them strings)."""
    hints = typing.get_type_hints(dc)
    return {f.name: hints[f.name] for f in dataclasses.fields(dc)}


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(_unwrap_optional(tp)[0])


def _schema_types(dc: type = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Every valid full dotted key (sections and leaves) -> its annotation."""
    out: dict[str, Any] = {}
    for name, tp in _fields(dc).items():
        key = f"{prefix}{name}"
        out[key] = tp
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            out.update(_schema_types(inner, key + "."))
    return out


_SCHEMA_TYPES: dict[str, Any] = _schema_types()


def _type_name(tp: Any) -> str:
    inner, nullable = _unwrap_optional(tp)
    if dataclasses.is_dataclass(inner):
        name = f"a mapping with keys {', '.join(_fields(inner))}"
    elif typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner) or (Any,)
        name = f"list of {_type_name(elem)}"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner)
    return f"{name} or null" if nullable else name


def _expected_type(full_key: str) -> str | None:
    """Readable expected type of a dotted key, also for list items like ``eval.shots[1]``."""
    base = re.sub(r"\[\d+\]$", "", full_key)
    tp = _SCHEMA_TYPES.get(base)
    if tp is None:
        return None
    if base != full_key:
        inner, _ = _unwrap_optional(tp)
        args = typing.get_args(inner)
        return _type_name(args[0]) if args else None
    return _type_name(tp)
