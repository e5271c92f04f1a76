"""The searcher tells its sampler's own study how each trial really ended: COMPLETE, PRUNED
(with its intermediate values), PRUNED and infeasible for a spike, FAIL; a restore keeps it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.samplers._tpe.sampler import _split_trials
from optuna.trial import TrialState

from unfreeze_hpo.search.rules import SpikeRule
from unfreeze_hpo.search.searcher import SPIKE_ATTR, Searcher
from unfreeze_hpo.search.space import default_space

EPOCHS = 4
SPIKE = {"spike_events": 1.0, "spike_nonfinite": 2.0, "spike_event_epoch": 2.0}


def searcher() -> Searcher:
    sampler = optuna.samplers.TPESampler(seed=0)
    space = default_space()
    return Searcher(
        space=space.define_by_run,
        sampler=sampler,
        metric="val_acc",
        mode="max",
        seed=0,
        rule=SpikeRule(),
        epochs=EPOCHS,
    )


def run(
    s: Searcher,
    trial_id: str,
    accs: list[float],
    last: dict[str, Any] | None = None,
    error: bool = False,
) -> None:
    assert s.suggest(trial_id) is not None
    result: dict[str, Any] = {}
    for epoch, acc in enumerate(accs):
        result = {"val_acc": acc, "epoch": float(epoch), "training_iteration": epoch + 1}
        if epoch == len(accs) - 1 and last:
            result.update(last)
        s.on_trial_result(trial_id, result)
    s.on_trial_complete(trial_id, result, error=error)


def states(s: Searcher) -> list[tuple[TrialState, dict[int, float], dict[str, float]]]:
    return [
        (t.state, t.intermediate_values, t.constraints) for t in s.study.get_trials(deepcopy=False)
    ]


@pytest.fixture
def ended() -> Searcher:
    s = searcher()
    run(s, "complete", [0.3, 0.4, 0.5, 0.6])
    run(s, "rung", [0.2, 0.25])  # stopped by ASHA at epoch 1
    run(s, "spike", [0.5, 0.7, 0.9], last=SPIKE)  # stopped by the spike rule at epoch 2
    run(s, "error", [0.4], error=True)
    return s


def test_each_trial_reaches_the_sampler_as_it_ended(ended: Searcher) -> None:
    # Ray's own OptunaSearch tells all four COMPLETE with their last value.
    assert states(ended) == [
        (TrialState.COMPLETE, {1: 0.3, 2: 0.4, 3: 0.5, 4: 0.6}, {}),
        (TrialState.PRUNED, {1: 0.2, 2: 0.25}, {}),
        (TrialState.PRUNED, {1: 0.5, 2: 0.7, 3: 0.9}, {"spike": 1.0}),
        (TrialState.FAIL, {1: 0.4}, {}),
    ]
    spike = ended.study.get_trials(deepcopy=False)[2]
    assert spike.user_attrs[SPIKE_ATTR].startswith("2 non-finite steps")
    assert [t.value for t in ended.study.get_trials(deepcopy=False)[:2]] == [0.6, 0.25]


def test_a_spike_pruned_trial_ranks_below_every_feasible_one_for_tpe(ended: Searcher) -> None:
    # It reached 0.9 before it blew up: as a plain PRUNED trial it would rank first among the
    # pruned ones and join TPE's good group; infeasible, it is the last of all.
    trials = [t for t in ended.study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
    below, above = _split_trials(ended.study, trials, n_below=2)
    assert [t.number for t in below] == [0, 1]
    assert [t.number for t in above] == [2]


def test_a_restored_searcher_keeps_what_its_study_learned(ended: Searcher, tmp_path: Path) -> None:
    ended.save(str(tmp_path / "searcher.pkl"))
    again = searcher()
    again.restore(str(tmp_path / "searcher.pkl"))
    assert states(again) == states(ended)
    run(again, "later", [0.1, 0.2, 0.3, 0.4], last=SPIKE)  # spiked at its last epoch
    assert states(again)[-1][0] == TrialState.PRUNED
    assert states(again)[-1][2] == {"spike": 1.0}
