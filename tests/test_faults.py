"""Faults a search must survive, injected where the real ones happen; each test ends with the
nothing-lost check, which also accounts for every fault the injector logged.

The faults come from the trial config's ``faults:`` block (see ``unfreeze_hpo.faults``), honoured
here because conftest sets ``UNFREEZE_HPO_FAULT_INJECTION=1`` for the suite.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from nothing_lost import assert_nothing_lost
from support import SHORT_BASE, SHORT_SPACE, cpu_fp16_autocast, write

from unfreeze_hpo import faults
from unfreeze_hpo.cli import main
from unfreeze_hpo.search import recorder
from unfreeze_hpo.search.driver import run_search
from unfreeze_hpo.search.options import STUDY_FILE, SearchConfig
from unfreeze_hpo.search.rules import SpikeRule

State = optuna.trial.TrialState
LOG = "faults.jsonl"


def search_cfg(
    tmp_path: Path, *inject: dict[str, Any], trials: int, **changes: Any
) -> SearchConfig:
    """A search whose trials meet the faults ``inject``, logged to tmp_path/faults.jsonl."""
    log = tmp_path / LOG
    base = {
        **SHORT_BASE,
        "max_nonfinite_steps": 3,
        **changes.pop("base", {}),
        "faults": {"log": str(log), "inject": list(inject)},
    }
    return SearchConfig(
        name="faults",
        storage_path=str(tmp_path / "runs"),
        base=str(write(tmp_path / "base.yaml", yaml.safe_dump(base))),
        space=str(write(tmp_path / "space.yaml", SHORT_SPACE)),
        num_trials=trials,
        max_concurrent=2,
        cpus_per_trial=1,
        scheduler="fifo",
        preflight=False,
        recipes=False,
        pruning=SpikeRule(max_nonfinite=1000),  # these tests watch the trial's own handling
        **changes,
    )


def fault_search(
    tmp_path: Path,
    *inject: dict[str, Any],
    trials: int = 2,
    print_log: bool = False,
    **changes: Any,
) -> tuple[SearchConfig, Path]:
    """Run that search to its end; its config and the fault log."""
    cfg = search_cfg(tmp_path, *inject, trials=trials, **changes)
    run_search(cfg, log=print if print_log else (lambda line: None))
    return cfg, tmp_path / LOG


def study_trials(cfg: SearchConfig) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=cfg.name, storage=cfg.study_url).get_trials()


def hit(cfg: SearchConfig, log: Path) -> list[optuna.trial.FrozenTrial]:
    """The study records of the trials a fault hit."""
    ids = {e["trial_id"] for e in faults.read_log(log)}
    return [t for t in study_trials(cfg) if t.user_attrs["ray_trial_id"] in ids]


def attempts(log: Path) -> int:
    """How many attempts of the trials met a fault (an ``every_attempt`` fault meets each)."""
    return len({e["attempt"] for e in faults.read_log(log)})


pytestmark = pytest.mark.usefixtures("ray_session")


# ---------------------------------------------------------------------------------------------
# The worker dies


def test_a_killed_worker_is_retried_from_its_checkpoint(tmp_path: Path) -> None:
    cfg, log = fault_search(tmp_path, {"kind": "exit", "epoch": 1, "trials": 1})
    (killed,) = hit(cfg, log)
    assert killed.state == State.COMPLETE
    assert killed.user_attrs["restarts"] == 1
    assert sorted(killed.intermediate_values) == [1, 2, 3]
    # Resumed at epoch 1 from its checkpoint: a fresh start would report 4 epochs, not 3.
    assert killed.user_attrs["final"]["training_iteration"] == 3
    assert_nothing_lost(cfg.folder, 2, faults_log=log)


def test_checkpoints_follow_the_policy_and_a_retry_redoes_the_epochs_after_the_last(
    tmp_path: Path,
) -> None:
    # 8 epochs, a checkpoint every 2 (epochs 1, 3, 5, 7), 3 kept; the worker dies after training
    # epoch 4, before its report.
    cfg, log = fault_search(
        tmp_path,
        {"kind": "exit", "epoch": 4, "trials": 1},
        trials=1,
        base={"epochs": 8},
        checkpoint_every=2,
        checkpoints_kept=3,
    )
    (killed,) = hit(cfg, log)
    assert killed.state == State.COMPLETE
    assert killed.user_attrs["restarts"] == 1
    (trial_dir,) = [p.parent for p in (cfg.folder / "ray").glob("*/result.json")]
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    # Tune recorded a checkpoint with the odd epochs' results only.
    marked = {int(r["epoch"]) for r in rows if r["checkpoint_dir_name"] is not None}
    assert marked == {1, 3, 5, 7}, rows
    assert all(r["checkpoint_dir_name"] is None for r in rows if int(r["epoch"]) % 2 == 0)
    # The retry resumed from the last checkpoint Ray had (epoch 3's: the kill came a whole
    # epoch after its report) and redid the epochs after it, each once.
    epochs = [int(r["epoch"]) for r in rows]
    assert epochs == [0, 1, 2, 3, 4, 5, 6, 7], epochs  # epoch 4 died before its report
    kept = sorted(trial_dir.glob("checkpoint_*"))
    assert [checkpointed_epochs(k)[-1] for k in kept] == [3, 5, 7]
    assert checkpointed_epochs(kept[-1]) == list(range(8))
    train_log = (kept[-1] / "train.log").read_text()
    assert "at epoch 4 (step " in train_log.split("resumed from", 1)[-1], train_log
    assert_nothing_lost(cfg.folder, 1, faults_log=log)


def checkpointed_epochs(checkpoint: Path) -> list[int]:
    """The epochs a Ray checkpoint's metrics.jsonl holds: a copy made when it was reported,
    never a link to the trial's growing file."""
    lines = (checkpoint / "metrics.jsonl").read_text().splitlines()
    return [int(json.loads(line)["metrics"]["epoch"]) for line in lines]


