"""Read a search (its Optuna study, ``search.yaml`` and Ray folder) without Ray or a running search:
a pandas table of its trials, the best ones, and a trial exported as a replayable schedule YAML or
as an explicit finetuning-scheduler schedule for PyTorch Lightning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import textwrap
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

from unfreeze_hpo import config, strategies
from unfreeze_hpo.config import STUDY_FILE, SearchConfig, TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem, UserError
from unfreeze_hpo.params import build
from unfreeze_hpo.space import SearchSpace, space_from_dict

if TYPE_CHECKING:  # blocks imports torch: only export's lightning-fts format needs it at run time
    from unfreeze_hpo.blocks import Blocks

SEARCH_FILE = "search.yaml"  # what a search was run with: options, base config, space
STATES = ("complete", "pruned", "failed", "running")
FORMATS = ("table", "csv", "json")
# What `export` writes: our trial YAML (`unfreeze-hpo train --config` replays it), or an explicit
# schedule for the finetuning-scheduler package (FTS) of PyTorch Lightning.
EXPORT_FORMATS = ("unfreeze-hpo", "lightning-fts")
# How a LightningModule that holds the model as `self.model` names its parameters.
FTS_PREFIX = "model."
_STATE_NAMES = {
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
_RAY_KEYS = frozenset(
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


def write_inputs(cfg: SearchConfig, base: TrialConfig, space: SearchSpace) -> Path:
    """Write ``search.yaml`` into the search folder: what export needs to rebuild any trial."""
    values = {
        "search": dataclasses.asdict(cfg),
        "base": base.to_dict(),
        "space": space_to_dict(space),
        "space_source": space.source,
    }
    header = "# written by unfreeze-hpo search: the options, base config and space of this search\n"
    return _write_yaml(cfg.folder / SEARCH_FILE, values, header)


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
    return config._plain(value)


def open_search(path: str | Path, *, study_storage: str | None = None) -> Search:
    """Open the search folder ``path`` (``<storage_path>/<name>``); UserError when it is not one."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(_search_problem(path, "no such folder", _nearby_searches(folder.parent)))
    record = folder / SEARCH_FILE
    if not record.is_file():
        if (folder / STUDY_FILE).exists() or (folder / "ray").is_dir():
            why = f"a search from before {SEARCH_FILE} was recorded"
            fix = (
                "run the same `unfreeze-hpo search` command again: it resumes the search, "
                f"keeps its trials and records {SEARCH_FILE}"
            )
            return _raise(_search_problem(path, why, fix))
        why = f"not a search folder (no {SEARCH_FILE})"
        return _raise(_search_problem(path, why, _nearby_searches(folder)))
    cfg, base, space = _read_record(record)
    url = study_storage or cfg.study_storage or f"sqlite:///{folder / STUDY_FILE}"
    study = load_study(path, cfg.name, url)
    return Search(folder, cfg.name, study, base, space, cfg.metric, cfg.mode, url)


def _read_record(record: Path) -> tuple[SearchConfig, TrialConfig, SearchSpace]:
    values, _ = config.parse_yaml(record.read_text(encoding="utf-8"), str(record))
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
        return _raise(_search_problem(path, why, "wait for the first trial, or start the search"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.get_storage(url)
    except Exception as exc:  # a bad URL or a missing database driver is bad input: say which
        why = f"cannot open the storage {url} ({type(exc).__name__}: {exc})"
        return _raise(_search_problem(path, why, "check --study-storage"))
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = ", ".join(optuna.get_all_study_names(storage)) or "none"
        fix = f"pass --study-storage with the URL the search wrote study {name!r} to"
        return _raise(
            _search_problem(path, f"study {name!r} is not in {url} (it holds {names})", fix)
        )


def _search_problem(path: str | Path, why: str, fix: str) -> Problem:
    return Problem("SEARCH", str(path), why, fix)


def _nearby_searches(folder: Path) -> str:
    found = sorted(p.parent.name for p in folder.glob(f"*/{SEARCH_FILE}"))[:5]
    example = f"; searches in {folder}: {', '.join(found)}" if found else ""
    return f"give a search folder, <storage_path>/<name> (e.g. unfreeze-runs/demo){example}"


def _raise(problem: Problem) -> Any:
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
        "state": _STATE_NAMES.get(trial.state, trial.state.name.lower()),
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
        problems.append(Problem("--state", state, "unknown state", f"use one of {_or(STATES)}"))
    if strategy is not None and strategy not in search.space.strategies:
        why = "not a strategy of this search"
        problems.append(Problem("--strategy", strategy, why, f"use {_or(search.space.strategies)}"))
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
        raise ConfigError(Problem("--format", fmt, "unknown format", f"use {_or(FORMATS)}"))
    return fmt


def render(table: pd.DataFrame, fmt: str = "table") -> str:
    """The table as aligned text, CSV or JSON records (missing values empty / null)."""
    check_format(fmt)
    if fmt == "csv":
        return str(table.to_csv(index=False))
    if fmt == "json":
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        return json.dumps(records, indent=2, default=_json_scalar)
    if table.empty:
        return "(no trials)"
    return str(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))


def _json_scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)  # numpy and pandas scalars


