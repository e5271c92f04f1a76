"""Read a search (its Optuna study, ``search.yaml`` and Ray folder) without Ray or a running search:
a pandas table of its trials and the best ones. ``export`` turns one trial into a schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeGuard

import optuna
import pandas as pd
import yaml
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from unfreeze_hpo import config, storage, tables, yamlfile
from unfreeze_hpo import space as space_module
from unfreeze_hpo.config import STUDY_FILE, SearchConfig, TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem, UserError
from unfreeze_hpo.params import build
from unfreeze_hpo.space import SearchSpace, space_from_dict

if TYPE_CHECKING:  # blocks imports torch: only export's lightning-fts format needs it at run time
    pass

SEARCH_FILE = "search.yaml"  # what a search was run with: options, base config, space
STATES = ("complete", "pruned", "failed", "running")
FORMATS = ("table", "csv", "json")
STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "running",
}
# Columns after the hyperparameters; "value" is the best metric over the epochs (the study's).
_TAIL = ("value", "final", "epochs", "trainable_ratio", "worst_spike", "reason", "ray_trial_id")
_RAY_TRIAL_DIR = re.compile(r"^.+?_([0-9a-f]{5,})_\d+_")  # run_trial_<id>_<n>_<params>_<date>
# Bookkeeping Ray adds to every result: not metrics the trial reached.
RAY_KEYS = frozenset(
    {
        "timestamp",
        "training_iteration",
        "time_this_iter_s",
        "time_total_s",
        "time_since_restore",
        "iterations_since_restore",
        "pid",
        "done",
        "should_checkpoint",
    }
)
_NOT_RECORDED = (
    "not in the study yet: running, or interrupted before it ended (resuming the search ends it)"
)


@dataclass(frozen=True)
class Search:
    """An opened search folder: its study, the base config and space its trials were built from."""

    folder: Path
    name: str
    study: optuna.Study
    base: TrialConfig
    space: SearchSpace
    metric: str
    mode: str
    study_url: str = ""


# ---------------------------------------------------------------------------------------------
# The search record (written by the search, read here)


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
    try:
        if cfg.remote:
            text = storage.read_text(location)
        else:
            text = Path(location).read_text(encoding="utf-8") if Path(location).is_file() else None
        if text is None:
            return []
        recorded, _ = yamlfile.parse_yaml(text, location)
        old = _space_entries(space_to_dict(space_from_dict(recorded.get("space") or {})))
    except (OSError, ConfigError):  # no readable record: the storage checks speak for the folder
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
    return space_module.locate(problems, new.source)


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


def open_search(path: str | Path, *, study_storage: str | None = None) -> Search:
    """Open the search folder ``path`` (``<storage_path>/<name>``, local or a URI); UserError when
    it is not one. A remote search is read through a local mirror of its small files."""
    folder = local_folder(path)
    if not folder.is_dir():
        raise UserError(search_problem(path, "no such folder", _nearby_searches(folder.parent)))
    record = folder / SEARCH_FILE
    if not record.is_file():
        if (folder / STUDY_FILE).exists() or (folder / "ray").is_dir():
            why = f"a search from before {SEARCH_FILE} was recorded"
            fix = (
                "run the same `unfreeze-hpo search` command again: it resumes the search, "
                f"keeps its trials and records {SEARCH_FILE}"
            )
            return raise_problem(search_problem(path, why, fix))
        why = f"not a search folder (no {SEARCH_FILE})"
        return raise_problem(search_problem(path, why, _nearby_searches(folder)))
    cfg, base, space = _read_record(record)
    url = study_storage or cfg.study_storage or f"sqlite:///{folder / STUDY_FILE}"
    study = load_study(path, cfg.name, url)
    return Search(folder, cfg.name, study, base, space, cfg.metric, cfg.mode, url)


def local_folder(path: str | Path) -> Path:
    """The search folder ``path`` on this machine: itself, or for a URI a refreshed local mirror
    of its records, results and metrics (see ``storage.mirror``)."""
    if "\0" in str(path):  # no path holds one; Path.resolve would raise
        return raise_problem(search_problem(path, "contains a NUL character", "remove it"))
    if not storage.is_uri(str(path)):
        return Path(path).expanduser().resolve()
    location = str(path)
    if problem := storage.check_location(location, "SEARCH"):
        raise UserError(problem)
    try:
        if storage.read_text(storage.join(location, SEARCH_FILE)) is None:
            why = f"not a search folder (no {SEARCH_FILE} there)"
            fix = "give <storage_path>/<name> as the search wrote it, e.g. s3://bucket/runs/demo"
            return raise_problem(search_problem(location, why, fix))
        return storage.mirror(location, storage.cache_dir())
    except OSError as exc:  # no such bucket, no credentials, endpoint down
        why = f"cannot read it ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
        fix = "check the URI and that this machine's credentials can read it"
        return raise_problem(search_problem(location, why, fix))


def recorded_study_storage(folder: Path) -> str | None:
    """The ``study_storage`` URL recorded in a search folder's ``search.yaml``, if any."""
    try:
        values, _ = yamlfile.parse_yaml((folder / SEARCH_FILE).read_text(encoding="utf-8"), "")
    except (OSError, ConfigError):
        return None
    search = values.get("search") if isinstance(values, dict) else None
    url = search.get("study_storage") if isinstance(search, dict) else None
    return url if isinstance(url, str) and url else None


