"""Trials on several Ray Train workers (``--workers-per-trial``): a search whose trials run as
data-parallel Ray Train runs launched by the Tune trial, on this machine's 2 cores (gloo).

The driver-kill test starts its own Ray in a child process, so it runs first, before the
module's in-process Ray (two Rays on one machine confuse Ray Train's state API). The two-worker
test is the one multi-worker test of make test; the fault tests are under full.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from nothing_lost import assert_nothing_lost
from support import DP_BASE as BASE
from support import DP_COMPARED as COMPARED
from support import count_recorded, reap_session

from unfreeze_hpo import faults, results, train, trialdir
from unfreeze_hpo.results import export
from unfreeze_hpo.search.driver import run_search
from unfreeze_hpo.search.options import SearchConfig
from unfreeze_hpo.search.ray_train import latest_checkpoint

State = optuna.trial.TrialState
SPACE = """\
strategy: early_gradual
strategies:
  early_gradual:
    freeze_epochs: 1
    blocks_per_epoch: 1
    target_ratio: 1.0
common:
  optimizer.lr: {type: float, low: 1e-3, high: 3e-3, log: true}
"""


def search_config(
    tmp_path: Path, base: dict[str, Any], trials: int = 1, **changes: Any
) -> SearchConfig:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "space.yaml").write_text(SPACE)
    return SearchConfig(
        name="dp",
        storage_path=str(tmp_path / "runs"),
        base=str(tmp_path / "base.yaml"),
        space=str(tmp_path / "space.yaml"),
        num_trials=trials,
        max_concurrent=1,
        cpus_per_trial=1,
        workers_per_trial=2,
        scheduler="fifo",
        preflight=False,
        recipes=False,
        **changes,
    )


def search(tmp_path: Path, base: dict[str, Any], trials: int = 1, **changes: Any) -> SearchConfig:
    cfg = search_config(tmp_path, base, trials, **changes)
    run_search(cfg, log=lambda _: None)
    return cfg


def worker_processes() -> int:
    """Ray Train worker processes alive on this machine."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return sum("RayTrainWorker" in line for line in ps.stdout.splitlines())


