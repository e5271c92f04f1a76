"""The search's objective: what each kind makes of a trial's per-epoch metric, and the options
and records that carry it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from unfreeze_hpo.search.inputs import changed_objective
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.options import SearchConfig, with_objective

CURVE = [0.25, 0.75, 0.5, 0.5, 0.625]  # a lucky epoch 1


def test_each_objective_kind_scores_the_curve_as_documented() -> None:
    assert Objective(kind="best").value(CURVE) == 0.75
    assert Objective(kind="final").value(CURVE) == 0.625
    assert Objective(kind="last_k_mean", k=3).value(CURVE) == pytest.approx(1.625 / 3)
    assert Objective(kind="last_k_mean", k=2).value(CURVE) == pytest.approx(0.5625)
    # Fewer epochs than k: the mean of those there are (what a rung at epoch 1 compares).
    assert Objective(kind="last_k_mean", k=3).value(CURVE[:2]) == 0.5
    assert Objective("val_loss", "best", mode="min").value([0.9, 0.4, 0.6]) == 0.4
    assert math.isnan(Objective().value([]))
    assert math.isnan(Objective().value([0.5, math.nan]))  # the trainable fails such a trial


def test_the_key_names_the_objective_and_an_old_searchs_metric_is_its_own_key() -> None:
    assert Objective().key == "last3_mean_val_acc"
    assert Objective(kind="best").key == "best_val_acc"  # what train.run reports as it is
    assert Objective("val_loss", "final", mode="min").key == "val_loss"
    # A search recorded before the objective: "final" of best_val_acc, the value it recorded.
    old = with_objective({"metric": "best_val_acc", "mode": "max"})
    assert SearchConfig(**old).goal.key == "best_val_acc"


def test_the_curve_is_the_objective_after_each_epoch_from_the_rows() -> None:
    rows = [{"epoch": e, "val_acc": v} for e, v in enumerate(CURVE)]
    rows.insert(1, {"epoch": 9, "val_acc": math.nan})  # an epoch without a finite value: left out
    assert Objective(kind="final").curve(reversed(rows)) == {i + 1: v for i, v in enumerate(CURVE)}
    best = Objective(kind="best").curve(rows)
    assert list(best.values()) == [0.25, 0.75, 0.75, 0.75, 0.75]


def test_a_resumed_search_must_keep_its_objective(tmp_path: Path) -> None:
    cfg = SearchConfig(storage_path=str(tmp_path), objective="best")
    record = {"search": {"metric": "val_acc", "mode": "max", "objective": "last_k_mean"}}
    (problem,) = changed_objective(cfg, {**record})
    assert (problem.field, problem.value) == ("--objective", "best")
    assert "changed from 'last_k_mean'" in problem.message and "--name" in problem.fix
    # k only matters to last_k_mean; an old record is scored by its final metric.
    assert changed_objective(SearchConfig(objective_k=5, objective="best"), {"search": {}}) != []
    old = {"search": {"metric": "best_val_acc", "mode": "max"}}
    assert changed_objective(SearchConfig(metric="best_val_acc", objective="final"), old) == []


def test_the_search_record_keeps_the_objective(tmp_path: Path) -> None:
    from unfreeze_hpo.search.inputs import load_inputs, write_inputs

    cfg = SearchConfig(storage_path=str(tmp_path), objective="last_k_mean", objective_k=4)
    base, space = load_inputs(cfg)
    write_inputs(cfg, base, space)
    recorded = yaml.safe_load((cfg.folder / "search.yaml").read_text())["search"]
    assert (recorded["objective"], recorded["objective_k"]) == ("last_k_mean", 4)
