from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from unfreeze_hpo.config import from_dict
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.space import space_from_dict
from unfreeze_hpo.search.trainable import run_trial

BASE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny"},
    "data": {"kind": "synthetic_video", "train_samples": 32, "val_samples": 16},
    "epochs": 4,
    "batch_size": 16,
    "schedule": {"kind": "constant"},
}
SPACE = space_from_dict({"strategy": "early_gradual", "common": {"optimizer.lr": 0.01}})


class KillWorkerOnce(tune.Callback):
    """SIGKILLs the trial's worker process right after it reports ``epoch`` the first time, and
    notes the checkpoint Ray will restore the retry from: the latest one it had registered when
    it saw the worker die (epoch ``epoch``'s, or an earlier or later one, as Ray's timing has it).
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.killed: list[int] = []
        self.restored_epochs: list[list[int]] = []  # epochs in the checkpoint each retry gets

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
    ) -> None:
        if not self.killed and int(result["epoch"]) == self.epoch:
            self.killed.append(int(result["pid"]))
            os.kill(int(result["pid"]), signal.SIGKILL)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        checkpoint = trial.checkpoint
        self.restored_epochs.append(
            [] if checkpoint is None else checkpointed_epochs(Path(checkpoint.path))
        )


def checkpointed_epochs(checkpoint: Path) -> list[int]:
    """The epochs a trial checkpoint's ``metrics.jsonl`` holds, in file order."""
    lines = (checkpoint / "metrics.jsonl").read_text().splitlines()
    return [int(json.loads(line)["metrics"]["epoch"]) for line in lines]


def tune_once(tmp_path: Path, callbacks: list[tune.Callback], max_failures: int) -> Any:
    trainable = tune.with_parameters(
        run_trial, base=from_dict(BASE).to_dict(), space=SPACE, objective=Objective()
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"strategy": "early_gradual"},
        tune_config=tune.TuneConfig(metric=Objective().key, mode="max", num_samples=1),
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
    assert result.metrics["epoch"] == 3
    assert result.metrics["pid"] != killer.killed[0], "the last epochs ran in a new worker"
    # Ray restores the retry from the last checkpoint it registered before it saw the worker
    # die. Which one that is depends on timing (epoch 0's is always in, since Ray passed on epoch
    # 1's result); the retry must resume exactly after it, not from scratch.
    (restored,) = killer.restored_epochs
    assert restored and restored == list(range(len(restored))), restored
    latest = Path(result.checkpoint.path)
    log = (latest / "train.log").read_text()
    assert f"at epoch {restored[-1] + 1} (step " in log.split("resumed from", 1)[-1], log
    assert log.count("resumed from") == 1
    # The trial's own record, carried to storage by its last checkpoint: every epoch exactly
    # once and in order, those before the kill taken over from the restored checkpoint.
    assert checkpointed_epochs(latest) == [0, 1, 2, 3]
    # The objective after the retry spans the epochs before the kill too.
    lines = (latest / "metrics.jsonl").read_text().splitlines()
    val_acc = [json.loads(line)["metrics"]["val_acc"] for line in lines]
    assert result.metrics[Objective().key] == pytest.approx(sum(val_acc[-3:]) / 3)
    # The trial's scratch folder (checkpoint files, log) never goes to storage by itself.
    assert not (Path(result.path) / "work").exists()


def test_without_retries_the_killed_trial_errors(ray_session: None, tmp_path: Path) -> None:
    grid = tune_once(tmp_path, [KillWorkerOnce(epoch=1)], max_failures=0)
    (result,) = list(grid)
    assert result.error is not None