def no_workers_left(timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while worker_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    return worker_processes() == 0


@pytest.mark.full
def test_a_killed_driver_resumes_a_multi_worker_trial_from_its_ray_train_run(
    tmp_path: Path,
) -> None:
    import ray

    assert not ray.is_initialized(), "runs before the module's in-process Ray (see docstring)"
    log, release = tmp_path / "faults.jsonl", tmp_path / "release"
    hold = {"kind": "hold", "epoch": 1, "release": str(release)}  # rank 0, before epoch 1's report
    held = {**BASE, "faults": {"log": str(log), "inject": [hold]}}
    cfg = search_config(tmp_path, held)
    command = [
        sys.executable,
        "-m",
        "unfreeze_hpo.cli",
        "search",
        *("--name", cfg.name, "--storage-path", cfg.storage_path),
        *("--base", str(cfg.base), "--space", str(cfg.space), "--num-trials", "1"),
        *("--workers-per-trial", "2", "--scheduler", "fifo", "--no-preflight", "--no-recipes"),
    ]
    sessions: list[int] = []
    try:
        with (tmp_path / "first.log").open("w") as out:
            first = subprocess.Popen(
                command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            sessions.append(first.pid)
            deadline = time.monotonic() + 240
            while not faults.read_log(log) and first.poll() is None:  # held at epoch 1
                assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()
                time.sleep(0.25)
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        reap_session(first.pid, grace_s=10)
        assert count_recorded(cfg.folder / "study.db") == 0
        release.touch()
        with (tmp_path / "second.log").open("w") as out:
            second = subprocess.Popen(
                command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            sessions.append(second.pid)
            code = second.wait(timeout=300)
        output = (tmp_path / "second.log").read_text()
        assert code == 0, output
        assert "resuming the search" in output
    finally:
        for sid in sessions:
            reap_session(sid, grace_s=0)
    (trial,) = optuna.load_study(study_name=cfg.name, storage=cfg.study_url).get_trials()
    assert trial.state == State.COMPLETE, trial.user_attrs.get("reason")
    assert sorted(trial.intermediate_values) == [1, 2, 3]
    latest = latest_checkpoint(cfg.location, trial.user_attrs["ray_trial_id"])
    assert latest is not None
    text = (Path(latest) / trialdir.LOG).read_text()
    # Tuner.restore ran the trial again; its new Ray Train run resumed the killed one's
    # checkpoint of epoch 0 and redid epoch 1.
    assert "resumed from" in text and text.count("epoch 0/2 |") == 1
    assert_nothing_lost(cfg.folder, 1, faults_log=log)


@pytest.mark.usefixtures("ray_session")
def test_a_two_worker_trial_trains_what_one_process_trains(tmp_path: Path) -> None:
    cfg = search(tmp_path, BASE)
    (trial,) = optuna.load_study(study_name=cfg.name, storage=cfg.study_url).get_trials()
    assert trial.state == State.COMPLETE, trial.user_attrs.get("reason")
    assert sorted(trial.intermediate_values) == [1, 2, 3]
    # The trial's files are in its Ray Train run, each checkpoint named after its epoch.
    latest = latest_checkpoint(cfg.location, trial.user_attrs["ray_trial_id"])
    assert latest is not None and latest.endswith("checkpoint_000002")
    rows = trialdir.read_rows(Path(latest))
    assert [r["workers"] for r in rows] == [2, 2, 2]
    # Wrapped at the start and again at each of the two unfreeze events; each step all-reduced
    # exactly the trainable parameters: the frozen blocks never entered DDP's reducer, the
    # unfrozen ones did; and the end-of-epoch check found the two replicas identical.
    assert [r["ddp_wraps"] for r in rows] == [1, 2, 3]
    assert [r["ddp_synced_params"] for r in rows] == [r["trainable_params"] for r in rows]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"] < rows[2]["trainable_params"]
    assert all(r["drift_moved_frozen_groups"] == 0 for r in rows)
    # The same numbers as the same config trained in one process with the same global batch.
    single = []
    same = export.trial_config(results.open_search(cfg.folder), trial.number)
    same = same.replace(output_dir=str(tmp_path / "single"))
    train.run(same, lambda metrics, _: single.append(metrics), log=lambda _: None)
    for a, b in zip(single, rows, strict=True):
        for key in COMPARED:
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a, b)
    assert_nothing_lost(cfg.folder, 1)
    assert no_workers_left()


@pytest.mark.full
@pytest.mark.usefixtures("ray_session")
def test_a_worker_killed_mid_trial_restarts_the_group_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    log = tmp_path / "faults.jsonl"
    killed = {
        **BASE,
        "faults": {"log": str(log), "inject": [{"kind": "exit", "epoch": 1, "rank": 1}]},
    }
    cfg = search(tmp_path, killed, max_failures=1)
    (trial,) = optuna.load_study(study_name=cfg.name, storage=cfg.study_url).get_trials()
    assert trial.state == State.COMPLETE, trial.user_attrs.get("reason")
    assert trial.user_attrs["restarts"] == 1  # Tune's retry of the trial: the layer that counts
    assert sorted(trial.intermediate_values) == [1, 2, 3]
    (fired,) = faults.read_log(log)
    assert fired["where"] == {"epoch": 1}
    # The group went on from the checkpoint of epoch 0: epoch 1 ran twice, epoch 0 once.
    latest = latest_checkpoint(cfg.location, trial.user_attrs["ray_trial_id"])
    assert latest is not None
    text = (Path(latest) / trialdir.LOG).read_text()
    assert text.count("epoch 0/2 |") == 1 and text.count("epoch 1/2 |") == 1
    assert "resumed from" in text
    assert_nothing_lost(cfg.folder, 1, faults_log=log)
    assert no_workers_left()


@pytest.mark.full
@pytest.mark.usefixtures("ray_session")
def test_a_pruned_and_a_failed_multi_worker_trial_leave_no_worker_behind(tmp_path: Path) -> None:
    log = tmp_path / "faults.jsonl"
    faulty = {**BASE, "max_nonfinite_steps": 2}
    faulty["faults"] = {
        "log": str(log),
        "inject": [
            # The first trial: NaN losses from epoch 1 on, so it diverges (FAIL) mid-epoch.
            {"kind": "nan_loss", "epoch": 1, "trials": 1},
            # Both: an infinite gradient at the first step after the unfreeze event, a
            # non-finite step in its spike window: the second trial is pruned at that epoch.
            {"kind": "inf_grad", "step": 4, "trials": 2},
        ],
    }
    cfg = search(tmp_path, faulty, trials=2)
    trials = optuna.load_study(study_name=cfg.name, storage=cfg.study_url).get_trials()
    failed, pruned = sorted(trials, key=lambda t: t.number)
    assert failed.state == State.FAIL and "diverged" in failed.user_attrs["reason"]
    assert pruned.state == State.PRUNED and "non-finite" in pruned.user_attrs["reason"]
    assert_nothing_lost(cfg.folder, 2, faults_log=log)
    assert no_workers_left()
