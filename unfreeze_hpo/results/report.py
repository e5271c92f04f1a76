"""Plots and a one-page HTML report of a search.

Reads only what a search wrote (the Optuna study and the trial folders); never imports Ray.
"""

from __future__ import annotations

import base64
import html
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import pandas as pd

from unfreeze_hpo import trialdir
from unfreeze_hpo.errors import Problem, UserError
from unfreeze_hpo.results import load_study, own_study_url, study_url
from unfreeze_hpo.results.plots import (
    Section,
    TrialRecord,
    plot_curves,
    plot_history,
    plot_importances,
    plot_ratios,
    plot_spikes,
)
from unfreeze_hpo.search.options import STUDY_FILE

REPORT_DIR = "report"  # inside the search folder, unless told otherwise


# -- opening the study -------------------------------------------------------------------------


def storage_url(search_folder: Path, study_storage: str | None = None) -> str:
    """The study's storage (``results.study_url``), for a folder that holds a study."""
    if study_storage:
        return study_storage
    folder = _folder(search_folder)
    if not folder.is_dir():
        raise _bad_search(search_folder, "no such search folder")
    url = study_url(folder)
    if url == own_study_url(folder) and not (folder / STUDY_FILE).is_file():
        raise _bad_search(search_folder, f"holds no {STUDY_FILE}: not a search folder")
    return url


def open_study(
    search_folder: Path, *, study_storage: str | None = None, study_name: str | None = None
) -> optuna.Study:
    """The search's Optuna study; a UserError naming SEARCH when there is none."""
    url = storage_url(search_folder, study_storage)
    return load_study(search_folder, study_name or _folder(search_folder).name, url)


def _bad_search(value: object, message: str, fix: str = "") -> UserError:
    fix = fix or "pass the folder a search wrote (<storage_path>/<name>), or its storage URL"
    return UserError(Problem("SEARCH", str(value), message, fix))


def _folder(search_folder: Path) -> Path:
    path = Path(search_folder)
    return path.parent if path.name == STUDY_FILE and path.is_file() else path


# -- reading the trials ------------------------------------------------------------------------


def read_trials(study: optuna.Study, search_folder: Path) -> list[TrialRecord]:
    """Every trial of the study, with its per-epoch metrics where its files survive."""
    return [_record(t, _folder(search_folder)) for t in study.get_trials(deepcopy=False)]


def _record(trial: optuna.trial.FrozenTrial, folder: Path) -> TrialRecord:
    attrs = trial.user_attrs
    config = attrs.get("config") or {}
    rows = [
        _numbers(r)
        for r in trialdir.find_rows(
            folder, str(attrs.get("trial_dir") or ""), str(attrs.get("ray_trial_id") or "")
        )
    ]
    # Studies written before the timeline was recorded: rebuilt from the rows.
    events = attrs.get("timeline") or trialdir.timeline(rows)
    timeline = [(int(e["epoch"]), int(e["n_trainable"])) for e in events]
    return TrialRecord(
        number=trial.number,
        state=trial.state.name.lower(),
        strategy=str(config.get("strategy", trial.params.get("strategy", "?"))),
        value=trial.value if trial.values else None,
        reason=str(attrs.get("reason") or ""),
        final={k: float(v) for k, v in (attrs.get("final") or {}).items() if _number(v)},
        # Optuna steps are Ray's training_iteration, 1-based; the metrics' epochs are 0-based.
        objective={step - 1: v for step, v in sorted(trial.intermediate_values.items())},
        rows=rows,
        timeline=timeline,
    )


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if _number(v)}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def objective_name(records: Iterable[TrialRecord]) -> str:
    """The metric the search optimized: the one key of ``final`` equal to every last objective."""
    candidates: set[str] | None = None
    for r in records:
        if r.objective and r.final:
            last = r.objective[max(r.objective)]
            keys = {k for k, v in r.final.items() if v == last}
            candidates = keys if candidates is None else candidates & keys
    return candidates.pop() if candidates and len(candidates) == 1 else "objective"


# -- the plots ---------------------------------------------------------------------------------


# -- the page ----------------------------------------------------------------------------------


