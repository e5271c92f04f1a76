"""Data-parallel trials without Ray: ranks started by torch.multiprocessing over gloo, each
running ``train.run`` with its ``Ranks``, against one process with the same global batch.

The Ray Train path is tested in test_ray_train.py; these drive the loop directly. Spawning two
ranks costs ~20 s on 2 cores, so the multi-rank runs are under the full marker; the sharding and
the batch split are plain functions, tested here in make test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import DP_BASE as BASE
from support import DP_COMPARED as COMPARED

from unfreeze_hpo import config, train
from unfreeze_hpo.data.loading import EpochSampler
from unfreeze_hpo.errors import AuditError, ConfigError
from unfreeze_hpo.train.replicas import Ranks
from unfreeze_hpo.train.trial import per_rank_batch


@pytest.mark.parametrize("length", [10, 11, 16])
def test_ranks_shard_one_order_and_training_shards_are_even(length: int) -> None:
    one = [i for _, i in EpochSampler(length, 3, True)]
    shards = [list(EpochSampler(length, 3, True, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank takes as many steps
    assert {i for s in shards for _, i in s} == set(one)
    # Rank r takes every third sample of the one order (DistributedSampler's rule), padded
    # with the order's head.
    padded = one + one[: 3 * len(shards[0]) - length]
    assert [i for _, i in shards[1]] == padded[1::3]
    evaluation = [
        [i for _, i in EpochSampler(length, 3, False, rank=r, world_size=3, even=False)]
        for r in range(3)
    ]
    assert sorted(i for s in evaluation for i in s) == list(range(length))  # no repeats


def test_the_batch_is_the_global_batch_split_over_the_ranks() -> None:
    assert per_rank_batch(16, Ranks(1, 4)) == 4
    with pytest.raises(ConfigError) as caught:
        per_rank_batch(10, Ranks(0, 4))
    (problem,) = caught.value.problems
    assert problem.field == "batch_size" and "--workers-per-trial" in problem.fix


# --- two ranks over gloo ----------------------------------------------------------------------


def _rank(rank: int, world: int, store: str, out: str, values: dict[str, Any], mode: str) -> None:
    """One rank: train ``values`` and write its reported metrics (or its error) to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    folder = Path(out)
    seen: dict[str, Any] = {"frozen_grads": 0, "steps": 0}
    if mode == "no_rewrap":  # the bug this module exists for: DDP wrapped once, at the start
        from unfreeze_hpo.train.replicas import Replicas

        first = Replicas.wrap
        Replicas.wrap = lambda self: first(self) if self.wraps == 0 else None  # type: ignore[method-assign]
    if mode == "grads":  # every step: gradients of frozen parameters (there must be none)
        from unfreeze_hpo.train import loop

        step = loop.optimizer_step

        def counted(trial: Any, loss: Any, params: Any, new: Any = ()) -> Any:
            frozen = [p for p in trial.model.parameters() if not p.requires_grad]
            seen["frozen_grads"] += sum(p.grad is not None for p in frozen)
            seen["steps"] += 1
            return step(trial, loss, params, new)

        loop.optimizer_step = counted  # type: ignore[assignment]
    cfg = config.from_dict({**values, "output_dir": str(folder / f"rank{rank}")})
    rows: list[dict[str, float]] = []
    checkpoints: list[str | None] = []

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        rows.append(metrics)
        checkpoints.append(None if checkpoint is None else str(checkpoint))

    try:
        train.run(cfg, report, log=lambda _: None, ranks=Ranks.current(), resume=mode == "resume")
        outcome: dict[str, Any] = {"rows": rows, "checkpoints": checkpoints, **seen}
    except Exception as exc:  # written for the test to read, not raised: spawn would hide it
        outcome = {"error": type(exc).__name__, "message": str(exc), "rows": rows}
    (folder / f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def two_ranks(tmp: Path, values: dict[str, Any], mode: str = "") -> list[dict[str, Any]]:
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / f"store-{mode or 'plain'}"
    store.unlink(missing_ok=True)
    mp.spawn(_rank, args=(2, str(store), str(tmp), values, mode), nprocs=2)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def one_process(tmp: Path, values: dict[str, Any]) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    cfg = config.from_dict({**values, "output_dir": str(tmp / "single")})
    train.run(cfg, lambda metrics, _: rows.append(metrics), log=lambda _: None)
    return rows


@pytest.mark.full
def test_two_ranks_train_the_model_one_process_trains_across_unfreeze_events(
    tmp_path: Path, one_thread: None
) -> None:
    ranks = two_ranks(tmp_path, BASE, "grads")
    single = one_process(tmp_path, BASE)
    assert all("error" not in r for r in ranks), ranks
    lead, other = ranks
    assert [r["unfrozen_blocks"] for r in lead["rows"]] == [0, 1, 2]  # two unfreeze events
    for a, b, c in zip(single, lead["rows"], other["rows"], strict=True):
        for key in COMPARED:  # the same global batches: the same numbers, to rounding
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a, b)
            assert b[key] == c[key], key  # every rank reports the same, reduced, metrics
        assert a["trainable_params"] == b["trainable_params"]
    # No gradient ever reached a frozen parameter (DDP's reducer never held one), on either rank.
    assert lead["steps"] == other["steps"] == 12
    assert lead["frozen_grads"] == other["frozen_grads"] == 0
    # Rank 0 alone wrote the trial folder and its checkpoints.
    assert all(lead["checkpoints"]) and not any(other["checkpoints"])
    assert (tmp_path / "rank0" / "metrics.jsonl").exists()
    assert not (tmp_path / "rank1" / "metrics.jsonl").exists()
    saved = torch.load(tmp_path / "rank0" / "checkpoint.pt", weights_only=True)
    assert saved["ranks"]["world_size"] == 2 and len(saved["ranks"]["rng"]) == 2


