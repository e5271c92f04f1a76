"""A search space's values: Optuna distributions written as ``{type, low, high, ...}`` (or a
fixed value), checked against the parameter they sample, and sampled define-by-run."""

from __future__ import annotations

import difflib
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from unfreeze_hpo.errors import Problem
from unfreeze_hpo.params import check_value, coerce


def is_distribution(spec: Any) -> bool:
    """A mapping with a type, or with the options of one (then its type is missing)."""
    return isinstance(spec, Mapping) and bool({"type", "low", "high", "choices"} & set(spec))


def distribution(
    where: str, spec: Mapping[str, Any], hint: Any, meta: Mapping[str, Any], problems: list[Problem]
) -> BaseDistribution | None:
    """The Optuna distribution ``spec`` describes, checked against the field it samples."""
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in OPTIONS:
        known = list(OPTIONS)
        message = "unknown distribution" if "type" in spec else "a distribution needs a type"
        problems.append(unknown(f"{where}.type", kind, kind, known, message))
        return None
    for option in spec:
        if option != "type" and option not in OPTIONS[kind]:
            known = ["type", *OPTIONS[kind]]
            message = f"not an option of a {kind} distribution"
            problems.append(unknown(f"{where}.{option}", spec[option], option, known, message))
    refusal = _kind_refusal(kind, kind_of(hint), meta)
    if refusal is not None:
        problems.append(Problem(where, dict(spec), *refusal))
        return None
    before = len(problems)
    args = _arguments(where, kind, spec, hint, problems)
    if len(problems) > before:
        return None
    try:
        # Optuna only warns when it moves high down onto the step grid; a silently changed
        # range would surprise, so its warnings count as problems too.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dist = _construct(kind, args)
        if caught:
            raise ValueError(str(caught[0].message))
    except ValueError as exc:  # Optuna's own rule, in Optuna's words
        problems.append(Problem(where, dict(spec), str(exc), "change low/high/log/step to obey it"))
        return None
    problems += _out_of_bounds(where, dist, meta)
    return dist


def _kind_refusal(kind: str, field_kind: str, meta: Mapping[str, Any]) -> tuple[str, str] | None:
    """(message, fix) when a distribution of ``kind`` cannot sample a field of ``field_kind``."""
    if field_kind == "structured":
        return "structured parameters can only be fixed", "write the value itself"
    if kind != "categorical" and (field_kind in ("str", "bool") or meta.get("choices")):
        return f"type {kind} cannot sample a {field_kind} field", "use type: categorical"
    if kind == "float" and field_kind == "int":
        return "type float cannot sample an int field", "use type: int"
    return None


def _arguments(
    where: str, kind: str, spec: Mapping[str, Any], hint: Any, problems: list[Problem]
) -> dict[str, Any]:
    """The constructor arguments, each brought to its type (problems appended)."""
    if kind == "categorical":
        choices = spec.get("choices")
        if choices is None or not isinstance(choices, list):
            fix = "e.g. choices: [cosine, constant]"
            problems.append(Problem(f"{where}.choices", choices, "must be a list", fix))
            return {}
        out = []
        for i, choice in enumerate(choices):
            value, problem = coerce(f"{where}.choices[{i}]", choice, hint)
            if problem is None and not isinstance(value, bool | int | float | str | None):
                fix = "fix the value instead of searching it"
                problem = Problem(f"{where}.choices[{i}]", choice, "choices must be scalars", fix)
            if problem is not None:
                problems.append(problem)
            out.append(value)
        return {"choices": out}
    number = int if kind == "int" else float
    args: dict[str, Any] = {}
    for option in ("low", "high", "step", "log"):
        value = spec.get(option)
        if value is None:
            if option in ("low", "high"):
                problems.append(Problem(f"{where}.{option}", None, "missing", "give a number"))
            continue
        value, problem = coerce(f"{where}.{option}", value, bool if option == "log" else number)
        if problem is not None:
            problems.append(problem)
        args[option] = value
    return args


def _construct(kind: str, args: Mapping[str, Any]) -> BaseDistribution:
    if kind == "categorical":
        return CategoricalDistribution(args["choices"])
    if kind == "int":
        return IntDistribution(**{"step": 1, **args})
    return FloatDistribution(**args)


def _out_of_bounds(where: str, dist: BaseDistribution, meta: Mapping[str, Any]) -> list[Problem]:
    """Range ends (or choices) outside the field's declared bounds."""
    if isinstance(dist, CategoricalDistribution):
        values = {f"{where}.choices[{i}]": c for i, c in enumerate(dist.choices)}
    else:
        assert isinstance(dist, FloatDistribution | IntDistribution)
        values = {f"{where}.low": dist.low, f"{where}.high": dist.high}
    found = [check_value(w, v, meta) for w, v in values.items()]
    return [p for p in found if p is not None]


def suggest(trial: optuna.trial.Trial, name: str, dist: BaseDistribution) -> Any:
    # Through the public suggest_* methods: Ray's OptunaSearch records exactly those calls.
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    assert isinstance(dist, CategoricalDistribution)
    return trial.suggest_categorical(name, dist.choices)


def contains(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    assert isinstance(dist, FloatDistribution | IntDistribution)
    if not dist.low <= value <= dist.high:
        return False
    steps = (value - dist.low) / dist.step if dist.step else 0
    return abs(steps - round(steps)) < 1e-8


def is_fixed(spec: Spec) -> bool:
    return not isinstance(spec, BaseDistribution)


def kind_of(hint: Any) -> str:
    """int, float, bool or str for a scalar field (None allowed), else structured."""
    args = [hint]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and args[0] in (int, float, bool, str):
        return str(args[0].__name__)
    return "structured"


OPTIONS: dict[str, tuple[str, ...]] = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}


Spec = BaseDistribution | Any  # a distribution to sample, or a fixed value


def unknown(where: str, value: Any, name: Any, known: typing.Iterable[str], what: str) -> Problem:
    known = list(known)
    return Problem(
        where, value, what, close_match(str(name), known) or f"known: {', '.join(known)}"
    )


def close_match(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=2)
    return f"did you mean {' or '.join(close)}?" if close else ""
