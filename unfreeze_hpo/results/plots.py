"""The report's plots, one PNG each, from the trials as the report reads them (``TrialRecord``).

Optuna's own matplotlib plots where it has one (history, importances); the unfreeze-specific ones
(per-epoch curves with the unfreeze events, spike ratios, trainable ratios) drawn here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

STYLES = {"complete": "-", "pruned": "--", "fail": ":"}


STATE_COLORS = {"complete": "tab:blue", "pruned": "tab:red", "fail": "tab:gray"}


MAX_LABELS = 12  # more per-trial legend entries than this hide the plot


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the report needs it; epochs are 0-based, as in the training log."""

    number: int
    state: str  # complete | pruned | fail (| running | waiting, never written by a search)
    strategy: str
    value: float | None
    reason: str
    final: dict[str, float]
    objective: dict[int, float]  # epoch -> the searched metric (Optuna's intermediate values)
    rows: list[dict[str, float]]  # metrics.jsonl, one per epoch; [] when its files are gone
    timeline: list[tuple[int, int]]  # (epoch, trainable blocks) each time the plan grew

    @property
    def label(self) -> str:
        return f"#{self.number} {self.strategy}"

    @property
    def events(self) -> list[int]:
        """Unfreeze events: blocks trainable from epoch 0 were never unfrozen."""
        return [epoch for epoch, _ in self.timeline if epoch > 0]


@dataclass(frozen=True)
class Section:
    """One part of the page: a plot with its caption, or a note saying why there is none."""

    title: str
    caption: str
    png: Path | None = None


def plot_history(study: optuna.Study, metric: str, path: Path) -> Section:
    title = "Optimization history"
    n = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if not n:
        return Section(title, "No complete trial yet, so there is no history to draw.")
    # Optuna's plots switch pyplot's global style: rc_context keeps that out of the other plots.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
    _save_optuna(ax, path)
    return Section(
        title, f"{metric} of each of the {n} complete trials, and the best so far.", path
    )


def plot_importances(study: optuna.Study, metric: str, path: Path) -> Section:
    title = "Parameter importances"
    n = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if n < 2:
        return Section(title, f"Needs at least 2 complete trials to compare; this search has {n}.")
    # PED-ANOVA rather than Optuna's default fANOVA: it needs no scikit-learn and no random seed.
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    with warnings.catch_warnings(record=True) as caught, matplotlib.rc_context():
        warnings.simplefilter("always")
        try:
            if not optuna.importance.get_param_importances(study, evaluator=evaluator):
                raise ValueError("no parameter was sampled in the complete trials")
            ax = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=evaluator, target_name=metric
            )
        except (ValueError, RuntimeError) as exc:  # e.g. every trial sampled the same values
            return Section(title, f"Not computed: {type(exc).__name__}: {exc}.")
    _save_optuna(ax, path)
    caption = (
        f"PED-ANOVA importance of each parameter for reaching the top of {metric}, "
        f"over the {n} complete trials."
    )
    if any("may be inaccurate" in str(w.message) for w in caught):
        caption += " Optuna warns that this few trials make the estimate rough."
    return Section(title, caption, path)


