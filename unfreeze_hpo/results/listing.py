"""A search's trials as a pandas table (study records, and running trials from Ray's files),
selected, rendered for a terminal or as CSV/JSON, and the best ones."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import pandas as pd
from optuna.trial import FrozenTrial

from unfreeze_hpo.errors import ConfigError, Problem, UserError
from unfreeze_hpo.results import STATE_NAMES, Search, or_list, tables
from unfreeze_hpo.search import seeds

STATES = ("complete", "pruned", "failed", "running")


FORMATS = ("table", "csv", "json")


# Columns after the hyperparameters; "value" is the study's (the search's objective), "final" the
# metric it is made of at the trial's last epoch.
_TAIL = (
    "value",
    "test_acc",  # test accuracy at the best val epoch: only when the data has a test split
    "final",
    "epochs",
    "trainable_ratio",
    "worst_spike",
    "reason",
    "ray_trial_id",
)


_RAY_TRIAL_DIR = re.compile(r"^.+?_([0-9a-f]{5,})_\d+_")  # run_trial_<id>_<n>_<params>_<date>


_NOT_RECORDED = (
    "not in the study yet: running, or interrupted before it ended (resuming the search ends it)"
)


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
    if table["test_acc"].isna().all():
        table = table.drop(columns="test_acc")
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
        **_final_columns(search.objective.metric, final),
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
        "value": values[-1] if values else None,  # the objective as it stands
        **_final_columns(search.objective.metric, last),
        "reason": _NOT_RECORDED,
        "ray_trial_id": ray_trial.trial_id,
    }


def _final_columns(metric: str, final: Mapping[str, Any]) -> dict[str, Any]:
    epoch = final.get("epoch")
    return {
        "test_acc": final.get("test_acc_at_best"),
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
    if summaries := seed_runs(search):  # re-run configs first, by their mean over seeds
        ranked = _with_seeds(ranked, summaries)
    if not by_strategy:
        return ranked.head(top).reset_index(drop=True)
    ranked = ranked.groupby("strategy", sort=False, dropna=False).head(top)
    order = {name: i for i, name in enumerate(dict.fromkeys(ranked["strategy"]))}
    ranked = ranked.sort_values("strategy", key=lambda s: s.map(order), kind="stable")
    return ranked.reset_index(drop=True)


def seed_runs(search: Search) -> list[seeds.SeedSummary]:
    """The configs ``--reseed-top`` re-ran, best mean over their seeds first ([] for none)."""
    reruns = seeds.load_reruns(search.study_url, search.name) if search.study_url else []
    if not reruns:
        return []
    return seeds.seed_summary(search.study.get_trials(deepcopy=False), reruns, search.objective)


# The columns a re-run config adds: its seeds, their mean and spread, and the two errors.
SEED_COLUMNS = ("seeds", "seed_mean", "seed_sd", "val_se", "train_sd")


def _with_seeds(ranked: pd.DataFrame, summaries: list[seeds.SeedSummary]) -> pd.DataFrame:
    """``ranked`` with the seed columns; the re-run configs first, by their mean over seeds."""
    stats = pd.DataFrame(
        [(s.number, s.seeds, s.mean, s.sd, s.val_se, s.train_sd) for s in summaries],
        columns=["number", *SEED_COLUMNS],
    )
    stats["number"] = stats["number"].astype("Int64")
    order = {s.number: i for i, s in enumerate(summaries)}
    out = ranked.merge(stats, on="number", how="left")
    position = out["number"].map(lambda n: order.get(n, len(order)))
    out = out.iloc[position.argsort(kind="stable")]
    columns = list(ranked.columns)
    at = columns.index("value") + 1
    return out[[*columns[:at], *SEED_COLUMNS, *columns[at:]]].reset_index(drop=True)


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