def trials_table(records: list[TrialRecord], metric: str) -> pd.DataFrame:
    """One row per trial: what the page lists under its plots."""
    columns: dict[str, list[Any]] = {
        "trial": [r.number for r in records],
        "state": [r.state for r in records],
        "strategy": [r.strategy for r in records],
        metric: [r.value for r in records],
        # Measured on the test split at the best val epoch: data the search did not choose on.
        "test acc (at best val)": [r.final.get("test_acc_at_best") for r in records],
        "epochs": [int(r.final["epoch"]) + 1 if "epoch" in r.final else None for r in records],
        "backbone trainable": [r.final.get("backbone_trainable_ratio") for r in records],
        "worst spike (loss x)": [r.final.get("spike_worst_loss_ratio") for r in records],
        "reason": [r.reason for r in records],
    }
    if all(v is None for v in columns["test acc (at best val)"]):
        del columns["test acc (at best val)"]
    return pd.DataFrame(columns)


def build_report(
    search_folder: Path,
    out: Path | None = None,
    *,
    study_storage: str | None = None,
    study_name: str | None = None,
    top: int = 5,
) -> Path:
    """Write the report's PNGs and its self-contained index.html into ``out``; return the page."""
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # headless by default; a session that chose a backend keeps it
    study = open_study(search_folder, study_storage=study_storage, study_name=study_name)
    records = read_trials(study, search_folder)
    if not records:  # nothing to plot or list: an error, so scripts notice (exit 2)
        message = f"study {study.study_name!r} has no trials yet (one is recorded when it ends)"
        raise _bad_search(search_folder, message, "report once the search has ended a trial")
    out = Path(out) if out is not None else _folder(search_folder) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    # The name the search recorded for its values; a study from before it, the one that fits.
    metric = (study.metric_names or [""])[0] or objective_name(records)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    sections = [
        plot_history(study, metric, out / "history.png"),
        plot_importances(study, metric, out / "importances.png"),
        plot_curves(records, metric, out / "curves.png"),
        plot_spikes(records, out / "spikes.png"),
        plot_ratios(records, top, maximize, out / "ratios.png"),
    ]
    for name in ("history", "importances", "curves", "spikes", "ratios"):
        if all(s.png != out / f"{name}.png" for s in sections):
            (out / f"{name}.png").unlink(missing_ok=True)  # a stale plot from an earlier report
    page = out / "index.html"
    page.write_text(_page(study, records, metric, sections))
    return page


def _page(
    study: optuna.Study, records: list[TrialRecord], metric: str, sections: list[Section]
) -> str:
    counts = ", ".join(
        f"{sum(r.state == s for r in records)} {s}" for s in ("complete", "pruned", "fail")
    )
    done = [r for r in records if r.state == "complete" and r.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    best = (max if maximize else min)(done, key=lambda r: r.value or 0.0) if done else None
    summary = f"{len(records)} trials: {counts}. Direction: {'max' if maximize else 'min'}imize."
    recorded = study.user_attrs.get("objective")
    if isinstance(recorded, dict) and recorded.get("describe"):
        summary += f" Objective: {recorded['describe']} ({metric})."
    if best is not None:
        summary += f" Best: trial {best.number} ({best.strategy}), {metric} = {best.value:.4g}."
    table = trials_table(records, metric).to_html(
        index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0, classes="trials"
    )
    title = html.escape(f"Search {study.study_name}")
    body = "\n".join(_section_html(s) for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption, .note {{ color: #555; margin: .4em 0 1.6em; }}
table.trials {{ border-collapse: collapse; font-size: 14px; }}
table.trials td, table.trials th {{ padding: 3px 10px; border-bottom: 1px solid #ddd; }}
</style></head><body>
<h1>{title}</h1>
<p>{html.escape(summary)}</p>
{body}
<h2>Trials</h2>
{table}
</body></html>
"""


def _section_html(s: Section) -> str:
    head = f"<h2>{html.escape(s.title)}</h2>"
    if s.png is None:
        return f'{head}\n<p class="note">{html.escape(s.caption)}</p>'
    data = base64.b64encode(s.png.read_bytes()).decode("ascii")  # one file to share
    return (
        f'{head}\n<figure><img src="data:image/png;base64,{data}" alt="{html.escape(s.title)}">'
        f"\n<figcaption>{html.escape(s.caption)}</figcaption></figure>"
    )
