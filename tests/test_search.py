"""Integration tests of the search: real Ray Tune runs on a tiny task, the durable Optuna study,
resume after a killed driver, failing trials, preflight and the ``search`` command.

Order matters: the resume test starts its own Ray in subprocesses, so it runs first, before the
module's ``ray_session`` fixture starts an in-process Ray that holds the 2 cores until the module
ends. Tests that need no Ray come next, the in-process searches last.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import ray
from nothing_lost import assert_nothing_lost
from ray import tune
from support import (
    SPIKY_SPACE,
    TINY_BASE,
    count_recorded,
    dashboard_json,
    reap_session,
    write,
)
from support import run as run_cli

from unfreeze_hpo.cli import main
from unfreeze_hpo.search.driver import PreflightFailed, run_search
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.options import STUDY_FILE, SearchConfig
from unfreeze_hpo.search.recorder import StudyRecorder, checkpointed_history
from unfreeze_hpo.search.rules import SpikeRule
from unfreeze_hpo.search.space import load_space

State = optuna.trial.TrialState
TERMINAL = {State.COMPLETE, State.PRUNED, State.FAIL}

PRUNE_LOSS_RATIO = 1.3

# AdamW at lr 1e37 makes the head's logits overflow from the first step: non-finite training
# losses (skipped steps) and a NaN val_loss from epoch 0 on; no unfreeze, so no spike pruning.
BLOWUP_LR = 1e37
BLOWUP_SPACE = f"""\
strategy: frozen
common:
  optimizer.lr: {{type: categorical, choices: [3e-2, {BLOWUP_LR:g}]}}
"""


def search_config(folder: Path, name: str, base: Path, space: Path, **changes: Any) -> SearchConfig:
    values: dict[str, Any] = {
        "name": name,
        "storage_path": str(folder / "runs"),
        "base": str(base),
        "space": str(space),
        "max_concurrent": 2,
        "cpus_per_trial": 1,
        "scheduler": "fifo",
        "preflight": False,
        **changes,
    }
    return SearchConfig(**values)


def recorded(cfg: SearchConfig) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none when the search never created its study."""
    if not (cfg.folder / STUDY_FILE).exists():
        return []
    try:
        study = optuna.load_study(study_name=cfg.name, storage=cfg.study_url)
    except KeyError:
        return []
    return study.get_trials()


def assert_durable(trials: list[optuna.trial.FrozenTrial], count: int) -> None:
    assert len(trials) == count
    assert {t.state for t in trials} <= TERMINAL, [t.state for t in trials]
    ids = [t.user_attrs["ray_trial_id"] for t in trials]
    assert len(set(ids)) == count, ids
    for t in trials:
        assert t.user_attrs["status"] == t.state.name.lower()
        if t.state != State.COMPLETE:
            assert t.user_attrs["reason"], t.user_attrs


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    return write(tmp_path / "base.yaml", TINY_BASE)


@pytest.fixture
def spiky_space_file(tmp_path: Path) -> Path:
    return write(tmp_path / "spiky.yaml", SPIKY_SPACE)


# ---------------------------------------------------------------------------------------------
# Resume after the driver is killed (own Ray per subprocess: must run before ray_session)