@pytest.mark.full
def test_a_model_wrapped_once_is_caught_at_the_first_step_after_an_unfreeze(
    tmp_path: Path, one_thread: None
) -> None:
    ranks = two_ranks(tmp_path, BASE, "no_rewrap")
    for outcome in ranks:
        assert outcome["error"] == AuditError.__name__
        assert (
            "all-reduced 772 gradient elements but 201,828 parameters are trainable"
            in (outcome["message"])
        )
        assert len(outcome["rows"]) == 1  # epoch 0 trained; epoch 1's first step was refused


@pytest.mark.full
def test_two_ranks_resumed_after_an_interruption_equal_the_uninterrupted_run(
    tmp_path: Path, one_thread: None
) -> None:
    whole = two_ranks(tmp_path / "whole", BASE)
    part = two_ranks(tmp_path / "part", {**BASE, "epochs": 2})
    resumed = two_ranks(tmp_path / "part", BASE, "resume")
    assert len(part[0]["rows"]) == 2 and len(resumed[0]["rows"]) == 1
    for key in COMPARED:
        assert resumed[0]["rows"][0][key] == whole[0]["rows"][2][key], key
    final = [torch.load(tmp_path / d / "rank0" / "checkpoint.pt") for d in ("whole", "part")]
    for name, weight in final[0]["model"].items():
        assert torch.equal(weight, final[1]["model"][name]), name


@pytest.mark.full
def test_a_nan_loss_on_one_rank_counts_on_every_rank(tmp_path: Path, one_thread: None) -> None:
    log = tmp_path / "faults.jsonl"
    faulty = {
        **BASE,
        "max_nonfinite_steps": 3,
        "faults": {"log": str(log), "inject": [{"kind": "nan_loss", "epoch": 1, "rank": 1}]},
    }
    ranks = two_ranks(tmp_path, faulty)
    for outcome in ranks:  # one rank's NaN made every rank skip: the trial diverged as one
        assert outcome["error"] == "TrialFailed"
        assert "diverged at epoch 1" in outcome["message"]
        assert "nonfinite_loss" in outcome["message"]