def best_trials(search: Search, top: int = 1, by_strategy: bool = False) -> pd.DataFrame:
    """The ``top`` completed trials, best first (ties: the earlier trial); with ``by_strategy``,
    the ``top`` of each strategy, strategies ordered by their best trial."""
    check_top(top)
    table = trials_table(search)
    complete = table[table["state"] == "complete"]
    if complete.empty:
        raise UserError(_no_completed(search, table))
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


def _no_completed(search: Search, table: pd.DataFrame) -> Problem:
    counts = table["state"].value_counts()
    seen = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no trials"
    fix = (
        f"see why with `unfreeze-hpo trials {search.folder}`; let the search finish, or widen "
        "the space / relax the prune thresholds and search again"
    )
    return Problem("SEARCH", str(search.folder), f"no completed trial ({seen})", fix)


# ---------------------------------------------------------------------------------------------
# Export


def trial_config(search: Search, number: int) -> TrialConfig:
    """Trial ``number``'s full config as it trained, with where it came from in ``provenance``."""
    trial = _trial(search, number)
    flat = trial.user_attrs.get("config") or trial.params
    cfg = search.space.trial_config(search.base, flat)
    attrs = trial.user_attrs
    provenance = {
        "search": str(search.folder),
        "study": search.name,
        "study_storage": search.study_url,
        "trial": number,
        "ray_trial_id": attrs.get("ray_trial_id"),
        "state": _STATE_NAMES.get(trial.state, trial.state.name.lower()),
        "reason": attrs.get("reason") or None,
        "metric": search.metric,
        "mode": search.mode,
        "value": trial.value,
        "final": {k: v for k, v in (attrs.get("final") or {}).items() if k not in _RAY_KEYS},
        "timeline": _timeline(cfg, attrs.get("timeline") or []),
    }
    return cfg.replace(output_dir=f"runs/{search.name}-trial-{number}", provenance=provenance)


def export_schedule(
    search: Search, out: Path, number: int | None = None, *, allow_incomplete: bool = False
) -> Path:
    """Write trial ``number`` (default: the best completed one) as a trial YAML that
    ``unfreeze-hpo train --config`` replays; atomically, and only once it validates."""
    out = Path(out)
    number = _exportable(search, out, number, allow_incomplete)
    cfg = trial_config(search, number)
    header = (
        f"# trial {number} of search {search.name!r} ({search.folder}), exported by unfreeze-hpo\n"
        f"# replay: unfreeze-hpo train --config {out.name}\n"
    )
    return _write_yaml(out, cfg.to_dict(), header, check=True)


def check_export_format(fmt: str) -> str:
    """``fmt`` if it is one of EXPORT_FORMATS, else the ConfigError that says which are."""
    if fmt not in EXPORT_FORMATS:
        fix = f"use {_or(EXPORT_FORMATS)}"
        raise ConfigError(Problem("--format", fmt, "unknown export format", fix))
    return fmt


def check_fts_prefix(prefix: str) -> str:
    """``prefix`` if it can start a parameter name: empty, or a module path ending in a dot."""
    if prefix and not prefix.endswith("."):
        fix = f"end it with a dot, e.g. --fts-prefix {prefix}."
        raise ConfigError(Problem("--fts-prefix", prefix, "must end with '.'", fix))
    return prefix


