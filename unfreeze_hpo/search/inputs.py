"""A search's inputs: the base trial config and the space, their checks, and their record.

``search.yaml`` in the search folder records the options, the base config and the space a search
started with: what the results need to rebuild any trial's config, and what a resumed search is
held to. ``search`` and ``submit`` run the same checks (``check_storage``, ``check_inputs``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from unfreeze_hpo import config as config_module
from unfreeze_hpo import resources, storage, yamlfile
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.search import space as space_module
from unfreeze_hpo.search.options import SearchConfig, with_objective
from unfreeze_hpo.search.space import SearchSpace, default_space, load_space, space_from_dict
from unfreeze_hpo.yamlfile import write_yaml, yaml_text


def load_inputs(cfg: SearchConfig) -> tuple[TrialConfig, SearchSpace]:
    """The base trial config and the search space, every problem reported at once."""
    problems: list[Problem] = []
    base = space = None
    try:
        base = config_module.load(cfg.base or resources.EXAMPLES / "embedded.yaml")
    except ConfigError as exc:
        problems += exc.problems
    try:
        space = load_space(cfg.space) if cfg.space else default_space()
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    assert base is not None and space is not None
    return _absolute_paths(base), space


def check_inputs(cfg: SearchConfig | None, base: TrialConfig, space: SearchSpace) -> list[Problem]:
    """What ``search`` and ``submit`` check once the files load: the space names no more blocks
    than the base model has, and (with ``cfg``, whose storage must be readable) a resumed search
    keeps the space it started with, and the base's batch splits over a trial's workers."""
    problems = []
    if (count := base.model.n_blocks()) is not None:
        problems += space.check_blocks(count)
    if cfg is not None:
        problems += changed_space(cfg, space)
        if base.batch_size % cfg.workers_per_trial:  # the global batch, split over the workers
            problems.append(
                Problem(
                    "batch_size",
                    base.batch_size,
                    f"is the global batch, split evenly over --workers-per-trial "
                    f"{cfg.workers_per_trial} workers",
                    f"use a multiple of {cfg.workers_per_trial}, or another --workers-per-trial",
                )
            )
    return problems


def check_storage(cfg: SearchConfig) -> list[Problem]:
    """Where the search writes: a storage_path pyarrow opens, a study database that works."""
    problems = [p for p in [storage.check_location(cfg.storage_path, "storage_path")] if p]
    if cfg.study_storage:
        problems += [p for p in [storage.check_study_storage(cfg.study_storage)] if p]
    elif cfg.remote:
        problems.append(
            Problem(
                "study_storage",
                None,
                f"storage_path {cfg.storage_path} is a URI, and the default SQLite study needs a "
                "local or NFS file",
                "pass --study-storage postgresql://USER@HOST:5432/DB (a database the driver "
                "reaches), or sqlite:////shared/nfs/study.db",
            )
        )
    return problems


def _absolute_paths(base: TrialConfig) -> TrialConfig:
    """Trials run in other working directories: make the paths in the base config absolute."""
    data = base.data
    if data.root:
        data = dataclasses.replace(data, root=str(Path(data.root).resolve()))
    model = base.model
    if model.checkpoint:
        model = dataclasses.replace(model, checkpoint=str(Path(model.checkpoint).resolve()))
    return base.replace(data=data, model=model)


SEARCH_FILE = "search.yaml"  # what a search was run with: options, base config, space


def write_inputs(cfg: SearchConfig, base: TrialConfig, space: SearchSpace) -> str:
    """Write ``search.yaml`` into the search folder: what export needs to rebuild any trial."""
    values = {
        "search": dataclasses.asdict(cfg),
        "base": base.to_dict(),
        "space": space_to_dict(space),
        "space_source": space.source,
    }
    header = "# written by unfreeze-hpo search: the options, base config and space of this search\n"
    location = storage.join(cfg.location, SEARCH_FILE)
    if cfg.remote:
        storage.write_text(location, header + yaml_text(values))
    else:
        write_yaml(Path(location), values, header)
    return location


def changed_space(cfg: SearchConfig, new: SearchSpace) -> list[Problem]:
    """How ``new`` differs from the space the search ``cfg`` names started with, one problem per
    parameter (none for a new search): a resumed search must sample the space its study and its
    searcher already hold."""
    location = storage.join(cfg.location, SEARCH_FILE)
    recorded = _record(cfg)
    if recorded is None:
        return []
    try:
        old = _space_entries(space_to_dict(space_from_dict(recorded.get("space") or {})))
    except ConfigError:  # no readable record: the storage checks speak for the folder
        return []
    now = _space_entries(space_to_dict(new))
    started = f"search {cfg.name!r} started with"
    fix = f"resume with the space recorded in {location}, or give --name a new search"
    problems = []
    for key in [*now, *(k for k in old if k not in now)]:
        if key not in old:
            problems.append(Problem(key, now[key], f"not in the space {started}", fix))
        elif key not in now:
            message = f"missing, but the space {started} has {old[key]!r}"
            problems.append(Problem(key, None, message, fix))
        elif now[key] != old[key]:
            message = f"changed from {old[key]!r}, the value {started}"
            problems.append(Problem(key, now[key], message, fix))
    return space_module.locate(problems, new.source) + changed_objective(cfg, recorded)


def changed_objective(cfg: SearchConfig, recorded: Mapping[str, Any]) -> list[Problem]:
    """A resumed search must score its trials as it started to: the study's values are that
    objective's. One problem per option that differs (a record from before the objective
    scored by the final value of its metric)."""
    options = recorded.get("search")
    if not isinstance(options, Mapping):
        return []
    options = with_objective(options)
    fix = f"resume with the options search {cfg.name!r} started with, or give --name a new search"
    problems = []
    for name in ("metric", "mode", "objective", "objective_k"):
        old, now = options.get(name, getattr(cfg, name)), getattr(cfg, name)
        if name == "objective_k" and cfg.objective != "last_k_mean":
            continue  # k means nothing to the other objectives
        if old != now:
            why = f"changed from {old!r}, the value search {cfg.name!r} started with"
            problems.append(Problem("--" + name.replace("_", "-"), now, why, fix))
    return problems


def _record(cfg: SearchConfig) -> dict[str, Any] | None:
    """The ``search.yaml`` the search ``cfg`` names wrote, parsed; None when there is none or
    it cannot be read (the storage checks speak for the folder)."""
    location = storage.join(cfg.location, SEARCH_FILE)
    try:
        if cfg.remote:
            text = storage.read_text(location)
        else:
            text = Path(location).read_text(encoding="utf-8") if Path(location).is_file() else None
        if text is None:
            return None
        recorded, _ = yamlfile.parse_yaml(text, location)
    except (OSError, ConfigError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _space_entries(values: Mapping[str, Any]) -> dict[str, Any]:
    """A space's YAML form by parameter: strategy, strategies.<name>.<param>, common.<field>."""
    out = {"strategy": values.get("strategy")}
    for name, params in (values.get("strategies") or {}).items():
        out.update((f"strategies.{name}.{k}", v) for k, v in params.items())
    out.update((f"common.{k}", v) for k, v in (values.get("common") or {}).items())
    return out


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    """The space in its YAML form (distributions back to ``{type, low, high, ...}``)."""
    out: dict[str, Any] = {"strategy": list(space.strategies)}
    if space.per_strategy:
        out["strategies"] = {
            name: {k: _spec(v) for k, v in params.items()}
            for name, params in space.per_strategy.items()
        }
    if space.common:
        out["common"] = {k: _spec(v) for k, v in space.common.items()}
    return out


def _spec(value: Any) -> Any:
    if isinstance(value, CategoricalDistribution):
        return {"type": "categorical", "choices": list(value.choices)}
    if isinstance(value, IntDistribution | FloatDistribution):
        kind = "int" if isinstance(value, IntDistribution) else "float"
        spec: dict[str, Any] = {"type": kind, "low": value.low, "high": value.high}
        if value.log:
            spec["log"] = True
        if value.step is not None and not (kind == "int" and value.step == 1):
            spec["step"] = value.step
        return spec
    return yamlfile.plain(value)
