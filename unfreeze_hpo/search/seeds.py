"""The best configs re-run with more training seeds, and what their seeds say.

One training seed decides a trial's value, and the spread between seeds can be larger than the
differences a search is meant to find. With ``--reseed-top N --reseed-seeds S`` the search, once
its trials have ended, re-runs its N best completed configs with S more seeds each (the base
seed + 1 ... + S), and names the winner by the mean over each config's seeds.

The re-runs are trials of their own Ray experiment (``<search>/ray-seeds``) and of their own
study (``<name>-seeds``, beside the search's): the search's study, whose values the sampler
learned from, keeps one seed per config. Each re-run's config is its original's, with ``seed``
and ``reseed_of`` (the original's trial number) added.

A config's spread over seeds mixes two errors: the training seed's, and the validation set's
sampling error, which for an accuracy p on n samples is sqrt(p (1 - p) / n). ``seed_summary``
reports both, and the training seed's share alone, sqrt(max(0, sd^2 - se^2)).

No Ray here: the results read it too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from unfreeze_hpo.search.objective import Objective

RESEED_OF = "reseed_of"  # the config key naming the trial a re-run repeats
SUFFIX = "-seeds"  # the re-runs' study: the search's name and this
EXPERIMENT = "ray-seeds"  # the re-runs' Ray experiment, in the search folder


def study_name(name: str) -> str:
    return name + SUFFIX


def ranked(trials: Iterable[FrozenTrial], mode: str) -> list[FrozenTrial]:
    """The completed trials, best first (ties: the earlier trial)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(done, key=lambda t: (sign * float(t.value or 0.0), t.number))


def points(
    trials: Sequence[FrozenTrial], mode: str, top: int, seeds: int, base_seed: int
) -> list[dict[str, Any]]:
    """The configs to re-run: the ``top`` best completed trials', each with ``seeds`` new seeds."""
    out = []
    for trial in ranked(trials, mode)[:top]:
        config = dict(trial.user_attrs.get("config") or trial.params)
        for s in range(1, seeds + 1):
            out.append({**config, "seed": base_seed + s, RESEED_OF: trial.number})
    return out


@dataclass(frozen=True)
class SeedSummary:
    """One re-run config: its values over every seed (the original's first)."""

    number: int  # the original trial's
    values: tuple[float, ...]
    mean: float
    sd: float  # over the seeds (NaN for one)
    val_se: float | None  # the validation-sampling error of one reading (accuracies only)
    train_sd: float  # the training seed's share of ``sd``: sqrt(max(0, sd^2 - val_se^2))

    @property
    def seeds(self) -> int:
        return len(self.values)


def seed_summary(
    originals: Sequence[FrozenTrial], reruns: Sequence[FrozenTrial], objective: Objective
) -> list[SeedSummary]:
    """Each re-run config with its values over its seeds, best mean first."""
    by_number = {t.number: t for t in originals}
    values: dict[int, list[float]] = {}
    for rerun in reruns:
        number = (rerun.user_attrs.get("config") or {}).get(RESEED_OF)
        if rerun.state != TrialState.COMPLETE or rerun.value is None or number not in by_number:
            continue
        original = by_number[number]
        if original.value is not None:
            values.setdefault(number, [float(original.value)])
        values.setdefault(number, []).append(float(rerun.value))
    out = []
    for number, seen in values.items():
        mean = statistics.fmean(seen)
        sd = statistics.stdev(seen) if len(seen) > 1 else math.nan
        final = by_number[number].user_attrs.get("final") or {}
        se = sampling_error(objective, mean, final.get("val_samples"))
        train = math.sqrt(max(0.0, sd**2 - (se or 0.0) ** 2)) if math.isfinite(sd) else math.nan
        out.append(SeedSummary(number, tuple(seen), mean, sd, se, train))
    sign = -1.0 if objective.mode == "max" else 1.0
    return sorted(out, key=lambda s: (sign * s.mean, s.number))


def sampling_error(objective: Objective, mean: float, samples: Any) -> float | None:
    """The standard error of one accuracy reading on ``samples`` validation samples; None for a
    metric that is not an accuracy, or when the count is unknown."""
    accuracy = objective.metric.endswith("_acc") or objective.metric == "acc"
    if not accuracy or not isinstance(samples, int | float) or samples < 1:
        return None
    p = min(max(mean, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / float(samples))


def load_reruns(url: str, name: str) -> list[FrozenTrial]:
    """The re-runs of search ``name`` in the study storage ``url`` ([] when there are none)."""
    storage = optuna.storages.get_storage(url)
    if study_name(name) not in optuna.get_all_study_names(storage=storage):
        return []
    return optuna.load_study(study_name=study_name(name), storage=storage).get_trials()


def line(summary: SeedSummary, key: str) -> str:
    """ "trial 5: last3_mean_val_acc 0.812 +- 0.021 over 3 seeds (training seed 0.015, ...)" """
    spread = f" +- {summary.sd:.3f}" if math.isfinite(summary.sd) else ""
    parts = [f"training seed sd {summary.train_sd:.3f}"] if math.isfinite(summary.train_sd) else []
    if summary.val_se is not None:
        parts.append(f"validation sampling se {summary.val_se:.3f}")
    detail = f" ({', '.join(parts)})" if parts else ""
    seen = f"{summary.seeds} seeds"
    return f"trial {summary.number}: {key} {summary.mean:.4f}{spread} over {seen}{detail}"
