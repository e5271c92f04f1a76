"""What a search optimizes: one number per trial, made from a metric the trial reports each epoch.

- ``last_k_mean`` (the default, k = 3): the mean of the metric over the trial's last k epochs.
  Robust to the luck of one epoch, and it still rewards a schedule that ends well.
- ``final``: the metric at the trial's last epoch.
- ``best``: the best value over the epochs. The maximum of noisy readings is biased upward,
  and more so for a longer or noisier curve, so it rewards luck as much as the schedule.

The trial reports the objective under its own key (``Objective.key``: ``last3_mean_val_acc``,
``best_val_acc`` ...) after every epoch, as what it would be if the trial ended there. The
scheduler's rungs, the sampler, the study's value and every table read that key, so they all
judge a trial by the same number. No Ray here: the results read it too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("last_k_mean", "final", "best")


@dataclass(frozen=True)
class Objective:
    metric: str = "val_acc"  # the per-epoch metric it is made from
    kind: str = "last_k_mean"
    k: int = 3  # last_k_mean's k
    mode: str = "max"

    @property
    def key(self) -> str:
        """The name the trial reports it under (and the study's metric name)."""
        if self.kind == "final":
            return self.metric
        if self.kind == "best":
            return f"best_{self.metric}"
        return f"last{self.k}_mean_{self.metric}"

    def describe(self) -> str:
        """A phrase for tables and logs: "the mean of val_acc over the last 3 epochs"."""
        if self.kind == "final":
            return f"{self.metric} at the last epoch"
        if self.kind == "best":
            best = "highest" if self.mode == "max" else "lowest"
            return f"the {best} {self.metric} over the epochs"
        return f"the mean of {self.metric} over the last {self.k} epochs"

    def value(self, history: Sequence[float]) -> float:
        """The objective of a trial whose metric read ``history`` (oldest first); NaN for none,
        and NaN when a value it uses is not finite."""
        if not history:
            return math.nan
        if self.kind == "final":
            return float(history[-1])
        if self.kind == "best":
            if not all(math.isfinite(v) for v in history):
                return math.nan
            return float(max(history) if self.mode == "max" else min(history))
        tail = history[-self.k :]
        return float(sum(tail) / len(tail))

    def curve(self, rows: Iterable[Mapping[str, Any]]) -> dict[int, float]:
        """Ray's training iteration (epoch + 1) -> the objective after that epoch, from a trial's
        per-epoch metrics rows (``metrics.jsonl``); an epoch whose value is not finite is left
        out."""
        ordered = sorted(
            (r for r in rows if _number(r.get("epoch")) and _number(r.get(self.metric))),
            key=lambda r: r["epoch"],
        )
        history: list[float] = []
        out = {}
        for row in ordered:
            history.append(float(row[self.metric]))
            value = self.value(history)
            if math.isfinite(value):
                out[int(row["epoch"]) + 1] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """What the study records (its user attribute ``objective``)."""
        return {**asdict(self), "key": self.key, "describe": self.describe()}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