def _read_record(record: Path) -> tuple[SearchConfig, TrialConfig, SearchSpace]:
    values, _ = yamlfile.parse_yaml(record.read_text(encoding="utf-8"), str(record))
    problems: list[Problem] = []
    cfg = build(SearchConfig, values.get("search"), "search", problems)
    base = space = None
    try:
        base = config.from_dict(values.get("base") or {}, source=str(record))
    except ConfigError as exc:
        problems += exc.problems
    try:
        space = space_from_dict(values.get("space") or {}, source=str(record))
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        # Typically a data folder or checkpoint that has moved since the search ran.
        raise ConfigError(problems)
    assert cfg is not None and base is not None and space is not None
    return cfg, base, space


def load_study(path: str | Path, name: str, url: str) -> optuna.Study:
    """The study ``name`` in ``url``, read-only; a UserError naming SEARCH when it is absent."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        # Optuna would create an empty database there; a reader must not write.
        why = "the search has no study yet (no trial has ended)"
        return raise_problem(
            search_problem(path, why, "wait for the first trial, or start the search")
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        db = optuna.storages.get_storage(url)
    except Exception as exc:  # a bad URL or a missing database driver is bad input: say which
        why = f"cannot open the storage {storage.redact(url)} ({storage.database_error(exc)})"
        return raise_problem(search_problem(path, why, "check --study-storage"))
    try:
        return optuna.load_study(study_name=name, storage=db)
    except KeyError:
        names = ", ".join(optuna.get_all_study_names(db)) or "none"
        fix = f"pass --study-storage with the URL the search wrote study {name!r} to"
        return raise_problem(
            search_problem(
                path, f"study {name!r} is not in {storage.redact(url)} (it holds {names})", fix
            )
        )


def search_problem(path: str | Path, why: str, fix: str) -> Problem:
    return Problem("SEARCH", str(path), why, fix)


def _nearby_searches(folder: Path) -> str:
    found = sorted(p.parent.name for p in folder.glob(f"*/{SEARCH_FILE}"))[:5]
    example = f"; searches in {folder}: {', '.join(found)}" if found else ""
    return f"give a search folder, <storage_path>/<name> (e.g. unfreeze-runs/demo){example}"


def raise_problem(problem: Problem) -> Any:
    raise UserError(problem)


# ---------------------------------------------------------------------------------------------
# Tables


def trials_table(search: Search) -> pd.DataFrame:
    """One row per trial: the study's, then trials Ray has started that the study lacks."""
    trials = search.study.get_trials(deepcopy=False)
    rows = [_study_row(search, t) for t in trials]
    recorded = {t.user_attrs.get("ray_trial_id") for t in trials}
    rows += [
        _running_row(search, ray_trial)
        for ray_trial in _ray_trials(search.folder / "ray")
        if ray_trial.trial_id not in recorded
    ]
    columns = ["number", "state", "strategy", *_hyperparameters(search, trials), *_TAIL]
    table = pd.DataFrame(rows, columns=columns)
    for column in ("number", "epochs"):  # integers with gaps (running, failed before epoch 0)
        table[column] = table[column].astype("Int64")
    return table


