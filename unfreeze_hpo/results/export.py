"""Export one trial of a search: a replayable schedule YAML (``unfreeze-hpo train --config``) or
an explicit finetuning-scheduler schedule for PyTorch Lightning.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from unfreeze_hpo import config
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem, UserError
from unfreeze_hpo.registry import Registry
from unfreeze_hpo.results import RAY_KEYS, STATE_NAMES, Search, or_list
from unfreeze_hpo.results.fts import FTS_PREFIX, FtsPhase, check_fts_prefix, fts_phases, fts_text
from unfreeze_hpo.results.listing import best_trials
from unfreeze_hpo.yamlfile import write_atomic, write_yaml

if TYPE_CHECKING:  # blocks imports torch: only the lightning-fts format needs it at run time
    from unfreeze_hpo.blocks import Blocks


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
        "state": STATE_NAMES.get(trial.state, trial.state.name.lower()),
        "reason": attrs.get("reason") or None,
        "metric": search.metric,
        "objective": search.objective.describe(),
        "mode": search.mode,
        "value": trial.value,
        "final": {k: v for k, v in (attrs.get("final") or {}).items() if k not in RAY_KEYS},
        "timeline": _timeline(attrs.get("timeline") or []),
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
    provenance = cfg.provenance or {}
    test = (provenance.get("final") or {}).get("test_acc_at_best")
    if test is not None:
        header += (
            f"# {search.metric} {provenance.get('value')}; test acc {test:.4f} at the best val "
            "epoch (the test split: not chosen on)\n"
        )
    return write_yaml(out, cfg.to_dict(), header, check=_check_config)


def _exportable(search: Search, out: Path, number: int | None, allow_incomplete: bool) -> int:
    """The trial to export (default: the best completed one); UserError when it may not be."""
    if out.is_dir():
        raise UserError(Problem("--out", str(out), "is a folder", "give a file, e.g. best.yaml"))
    if number is None:
        number = int(best_trials(search)["number"].iloc[0])
    trial = _trial(search, number)
    if trial.state != TrialState.COMPLETE and not allow_incomplete:
        state = STATE_NAMES.get(trial.state, trial.state.name.lower())
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


def _timeline(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The unfreeze events the trial took, with the blocks each opened where the study names
    them (trials recorded by earlier versions carry epochs and counts only)."""
    keys = ("epoch", "n_trainable", "blocks")
    return [{k: event[k] for k in keys if k in event} for event in events]


def _discover_blocks(cfg: TrialConfig) -> Blocks:
    """The trial's model's blocks and head, from a model built on the meta device (cheap)."""
    from unfreeze_hpo.blocks import discover_spec

    spec = cfg.model.spec(cfg.model.num_classes or 2)
    return discover_spec(spec, cfg.model.granularity, cfg.model.matcher)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Export for Lightning's finetuning-scheduler (the schedule itself: results.fts)


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
    text = fts_text(search, number, cfg, prefix, out, phases)
    write_atomic(out, lambda f: f.write(text))
    return FtsSchedule(out, cfg, phases)


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


# ---------------------------------------------------------------------------------------------
# The formats `export` writes (a registry: `unfreeze-hpo export --format NAME`)


@dataclass(frozen=True)
class Exported:
    """What an exporter wrote, and the lines ``export`` prints about it."""

    path: Path
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Exporter:
    """One export format: ``write(search, out, number, allow_incomplete=..., **options)``."""

    name: str
    help: str
    write: Callable[..., Exported]
    options: tuple[str, ...] = ()  # keyword options beyond the common ones (e.g. fts_prefix)


EXPORTERS: Registry[Exporter] = Registry("export format")


def register_exporter(exporter: Exporter) -> Exporter:
    """Add an export format (a name is registered once)."""
    return EXPORTERS.add(exporter.name, exporter)


def exporter(fmt: str) -> Exporter:
    """The registered format ``fmt``, else the ConfigError that says which there are."""
    if fmt not in EXPORTERS:
        fix = f"use {or_list(list(EXPORTERS))}"
        raise ConfigError(Problem("--format", fmt, "unknown export format", fix))
    return EXPORTERS[fmt]


def _write_schedule(
    search: Search, out: Path, number: int | None = None, *, allow_incomplete: bool = False
) -> Exported:
    path = export_schedule(search, out, number, allow_incomplete=allow_incomplete)
    cfg = config.load(path)
    record = cfg.provenance or {}
    value = record.get("value")
    reached = f"{search.metric} {value:.4f}" if isinstance(value, float) else "no metric"
    events = ", ".join(
        f"epoch {e['epoch']} -> {e['n_trainable']} trainable" for e in record.get("timeline", [])
    )
    return Exported(
        path,
        (
            f"wrote {path}: trial {record.get('trial')} ({record.get('state')}), strategy "
            f"{cfg.strategy}, {reached}; unfreeze events: {events or 'none'}",
            f"replay it: unfreeze-hpo train --config {shlex.quote(str(path))}",
        ),
    )


def _write_fts(
    search: Search,
    out: Path,
    number: int | None = None,
    *,
    allow_incomplete: bool = False,
    fts_prefix: str = FTS_PREFIX,
) -> Exported:
    fts = export_fts(search, out, number, allow_incomplete=allow_incomplete, prefix=fts_prefix)
    record = fts.trial.provenance or {}
    phases = "; ".join(
        f"{i}: from epoch {p.epoch}, {', '.join(p.blocks)}"
        + (f" at lr {p.lr:g}" if p.lr is not None else "")
        for i, p in enumerate(fts.phases)
    )
    return Exported(
        fts.path,
        (
            f"wrote {fts.path}: trial {record.get('trial')} ({record.get('state')}), strategy "
            f"{fts.trial.strategy.name}, {len(fts.phases)} finetuning-scheduler phases "
            f"({phases})",
            f"use it: FinetuningScheduler(ft_schedule={str(fts.path)!r}, "
            "epoch_transitions_only=True, restore_best=False); parameter names start with "
            f"{fts_prefix!r}",
        ),
    )


register_exporter(
    Exporter(
        "unfreeze-hpo",
        "a trial YAML that `unfreeze-hpo train --config` replays",
        _write_schedule,
    )
)
register_exporter(
    Exporter(
        "lightning-fts",
        "an explicit schedule for Lightning's finetuning-scheduler",
        _write_fts,
        options=("fts_prefix",),
    )
)