def _exportable(search: Search, out: Path, number: int | None, allow_incomplete: bool) -> int:
    """The trial to export (default: the best completed one); UserError when it may not be."""
    if out.is_dir():
        raise UserError(Problem("--out", str(out), "is a folder", "give a file, e.g. best.yaml"))
    if number is None:
        number = int(best_trials(search)["number"].iloc[0])
    trial = _trial(search, number)
    if trial.state != TrialState.COMPLETE and not allow_incomplete:
        state = _STATE_NAMES.get(trial.state, trial.state.name.lower())
        reason = trial.user_attrs.get("reason")
        fix = "export a completed trial (see `unfreeze-hpo best`), or pass --allow-incomplete"
        why = f"trial {number} {'is' if state == 'running' else 'was'} {state}"
        raise UserError(Problem("--trial", number, f"{why}{f': {reason}' if reason else ''}", fix))
    return number


def _trial(search: Search, number: int) -> FrozenTrial:
    trials = search.study.get_trials(deepcopy=False)
    found = next((t for t in trials if t.number == number), None)
    if found is None:
        span = f"numbered 0 to {len(trials) - 1}" if trials else "none yet"
        fix = f"pick a number from `unfreeze-hpo trials {search.folder}`"
        raise UserError(
            Problem("--trial", number, f"out of range: this search's trials are {span}", fix)
        )
    return found


