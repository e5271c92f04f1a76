"""Re-running the best configs with more training seeds: which configs, and what their seeds say."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest

from unfreeze_hpo.search import seeds
from unfreeze_hpo.search.objective import Objective

State = optuna.trial.TrialState


def trial(number: int, value: float | None, state: State = State.COMPLETE, **config: Any) -> Any:
    made = optuna.trial.create_trial(
        state=state,
        value=value if state == State.COMPLETE else None,
        user_attrs={"config": {"optimizer.lr": 0.01 * (number + 1), **config}, "final": {}},
    )
    made.number = number
    return made


def test_the_best_completed_configs_are_re_run_each_with_new_seeds() -> None:
    trials = [trial(0, 0.5), trial(1, 0.7), trial(2, None, State.PRUNED), trial(3, 0.7)]
    points = seeds.points(trials, "max", top=2, seeds=2, base_seed=10)
    # Ties go to the earlier trial; the pruned one is never re-run.
    assert [(p["reseed_of"], p["seed"]) for p in points] == [(1, 11), (1, 12), (3, 11), (3, 12)]
    assert points[0]["optimizer.lr"] == 0.02  # the original's config, seed and origin added
    assert [p["reseed_of"] for p in seeds.points(trials, "min", 1, 1, 0)] == [0]


def test_the_summary_separates_the_training_seed_from_the_validation_sample() -> None:
    originals = [trial(0, 0.80), trial(1, 0.75)]
    originals[0].user_attrs["final"]["val_samples"] = 400
    reruns = [
        trial(10, 0.70, reseed_of=0, seed=1),
        trial(11, 0.72, reseed_of=0, seed=2),
        trial(12, 0.76, reseed_of=1, seed=1),
        trial(13, None, State.FAIL, reseed_of=1, seed=2),  # a failed re-run counts for nothing
    ]
    first, second = seeds.seed_summary(originals, reruns, Objective())
    # Trial 1's two seeds (0.75, 0.76) beat trial 0's three (0.80, 0.70, 0.72): it wins.
    assert (first.number, first.values, first.seeds) == (1, (0.75, 0.76), 2)
    assert (second.number, second.values) == (0, (0.80, 0.70, 0.72))
    assert second.mean == pytest.approx(0.74)
    assert second.sd == pytest.approx(0.052915, abs=1e-6)
    assert second.val_se == pytest.approx(math.sqrt(0.74 * 0.26 / 400))
    assert second.train_sd == pytest.approx(math.sqrt(second.sd**2 - second.val_se**2))
    assert first.val_se is None  # no val_samples recorded: not guessed
    line = seeds.line(second, "last3_mean_val_acc")
    assert line.startswith("trial 0: last3_mean_val_acc 0.7400 +- 0.053 over 3 seeds")
    assert "validation sampling se 0.022" in line
    # A loss has no binomial sampling error.
    assert seeds.sampling_error(Objective("val_loss", mode="min"), 0.5, 400) is None
