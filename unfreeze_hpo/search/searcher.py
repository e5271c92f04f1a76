"""The searcher: Ray's OptunaSearch, told what really happened to each trial.

Ray's ``OptunaSearch.on_trial_complete`` tells its study COMPLETE, with the last reported value,
for every trial that reported one: a trial the scheduler stopped at a rung, one the spike rule
stopped, one that errored after reporting. TPE then learns "this config reached 0.47" for a
schedule cut at epoch 3. Here the sampler's own study is told:

- COMPLETE with the last value, for a trial that ran all its epochs;
- PRUNED, for a trial stopped before its last epoch (a rung, the time budget). Its intermediate
  values are already in the study (``on_trial_result`` reports each epoch), and TPE ranks pruned
  trials below complete ones, the ones that got further first, as it does with Optuna's own
  pruners;
- PRUNED and infeasible, for a trial the spike rule stopped: its constraint ``spike`` is set to
  1 (``Trial.set_constraint``), and TPE ranks every infeasible trial below every feasible one.
  A schedule that blew up right after an unfreeze event is a region to leave, however well it
  did before: as a plain PRUNED trial that got far, it would outrank the ones a rung stopped
  early and draw the sampler towards it;
- FAIL, for a trial that errored.

The rule and the epoch count travel with the searcher's own checkpoint, so ``Tuner.restore``
keeps all of this.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher as TuneSearcher
from ray.tune.search.optuna import OptunaSearch

from unfreeze_hpo.search.rules import SpikeRule, metric_value, spike_verdict

# The user attribute that holds a spike-pruned trial's reason in the sampler's study, and the
# constraint it violates (> 0: infeasible).
SPIKE_ATTR = "spike_pruned"
SPIKE_CONSTRAINT = "spike"


def outcome(
    result: Mapping[str, Any] | None, error: bool, rule: SpikeRule, epochs: int
) -> tuple[TrialState, str | None]:
    """The state the sampler is told for a trial's last result, and the spike reason if any."""
    if error:
        return TrialState.FAIL, None
    if not result:
        return TrialState.PRUNED, None
    reason = spike_verdict(result, rule)
    if reason is not None:
        return TrialState.PRUNED, reason
    finished = metric_value(result, "epoch", -1.0) + 1 >= epochs
    return (TrialState.COMPLETE if finished else TrialState.PRUNED), None


class Searcher(OptunaSearch):
    """OptunaSearch whose study learns each trial's true end (see the module's docstring)."""

    def __init__(self, *args: Any, rule: SpikeRule, epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rule, self.epochs = rule, epochs

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)  # Ray's own warning, or no-op
            return
        state, reason = outcome(result, error, self.rule, self.epochs)
        if state == TrialState.COMPLETE:
            super().on_trial_complete(trial_id, result, error)
            return
        ot_trial = self._ot_trials[trial_id]
        if reason is not None:
            ot_trial.set_user_attr(SPIKE_ATTR, reason)
            ot_trial.set_constraint(SPIKE_CONSTRAINT, 1.0)
        self.study.tell(ot_trial, state=state)
        self._completed_trials.add(trial_id)

    @property
    def study(self) -> optuna.Study:
        """The sampler's own study (in memory, separate from the durable one)."""
        study = self._ot_study
        assert study is not None, "the searcher has no study before its space is set"
        return study


class Points(TuneSearcher):
    """Hands out fixed configs in order, one trial each (the re-runs of ``seeds``); unlike
    Tune's BasicVariantGenerator it needs no param space and keeps ``max_concurrent_trials``.
    Its place in the list travels with its checkpoint, so ``Tuner.restore`` goes on from it."""

    def __init__(self, points: list[dict[str, Any]], metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self.points, self.given = [dict(p) for p in points], 0

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.given >= len(self.points):
            return TuneSearcher.FINISHED  # type: ignore[return-value]  # Tune's own sentinel
        self.given += 1
        return dict(self.points[self.given - 1])

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        pass  # nothing to learn: the configs are fixed

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"points": self.points, "given": self.given}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.points, self.given = state["points"], state["given"]
