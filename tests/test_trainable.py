from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from ray import tune

from unfreeze_hpo.config import from_dict
from unfreeze_hpo.space import space_from_dict
from unfreeze_hpo.trainable import run_trial

BASE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny"},
    "data": {"kind": "synthetic_video", "train_samples": 32, "val_samples": 16},
    "epochs": 4,
    "batch_size": 16,
    "schedule": {"kind": "constant"},
}
SPACE = space_from_dict({"strategy": "early_gradual", "common": {"optimizer.lr": 0.01}})


class KillWorkerOnce(tune.Callback):
    """SIGKILLs the trial's worker process right after it reports ``epoch`` the first time."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.killed: list[int] = []

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
    ) -> None:
        if not self.killed and int(result["epoch"]) == self.epoch:
            self.killed.append(int(result["pid"]))
            os.kill(int(result["pid"]), signal.SIGKILL)


def tune_once(tmp_path: Path, callbacks: list[tune.Callback], max_failures: int) -> Any:
    trainable = tune.with_parameters(
        run_trial, base=from_dict(BASE).to_dict(), space=SPACE, metric="best_val_acc"
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"strategy": "early_gradual"},
        tune_config=tune.TuneConfig(metric="best_val_acc", mode="max", num_samples=1),
        run_config=tune.RunConfig(
            name="t",
            storage_path=str(tmp_path),
            verbose=0,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    )
    return tuner.fit()


def test_a_killed_worker_is_retried_from_its_last_epoch(ray_session: None, tmp_path: Path) -> None:
    killer = KillWorkerOnce(epoch=1)
    grid = tune_once(tmp_path, [killer], max_failures=1)
    assert killer.killed, "the worker was killed"
    (result,) = list(grid)
    assert result.error is None
    assert result.metrics["epoch"] == 3 and result.metrics["training_iteration"] == 4
    epochs = list(result.metrics_dataframe["epoch"])
    # The epoch in flight when the worker died may be reported again; nothing before it is.
    assert sorted(set(epochs)) == [0, 1, 2, 3] and epochs.count(0) == 1
    assert result.metrics["pid"] != killer.killed[0], "the last epochs ran in a new worker"
    # The last checkpoint carries the trial's log and metrics to storage.
    latest = Path(result.checkpoint.path)
    assert "resumed from" in (latest / "train.log").read_text(), "the retry started from scratch"
    rows = [json.loads(line) for line in (latest / "metrics.jsonl").read_text().splitlines()]
    assert [r["metrics"]["epoch"] for r in rows] == [0, 1, 2, 3]
    # The trial's scratch folder (checkpoint files, log) never goes to storage by itself.
    assert not (Path(result.path) / "work").exists()


def test_without_retries_the_killed_trial_errors(ray_session: None, tmp_path: Path) -> None:
    grid = tune_once(tmp_path, [KillWorkerOnce(epoch=1)], max_failures=0)
    (result,) = list(grid)
    assert result.error is not None
