"""Search-space YAML -> a define-by-run function for OptunaSearch, conditional on the strategy.

Distributions use Optuna's own vocabulary and constructors; every problem is reported at once.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from unfreeze_hpo import config, resources, strategies, yamlfile
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.params import check_value, coerce

SPACES_DIR = resources.SPACES  # the shipped spaces, package data

_TOP_KEYS = ("strategy", "strategies", "common")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}
# The search owns these: the branch chooses the strategy, Ray gives each trial its own directory.
_NOT_COMMON = {
    "strategy": "list strategies under strategy: and their parameters under strategies:",
    "output_dir": "leave it out; each trial writes to its own directory",
}
# Recipes from the field notes, tried first so the search starts from known-good schedules.
# fmt: off
RECIPES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("early_gradual 1/1/0.5", "early_gradual",
     {"freeze_epochs": 1, "blocks_per_epoch": 1, "target_ratio": 0.5}),
    ("adaptive 2/0.005", "adaptive", {"patience": 2, "min_improvement": 0.005}),
    ("gentle finetune", "progressive",
     {"initial_blocks": 2, "initial_freeze_epochs": 5, "unfreeze_interval": 2}),
    ("slow burn", "progressive",
     {"initial_blocks": 4, "initial_freeze_epochs": 15, "unfreeze_interval": 5}),
    ("linear probe", "frozen", {}),  # "strong head, frozen backbone"
    ("full fine-tuning", "full", {}),
)
# fmt: on

Spec = BaseDistribution | Any  # a distribution to sample, or a fixed value


@dataclass(frozen=True)
class SearchSpace:
    """Strategies to try, each one's parameters (sampled only on its branch) and common fields."""

    strategies: tuple[str, ...]
    per_strategy: Mapping[str, Mapping[str, Spec]]
    common: Mapping[str, Spec]  # dotted TrialConfig paths: optimizer.lr, epochs
    source: str = ""  # file path, for messages

    def define_by_run(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        """Suggest the strategy, then its parameters as ``<strategy>.<param>`` (branches never
        share a name), then the common ones; return the branch's fixed values, keyed the same
        way (OptunaSearch adds them to the trial's config)."""
        fixed: dict[str, Any] = {}
        if len(self.strategies) > 1:
            name = trial.suggest_categorical("strategy", self.strategies)
        else:
            name = fixed["strategy"] = self.strategies[0]
        for key, spec in self._branch(str(name)).items():
            if isinstance(spec, BaseDistribution):
                _suggest(trial, key, spec)
            else:
                fixed[key] = copy.deepcopy(spec)  # Ray may keep or alter the config it is given
        return fixed

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every searchable name and its distribution, over all branches."""
        out: dict[str, BaseDistribution] = {}
        if len(self.strategies) > 1:
            out["strategy"] = CategoricalDistribution(self.strategies)
        for name in self.strategies:
            branch = self._branch(name).items()
            out.update((k, v) for k, v in branch if isinstance(v, BaseDistribution))
        return out

    def trial_config(self, base: TrialConfig, flat: Mapping[str, Any]) -> TrialConfig:
        """One sampled flat dict -> a TrialConfig: base overridden by the common keys, and the
        chosen strategy built from the space's fixed values and the sampled ones (parameters
        the space leaves out take the strategy's defaults, not base's)."""
        flat = dict(flat)
        name = flat.pop("strategy", self.strategies[0] if len(self.strategies) == 1 else None)
        if name is None:
            fix = f"give strategy: {' | '.join(self.strategies)}"
            raise ConfigError(Problem("strategy", None, "missing", fix))
        if name not in self.strategies:
            fix = f"use one of {', '.join(self.strategies)}"
            raise ConfigError(Problem("strategy", name, "not a strategy of this space", fix))
        params = {k: v for k, v in self.per_strategy.get(name, {}).items() if _fixed(v)}
        common = {k: v for k, v in self.common.items() if _fixed(v)}
        problems: list[Problem] = []
        for key, value in flat.items():
            head, _, param = key.partition(".")
            if head in strategies.REGISTRY:
                problem = _branch_key(key, value, name, param)
                params[param] = value
            else:
                found = _common_field(key, value)
                problem = found if isinstance(found, Problem) else None
                common[key] = value
            if problem is not None:
                problems.append(problem)
        if problems:
            raise ConfigError(problems)
        values = base.to_dict()
        for key, value in common.items():
            *sections, leaf = key.split(".")
            target = values
            for section in sections:
                target = target[section]
            target[leaf] = copy.deepcopy(value)
        values["strategy"] = {"name": name, **params}
        return config.from_dict(values)

    def recipes(self) -> list[tuple[str, dict[str, Any]]]:
        """The field-notes recipes that fit this space, as flat dicts (define_by_run's keys and
        'strategy') for OptunaSearch(points_to_evaluate=...); common parameters are left out,
        so Optuna samples them."""
        out = []
        for title, name, values in RECIPES:
            point = self._recipe_point(name, values) if name in self.strategies else None
            if point is not None:
                out.append((title, point))
        return out

    def _recipe_point(self, name: str, values: Mapping[str, Any]) -> dict[str, Any] | None:
        """The recipe as a point of this space, or None where the space cannot produce it."""
        specs = self.per_strategy.get(name, {})
        defaults = strategies.REGISTRY[name]().params()
        point: dict[str, Any] = {"strategy": name}
        for param, value in values.items():
            spec = specs.get(param, defaults[param])
            if isinstance(spec, BaseDistribution):
                if not _contains(spec, value):
                    return None
                point[f"{name}.{param}"] = value
            elif spec != value:  # fixed by the space, or left at the strategy's default
                return None
        return point

    def check_blocks(self, n_blocks: int) -> list[Problem]:
        """Fixed strategy parameters that name more blocks than the model's ``n_blocks``."""
        problems = []
        for name in self.strategies:
            fixed = {k: v for k, v in self.per_strategy.get(name, {}).items() if _fixed(v)}
            strategy = strategies.create(name, fixed)  # load_space has checked them
            problems += [
                dataclasses.replace(p, field=re.sub(r"^strategy\.", f"strategies.{name}.", p.field))
                for p in strategy.check_blocks(n_blocks)
            ]
        return locate(problems, self.source)

    def _branch(self, name: str) -> dict[str, Spec]:
        """One strategy's parameters then the common fields, under their flat names."""
        params = {f"{name}.{k}": v for k, v in self.per_strategy.get(name, {}).items()}
        return {**params, **self.common}


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file; ConfigError lists every problem."""
    path = Path(path)
    if not yamlfile.is_file(path):
        shipped = ", ".join(sorted(p.name for p in SPACES_DIR.glob("*.yaml")))
        fix = f"give a YAML file; shipped in {SPACES_DIR}: {shipped or 'none'}"
        raise ConfigError(Problem("space", str(path), "no such file", fix))
    values, lines = yamlfile.parse_yaml(yamlfile.read_yaml_text(path, "space"), str(path))
    return space_from_dict(values, lines=lines, source=str(path))


def locate(problems: typing.Iterable[Problem], source: str) -> list[Problem]:
    """Problems found after the space file ``source`` loaded, with their file:line."""
    if not source or not yamlfile.is_file(Path(source)):
        return list(problems)
    _, lines = yamlfile.parse_yaml(yamlfile.read_yaml_text(Path(source), "space"), source)
    return [_locate(p, lines, source) for p in problems]


def default_space() -> SearchSpace:
    """The conditional space over every strategy shipped with the package."""
    return load_space(SPACES_DIR / "all.yaml")


def space_from_dict(
    values: Mapping[str, Any], *, lines: Mapping[str, int] | None = None, source: str = ""
) -> SearchSpace:
    """Build a SearchSpace from plain values, reporting every problem with its YAML path."""
    problems: list[Problem] = []
    for key in values:
        if key not in _TOP_KEYS:
            problems.append(_unknown(str(key), values[key], key, _TOP_KEYS, "unknown key"))
    names = _strategy_names(values.get("strategy"), problems)
    per_strategy = _per_strategy(values.get("strategies"), names, problems)
    common = _common(values.get("common"), problems)
    if problems:
        raise ConfigError([_locate(p, lines or {}, source) for p in problems])
    return SearchSpace(tuple(names), per_strategy, common, source)


# ---------------------------------------------------------------------------------------------
# Sections


def _strategy_names(raw: Any, problems: list[Problem]) -> list[str]:
    if raw is None:
        fix = "e.g. strategy: [early_gradual, adaptive] or strategy: progressive"
        problems.append(Problem("strategy", None, "missing", fix))
        return []
    items = raw if isinstance(raw, list) else [raw]
    names: list[str] = []
    for item in items:
        if not isinstance(item, str) or item not in strategies.REGISTRY:
            known = list(strategies.REGISTRY)
            problems.append(_unknown("strategy", item, item, known, "unknown strategy"))
        elif item in names:
            problems.append(Problem("strategy", item, "listed twice", "list it once"))
        else:
            names.append(item)
    if not items:
        problems.append(Problem("strategy", raw, "empty", "list at least one strategy"))
    return names


def _per_strategy(
    raw: Any, names: list[str], problems: list[Problem]
) -> dict[str, dict[str, Spec]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(Problem("strategies", raw, "must be a mapping", "strategy name: params"))
        return {}
    out = {}
    for name, params in raw.items():
        where = f"strategies.{name}"
        if name not in strategies.REGISTRY:
            known = list(strategies.REGISTRY)
            problems.append(_unknown(where, name, name, known, "unknown strategy"))
        elif names and name not in names:  # names is empty when strategy: itself is wrong
            fix = "add it to strategy: or remove this section"
            problems.append(Problem(where, name, "not in the strategy: list", fix))
        elif params is not None and not isinstance(params, Mapping):
            problems.append(Problem(where, params, "must be a mapping", "param: distribution"))
        else:
            out[name] = _strategy_params(name, params or {}, problems)
    return out


def _strategy_params(name: str, raw: Mapping[str, Any], problems: list[Problem]) -> dict[str, Spec]:
    cls = strategies.REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    out: dict[str, Spec] = {}
    for param, spec in raw.items():
        where = f"strategies.{name}.{param}"
        if param not in fields:
            problems.append(_not_a_param(where, spec, name, param))
        elif _is_distribution(spec):
            dist = _distribution(where, spec, hints[param], fields[param].metadata, problems)
            if dist is not None:
                out[param] = dist
        else:
            out[param] = spec
    # The fixed values are checked by the strategy itself, cross-field rules (phases) included.
    fixed = {k: v for k, v in out.items() if _fixed(v)}
    try:
        strategies.create(name, fixed)
    except ConfigError as exc:
        prefix = f"strategies.{name}."
        problems += [
            dataclasses.replace(p, field=re.sub(r"^strategy\.", prefix, p.field))
            for p in exc.problems
        ]
    return out


def _common(raw: Any, problems: list[Problem]) -> dict[str, Spec]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(Problem("common", raw, "must be a mapping", "optimizer.lr: {...}"))
        return {}
    out: dict[str, Spec] = {}
    for key, spec in raw.items():
        where = f"common.{key}"
        found = _common_field(key, spec, where)
        if isinstance(found, Problem):
            problems.append(found)
            continue
        hint, meta = found
        if _is_distribution(spec):
            dist = _distribution(where, spec, hint, meta, problems)
            if dist is not None:
                out[key] = dist
        else:
            value, problem = coerce(where, spec, hint)
            problem = problem or check_value(where, value, meta)
            if problem is not None:
                problems.append(problem)
            out[key] = spec
    return out


# ---------------------------------------------------------------------------------------------
# Distributions


def _is_distribution(spec: Any) -> bool:
    """A mapping with a type, or with the options of one (then its type is missing)."""
    return isinstance(spec, Mapping) and bool({"type", "low", "high", "choices"} & set(spec))


def _distribution(
    where: str, spec: Mapping[str, Any], hint: Any, meta: Mapping[str, Any], problems: list[Problem]
) -> BaseDistribution | None:
    """The Optuna distribution ``spec`` describes, checked against the field it samples."""
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _OPTIONS:
        known = list(_OPTIONS)
        message = "unknown distribution" if "type" in spec else "a distribution needs a type"
        problems.append(_unknown(f"{where}.type", kind, kind, known, message))
        return None
    for option in spec:
        if option != "type" and option not in _OPTIONS[kind]:
            known = ["type", *_OPTIONS[kind]]
            message = f"not an option of a {kind} distribution"
            problems.append(_unknown(f"{where}.{option}", spec[option], option, known, message))
    refusal = _kind_refusal(kind, _kind(hint), meta)
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


def _suggest(trial: optuna.trial.Trial, name: str, dist: BaseDistribution) -> Any:
    # Through the public suggest_* methods: Ray's OptunaSearch records exactly those calls.
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    assert isinstance(dist, CategoricalDistribution)
    return trial.suggest_categorical(name, dist.choices)


def _contains(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    assert isinstance(dist, FloatDistribution | IntDistribution)
    if not dist.low <= value <= dist.high:
        return False
    steps = (value - dist.low) / dist.step if dist.step else 0
    return abs(steps - round(steps)) < 1e-8


def _fixed(spec: Spec) -> bool:
    return not isinstance(spec, BaseDistribution)


# ---------------------------------------------------------------------------------------------
# Field lookup and messages


def _kind(hint: Any) -> str:
    """int, float, bool or str for a scalar field (None allowed), else structured."""
    args = [hint]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and args[0] in (int, float, bool, str):
        return str(args[0].__name__)
    return "structured"


def _common_field(
    key: str, value: Any, where: str | None = None
) -> tuple[Any, Mapping[str, Any]] | Problem:
    """The (type, bounds) of the TrialConfig field a dotted path names, or the problem."""
    where = where or key
    head = key.split(".")[0]
    if head in _NOT_COMMON:
        return Problem(where, value, "is set by the search, not in common", _NOT_COMMON[head])
    cls: Any = TrialConfig
    segments = key.split(".")
    for depth, segment in enumerate(segments):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = ".".join(segments[:depth])
        if segment not in fields:
            known = [f"{prefix}.{f}" if prefix else f for f in fields]
            return _unknown(where, value, key, known, "not a TrialConfig field")
        hint = typing.get_type_hints(cls)[segment]
        last = depth == len(segments) - 1
        if dataclasses.is_dataclass(hint) and last:
            first = next(iter(dataclasses.fields(hint))).name
            fix = f"name one of its fields, e.g. {key}.{first}"
            return Problem(where, value, "is a section, not a field", fix)
        if not dataclasses.is_dataclass(hint):
            if not last:
                return Problem(where, value, f"{segment} has no fields", f"use {segment}")
            return hint, fields[segment].metadata
        cls = hint
    raise AssertionError(key)  # the loop returns at the last segment


def _branch_key(key: str, value: Any, chosen: str, param: str) -> Problem | None:
    head = key.partition(".")[0]
    if head != chosen:
        fix = f"drop it, or set strategy: {head}"
        return Problem(key, value, f"belongs to {head}, but this trial's strategy is {chosen}", fix)
    if param not in strategies.REGISTRY[chosen]().params():
        return _not_a_param(key, value, chosen, param)
    return None


def _not_a_param(where: str, value: Any, name: str, param: str) -> Problem:
    fields = list(strategies.REGISTRY[name]().params())
    fix = _close(param, fields) or f"{name} takes {', '.join(fields) or 'no parameters'}"
    return Problem(where, value, f"not a parameter of {name}", fix)


def _unknown(where: str, value: Any, name: Any, known: typing.Iterable[str], what: str) -> Problem:
    known = list(known)
    return Problem(where, value, what, _close(str(name), known) or f"known: {', '.join(known)}")


def _close(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=2)
    return f"did you mean {' or '.join(close)}?" if close else ""


def _locate(problem: Problem, lines: Mapping[str, int], source: str) -> Problem:
    """Add ``file:line`` from the nearest key path that has a line."""
    if not source or problem.location:
        return problem
    path = re.sub(r"\[\d+\]", "", problem.field)
    while path and path not in lines:
        path = path.rpartition(".")[0]
    location = f"{source}:{lines[path]}" if path else source
    return dataclasses.replace(problem, location=location)