def _timeline(cfg: TrialConfig, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The unfreeze events the trial took, each with the blocks it opened when they can be named."""
    names = _block_names(cfg) if events else None
    out, previous = [], 0
    for event in events:
        n = int(event["n_trainable"])
        entry: dict[str, Any] = {"epoch": int(event["epoch"]), "n_trainable": n}
        if names is not None and n <= len(names):
            entry["blocks"] = names[len(names) - n : len(names) - previous]  # the last n blocks
        out.append(entry)
        previous = n
    return out


def _block_names(cfg: TrialConfig) -> list[str] | None:
    """The model's blocks, input to output, or None when they cannot be discovered."""
    try:
        blocks = _discover_blocks(cfg)
    except Exception:  # names are a courtesy: the epochs and counts stay exact without them
        return None
    return [b.name for b in blocks.blocks]


def _discover_blocks(cfg: TrialConfig) -> Blocks:
    """The trial's model's blocks and head. Built on the meta device: no weights are allocated,
    loaded or downloaded, so this is cheap for any model size (names and sizes do not depend on
    weights, nor on the classifier's size)."""
    import torch

    from unfreeze_hpo.blocks import discover
    from unfreeze_hpo.models import build as build_model

    spec = dataclasses.replace(
        cfg.model.spec(cfg.model.num_classes or 2), pretrained=False, checkpoint=None
    )
    with torch.device("meta"):
        model = build_model(spec)
    return discover(model, cfg.model.granularity, cfg.model.matcher)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Export for Lightning's finetuning-scheduler (FTS)
#
# FTS reads an explicit schedule {phase: {params, max_transition_epoch, lr}}, phases 0..n. It
# freezes the whole LightningModule, thaws phase 0 before training, and at the start of each
# epoch E moves to the next phase once the current phase's max_transition_epoch <= E, adding
# the new phase's parameters to the optimizer as a group at the phase's lr. Phase 0 trains at
# the LR of `configure_optimizers` (FTS drops a phase-0 lr with a warning). A listed name that
# is a parameter of the module is taken as is; anything else is a regex (re.match).


@dataclass(frozen=True)
class FtsPhase:
    """One FTS phase: what it thaws, from which epoch, at which LR."""

    epoch: int  # the first epoch it trains
    blocks: tuple[str, ...]  # our block names it thaws ("head" in phase 0), nearest the head first
    params: tuple[str, ...]  # their parameters, as the LightningModule names them
    max_transition_epoch: int  # the epoch the next phase starts; the last phase: the trial's epochs
    lr: float | None  # None in phase 0: FTS takes it from configure_optimizers
    block_lrs: tuple[float, ...]  # each block's own LR in the trial, in the order of ``blocks``


@dataclass(frozen=True)
class FtsSchedule:
    """An exported FTS schedule: the file, the trial's config (with provenance), its phases."""

    path: Path
    trial: TrialConfig
    phases: tuple[FtsPhase, ...]


def export_fts(
    search: Search,
    out: Path,
    number: int | None = None,
    *,
    allow_incomplete: bool = False,
    prefix: str = FTS_PREFIX,
) -> FtsSchedule:
    """Write trial ``number`` (default: the best completed one) as an explicit finetuning-scheduler
    schedule; parameter names carry ``prefix`` (the model's attribute in the LightningModule)."""
    out = Path(out)
    check_fts_prefix(prefix)
    number = _exportable(search, out, number, allow_incomplete)
    cfg = trial_config(search, number)
    recorded = (cfg.provenance or {}).get("timeline") or []
    phases = tuple(fts_phases(cfg, _discover_blocks(cfg), recorded, prefix))
    header = _fts_header(search, number, cfg, prefix, out)
    text = header + "".join(_fts_phase_text(i, phase) for i, phase in enumerate(phases))
    _write_atomic(out, lambda f: f.write(text))
    return FtsSchedule(out, cfg, phases)


def unfreeze_events(
    cfg: TrialConfig, sizes: Sequence[int], recorded: Sequence[Mapping[str, Any]] = ()
) -> list[tuple[int, int]]:
    """``(epoch, n_trainable)`` at epoch 0 and at every epoch the trainable block count grows."""
    if isinstance(cfg.strategy, strategies.Adaptive):
        # Its events follow the metric the trial saw: only the recorded ones are known.
        counts = [(int(e["epoch"]), int(e["n_trainable"])) for e in recorded]
    else:
        # A pure function of the epoch: the plan over every epoch the exported config trains,
        # which is what `train --config` replays (for a completed trial, the recorded events).
        counts = [(e, cfg.strategy.plan(e, (), sizes).n_trainable) for e in range(cfg.epochs)]
    events: list[tuple[int, int]] = []
    for epoch, n in sorted(counts):
        if n > (events[-1][1] if events else -1):
            events.append((epoch, n))
    if not events or events[0][0] != 0:
        events.insert(0, (0, 0))  # frozen until the first event
    return events


def fts_phases(
    cfg: TrialConfig,
    blocks: Blocks,
    recorded: Sequence[Mapping[str, Any]] = (),
    prefix: str = FTS_PREFIX,
) -> list[FtsPhase]:
    """The trial's unfreeze events as FTS phases: phase 0 the head and the blocks trainable from
    epoch 0, then one phase per later event with the blocks it unfroze (see export_fts)."""
    events = unfreeze_events(cfg, blocks.sizes, recorded)
    n_blocks = len(blocks)
    if events[-1][1] > n_blocks:
        why = f"the trial unfroze {events[-1][1]} blocks; its model has {n_blocks}"
        fix = "export from the search folder the trial ran in, with its model unchanged"
        raise UserError(Problem("timeline", events[-1][1], why, fix))
    base = cfg.optimizer.lr
    scales = strategies.lr_scales(
        n_blocks, n_blocks, cfg.optimizer.backbone_lr_mult, cfg.optimizer.layer_decay
    )  # a block's scale depends on its place only, not on how many others are trainable
    phases = []
    for k, (epoch, n) in enumerate(events):
        previous = events[k - 1][1] if k else 0
        opened = [blocks.blocks[i] for i in reversed(range(n_blocks - n, n_blocks - previous))]
        names = [p for b in opened for p in b.params]
        if k == 0:
            names = [*blocks.head.params, *names]
        end = events[k + 1][0] if k + 1 < len(events) else cfg.epochs
        lrs = tuple(_round(base * scales[b.index]) for b in opened)
        phases.append(
            FtsPhase(
                epoch=epoch,
                blocks=(*(["head"] if k == 0 else []), *(b.name for b in opened)),
                params=tuple(prefix + p for p in names),
                max_transition_epoch=end,
                lr=None if k == 0 else lrs[0],  # the block nearest the head: the largest LR
                block_lrs=lrs,
            )
        )
    return phases


def _round(value: float) -> float:
    # Products like 0.03 * 0.1 print as 0.0030000000000000005; 12 digits are plenty for an LR.
    return float(f"{value:.12g}")


def _fts_header(search: Search, number: int, cfg: TrialConfig, prefix: str, out: Path) -> str:
    lr = cfg.optimizer.lr
    source = (
        "the events this trial recorded: adaptive follows its metric"
        if isinstance(cfg.strategy, strategies.Adaptive)
        else "the strategy's plan over the trial's epochs"
    )
    paragraphs = [
        f"finetuning-scheduler (FTS) schedule of trial {number} of search {search.name!r} "
        f"({search.folder}), exported by unfreeze-hpo: model {cfg.model.name}, strategy "
        f"{cfg.strategy}, {cfg.epochs} epochs, optimizer.lr {lr}.",
        "",
        f"Use: FinetuningScheduler(ft_schedule={out.name!r}, epoch_transitions_only=True, "
        "restore_best=False) moves phase by phase at the epochs below, as the trial did (with "
        "its defaults FTS may also move earlier, on its early-stopping criteria, and restores "
        "the best checkpoint at each move). Parameter names are the model's with the prefix "
        f"{prefix!r}: hold the model as `self.model` of the LightningModule, or export with "
        f"another --fts-prefix. Return an optimizer at lr {lr} from configure_optimizers.",
        "",
        f"Mapping from the trial's unfreeze events ({source}):",
        "- phase 0: the head and the blocks trainable from epoch 0. It has no lr: FTS trains "
        "phase 0 at the LR of configure_optimizers.",
        "- each later event: one phase listing the parameters of the blocks it unfroze (exact "
        "names, which FTS takes as they are before trying them as regexes), with lr = "
        "optimizer.lr x the block's LR scale (backbone_lr_mult x layer_decay ^ blocks between "
        "it and the head). FTS gives a phase one lr: under layer decay, a phase of several "
        "blocks gets its deepest block's (the one nearest the head), and its comment lists "
        "each block's own.",
        "- max_transition_epoch: the epoch the next phase starts (FTS moves at the start of "
        "that epoch); the last phase's is the trial's epochs (epoch_transitions_only needs "
        "one; FTS raises a lower max_epochs to it).",
        "- blocks no event unfroze are in no phase: FTS keeps them frozen.",
        "Not carried: the LR schedule (lrs are peak LRs), unfreeze_warmup_steps, weight decay, "
        "frozen_norm_eval; configure those in Lightning.",
    ]
    return "".join(_comment(text) for text in paragraphs) + "\n"


def _comment(text: str, indent: str = "") -> str:
    """``text`` as YAML comment lines of at most 100 characters; a "- " item hangs indented."""
    if not text:
        return "#\n"
    hang = indent + ("  " if text.startswith("- ") else "")
    lines = textwrap.wrap(text, 98, initial_indent=indent, subsequent_indent=hang)
    return "".join(f"# {line}\n" for line in lines)


def _fts_phase_text(k: int, phase: FtsPhase) -> str:
    body: dict[str, Any] = {"params": list(phase.params)}
    body["max_transition_epoch"] = phase.max_transition_epoch
    if phase.lr is not None:
        body["lr"] = phase.lr
    text = yaml.dump({k: body}, Dumper=_FtsDumper, sort_keys=False, allow_unicode=True)
    notes = _fts_phase_notes(k, phase)
    return _comment(notes[0]) + "".join(_comment(n, "  ") for n in notes[1:]) + text


def _fts_phase_notes(k: int, phase: FtsPhase) -> list[str]:
    opened = [b for b in phase.blocks if b != "head"]
    notes = [f"phase {k}, from epoch {phase.epoch}: {', '.join(phase.blocks)}"]
    if k == 0 and opened:
        lrs = ", ".join(f"{b} {lr:g}" for b, lr in zip(opened, phase.block_lrs, strict=True))
        notes.append(f"the trial trained these blocks at: {lrs}")
    if k > 0 and len(set(phase.block_lrs)) > 1:
        lrs = ", ".join(f"{b} {lr:g}" for b, lr in zip(opened, phase.block_lrs, strict=True))
        notes.append(f"layer decay gives the blocks their own LRs: {lrs}; lr is the deepest's")
    return notes


# ---------------------------------------------------------------------------------------------
# YAML out


class _Dumper(yaml.SafeDumper):
    """Quotes every string that PyYAML's YAML 1.1 rules *or* the project's YAML 1.2 reader would
    take for a number or boolean (``1e3``), so what is written reads back the same."""


for _first, _resolvers in config._Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        _Dumper.add_implicit_resolver(_tag, _regexp, None if _first is None else [_first])


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # Lists of scalars on one line (phases, block names); nested structure stays in blocks.
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


class _FtsDumper(_Dumper):
    """Parameter lists one name a line: FTS schedules are read and edited by people."""


_FtsDumper.add_representer(
    list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=False)
)


def _write_yaml(path: Path, values: Mapping[str, Any], header: str, *, check: bool = False) -> Path:
    """Write ``header`` and ``values`` as YAML through ``_write_atomic``. ``check``: the written
    file must load as a valid trial config before it replaces anything."""

    def body(f: TextIO) -> None:
        f.write(header)
        yaml.dump(dict(values), f, Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    return _write_atomic(path, body, check=check)


def _write_atomic(path: Path, body: Callable[[TextIO], Any], *, check: bool = False) -> Path:
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


def _or(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
