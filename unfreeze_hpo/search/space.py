"""Search-space YAML -> a define-by-run function for OptunaSearch, conditional on the strategy.

Distributions use Optuna's own vocabulary and constructors; every problem is reported at once.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
)

from unfreeze_hpo import config, resources, strategies, yamlfile
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.params import check_value, coerce
from unfreeze_hpo.search.distributions import (
    Spec,
    close_match,
    distribution,
    is_distribution,
    is_fixed,
    suggest,
    unknown,
)

SPACES_DIR = resources.SPACES  # the shipped spaces, package data

_TOP_KEYS = ("strategy", "strategies", "common")
# The search owns these: the branch chooses the strategy, Ray gives each trial its own directory.
_NOT_COMMON = {
    "strategy": "list strategies under strategy: and their parameters under strategies:",
    "output_dir": "leave it out; each trial writes to its own directory",
}


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
                suggest(trial, key, spec)
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
        params = {k: v for k, v in self.per_strategy.get(name, {}).items() if is_fixed(v)}
        common = {k: v for k, v in self.common.items() if is_fixed(v)}
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

    def check_blocks(self, n_blocks: int) -> list[Problem]:
        """Fixed strategy parameters that name more blocks than the model's ``n_blocks``."""
        problems = []
        for name in self.strategies:
            fixed = {k: v for k, v in self.per_strategy.get(name, {}).items() if is_fixed(v)}
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


def describe_range(spec: BaseDistribution) -> str:
    """A distribution in words: its choices, or its bounds and step."""
    if isinstance(spec, optuna.distributions.CategoricalDistribution):
        return f"choices {list(spec.choices)}"
    low, high = getattr(spec, "low", None), getattr(spec, "high", None)
    step = getattr(spec, "step", None)
    plain = step is None or (isinstance(spec, optuna.distributions.IntDistribution) and step == 1)
    return f"{low}..{high}" + ("" if plain else f" in steps of {step}")


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
            problems.append(unknown(str(key), values[key], key, _TOP_KEYS, "unknown key"))
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
            problems.append(unknown("strategy", item, item, known, "unknown strategy"))
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
            problems.append(unknown(where, name, name, known, "unknown strategy"))
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
        elif is_distribution(spec):
            dist = distribution(where, spec, hints[param], fields[param].metadata, problems)
            if dist is not None:
                out[param] = dist
        else:
            out[param] = spec
    # The fixed values are checked by the strategy itself, cross-field rules (phases) included.
    fixed = {k: v for k, v in out.items() if is_fixed(v)}
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
        if is_distribution(spec):
            dist = distribution(where, spec, hint, meta, problems)
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


# ---------------------------------------------------------------------------------------------
# Field lookup and messages


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
            return unknown(where, value, key, known, "not a TrialConfig field")
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
    fix = close_match(param, fields) or f"{name} takes {', '.join(fields) or 'no parameters'}"
    return Problem(where, value, f"not a parameter of {name}", fix)


def _locate(problem: Problem, lines: Mapping[str, int], source: str) -> Problem:
    """Add ``file:line`` from the nearest key path that has a line."""
    if not source or problem.location:
        return problem
    path = re.sub(r"\[\d+\]", "", problem.field)
    while path and path not in lines:
        path = path.rpartition(".")[0]
    location = f"{source}:{lines[path]}" if path else source
    return dataclasses.replace(problem, location=location)