def test_a_worker_killed_every_attempt_fails_after_max_failures(tmp_path: Path) -> None:
    fault = {"kind": "exit", "epoch": 1, "trials": 1, "every_attempt": True}
    cfg, log = fault_search(tmp_path, fault, max_failures=1)
    (killed,) = hit(cfg, log)
    assert killed.state == State.FAIL
    assert killed.user_attrs["reason"]
    assert attempts(log) == 2  # the first try and one retry
    others = [t for t in study_trials(cfg) if t.number != killed.number]
    assert [t.state for t in others] == [State.COMPLETE]  # the search went on
    assert_nothing_lost(cfg.folder, 2, faults_log=log, max_failures=1)


def test_a_worker_killed_between_checkpoint_write_and_rename_resumes(tmp_path: Path) -> None:
    cfg, log = fault_search(tmp_path, {"kind": "crash_in_checkpoint", "epoch": 1, "trials": 1})
    (killed,) = hit(cfg, log)
    assert killed.state == State.COMPLETE
    assert killed.user_attrs["restarts"] == 1
    assert_nothing_lost(cfg.folder, 2, faults_log=log)


# ---------------------------------------------------------------------------------------------
# The trial fails for a reason of its own: recorded once with the reason, never retried


def test_a_nan_metric_fails_the_trial_with_its_reason_and_no_retry(tmp_path: Path) -> None:
    cfg, log = fault_search(
        tmp_path, {"kind": "nan_metric", "epoch": 1, "trials": 1, "every_attempt": True}
    )
    (failed,) = hit(cfg, log)
    assert failed.state == State.FAIL
    assert "nonfinite_metric at epoch 1" in failed.user_attrs["reason"]
    assert attempts(log) == 1  # a retry would have met it again
    assert_nothing_lost(cfg.folder, 2, faults_log=log)


def test_a_nan_loss_ends_the_trial_as_diverged(tmp_path: Path) -> None:
    cfg, log = fault_search(
        tmp_path, {"kind": "nan_loss", "epoch": 1, "trials": 1, "every_attempt": True}
    )
    (diverged,) = hit(cfg, log)
    assert diverged.state == State.FAIL
    assert "diverged at epoch 1" in diverged.user_attrs["reason"]
    assert len(faults.read_log(log)) == 3  # max_nonfinite_steps NaN steps, then it stopped
    assert attempts(log) == 1
    assert_nothing_lost(cfg.folder, 2, faults_log=log)


def test_an_injected_out_of_memory_fails_as_oom_at_its_stage_without_retry(
    tmp_path: Path,
) -> None:
    cfg, log = fault_search(
        tmp_path, {"kind": "oom", "stage": 1, "trials": 1, "every_attempt": True}
    )
    (oom,) = hit(cfg, log)
    assert oom.state == State.FAIL
    assert "oom at epoch 1" in oom.user_attrs["reason"]
    assert "stage 1, 5 blocks" in oom.user_attrs["reason"]
    assert attempts(log) == 1
    assert_nothing_lost(cfg.folder, 2, faults_log=log)


# ---------------------------------------------------------------------------------------------
# Infinite gradients: skipped steps, and a trial that ends after K in a row


