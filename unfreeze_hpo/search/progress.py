"""The search's progress lines: one when a trial starts, one when it ends, a summary as it goes."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ray import tune

from unfreeze_hpo.search.recorder import error_reason


class ProgressPrinter(tune.Callback):
    """One line when a trial starts or ends, and a compact table of running trials each minute."""

    def __init__(self, metric: str, total: int, scheduler: Any, every_s: float = 60.0) -> None:
        self.metric, self.total, self.every_s = metric, total, every_s
        self.scheduler = scheduler
        self.ended = 0
        self.latest: dict[str, dict[str, Any]] = {}
        self.next_table = time.monotonic() + every_s

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        print(f"[search] start  {trial.trial_id}  {_describe(trial.config)}", flush=True)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
    ) -> None:
        self.latest[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        reason = getattr(self.scheduler, "reasons", {}).get(trial.trial_id)
        self._ended(trial, "pruned" if reason else "done", f": {reason}" if reason else "")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, "FAILED", f": {error_reason(trial)}")

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if time.monotonic() < self.next_table:
            return
        self.next_table = time.monotonic() + self.every_s
        running = [t for t in trials if t.status == "RUNNING"]
        print(
            f"[search] {self.ended}/{self.total} trials ended, {len(running)} running", flush=True
        )
        for t in running:
            r = self.latest.get(t.trial_id, {})
            print(
                f"           {t.trial_id}  epoch {int(r.get('epoch', -1)) + 1:>3}  "
                f"{self.metric} {r.get(self.metric, float('nan')):.3f}  trainable "
                f"{100 * r.get('backbone_trainable_ratio', 0):.0f}%  spike "
                f"x{r.get('spike_worst_loss_ratio', 1):.2f}",
                flush=True,
            )

    def _ended(self, trial: Any, how: str, why: str) -> None:
        self.ended += 1
        r = self.latest.get(trial.trial_id, {})
        epochs = int(r.get("epoch", -1)) + 1
        print(
            f"[search] {how:6s} {trial.trial_id}  {self.metric} "
            f"{r.get(self.metric, float('nan')):.3f} after {epochs} epochs  "
            f"({self.ended}/{self.total}){why}",
            flush=True,
        )


def _describe(config: Mapping[str, Any]) -> str:
    def short(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in sorted(config.items()))