def plot_curves(records: list[TrialRecord], metric: str, path: Path) -> Section:
    title = "Per-trial curves"
    with_rows = [r for r in records if any("val_loss" in row for row in r.rows)]
    with_objective = [r for r in records if r.objective]
    if not with_rows and not with_objective:
        return Section(title, "No trial reported a metric, so there are no curves.")
    # val_loss and the objective have different units: one panel each, never mixed on one axis.
    panels = [("val_loss (metrics.jsonl)", with_rows, _loss_curve)] if with_rows else []
    panels.append((f"{metric} (Optuna intermediate values)", with_objective, _objective_curve))
    fig = Figure(figsize=(6.2 * len(panels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = _colors(records)
    for ax, (ylabel, group, curve) in zip(axes, panels, strict=True):
        for r in group:
            _draw_curve(ax, r, curve(r), colors[r.number])
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _log_if_wide(ax, [v for r in group for v in curve(r).values()])
        ax.grid(alpha=0.3)
    _legend(fig, records, colors)
    missing = [f"#{r.number}" for r in with_objective if r not in with_rows]
    caption = "Solid: complete, dashed: pruned, dotted: failed; | marks an unfreeze event."
    if with_rows and missing:
        caption += f" No metrics.jsonl left for {', '.join(missing)} (right panel only)."
    elif not with_rows:
        caption += " No trial's metrics.jsonl was found, so val_loss is not drawn."
    return Section(title, caption, _save(fig, path))


def _loss_curve(r: TrialRecord) -> dict[int, float]:
    return {int(row["epoch"]): row["val_loss"] for row in r.rows if "val_loss" in row}


def _objective_curve(r: TrialRecord) -> dict[int, float]:
    return r.objective


def _draw_curve(ax: Any, r: TrialRecord, curve: dict[int, float], color: Any) -> None:
    epochs = sorted(curve)
    ax.plot(epochs, [curve[e] for e in epochs], STYLES.get(r.state, "-"), color=color, lw=1.5)
    events = [e for e in r.events if e in curve]
    ax.plot(events, [curve[e] for e in events], "|", color=color, ms=16, mew=2.5)


def plot_spikes(records: list[TrialRecord], path: Path) -> Section:
    title = "Unfreeze spikes: pruned vs completed"
    keys = {"spike_worst_loss_ratio": "loss", "spike_worst_grad_ratio": "grad-norm"}
    groups = [s for s in STYLES if any(r.state == s and keys.keys() & r.final for r in records)]
    if not groups:
        return Section(title, "No trial reported spike signals.")
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    rng = np.random.default_rng(0)  # the jitter only spreads points; fixed so reports repeat
    for ax, (key, name) in zip(fig.subplots(1, 2), keys.items(), strict=True):
        for i, state in enumerate(groups):
            points = [
                (r.number, r.final[key]) for r in records if r.state == state and key in r.final
            ]
            if not points:
                continue
            xs = i + rng.uniform(-0.15, 0.15, len(points))
            ys = [v for _, v in points]
            ax.scatter(xs, ys, color=STATE_COLORS[state], alpha=0.75, s=36, zorder=3)
            ax.hlines(float(np.median(ys)), i - 0.3, i + 0.3, color="black", lw=2)
            if len(records) <= 30:
                for x, (number, y) in zip(xs, points, strict=True):
                    ax.annotate(f"#{number}", (x, y), xytext=(5, 2), textcoords="offset points")
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xticks(range(len(groups)), [f"{g} ({_count(records, g)})" for g in groups])
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set(ylabel=f"worst {name} ratio to the pre-unfreeze baseline", title=f"{name} spikes")
        _log_if_wide(ax, [r.final[key] for r in records if key in r.final])
        ax.grid(alpha=0.3, axis="y")
    caption = (
        "Worst ratio to the pre-unfreeze baseline over a trial's unfreeze events "
        "(1 = no spike, dashed); black bars are medians."
    )
    return Section(title, caption, _save(fig, path))


def plot_ratios(records: list[TrialRecord], top: int, maximize: bool, path: Path) -> Section:
    done = [r for r in records if r.state == "complete" and r.value is not None]
    best = sorted(done, key=lambda r: r.value or 0.0, reverse=maximize)[:top]
    series = [(r, *_ratio_series(r)) for r in best]
    series = [s for s in series if s[1]]
    title = f"Trainable backbone of the best {len(series) or top} complete trials"
    if not series:
        return Section(title, "No complete trial with a trainable-ratio record.")
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    approx = []
    for i, (r, points, exact) in enumerate(series):
        ax.plot(
            [e for e, _ in points],
            [v for _, v in points],
            "-" if exact else ":",
            drawstyle="steps-post",
            marker="o",
            ms=3,
            lw=1.5 + 1.5 * (len(series) - 1 - i),  # equal schedules overlap: nested, not hidden
            label=f"{r.label} ({r.value:.4g})",
        )
        approx += [] if exact else [f"#{r.number}"]
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="trainable share of the backbone", ylim=(-0.03, 1.03))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    caption = "Share of backbone parameters trainable at each epoch, best trial first in legend."
    if approx:
        caption += (
            f" Dotted ({', '.join(approx)}): metrics.jsonl is gone; rebuilt from the unfreeze "
            "timeline, assuming blocks of equal size."
        )
    return Section(title, caption, _save(fig, path))


def _ratio_series(r: TrialRecord) -> tuple[list[tuple[int, float]], bool]:
    """(epoch, backbone trainable ratio) and whether it was measured (True) or rebuilt."""
    measured = [
        (int(row["epoch"]), row["backbone_trainable_ratio"])
        for row in r.rows
        if "backbone_trainable_ratio" in row
    ]
    if measured or "backbone_trainable_ratio" not in r.final:
        return measured, True
    ratio, blocks = r.final["backbone_trainable_ratio"], r.final.get("unfrozen_blocks", 0.0)
    last = int(r.final.get("epoch", max(r.objective, default=0)))
    points = []
    for epoch in range(last + 1):
        n = max((k for e, k in r.timeline if e <= epoch), default=0)
        points.append((epoch, ratio * n / blocks if blocks else ratio))
    return points, False


def _log_if_wide(ax: Any, values: list[float]) -> None:
    """A log axis when values span more than 20x: one diverged trial must not flatten the rest."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")


def _colors(records: list[TrialRecord]) -> dict[int, Any]:
    if len(records) > MAX_LABELS:  # too many to tell apart: color by state instead
        return {r.number: STATE_COLORS.get(r.state, "tab:gray") for r in records}
    cmap = matplotlib.colormaps["tab20" if len(records) > 10 else "tab10"]
    return {r.number: cmap(i) for i, r in enumerate(records)}


def _legend(fig: Figure, records: list[TrialRecord], colors: dict[int, Any]) -> None:
    per_trial = len(records) <= MAX_LABELS  # else the colors are the states'
    handles = [
        Line2D([], [], color="black" if per_trial else STATE_COLORS[s], ls=STYLES[s], label=s)
        for s in STYLES
        if _count(records, s)
    ]
    handles.append(
        Line2D([], [], color="black", ls="", marker="|", ms=12, mew=2, label="unfreeze event")
    )
    if per_trial:
        handles += [Line2D([], [], color=colors[r.number], lw=3, label=r.label) for r in records]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")


def _count(records: list[TrialRecord], state: str) -> int:
    return sum(r.state == state for r in records)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _save_optuna(ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt  # Optuna draws with pyplot: close its figure after saving

    fig = ax.figure
    fig.set_size_inches(9, 4.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