def test_a_few_infinite_gradients_are_skipped_and_the_trial_completes(tmp_path: Path) -> None:
    cfg, log = fault_search(tmp_path, {"kind": "inf_grad", "step": 4, "steps": 2, "trials": 1})
    (skipped,) = hit(cfg, log)
    assert skipped.state == State.COMPLETE
    assert skipped.user_attrs["final"]["skipped_total"] == 2
    assert_nothing_lost(cfg.folder, 2, faults_log=log)


@pytest.mark.full
@pytest.mark.skipif(not cpu_fp16_autocast(), reason="this torch has no fp16 autocast on CPU")
def test_infinite_gradients_under_fp16_are_skipped_by_the_grad_scaler(tmp_path: Path) -> None:
    fault = {"kind": "inf_grad", "step": 4, "steps": 2, "trials": 1}
    cfg, log = fault_search(tmp_path, fault, base={"amp": "fp16"})
    (skipped,) = hit(cfg, log)
    assert skipped.state == State.COMPLETE
    assert skipped.user_attrs["final"]["amp_skipped_total"] >= 2  # and any overflow of its own
    assert_nothing_lost(cfg.folder, 2, faults_log=log)


def test_infinite_gradients_k_steps_in_a_row_end_the_trial(tmp_path: Path) -> None:
    cfg, log = fault_search(tmp_path, {"kind": "inf_grad", "step": 4, "steps": 5, "trials": 1})
    (diverged,) = hit(cfg, log)
    assert diverged.state == State.FAIL
    assert "3 consecutive steps with non-finite loss or gradients" in diverged.user_attrs["reason"]
    assert_nothing_lost(cfg.folder, 2, faults_log=log)


# ---------------------------------------------------------------------------------------------
# The study database is locked


class Lock:
    taken = threading.Event()
    released_at = math.inf  # unix time


def hold(tmp_path: Path) -> dict[str, Any]:
    """Every trial waits after epoch 0 until ``locked_study`` has taken the lock."""
    return {"kind": "hold", "epoch": 0, "release": str(tmp_path / "release")}


@contextlib.contextmanager
def locked_study(tmp_path: Path, until: threading.Event | None) -> Iterator[Lock]:
    """Hold an exclusive lock on the SQLite study of ``search_cfg(tmp_path, hold(tmp_path))``
    from the moment a trial waits at the hold (no trial has ended then: all wait there), until
    ``until`` is set (None: until the block ends). The trials go on once the lock is taken."""
    db = tmp_path / "runs" / "faults" / STUDY_FILE
    lock, done = Lock(), threading.Event()
    lock.taken = threading.Event()

    def keep() -> None:
        while not done.is_set() and not (_has_study(db) and faults.read_log(tmp_path / LOG)):
            time.sleep(0.05)
        if done.is_set():
            return
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        lock.taken.set()
        (tmp_path / "release").touch()
        while not done.is_set() and not (until is not None and until.is_set()):
            time.sleep(0.05)
        conn.execute("COMMIT")
        lock.released_at = time.time()
        conn.close()

    thread = threading.Thread(target=keep, daemon=True)
    thread.start()
    try:
        yield lock
    finally:
        done.set()
        thread.join(timeout=60)


def _has_study(db: Path) -> bool:
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as conn:
            return bool(conn.execute("SELECT count(*) FROM studies").fetchone()[0])
    except sqlite3.Error:
        return False