def test_rerun_after_sigkill_resumes_to_exactly_the_requested_trials(
    tmp_path: Path, base_file: Path, spiky_space_file: Path
) -> None:
    assert not ray.is_initialized(), "runs before the module's in-process Ray (see docstring)"
    cfg = search_config(tmp_path, "resume", base_file, spiky_space_file, num_trials=8)
    command = [
        sys.executable,
        "-m",
        "unfreeze_hpo.cli",
        "search",
        *("--name", cfg.name, "--storage-path", cfg.storage_path),
        *("--base", str(base_file), "--space", str(spiky_space_file)),
        *("--num-trials", "8", "--max-concurrent", "2", "--cpus-per-trial", "1"),
        *("--scheduler", "fifo", "--prune-loss-ratio", str(PRUNE_LOSS_RATIO), "--no-preflight"),
        # Checkpoints at epochs 1 and 3 only: a trial cut short resumes from its last one.
        *("--checkpoint-every", "2"),
    ]
    db = cfg.folder / STUDY_FILE
    sessions: list[int] = []
    try:
        with (tmp_path / "first.log").open("w") as log:
            first = subprocess.Popen(
                command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            sessions.append(first.pid)
            deadline = time.monotonic() + 120
            while count_recorded(db) < 2 and first.poll() is None:
                assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()
                time.sleep(0.25)
            assert first.poll() is None, "the first run ended before it could be killed"
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        reap_session(first.pid, grace_s=10)
        before = {t.user_attrs["ray_trial_id"]: (t.state, t.value) for t in recorded(cfg)}
        assert 2 <= len(before) < 8
        assert (cfg.folder / "ray").is_dir()

        with (tmp_path / "second.log").open("w") as log:
            second = subprocess.Popen(
                command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            sessions.append(second.pid)
            code = second.wait(timeout=300)
        output = (tmp_path / "second.log").read_text()
        assert code == 0, output
        assert "resuming the search" in output
        assert not any(line.startswith("error:") for line in output.splitlines()), output
        assert reap_session(second.pid, grace_s=20) == [], "Ray outlived the finished search"
    finally:
        for sid in sessions:
            reap_session(sid, grace_s=0)

    trials = recorded(cfg)
    assert_durable(trials, 8)
    assert_nothing_lost(cfg.folder, 8)
    after = {t.user_attrs["ray_trial_id"]: (t.state, t.value) for t in trials}
    assert {k: after.get(k) for k in before} == before


# ---------------------------------------------------------------------------------------------
# No Ray needed

UNIT_CONFIG = {"strategy": "fixed", "optimizer.backbone_lr_mult": 3.0, "optimizer.lr": 3e-2}
OBJECTIVE = Objective()  # the default: the mean of val_acc over the last 3 epochs
KEY = OBJECTIVE.key


def unit_recorder(tmp_path: Path, name: str, space: Path) -> tuple[str, StudyRecorder]:
    """A study recorder on a fresh SQLite study, fed by hand (no Ray); the study's URL."""
    url = f"sqlite:///{tmp_path / STUDY_FILE}"
    recorder = StudyRecorder(url, name, OBJECTIVE, load_space(space), SimpleNamespace())
    recorder.setup()
    return url, recorder


def test_recorded_trials_keep_their_time_span_and_the_study_its_metric_name(
    tmp_path: Path, spiky_space_file: Path
) -> None:
    """What Optuna's own tools read: each trial's real start and end (the dashboard's Timeline and
    durations) and the objective's name, through Optuna's API and optuna-dashboard's."""
    url, recorder = unit_recorder(tmp_path, "spans", spiky_space_file)
    now = time.time()
    for trial_id, started, last_result in (
        ("here", now - 30, now - 1),
        ("before", now - 90, now - 60),
    ):
        trial = SimpleNamespace(
            trial_id=trial_id,
            config=UNIT_CONFIG,
            status="TERMINATED",
            last_result={KEY: 0.5, "training_iteration": 1},
            run_metadata=SimpleNamespace(start_time=started, last_result_time=last_result),
        )
        recorder.on_trial_result(1, [], trial, {KEY: 0.5, "training_iteration": 1})
        if trial_id == "here":  # ended in this driver: its end is when Ray said so
            recorder.on_trial_complete(1, [], trial)
            ended = time.time()
        else:  # ended in an earlier run of the driver, recorded at the end of this one
            recorder._active.discard(trial_id)
            recorder.on_experiment_end([trial])

    study = optuna.load_study(study_name="spans", storage=url)
    assert study.metric_names == ["last3_mean_val_acc"]
    assert study.user_attrs["objective"] == {
        "metric": "val_acc",
        "kind": "last_k_mean",
        "k": 3,
        "mode": "max",
        "key": "last3_mean_val_acc",
        "describe": "the mean of val_acc over the last 3 epochs",
    }
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    here, before = by_id["here"], by_id["before"]
    assert here.datetime_start is not None and before.datetime_start is not None
    assert abs(here.datetime_start.timestamp() - (now - 30)) < 1e-3
    assert now <= here.datetime_complete.timestamp() <= ended
    assert abs(before.datetime_start.timestamp() - (now - 90)) < 1e-3
    assert abs(before.datetime_complete.timestamp() - (now - 60)) < 1e-3

    # optuna-dashboard's own API, served in-process by its WSGI app.
    (summary,) = dashboard_json(url, "/api/studies")["study_summaries"]
    detail = dashboard_json(url, f"/api/studies/{summary['study_id']}")
    assert detail["objective_names"] == ["last3_mean_val_acc"]
    durations = {
        t["number"]: (
            datetime.datetime.fromisoformat(t["datetime_complete"])
            - datetime.datetime.fromisoformat(t["datetime_start"])
        ).total_seconds()
        for t in detail["trials"]
    }
    assert sorted(round(d) for d in durations.values()) == [30, 30], durations


def test_trials_an_interrupt_stopped_before_a_result_end_the_search_cleanly(
    tmp_path: Path, spiky_space_file: Path
) -> None:
    """Ctrl+C while trials come up: Ray marks them TERMINATED, and its metadata says their last
    result came at -inf. One whose worker never started is left to the rerun (its snapshot says
    PENDING); one that started in an earlier driver keeps its start and ends now."""
    url, recorder = unit_recorder(tmp_path, "stopped", spiky_space_file)
    now = time.time()
    trials = [
        SimpleNamespace(
            trial_id=trial_id,
            config=UNIT_CONFIG,
            status="TERMINATED",
            last_result={},
            run_metadata=SimpleNamespace(start_time=started, last_result_time=float("-inf")),
        )
        for trial_id, started in (("pending", None), ("earlier", now - 5))
    ]
    recorder.on_experiment_end(trials)
    records = optuna.load_study(study_name="stopped", storage=url).get_trials()
    assert [r.user_attrs["ray_trial_id"] for r in records] == ["earlier"]
    (record,) = records
    assert record.state == optuna.trial.TrialState.FAIL
    assert record.datetime_start is not None
    assert abs(record.datetime_start.timestamp() - (now - 5)) < 1e-3
    assert now <= record.datetime_complete.timestamp() <= time.time()


def test_recorder_writes_a_trial_once_per_ray_trial_id(
    tmp_path: Path, spiky_space_file: Path
) -> None:
    url = f"sqlite:///{tmp_path / STUDY_FILE}"
    space = load_space(spiky_space_file)
    scheduler = SimpleNamespace(reasons={"t1": "loss x9 over baseline after unfreezing block 0"})
    recorder = StudyRecorder(url, "unit", OBJECTIVE, space, scheduler)
    recorder.setup()
    trial = SimpleNamespace(
        trial_id="t1",
        config=UNIT_CONFIG,
        last_result={KEY: 0.5, "training_iteration": 3, "val_loss": math.nan},
        local_path=str(tmp_path / "t1"),
    )
    for iteration, acc, unfrozen in ((1, 0.25, 0), (2, 0.5, 2), (2, 0.5, 2), (3, 0.375, 5)):
        result = {
            KEY: acc,
            "training_iteration": iteration,
            "epoch": iteration - 1,
            "unfrozen_blocks": unfrozen,
        }
        recorder.on_trial_result(iteration, [], trial, result)
    recorder.on_trial_complete(3, [], trial)
    recorder.on_trial_complete(3, [], trial)
    recorder._record(trial, State.COMPLETE, None)
    recorder.on_trial_error(3, [], trial)

    again = StudyRecorder(url, "unit", OBJECTIVE, space, scheduler)
    again.on_trial_complete(3, [], trial)
    restored = pickle.loads(pickle.dumps(recorder))  # as in the snapshot a restore reads
    assert restored._opened is None  # the open study never travels in the snapshot
    restored.on_trial_complete(3, [], trial)
    (only,) = optuna.load_study(study_name="unit", storage=url).get_trials()
    assert only.state == State.PRUNED
    assert only.value == 0.375  # the objective as it stood at the last epoch, not its best
    assert only.intermediate_values == {1: 0.25, 2: 0.5, 3: 0.375}
    assert only.params == {"strategy": "fixed", "optimizer.backbone_lr_mult": 3.0}
    assert only.user_attrs["ray_trial_id"] == "t1"
    assert only.user_attrs["reason"] == scheduler.reasons["t1"]
    assert only.user_attrs["config"] == UNIT_CONFIG
    assert only.user_attrs["final"] == {
        KEY: 0.375,
        "training_iteration": 3,
        "epoch": 2,
        "unfrozen_blocks": 5,
    }
    assert only.user_attrs["timeline"] == [
        {"epoch": 1, "n_trainable": 2},
        {"epoch": 2, "n_trainable": 5},
    ]


def test_recorder_after_a_driver_restart_takes_the_early_epochs_from_the_checkpoint(
    tmp_path: Path, spiky_space_file: Path
) -> None:
    # A driver killed after epoch 1 forgets it; the restarted driver sees epochs 2 and 3 only.
    # The trial's last checkpoint carries metrics.jsonl with all three, as the trainable writes it.
    url = f"sqlite:///{tmp_path / STUDY_FILE}"
    rows = [
        {"epoch": 0, "val_acc": 0.25, "unfrozen_blocks": 1},
        {"epoch": 1, "val_acc": 0.5, "unfrozen_blocks": 3},
        {"epoch": 2, "val_acc": 0.375, "unfrozen_blocks": 3},
    ]
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    write(folder / "metrics.jsonl", "".join(json.dumps({"metrics": r}) + "\n" for r in rows))
    trial = SimpleNamespace(
        trial_id="t1",
        config={"strategy": "fixed"},
        checkpoint=tune.Checkpoint.from_directory(folder),
        last_result={},
        local_path=str(tmp_path / "t1"),
    )
    scheduler = SimpleNamespace(reasons={})
    restarted = StudyRecorder(url, "unit", OBJECTIVE, load_space(spiky_space_file), scheduler)
    for row, objective in zip(rows[1:], (0.375, 0.375), strict=True):  # as the trainable adds it
        result = {**row, KEY: objective, "training_iteration": row["epoch"] + 1}
        restarted.on_trial_result(result["training_iteration"], [], trial, result)
    restarted.on_trial_complete(3, [], trial)
    (only,) = optuna.load_study(study_name="unit", storage=url).get_trials()
    # Epoch 0's objective rebuilt from the checkpointed val_acc, as the trial computed it.
    assert only.intermediate_values == {1: 0.25, 2: 0.375, 3: 0.375}
    assert only.value == 0.375
    assert only.user_attrs["timeline"] == [
        {"epoch": 0, "n_trainable": 1},
        {"epoch": 1, "n_trainable": 3},
    ]

    # An unreadable checkpoint is no history, not an error inside Tune's event loop.
    (folder / "metrics.jsonl").write_text("{not json")
    assert checkpointed_history(trial) == []


def test_failing_preflight_stops_the_search_before_any_trial(
    ray_session: None, tmp_path: Path, spiky_space_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = write(tmp_path / "slow.yaml", TINY_BASE + "optimizer: {lr: 1e-9}\n")
    cfg = search_config(tmp_path, "preflight", base, spiky_space_file, preflight=True)
    lines: list[str] = []
    with pytest.raises(PreflightFailed, match="loss falls"):
        run_search(cfg, log=lines.append)
    assert any("diagnosis" in line for line in lines), lines
    # It ran where trials run: in a Ray worker holding one trial's resources, not the driver.
    (where,) = [line for line in lines if line.startswith("preflight: ran in Ray worker pid ")]
    assert int(where.split()[6]) != os.getpid(), where
    assert not (cfg.folder / "ray").exists()
    assert recorded(cfg) == []

    code = main(
        [
            "search",
            *("--name", "preflight-cli", "--storage-path", cfg.storage_path),
            *("--base", str(base), "--space", str(spiky_space_file), "--num-trials", "2"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "preflight FAILED" in out
    assert "diagnosis: the loss does not fall" in out
    assert "--no-preflight" in err
    assert "Traceback" not in out + err
    assert not (Path(cfg.storage_path) / "preflight-cli" / "ray").exists()


def test_search_option_errors_exit_2_all_listed_nothing_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    code = main(["search", "--num-trials", "0", "--mode", "up", "--storage-path", str(runs)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "--num-trials" in err
    assert "--mode" in err
    assert "Traceback" not in out + err
    assert not runs.exists()


def test_checkpoint_options_out_of_range_are_refused_naming_their_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    argv = ["search", "--checkpoints-kept", "0", "--checkpoint-every", "0"]
    code = main([*argv, "--storage-path", str(runs)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "--checkpoints-kept: a trial must keep its latest checkpoint" in err, err
    assert "(got 0); fix: use 1 or more" in err, err
    assert "--checkpoint-every: out of range (got 0); fix: use a value >= 1" in err, err
    assert "Traceback" not in out + err
    assert not runs.exists()


def test_search_file_errors_exit_2_all_listed_nothing_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    space, base = tmp_path / "nope.yaml", tmp_path / "nobase.yaml"
    argv = ["search", "--space", str(space), "--base", str(base), "--storage-path", str(runs)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert str(space) in err
    assert str(base) in err
    assert "Traceback" not in out + err
    assert not runs.exists()


def test_search_option_and_file_errors_are_reported_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    space = tmp_path / "nope.yaml"
    argv = ["search", "--num-trials", "0", "--mode", "up", "--space", str(space)]
    code = main([*argv, "--storage-path", str(runs)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    assert not runs.exists()
    assert "--num-trials" in err
    assert "--mode" in err
    assert str(space) in err


# ---------------------------------------------------------------------------------------------
# Searches on the module's in-process Ray


@pytest.mark.parametrize(
    ("option", "value"), [("--gpus-per-trial", "0.5"), ("--cpus-per-trial", "3")]
)
def test_trials_the_cluster_cannot_hold_are_refused_before_anything_is_written(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    runs = tmp_path / "runs"
    code = main(["search", option, value, "--storage-path", str(runs), "--no-preflight"])
    out, err = capsys.readouterr()
    assert code == 2
    assert f"{option}: no node of the cluster fits one trial" in err
    assert "2 CPU/0 GPU" in err and "--no-resource-check" in err
    assert "Traceback" not in out + err
    assert not (runs / "demo" / "search.yaml").exists()


@pytest.fixture(scope="module")
def spiky_search(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("spiky")
    base = write(folder / "base.yaml", TINY_BASE)
    space = write(folder / "spiky.yaml", SPIKY_SPACE)
    cfg = search_config(
        folder,
        "spiky",
        base,
        space,
        num_trials=6,
        pruning=SpikeRule(max_loss_ratio=PRUNE_LOSS_RATIO),
        log_to="tensorboard,mlflow",
    )
    outcome = run_search(cfg, log=lambda _: None)
    return SimpleNamespace(cfg=cfg, outcome=outcome, space=load_space(space))


def test_trackers_show_every_trial_with_its_config_epochs_and_unfreeze_events(
    spiky_search: SimpleNamespace, diverge_search: SimpleNamespace
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = spiky_search.cfg
    trials = recorded(cfg)
    client = MlflowClient(f"sqlite:///{cfg.folder / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len(trials)
    for trial in trials:
        ray_id = trial.user_attrs["ray_trial_id"]
        [run] = [r for r in runs if r.info.run_name.endswith(ray_id)]
        assert run.data.params == {k: str(v) for k, v in trial.user_attrs["config"].items()}
        # Tune's step is the epoch count: epoch e is step e + 1.
        epochs = client.get_metric_history(run.info.run_id, "epoch")
        assert sorted((m.step, m.value) for m in epochs) == [
            (e + 1, float(e)) for e in range(len(trial.intermediate_values))
        ]
        blocks = sorted(
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "unfrozen_blocks")
        )
        before = [0.0, *(v for _, v in blocks)]  # none trainable before the first epoch
        grew = [(s - 1, int(v)) for (s, v), b in zip(blocks, before, strict=False) if v > b]
        assert grew == [(e["epoch"], e["n_trainable"]) for e in trial.user_attrs["timeline"]]
        [folder] = (cfg.folder / "ray").glob(f"*{ray_id}*")
        events = EventAccumulator(str(folder))
        events.Reload()
        assert len(events.Scalars("ray/tune/val_acc")) == len(trial.intermediate_values)
    # A search that names no tracker writes none: Ray's default TensorBoard logger stays off.
    assert not list(diverge_search.cfg.folder.glob("ray/*/events.out.tfevents*"))
    assert not (diverge_search.cfg.folder / "mlflow").exists()


def test_aggressive_schedules_are_pruned_for_spikes_gentle_ones_complete(
    spiky_search: SimpleNamespace,
) -> None:
    cfg, outcome = spiky_search.cfg, spiky_search.outcome
    trials = recorded(cfg)
    assert_durable(trials, 6)
    assert_nothing_lost(cfg.folder, 6)
    aggressive = [t for t in trials if t.params["strategy"] == "fixed"]
    gentle = [t for t in trials if t.params["strategy"] == "early_gradual"]
    assert aggressive and gentle, [t.params for t in trials]

    pruned = [t for t in aggressive if t.state == State.PRUNED]
    assert pruned, [(t.state, t.user_attrs["final"]) for t in aggressive]
    for t in pruned:
        assert "after unfreezing block" in t.user_attrs["reason"]
        assert t.user_attrs["reason"].startswith("loss x")
        assert t.intermediate_values
        # Its objective as it stood when the trial was stopped.
        assert t.value == t.intermediate_values[max(t.intermediate_values)]
    for t in gentle:
        assert t.state == State.COMPLETE, t.user_attrs
        assert t.value is not None and math.isfinite(t.value)
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.user_attrs["final"]["spike_worst_loss_ratio"] <= PRUNE_LOSS_RATIO

    complete = [t for t in trials if t.state == State.COMPLETE]
    assert outcome.best is not None
    assert outcome.best.state == State.COMPLETE
    assert outcome.best.value == max(t.value for t in complete)
    assert outcome.counts["complete"] == len(complete)
    assert outcome.counts["pruned"] == len(trials) - len(complete)
    assert outcome.counts["running"] == 0


def test_study_params_lie_in_the_space_and_optuna_tools_read_it(
    spiky_search: SimpleNamespace,
) -> None:
    cfg = spiky_search.cfg
    distributions = spiky_search.space.distributions()
    trials = recorded(cfg)
    for t in trials:
        assert set(t.params) <= set(distributions)
        for name, value in t.params.items():
            assert t.distributions[name] == distributions[name]
            assert distributions[name]._contains(distributions[name].to_internal_repr(value))
        gentle = t.params["strategy"] == "early_gradual"
        assert ("early_gradual.target_ratio" in t.params) == gentle

    frame = optuna.load_study(study_name=cfg.name, storage=cfg.study_url).trials_dataframe()
    assert len(frame) == 6
    assert {"params_strategy", "user_attrs_status", "user_attrs_reason"} <= set(frame.columns)
    listed = subprocess.run(
        [
            str(Path(sys.executable).with_name("optuna")),
            *("trials", "--storage", cfg.study_url, "--study-name", cfg.name, "-f", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count('"number"') == 6


@pytest.fixture(scope="module")
def diverge_search(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("diverge")
    base = write(folder / "base.yaml", TINY_BASE + "max_nonfinite_steps: 2\n")
    space = write(folder / "blowup.yaml", BLOWUP_SPACE)
    cfg = search_config(folder, "diverge", base, space, num_trials=4)
    outcome = run_search(cfg, log=lambda _: None)
    return SimpleNamespace(cfg=cfg, outcome=outcome, trials=recorded(cfg))


@pytest.fixture(scope="module")
def nan_search(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("nan")
    base = write(folder / "base.yaml", TINY_BASE)
    space = write(folder / "blowup.yaml", BLOWUP_SPACE)
    cfg = search_config(folder, "nan", base, space, num_trials=4, metric="val_loss", mode="min")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            [
                "search",
                *("--name", cfg.name, "--storage-path", cfg.storage_path),
                *("--base", str(base), "--space", str(space), "--num-trials", "4"),
                *("--metric", "val_loss", "--mode", "min", "--scheduler", "fifo", "--no-preflight"),
                *("--max-concurrent", "2", "--cpus-per-trial", "1"),
            ]
        )
    return SimpleNamespace(
        cfg=cfg, code=code, out=out.getvalue(), err=err.getvalue(), trials=recorded(cfg)
    )


def by_lr(trials: list[optuna.trial.FrozenTrial]) -> tuple[list[Any], list[Any]]:
    blowups = [t for t in trials if t.params["optimizer.lr"] == BLOWUP_LR]
    others = [t for t in trials if t.params["optimizer.lr"] != BLOWUP_LR]
    assert blowups and others, [t.params for t in trials]
    return blowups, others


def test_a_diverging_trial_fails_and_the_search_goes_on(diverge_search: SimpleNamespace) -> None:
    assert_durable(diverge_search.trials, 4)
    blowups, others = by_lr(diverge_search.trials)
    for t in blowups:
        assert t.state == State.FAIL
        assert t.value is None
    assert all(t.state == State.COMPLETE for t in others)
    best = diverge_search.outcome.best
    assert best is not None and best.params["optimizer.lr"] != BLOWUP_LR


def test_a_diverging_trial_keeps_its_reason(diverge_search: SimpleNamespace) -> None:
    blowups, _ = by_lr(diverge_search.trials)
    for t in blowups:
        assert "diverged" in t.user_attrs["reason"], t.user_attrs["reason"]


def test_a_nan_metric_fails_the_trial_instead_of_leaving_it_running(
    nan_search: SimpleNamespace,
) -> None:
    assert nan_search.code == 0, nan_search.out + nan_search.err
    assert_durable(nan_search.trials, 4)
    blowups, others = by_lr(nan_search.trials)
    for t in blowups:
        assert t.state == State.FAIL
        assert t.value is None
        assert not t.intermediate_values
    for t in others:
        assert t.state == State.COMPLETE
        assert t.value == t.intermediate_values[max(t.intermediate_values)]
    assert f"{len(blowups)} fail" in nan_search.out
    assert "best trial" in nan_search.out


def test_a_nan_metric_trial_keeps_its_reason(nan_search: SimpleNamespace) -> None:
    blowups, _ = by_lr(nan_search.trials)
    for t in blowups:
        assert "nonfinite_metric" in t.user_attrs["reason"], t.user_attrs["reason"]
        assert "val_loss is nan" in t.user_attrs["reason"]


def test_trial_failed_survives_copy_and_pickle() -> None:
    from unfreeze_hpo.train import TrialFailed

    failed = TrialFailed("diverged", "2 consecutive steps with non-finite loss", 0, 3)
    for clone in (copy.copy(failed), pickle.loads(pickle.dumps(failed))):
        assert str(clone) == str(failed)
        assert (clone.reason, clone.epoch, clone.step) == ("diverged", 0, 3)


# ---------------------------------------------------------------------------------------------
# Hub weights: fetched once per node before any trial, an unreachable hub one clear error

TIMM_BASE: dict[str, Any] = {
    "model": {"name": "timm:test_resnet", "pretrained": True},
    "data": {"kind": "synthetic_image", "train_samples": 8, "val_samples": 4, "size": 32},
    "epochs": 1,
    "batch_size": 4,
}
FROZEN_SPACE = """\
strategy: frozen
common:
  optimizer.lr: {type: float, low: 1e-3, high: 3e-2, log: true}
"""


@contextlib.contextmanager
def weights_server(folder: Path) -> Any:
    """A loopback HTTP server of ``folder``'s files; yields (its URL, the paths requested)."""
    import functools
    import http.server
    import threading

    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def test_hub_weights_are_downloaded_once_for_a_search_of_several_trials(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm
    import torch

    served = tmp_path / "served"
    served.mkdir()
    torch.save(timm.create_model("test_resnet").state_dict(), served / "test_resnet.pth")
    cache = tmp_path / "weights"
    with weights_server(served) as (url, requested):
        overlay = {"url": f"{url}/test_resnet.pth", "hf_hub_id": None}
        trial = {**TIMM_BASE, "model": {**TIMM_BASE["model"], "kwargs": {}}}
        trial["model"]["kwargs"] = {"pretrained_cfg_overlay": overlay}
        base = write(tmp_path / "base.yaml", json.dumps(trial))
        space = write(tmp_path / "space.yaml", FROZEN_SPACE)
        code, out, err = run_cli(
            capsys,
            "search",
            *("--name", "hub", "--storage-path", str(tmp_path / "runs")),
            *("--base", str(base), "--space", str(space), "--num-trials", "3"),
            *("--max-concurrent", "2", "--scheduler", "fifo", "--no-recipes", "--no-preflight"),
            *("--weights-cache", str(cache)),
        )
    assert code == 0, out + err
    assert "trials: 3 complete" in out, out
    # One download, for the node, before the three trials: they found the file in the cache.
    assert requested == ["/test_resnet.pth"], requested
    assert (cache / "timm" / "test_resnet.pth").is_file()


def test_an_unreachable_hub_is_one_clear_error_before_any_trial(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # This machine reaches no hub. timm:resnet18's weights from their URL (GitHub; the Hugging
    # Face hub fails the same way, after huggingface_hub's own retries of about 25 s).
    trial = {**TIMM_BASE, "model": {"name": "timm:resnet18", "pretrained": True}}
    trial["model"]["kwargs"] = {"pretrained_cfg_overlay": {"hf_hub_id": None}}
    base = write(tmp_path / "base.yaml", json.dumps(trial))
    space = write(tmp_path / "space.yaml", FROZEN_SPACE)
    runs = tmp_path / "runs"
    code, out, err = run_cli(
        capsys,
        "search",
        *("--name", "offline", "--storage-path", str(runs), "--base", str(base)),
        *("--space", str(space), "--num-trials", "2", "--weights-cache", str(tmp_path / "w")),
    )
    assert code == 2, out + err
    (problem,) = [line for line in err.splitlines() if line.startswith("  ")]
    assert problem.startswith("  model.pretrained: cannot get the hub weights of timm:resnet18")
    assert "https://github.com/huggingface/pytorch-image-models/releases/download/" in problem
    assert f"download resnet18_a1_0-d63eafa0.pth into {tmp_path / 'w' / 'timm'}" in problem
    assert "model.pretrained_file" in problem
    assert "Traceback" not in out + err and "RayTaskError" not in out + err
    assert not (runs / "offline" / "search.yaml").exists()
    assert not (runs / "offline" / "ray").exists()
