"""Declared parameters: bounds in field metadata, coercion of YAML/CLI values, validation.

Strategies and config sections are frozen dataclasses whose fields are ``param(...)``; the same
bounds drive validation, the CLI's help and the contract tests.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any, Literal, TypeVar

from unfreeze_hpo.errors import Problem

# YAML 1.1 reads 010 as octal 8; a string with a leading zero is ambiguous, so it is refused.
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9]")


def param(
    default: Any,
    *,
    help: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Sequence[str] | None = None,
    check: Callable[[Any], tuple[str, str] | None] | None = None,
) -> Any:
    """A dataclass field with its bounds; the bounds drive validation, docs and tests.

    ``check`` is a rule the bounds cannot say: it returns (message, fix) for a bad value."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices, "check": check}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def bounds_text(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']}")
    if meta.get("ge") is not None:
        parts.append(f">= {meta['ge']}")
    if meta.get("le") is not None:
        parts.append(f"<= {meta['le']}")
    if meta.get("choices"):
        parts.append("one of " + ", ".join(meta["choices"]))
    return " and ".join(parts)


def check_value(where: str, value: Any, meta: Mapping[str, Any]) -> Problem | None:
    """The bounds/choices problem of one value, if any (None, where the type allows it, has
    none: it means "the default")."""
    if value is None:
        return None
    check = meta.get("check")
    if check is not None and (found := check(value)) is not None:
        return Problem(where, value, *found)
    choices = meta.get("choices")
    if choices is not None:
        if value not in choices:
            close = difflib.get_close_matches(str(value), list(choices), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            return Problem(where, value, "unknown value", f"{hint}use one of {', '.join(choices)}")
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return Problem(where, value, "must be a finite number", f"use a value {bounds_text(meta)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    low_ge, low_gt, high = meta.get("ge"), meta.get("gt"), meta.get("le")
    if (
        (low_ge is not None and value < low_ge)
        or (low_gt is not None and value <= low_gt)
        or (high is not None and value > high)
    ):
        return Problem(where, value, "out of range", f"use a value {bounds_text(meta)}")
    return None


def coerce(where: str, value: Any, annotation: Any) -> tuple[Any, Problem | None]:
    """Bring a YAML/CLI value to the annotated type, or say why it cannot be.

    Numeric strings (``"1e-3"``, ``"2"``) become numbers; booleans never count as numbers;
    leading zeros (``"010"``, octal in YAML 1.1) are refused as ambiguous.
    """
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None, None
        annotation = options[0] if len(options) == 1 else Any
    if origin is Literal:
        return value, None  # choices are checked by check_value
    if isinstance(value, str) and annotation in (int, float) and _LEADING_ZERO.match(value):
        return value, Problem(
            where,
            value,
            "a leading zero is ambiguous (YAML 1.1 reads it as octal)",
            "write the number without leading zeros",
        )
    if annotation is int:
        return _to_int(where, value)
    if annotation is float:
        return _to_float(where, value)
    if annotation is bool:
        if isinstance(value, bool):
            return value, None
        return value, Problem(where, value, "must be true or false", "write true or false")
    if annotation is str:
        if isinstance(value, str) and "\0" in value:  # no file name or URL holds one
            return value, Problem(where, value, "contains a NUL character", "remove it")
        if isinstance(value, str):
            return value, None
        return value, Problem(where, value, "must be a string", "quote it")
    if typing.get_origin(annotation) is tuple and isinstance(value, list | tuple):
        return tuple(value), None  # YAML has lists; frozen configs hold tuples
    if typing.get_origin(annotation) in (dict, Mapping) or annotation in (dict, Mapping):
        if isinstance(value, Mapping):
            return dict(value), None
        return value, Problem(where, value, "must be a mapping", "write key: value pairs")
    return value, None  # structured values validate themselves


def _to_int(where: str, value: Any) -> tuple[Any, Problem | None]:
    if isinstance(value, bool):
        return value, Problem(where, value, "must be an integer, not a boolean", "e.g. 2")
    if isinstance(value, int):
        return value, None
    if isinstance(value, float) and value.is_integer():
        return int(value), None
    if isinstance(value, str):
        try:
            number = float(value.strip())  # "2" and exponent strings such as "1e3"
        except ValueError:
            number = math.nan
        if number.is_integer():
            return int(number), None
    return value, Problem(where, value, "must be an integer", "write a whole number, e.g. 2")


def _to_float(where: str, value: Any) -> tuple[Any, Problem | None]:
    if isinstance(value, bool):
        return value, Problem(where, value, "must be a number, not a boolean", "e.g. 0.5")
    if isinstance(value, int | float):
        return float(value), None
    if isinstance(value, str):
        try:
            return float(value.strip()), None
        except ValueError:
            pass
    return value, Problem(where, value, "must be a number", "write a number, e.g. 1e-3")


T = TypeVar("T")


def build(
    cls: type[T], values: Mapping[str, Any] | None, where: str, problems: list[Problem]
) -> T | None:
    """Build the dataclass ``cls`` from ``values``: coerce each field, check its bounds, refuse
    unknown keys with a close match. Problems are appended; returns None when there are any.
    Nested dataclass fields are built recursively from nested mappings."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        problems.append(Problem(where, values, "must be a mapping", "write key: value pairs"))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            problems.append(
                Problem(
                    path,
                    value,
                    "unknown key",
                    f"did you mean {close[0]}?" if close else f"known keys: {', '.join(fields)}",
                )
            )
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, path, problems)  # type: ignore[arg-type]
            continue
        coerced, problem = coerce(path, value, hint)
        if problem is None:
            problem = check_value(path, coerced, fields[key].metadata)
        if problem is not None:
            problems.append(problem)
        kwargs[key] = coerced
    if len(problems) > before:
        return None
    return cls(**kwargs)