def _hyperparameters(search: Search, trials: Sequence[FrozenTrial]) -> list[str]:
    names = [k for k in search.space.distributions() if k != "strategy"]
    extra = sorted({k for t in trials for k in t.params} - {"strategy", *names})
    return names + extra


def _study_row(search: Search, trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    final = attrs.get("final") or {}
    return {
        "number": trial.number,
        "state": STATE_NAMES.get(trial.state, trial.state.name.lower()),
        "strategy": _strategy(search, {**(attrs.get("config") or {}), **trial.params}),
        **{k: v for k, v in trial.params.items() if k != "strategy"},
        "value": trial.value,
        **_final_columns(search.metric, final),
        "reason": attrs.get("reason") or None,
        "ray_trial_id": attrs.get("ray_trial_id"),
    }


def _running_row(search: Search, ray_trial: _RayTrial) -> dict[str, Any]:
    sampled = search.space.distributions()
    params = ray_trial.params
    curve = [r.get(search.metric) for r in ray_trial.results]
    values = [v for v in curve if _finite(v)]
    last = ray_trial.results[-1] if ray_trial.results else {}
    return {
        "number": None,
        "state": "running",
        "strategy": _strategy(search, params),
        **{k: v for k, v in params.items() if k in sampled and k != "strategy"},
        "value": (max if search.mode == "max" else min)(values) if values else None,
        **_final_columns(search.metric, last),
        "reason": _NOT_RECORDED,
        "ray_trial_id": ray_trial.trial_id,
    }


def _final_columns(metric: str, final: Mapping[str, Any]) -> dict[str, Any]:
    epoch = final.get("epoch")
    return {
        "final": final.get(metric),
        "epochs": int(epoch) + 1 if _finite(epoch) else None,
        "trainable_ratio": final.get("backbone_trainable_ratio"),
        "worst_spike": final.get("spike_worst_loss_ratio"),
    }


def _strategy(search: Search, values: Mapping[str, Any]) -> str | None:
    # A one-strategy space does not sample the strategy; its trials still have it.
    name = values.get("strategy")
    if name is None and len(search.space.strategies) == 1:
        return search.space.strategies[0]
    return None if name is None else str(name)


@dataclass(frozen=True)
class _RayTrial:
    trial_id: str
    results: list[dict[str, Any]]  # every reported result, oldest first
    params: dict[str, Any]  # the sampled config


def _ray_trials(folder: Path) -> Iterator[_RayTrial]:
    """The trials of a Ray experiment folder, read from the files Ray writes per trial.

    A running search may be writing them: a partial last line is skipped.
    """
    if not folder.is_dir():
        return
    for trial_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        results = _json_lines(trial_dir / "result.json")
        match = _RAY_TRIAL_DIR.match(trial_dir.name)
        trial_id = results[-1].get("trial_id") if results else (match and match.group(1))
        if trial_id:
            params = _json_file(trial_dir / "params.json") or {}
            yield _RayTrial(str(trial_id), results, params)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _finite(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Selecting, rendering, the best trials


def select(
    search: Search,
    table: pd.DataFrame,
    *,
    state: str | None = None,
    strategy: str | None = None,
    sort: str | None = None,
    descending: bool = False,
) -> pd.DataFrame:
    """Rows of ``state`` and ``strategy``, sorted by ``sort``; every bad option reported at once."""
    problems = []
    if state is not None and state not in STATES:
        problems.append(Problem("--state", state, "unknown state", f"use one of {or_list(STATES)}"))
    if strategy is not None and strategy not in search.space.strategies:
        why = "not a strategy of this search"
        problems.append(
            Problem("--strategy", strategy, why, f"use {or_list(search.space.strategies)}")
        )
    if sort is not None and sort not in table.columns:
        fix = f"use one of {', '.join(table.columns)}"
        problems.append(Problem("--sort", sort, "not a column of the table", fix))
    if problems:
        raise ConfigError(problems)
    if state is not None:
        table = table[table["state"] == state]
    if strategy is not None:
        table = table[table["strategy"] == strategy]
    if sort is not None:
        table = table.sort_values(sort, ascending=not descending, kind="stable", na_position="last")
    return table.reset_index(drop=True)


def check_format(fmt: str) -> str:
    """``fmt`` if it is one of FORMATS, else the ConfigError that says which are."""
    if fmt not in FORMATS:
        raise ConfigError(Problem("--format", fmt, "unknown format", f"use {or_list(FORMATS)}"))
    return fmt


def render(
    table: pd.DataFrame,
    fmt: str = "table",
    *,
    columns: str | None = None,
    wide: bool = False,
) -> str:
    """The table as text that fits a terminal (see ``tables``), CSV or JSON records (every column
    under its full name, missing values empty / null); ``columns`` picks the columns of any."""
    check_format(fmt)
    chosen = tables.choose(table, columns) if columns is not None else None
    if fmt == "table":
        return tables.terminal(table, columns=chosen, wide=wide)
    if chosen is not None:
        table = table[chosen]
    if fmt == "csv":
        return str(table.to_csv(index=False))
    records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
    return json.dumps(records, indent=2, default=_json_scalar)


def _json_scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)  # numpy and pandas scalars


def best_trials(search: Search, top: int = 1, by_strategy: bool = False) -> pd.DataFrame:
    """The ``top`` completed trials, best first (ties: the earlier trial); with ``by_strategy``,
    the ``top`` of each strategy, strategies ordered by their best trial."""
    check_top(top)
    table = trials_table(search)
    complete = table[table["state"] == "complete"]
    if complete.empty:
        raise UserError(no_completed(search, table))
    ranked = complete.sort_values(
        ["value", "number"], ascending=[search.mode == "min", True], kind="stable"
    )
    if not by_strategy:
        return ranked.head(top).reset_index(drop=True)
    ranked = ranked.groupby("strategy", sort=False, dropna=False).head(top)
    order = {name: i for i, name in enumerate(dict.fromkeys(ranked["strategy"]))}
    ranked = ranked.sort_values("strategy", key=lambda s: s.map(order), kind="stable")
    return ranked.reset_index(drop=True)


def check_top(top: int) -> int:
    """``top`` if it is at least 1, else the ConfigError."""
    if top < 1:
        raise ConfigError(Problem("--top", top, "must be >= 1", "e.g. --top 3"))
    return top


def no_completed(search: Search, table: pd.DataFrame) -> Problem:
    counts = table["state"].value_counts()
    seen = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no trials"
    fix = (
        f"see why with `unfreeze-hpo trials {search.folder}`; let the search finish, or widen "
        "the space / relax the prune thresholds and search again"
    )
    return Problem("SEARCH", str(search.folder), f"no completed trial ({seen})", fix)


# ---------------------------------------------------------------------------------------------
# Writing YAML


class YamlDumper(yaml.SafeDumper):
    """Quotes every string that PyYAML's YAML 1.1 rules *or* the project's YAML 1.2 reader would
    take for a number or boolean (``1e3``), so what is written reads back the same."""


for _first, _resolvers in yamlfile.Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        YamlDumper.add_implicit_resolver(_tag, _regexp, None if _first is None else [_first])


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # Lists of scalars on one line (phases, block names); nested structure stays in blocks.
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def yaml_text(values: Mapping[str, Any]) -> str:
    """``values`` as the YAML this project writes (reads back the same under its YAML 1.2 rules)."""
    text: str = yaml.dump(dict(values), Dumper=YamlDumper, sort_keys=False, allow_unicode=True)
    return text


def write_yaml(path: Path, values: Mapping[str, Any], header: str, *, check: bool = False) -> Path:
    """Write ``header`` and ``values`` as YAML through ``write_atomic``. ``check``: the written
    file must load as a valid trial config before it replaces anything."""

    def body(f: TextIO) -> None:
        f.write(header)
        yaml.dump(dict(values), f, Dumper=YamlDumper, sort_keys=False, allow_unicode=True)

    return write_atomic(path, body, check=check)


def write_atomic(path: Path, body: Callable[[TextIO], Any], *, check: bool = False) -> Path:
    """Write through a temp file renamed over ``path``: a reader or a crash never sees half a
    file, and a failed write leaves the previous file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            body(f)
            f.flush()
            os.fsync(f.fileno())
        if check:
            _check_config(tmp, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_config(tmp: Path, path: Path) -> None:
    try:
        config.load(tmp)
    except ConfigError as exc:  # e.g. the data folder has moved since the search ran
        raise ConfigError(
            [
                dataclasses.replace(p, location=p.location.replace(str(tmp), str(path)))
                for p in exc.problems
            ]
        ) from exc


def or_list(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


YamlDumper.add_representer(list, _represent_list)