class WriteFailures:
    """The Ray trial ids whose write to the study failed, and an event set at the first."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.trial_ids: list[str] = []


def write_failures(monkeypatch: pytest.MonkeyPatch) -> WriteFailures:
    failures = WriteFailures()
    record = recorder.StudyRecorder._record

    def recording(self: recorder.StudyRecorder, trial: Any, *args: Any) -> None:
        try:
            record(self, trial, *args)
        except recorder.DATABASE_ERRORS:
            failures.trial_ids.append(trial.trial_id)
            failures.first.set()
            raise

    monkeypatch.setattr(recorder.StudyRecorder, "_record", recording)
    return failures


@pytest.mark.full
def test_a_study_locked_for_a_while_loses_no_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = write_failures(monkeypatch)
    with locked_study(tmp_path, until=failures.first) as lock:
        cfg, _ = fault_search(tmp_path, hold(tmp_path), trials=3)
    assert lock.taken.is_set() and failures.trial_ids
    # The trials that ended while the study was locked were written once the lock was gone,
    # with the time they really ended.
    recorded = {t.user_attrs["ray_trial_id"]: t for t in study_trials(cfg)}
    for trial_id in failures.trial_ids:
        ended = recorded[trial_id].datetime_complete
        assert ended is not None and ended.timestamp() < lock.released_at
    assert_nothing_lost(cfg.folder, 3, faults_log=tmp_path / LOG)


def test_a_study_down_at_the_end_stops_and_the_rerun_records_every_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder, "RECORD_RETRY_S", 3.0)
    monkeypatch.setattr(recorder, "_QUICK_S", 0.5)
    with (
        locked_study(tmp_path, until=None) as lock,
        pytest.raises(recorder.StudyUnavailable) as caught,
    ):
        fault_search(tmp_path, hold(tmp_path), trials=2)
    assert lock.taken.is_set()
    assert "Run the same command again" in str(caught.value)
    assert study_trials(search_cfg(tmp_path, hold(tmp_path), trials=2)) == []
    cfg, _ = fault_search(tmp_path, hold(tmp_path), trials=2)  # the same search, the database back
    assert_nothing_lost(cfg.folder, 2, faults_log=tmp_path / LOG)


# ---------------------------------------------------------------------------------------------
# A real out-of-memory, and crashes while writing results


def test_a_real_allocation_failure_after_an_unfreeze_fails_the_trial_as_oom(
    tmp_path: Path,
) -> None:
    # resnet18's last two blocks hold 8.4M parameters: their gradients (34 MB) cannot be
    # allocated once the address space is capped 16 MB above what the process maps.
    log = tmp_path / "faults.jsonl"
    trial = {
        "model": {"name": "timm:resnet18"},
        "data": {"kind": "synthetic_image", "train_samples": 8, "val_samples": 4, "size": 32},
        "epochs": 2,
        "batch_size": 4,
        "strategy": {"name": "fixed", "phases": [[0, 0], [1, 2]]},
        "output_dir": str(tmp_path / "run"),
        "faults": {"log": str(log), "inject": [{"kind": "oom", "stage": 1, "real": True}]},
    }
    config = write(tmp_path / "trial.yaml", yaml.safe_dump(trial))
    done = subprocess.run(
        [sys.executable, "-m", "unfreeze_hpo.cli", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "oom at epoch 1" in output and "stage 1" in output, output
    assert "can't allocate memory" in output, output  # the allocator's own failure
    assert "Traceback" not in output
    (fired,) = faults.read_log(log)
    assert fired["where"] == {"epoch": 1, "step": 2, "stage": 1}
    assert [
        json.loads(line)["metrics"]["epoch"]
        for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ] == [0.0]  # epoch 0 kept, nothing half-written after it


def test_a_failed_export_leaves_the_previous_file_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, _ = fault_search(tmp_path, trials=1)
    out = tmp_path / "schedule.yaml"
    assert main(["export", str(cfg.folder), "--out", str(out)]) == 0
    before = out.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert main(["export", str(cfg.folder), "--out", str(out), "--format", "lightning-fts"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_process_killed_while_writing_leaves_the_previous_file_as_it_was(
    tmp_path: Path,
) -> None:
    target = write(tmp_path / "schedule.yaml", "epochs: 4\n")
    script = f"""
import os, signal
from pathlib import Path
from unfreeze_hpo.yamlfile import write_atomic

def half_then_die(f):
    f.write("epochs: 1")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

write_atomic(Path({str(target)!r}), half_then_die)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert target.read_text() == "epochs: 4\n"


# ---------------------------------------------------------------------------------------------
# The hold the synchronised tests use


def test_a_hold_waits_for_its_release_file_once_per_trial(tmp_path: Path) -> None:
    release = tmp_path / "release"
    cfg = faults.FaultsConfig(
        log=str(tmp_path / LOG),
        inject=({"kind": "hold", "epoch": 1, "trials": 1, "release": str(release)},),
    )
    assert faults.check(cfg) == []
    first, second = faults.Injector(cfg, "a"), faults.Injector(cfg, "b")
    first.after_epoch(0, {})  # not its epoch
    assert faults.read_log(tmp_path / LOG) == []
    threading.Timer(0.3, release.touch).start()
    first.after_epoch(1, {})  # returns once the file exists
    assert release.exists()
    second.after_epoch(1, {})  # trials: 1, and the first took it
    assert [e["trial_id"] for e in faults.read_log(tmp_path / LOG)] == ["a"]


def test_a_hold_needs_an_absolute_release_path() -> None:
    cfg = faults.FaultsConfig(log="/tmp/f.jsonl", inject=({"kind": "hold", "release": "go"},))
    (problem,) = faults.check(cfg)
    assert problem.field == "faults.inject[0].release" and problem.value == "go"
