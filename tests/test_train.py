from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from support import cpu_fp16_autocast

import unfreeze_hpo
from unfreeze_hpo import train, trialdir, unfreezer
from unfreeze_hpo.cli import main
from unfreeze_hpo.config import ScheduleConfig, TrialConfig, from_dict
from unfreeze_hpo.errors import ConfigError
from unfreeze_hpo.lr import lr_schedule
from unfreeze_hpo.train import loop

BASE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny"},
    "data": {
        "kind": "synthetic_video",
        "train_samples": 32,
        "val_samples": 16,
        "frames": 4,
        "size": 32,
    },
    "epochs": 4,
    "batch_size": 8,
    "strategy": {"name": "early_gradual", "freeze_epochs": 1, "target_ratio": 1.0},
}
# The reference run: LR scales below 1 and an unfreeze warmup, so the LR metrics say something.
REFERENCE_OPTIMIZER = {"backbone_lr_mult": 0.5, "layer_decay": 0.5, "unfreeze_warmup_steps": 6}
STEPS_PER_EPOCH = 4
N_BLOCKS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def values_for(out: Path, **changes: Any) -> dict[str, Any]:
    """BASE with ``changes``: sections are merged key by key, the strategy is replaced."""
    values = copy.deepcopy(BASE)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict) and key != "strategy":
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    values["output_dir"] = str(out)
    return values


def make_cfg(out: Path, **changes: Any) -> TrialConfig:
    return from_dict(values_for(out, **changes))


def quiet(line: str) -> None:
    pass


def rows(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def comparable(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows without the values that may differ between equal runs."""
    found = rows(out)
    for row in found:
        del row["metrics"]["epoch_seconds"], row["metrics"]["peak_memory_mb"]
    return found


def assert_same_rows(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> None:
    assert len(actual) == len(expected)
    diffs = [
        f"epoch {i} {key}: {want!r} != {got!r}"
        for i, (a, b) in enumerate(zip(expected, actual, strict=True))
        for key, want in {**a["metrics"], "unfrozen": a["unfrozen"]}.items()
        if (got := {**b["metrics"], "unfrozen": b["unfrozen"]}.get(key, "<missing>")) != want
    ]
    assert not diffs, "\n".join(diffs[:12])


def assert_same_tensors(expected: Any, actual: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_tensors(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), where
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            assert_same_tensors(a, b, f"{where}[{i}]")
    else:
        assert expected == actual, where


def load(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, weights_only=True)
    return payload


class Interrupted(Exception):
    pass


def interrupt_after(epochs: int) -> train.Report:
    """A report that kills the run once ``epochs`` epochs are checkpointed."""

    def report(metrics: dict[str, float], path: Path | None) -> None:
        if metrics["epoch"] + 1 == epochs:
            raise Interrupted

    return report


def interrupted_then_resumed(cfg: TrialConfig, epochs: int) -> train.Summary:
    with pytest.raises(Interrupted):
        train.run(cfg, interrupt_after(epochs), log=quiet)
    assert len(rows(Path(cfg.output_dir))) == epochs
    return train.run(cfg, resume=True, log=quiet)


def param_of(trial: train.Trial, name: str) -> torch.nn.Parameter:
    return dict(trial.model.named_parameters())[name]


def head_param(trial: train.Trial) -> torch.nn.Parameter:
    return param_of(trial, trial.blocks.head.params[0])


def block_params(trial: train.Trial, index: int) -> list[torch.nn.Parameter]:
    return [param_of(trial, n) for n in trial.blocks.blocks[index].params]


def adam_steps(trial: train.Trial, param: torch.nn.Parameter) -> int:
    state = trial.optimizer.state.get(param, {})
    return int(state["step"]) if "step" in state else 0


def on_training_forward(trial: train.Trial, action: Callable[[int], None]) -> None:
    """Call ``action(n)`` before the n-th (0-based) training forward of the model."""
    calls = itertools.count()

    def hook(module: torch.nn.Module, args: Any) -> None:
        if module.training:
            action(next(calls))

    trial.model.register_forward_pre_hook(hook)


def nan_logits_at(trial: train.Trial, calls: Callable[[int], bool]) -> None:
    """NaN logits on the training forward calls ``calls`` selects."""
    counter = itertools.count()

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if module.training and calls(next(counter)):
            return output * math.nan
        return None

    trial.model.register_forward_hook(hook)


def inf_grad_at(param: torch.nn.Parameter, backward: int) -> None:
    counter = itertools.count()

    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        return torch.full_like(grad, math.inf) if next(counter) == backward else None

    param.register_hook(hook)


@pytest.fixture
def on_setup(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[train.Trial], None]], None]:
    """Register callbacks run on each Trial right after ``train.setup`` builds it."""
    callbacks: list[Callable[[train.Trial], None]] = []
    original = train.setup

    def setup(cfg: TrialConfig, log: train.Log = print, **kwargs: Any) -> train.Trial:
        trial = original(cfg, log, **kwargs)
        for callback in callbacks:
            callback(trial)
        return trial

    monkeypatch.setattr(loop, "setup", setup)
    return callbacks.append


@dataclass
class StepRecord:
    skipped: str | None  # the step's skip reason, read back from the device
    params_unchanged: bool


@pytest.fixture
def step_records(monkeypatch: pytest.MonkeyPatch) -> list[StepRecord]:
    """Every optimizer step's skip reason, and whether the step left every parameter
    bit-identical."""
    records: list[StepRecord] = []
    original = train.optimizer_step

    def spy(trial: train.Trial, loss: torch.Tensor, params: Any, new: Any) -> train.StepOutcome:
        before = [p.detach().clone() for p in trial.model.parameters()]
        outcome = original(trial, loss, params, new)
        after = list(trial.model.parameters())
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        records.append(StepRecord(outcome.read().skipped, unchanged))
        return outcome

    monkeypatch.setattr(loop, "optimizer_step", spy)
    return records


# --- the reference run: 4 epochs, one unfreeze event per epoch from epoch 1 ------------------


@dataclass
class EpochSeen:
    metrics: dict[str, float]
    path: Path | None
    files: list[str]
    checkpoint: dict[str, Any]
    previous_epoch: int | None
    live_model: dict[str, torch.Tensor]


@dataclass
class Reference:
    cfg: TrialConfig
    out: Path
    summary: train.Summary
    trial: train.Trial
    optimizers_built: int
    epochs: list[EpochSeen] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference")
    cfg = make_cfg(out, optimizer=REFERENCE_OPTIMIZER)
    trials: list[train.Trial] = []
    optimizers: list[torch.optim.Optimizer] = []
    seen: list[EpochSeen] = []
    lines: list[str] = []
    original_setup, original_build = train.setup, unfreezer.build_optimizer

    def setup(cfg: TrialConfig, log: train.Log = print, **kwargs: Any) -> train.Trial:
        trial = original_setup(cfg, log, **kwargs)
        trials.append(trial)
        return trial

    def build_optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = original_build(*args, **kwargs)
        optimizers.append(optimizer)
        return optimizer

    def report(metrics: dict[str, float], path: Path | None) -> None:
        assert path is not None
        previous = out / trialdir.PREVIOUS
        seen.append(
            EpochSeen(
                metrics=dict(metrics),
                path=path,
                files=sorted(os.listdir(out)),
                checkpoint=load(path),
                previous_epoch=load(previous)["loop"]["epoch"] if previous.exists() else None,
                live_model={k: v.clone() for k, v in trials[0].model.state_dict().items()},
            )
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "setup", setup)
        mp.setattr(unfreezer, "build_optimizer", build_optimizer)
        summary = train.run(cfg, report, log=lines.append)
    assert len(trials) == 1
    assert trials[0].optimizer is optimizers[0]
    return Reference(cfg, out, summary, trials[0], len(optimizers), seen, lines)


# --- 1. exact resume ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_reference(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resumed")
    interrupted_then_resumed(reference.cfg.replace(output_dir=str(out)), epochs=2)
    return out


def assert_exact_resume(expected: Path, resumed: Path) -> None:
    assert_same_rows(comparable(expected), comparable(resumed))
    a, b = load(expected / trialdir.CHECKPOINT), load(resumed / trialdir.CHECKPOINT)
    for key in ("model", "optimizer", "freezer", "monitor", "loop"):
        assert_same_tensors(a[key], b[key], key)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(
    reference: Reference, resumed_reference: Path
) -> None:
    assert_exact_resume(reference.out, resumed_reference)


def test_resumed_run_keeps_the_lr_schedule_and_trains_newly_unfrozen_blocks(
    reference: Reference, resumed_reference: Path
) -> None:
    resumed = [r["metrics"] for r in rows(resumed_reference)]
    for want, got in zip(reference.epochs[2:], resumed[2:], strict=True):
        lrs = {k: v for k, v in want.metrics.items() if k.startswith("lr/")}
        assert {k: got[k] for k in lrs} == lrs
        assert got["drift_stuck_groups"] == 0


def test_resume_is_exact_with_dropout(tmp_path: Path) -> None:
    model = {"name": "pytorchvideo:resnet3d_tiny", "kwargs": {"dropout_rate": 0.5}}
    whole = make_cfg(tmp_path / "a", model=model)
    train.run(whole, log=quiet)
    interrupted_then_resumed(whole.replace(output_dir=str(tmp_path / "b")), epochs=2)
    assert_exact_resume(tmp_path / "a", tmp_path / "b")


def test_resume_with_more_epochs_is_exact_for_the_adaptive_strategy(tmp_path: Path) -> None:
    changes: dict[str, Any] = {
        "strategy": {"name": "adaptive", "patience": 1, "min_improvement": 0.0},
        "schedule": {"kind": "constant"},
        "monitor": "val_loss",
    }
    whole = make_cfg(tmp_path / "a", **changes)
    summary = train.run(whole, log=quiet)
    assert summary.timeline, "the adaptive strategy should unfreeze within 4 epochs here"
    train.run(make_cfg(tmp_path / "b", epochs=2, **changes), log=quiet)
    resumed = train.run(whole.replace(output_dir=str(tmp_path / "b")), resume=True, log=quiet)
    assert resumed.timeline == summary.timeline
    assert_exact_resume(tmp_path / "a", tmp_path / "b")


# --- 2. what resume accepts -----------------------------------------------------------------


@pytest.fixture
def two_epochs(tmp_path: Path) -> TrialConfig:
    """A cheap 2-epoch run with no unfreeze event, already run."""
    cfg = make_cfg(tmp_path / "run", epochs=2, strategy={"name": "frozen"})
    train.run(cfg, log=quiet)
    return cfg


def test_resume_refuses_a_different_config(two_epochs: TrialConfig) -> None:
    other = two_epochs.replace(optimizer=dataclasses.replace(two_epochs.optimizer, lr=2e-3))
    with pytest.raises(ConfigError) as caught:
        train.run(other, resume=True, log=quiet)
    assert caught.value.problems[0].value == ["optimizer"]
    assert "different config" in str(caught.value)
    assert len(rows(Path(two_epochs.output_dir))) == 2


def test_resume_without_a_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        train.run(make_cfg(tmp_path / "empty"), resume=True, log=quiet)


def test_resume_falls_back_to_the_previous_checkpoint(two_epochs: TrialConfig) -> None:
    out = Path(two_epochs.output_dir)
    (out / trialdir.CHECKPOINT).unlink()
    lines: list[str] = []
    summary = train.run(two_epochs, resume=True, log=lines.append)
    assert f"resumed from {out / trialdir.PREVIOUS} at epoch 1 (step 4)" in lines
    assert summary.epochs_run == 2
    assert [r["metrics"]["epoch"] for r in rows(out)] == [0.0, 1.0]
    assert load(out / trialdir.CHECKPOINT)["loop"]["epoch"] == 2


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"\0" * len(b), id="zeroed"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_resume_from_a_damaged_latest_checkpoint_falls_back_to_the_previous(
    two_epochs: TrialConfig, damage: Callable[[bytes], bytes]
) -> None:
    out = Path(two_epochs.output_dir)
    latest = out / trialdir.CHECKPOINT
    latest.write_bytes(damage(latest.read_bytes()))
    lines: list[str] = []
    summary = train.run(two_epochs.replace(epochs=3), resume=True, log=lines.append)
    assert any(line.startswith(f"warning: {latest} is unreadable") for line in lines), lines
    assert f"resumed from {out / trialdir.PREVIOUS} at epoch 1 (step 4)" in lines
    assert summary.epochs_run == 3
    assert [r["metrics"]["epoch"] for r in rows(out)] == [0.0, 1.0, 2.0]


def test_resume_with_both_checkpoints_damaged_is_a_config_error(two_epochs: TrialConfig) -> None:
    out = Path(two_epochs.output_dir)
    for name in (trialdir.CHECKPOINT, trialdir.PREVIOUS):
        (out / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        train.run(two_epochs, resume=True, log=quiet)


class Payload:
    """What a tampered checkpoint could carry: unpickling it would run a command."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_resume_refuses_a_checkpoint_carrying_a_pickle_payload(
    two_epochs: TrialConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Path(two_epochs.output_dir)
    monkeypatch.chdir(out)
    payload = load(out / trialdir.CHECKPOINT)
    payload["loop"]["extra"] = Payload()
    torch.save(payload, out / trialdir.CHECKPOINT)
    with pytest.raises(ConfigError) as caught:
        train.run(two_epochs, resume=True, log=quiet)
    assert "carries a Python object (posix.system)" in str(caught.value)
    assert str(out / trialdir.CHECKPOINT) in str(caught.value)
    assert not (out / "PWNED").exists()  # nothing in it ran
    assert (out / trialdir.PREVIOUS).exists()  # and nothing was overwritten


# --- 3. atomic checkpoints ------------------------------------------------------------------


def test_every_epoch_writes_a_complete_weights_only_checkpoint(reference: Reference) -> None:
    assert len(reference.epochs) == 4
    for epoch, seen in enumerate(reference.epochs):
        assert seen.path == reference.out / trialdir.CHECKPOINT
        assert not [f for f in seen.files if f.endswith(".tmp")]
        payload = seen.checkpoint
        assert {"model", "optimizer", "freezer", "monitor", "loop", "rng", "config"} <= set(payload)
        assert payload["loop"]["epoch"] == epoch + 1
        assert payload["loop"]["step"] == STEPS_PER_EPOCH * (epoch + 1)
        assert payload["config"] == reference.cfg.to_dict()
        assert payload["freezer"]["plan"]["n_trainable"] == epoch
        assert_same_tensors(seen.live_model, payload["model"], "model")
        assert seen.previous_epoch == (epoch if epoch else None)
        assert (trialdir.PREVIOUS in seen.files) == (epoch > 0)


# --- 4. the plan, the optimizer and the reports ---------------------------------------------


def test_plan_is_applied_each_epoch(reference: Reference) -> None:
    sizes = reference.trial.blocks.sizes
    head = reference.trial.blocks.head.numel
    names = [b.name for b in reference.trial.blocks.blocks]
    assert len(sizes) == N_BLOCKS
    found = rows(reference.out)
    for epoch, row in enumerate(found):
        m = row["metrics"]
        assert m["unfrozen_blocks"] == epoch
        trainable = sum(sizes[len(sizes) - epoch :]) if epoch else 0
        assert m["backbone_trainable_ratio"] == pytest.approx(trainable / sum(sizes))
        assert m["trainable_params"] == trainable + head
        assert row["unfrozen"] == (names[len(names) - epoch :] if epoch else [])
    assert reference.summary.timeline == [
        {"epoch": e, "step": STEPS_PER_EPOCH * e, "blocks": [names[-e]], "n_trainable": e}
        for e in (1, 2, 3)
    ]
    for e in (1, 2, 3):
        assert any(
            line.startswith(
                f"unfreeze event at epoch {e} (step {STEPS_PER_EPOCH * e}): {names[-e]}"
            )
            for line in reference.lines
        )


def test_optimizer_is_built_once_and_keeps_its_state(reference: Reference) -> None:
    trial = reference.trial
    assert reference.optimizers_built == 1
    total = 4 * STEPS_PER_EPOCH
    assert adam_steps(trial, head_param(trial)) == total
    for index, unfrozen_at in ((4, 1), (3, 2), (2, 3)):
        for p in block_params(trial, index):
            assert adam_steps(trial, p) == total - STEPS_PER_EPOCH * unfrozen_at
    for index in (0, 1):
        for p in block_params(trial, index):
            assert p not in trial.optimizer.state
            assert not p.requires_grad and p.grad is None


def test_report_is_called_once_per_epoch_with_finite_floats(reference: Reference) -> None:
    assert [seen.metrics["epoch"] for seen in reference.epochs] == [0.0, 1.0, 2.0, 3.0]
    for seen in reference.epochs:
        assert seen.metrics
        for key, value in seen.metrics.items():
            assert type(value) is float, key
            assert math.isfinite(value), key


# --- 5. non-finite numbers are skipped and counted, never sanitised -------------------------


def test_package_never_calls_nan_to_num() -> None:
    root = Path(unfreeze_hpo.__file__).parent
    users = [p.name for p in root.rglob("*.py") if "nan_to_num" in p.read_text()]
    assert users == []


def test_nan_loss_steps_are_skipped_and_counted(
    tmp_path: Path,
    on_setup: Callable[[Callable[[train.Trial], None]], None],
    step_records: list[StepRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nan_to_num hides non-finite numbers")

    monkeypatch.setattr(torch, "nan_to_num", forbidden)
    monkeypatch.setattr(torch.Tensor, "nan_to_num", forbidden)
    on_setup(lambda trial: nan_logits_at(trial, lambda call: call in (4, 5)))
    summary = train.run(make_cfg(tmp_path, epochs=2), log=quiet)
    assert summary.epochs_run == 2 and summary.steps == 2 * STEPS_PER_EPOCH
    skipped = [i for i, r in enumerate(step_records) if r.skipped]
    assert skipped == [4, 5]
    for i, record in enumerate(step_records):
        if i in skipped:
            assert record.skipped == "nonfinite_loss"
            assert record.params_unchanged
        else:
            assert not record.params_unchanged
    first, second = (r["metrics"] for r in rows(tmp_path))
    assert (first["skipped_steps"], first["skipped_total"]) == (0.0, 0.0)
    assert (second["skipped_steps"], second["skipped_total"]) == (2.0, 2.0)
    assert second["spike_nonfinite"] == 2.0
    assert math.isfinite(second["train_loss"])


def test_consecutive_nonfinite_steps_fail_the_trial_as_diverged(
    tmp_path: Path, on_setup: Callable[[Callable[[train.Trial], None]], None]
) -> None:
    on_setup(lambda trial: nan_logits_at(trial, lambda call: call >= 1))
    with pytest.raises(train.TrialFailed) as caught:
        train.run(make_cfg(tmp_path, max_nonfinite_steps=3), log=quiet)
    failure = caught.value
    assert (failure.reason, failure.epoch, failure.step) == ("diverged", 0, 4)
    assert "3 consecutive" in failure.detail and "nonfinite_loss" in failure.detail


def test_nonfinite_steps_across_epochs_count_as_consecutive(
    tmp_path: Path, on_setup: Callable[[Callable[[train.Trial], None]], None]
) -> None:
    on_setup(lambda trial: nan_logits_at(trial, lambda call: True))
    with pytest.raises(train.TrialFailed) as caught:
        train.run(make_cfg(tmp_path, epochs=3, max_nonfinite_steps=6), log=quiet)
    assert (caught.value.reason, caught.value.step) == ("diverged", 6)


def test_inf_gradient_without_amp_skips_the_step(
    tmp_path: Path,
    on_setup: Callable[[Callable[[train.Trial], None]], None],
    step_records: list[StepRecord],
) -> None:
    trials: list[train.Trial] = []
    on_setup(trials.append)
    on_setup(lambda trial: inf_grad_at(head_param(trial), backward=2))
    train.run(make_cfg(tmp_path, epochs=1), log=quiet)
    assert [r.skipped for r in step_records] == [None, None, "nonfinite_grad", None]
    assert [r.params_unchanged for r in step_records] == [False, False, True, False]
    assert adam_steps(trials[0], head_param(trials[0])) == 3
    (row,) = rows(tmp_path)
    assert (row["metrics"]["skipped_total"], row["metrics"]["amp_skipped_total"]) == (1.0, 0.0)


@pytest.mark.skipif(not cpu_fp16_autocast(), reason="this torch has no fp16 autocast on CPU")
def test_inf_gradient_with_fp16_is_skipped_by_the_grad_scaler(
    tmp_path: Path,
    on_setup: Callable[[Callable[[train.Trial], None]], None],
    step_records: list[StepRecord],
) -> None:
    trials: list[train.Trial] = []
    on_setup(trials.append)
    on_setup(lambda trial: inf_grad_at(head_param(trial), backward=2))
    train.run(make_cfg(tmp_path, epochs=1, amp="fp16"), log=quiet)
    assert trials[0].scaler.is_enabled()
    outcomes = [r.skipped for r in step_records]
    assert outcomes[2] == "amp_overflow"
    assert set(outcomes) <= {None, "amp_overflow"}
    for record in step_records:
        assert record.params_unchanged == (record.skipped is not None)
    overflows = outcomes.count("amp_overflow")
    assert adam_steps(trials[0], head_param(trials[0])) == len(outcomes) - overflows
    (row,) = rows(tmp_path)
    assert row["metrics"]["amp_skipped_total"] == overflows
    assert row["metrics"]["skipped_total"] == overflows


# --- 6. drift probe -------------------------------------------------------------------------


def test_drift_probe_is_quiet_on_a_healthy_run(reference: Reference) -> None:
    for row in rows(reference.out):
        m = row["metrics"]
        assert (m["drift_stuck_groups"], m["drift_moved_frozen_groups"]) == (0.0, 0.0)
        assert m["drift_min_trainable"] > 0


def test_drift_probe_reports_stuck_and_moving_frozen_groups(
    tmp_path: Path, on_setup: Callable[[Callable[[train.Trial], None]], None]
) -> None:
    def sabotage(trial: train.Trial) -> None:
        for p in block_params(trial, N_BLOCKS - 1):
            p.register_hook(torch.zeros_like)
        stem = block_params(trial, 0)[0]

        def nudge(call: int) -> None:
            with torch.no_grad():
                stem.add_(1e-3)

        on_training_forward(trial, nudge)

    on_setup(sabotage)
    train.run(make_cfg(tmp_path, epochs=2), log=quiet)
    first, second = (r["metrics"] for r in rows(tmp_path))
    assert (first["drift_stuck_groups"], first["drift_moved_frozen_groups"]) == (0.0, 1.0)
    assert (second["drift_stuck_groups"], second["drift_moved_frozen_groups"]) == (1.0, 1.0)
    assert second["drift_min_trainable"] == 0.0


# --- 7. RuntimeError around unfreeze events -------------------------------------------------


def raise_at(trial: train.Trial, calls: set[int], error: Callable[[], Exception]) -> list[int]:
    seen: list[int] = []

    def action(call: int) -> None:
        seen.append(call)
        if call in calls:
            raise error()

    on_training_forward(trial, action)
    return seen


def test_runtime_error_right_after_an_unfreeze_is_retried_once(
    tmp_path: Path, on_setup: Callable[[Callable[[train.Trial], None]], None]
) -> None:
    on_setup(lambda trial: raise_at(trial, {4}, lambda: RuntimeError("boom")))
    lines: list[str] = []
    summary = train.run(make_cfg(tmp_path, epochs=2), log=lines.append)
    assert summary.epochs_run == 2 and summary.steps == 2 * STEPS_PER_EPOCH
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "RuntimeError: boom" in warnings[0] and "retrying" in warnings[0]


def test_runtime_error_twice_after_an_unfreeze_fails_the_trial(
    tmp_path: Path, on_setup: Callable[[Callable[[train.Trial], None]], None]
) -> None:
    on_setup(lambda trial: raise_at(trial, {4, 5}, lambda: RuntimeError("boom")))
    with pytest.raises(train.TrialFailed) as caught:
        train.run(make_cfg(tmp_path, epochs=2), log=quiet)
    failure = caught.value
    assert (failure.reason, failure.epoch, failure.step) == ("runtime_error", 1, 4)
    assert "RuntimeError: boom" in failure.detail and "after the retry" in failure.detail


def test_runtime_error_without_a_message_still_names_its_type(
    tmp_path: Path, on_setup: Callable[[Callable[[train.Trial], None]], None]
) -> None:
    on_setup(lambda trial: raise_at(trial, {4, 5}, RuntimeError))
    with pytest.raises(train.TrialFailed) as caught:
        train.run(make_cfg(tmp_path, epochs=2), log=quiet)
    assert "RuntimeError: (no message)" in caught.value.detail
    assert "RuntimeError: (no message)" in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "call", "epoch"),
    [({}, 1, 0), ({"signals": {"window_steps": 2}}, 7, 1)],
    ids=["no-unfreeze-event", "outside-the-window"],
)
def test_runtime_error_away_from_an_unfreeze_is_not_retried(
    tmp_path: Path,
    on_setup: Callable[[Callable[[train.Trial], None]], None],
    changes: dict[str, Any],
    call: int,
    epoch: int,
) -> None:
    seen: list[list[int]] = []
    on_setup(lambda trial: seen.append(raise_at(trial, {call}, lambda: RuntimeError("boom"))))
    lines: list[str] = []
    with pytest.raises(train.TrialFailed) as caught:
        train.run(make_cfg(tmp_path, epochs=2, **changes), log=lines.append)
    assert (caught.value.reason, caught.value.epoch, caught.value.step) == (
        "runtime_error",
        epoch,
        call,
    )
    assert seen[0][-1] == call
    assert not [line for line in lines if line.startswith("warning:")]


def test_out_of_memory_fails_the_trial_as_oom(
    tmp_path: Path, on_setup: Callable[[Callable[[train.Trial], None]], None]
) -> None:
    on_setup(lambda trial: raise_at(trial, {4}, lambda: torch.OutOfMemoryError("out of memory")))
    with pytest.raises(train.TrialFailed) as caught:
        train.run(make_cfg(tmp_path, epochs=2), log=quiet)
    assert caught.value.reason == "oom"
    assert "OutOfMemoryError: out of memory" in caught.value.detail


# --- 8. the LR schedule ---------------------------------------------------------------------


def test_cosine_schedule_values() -> None:
    base = lr_schedule(ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1), 1.0, 20)
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 12: 0.55, 20: 0.1, 100: 0.1}
    for step in [*expected, *reversed(expected)]:
        assert base(step) == pytest.approx(expected[step])


def test_constant_schedule_values() -> None:
    base = lr_schedule(ScheduleConfig(kind="constant", warmup_steps=2), 0.01, 10)
    assert [base(s) for s in (0, 1, 2, 9, 50, 1)] == pytest.approx(
        [0.005, 0.01, 0.01, 0.01, 0.01, 0.01]
    )


def test_cosine_schedule_without_warmup_starts_at_lr_and_is_pure() -> None:
    base = lr_schedule(ScheduleConfig(kind="cosine"), 2.0, 8)
    values = [base(s) for s in range(9)]
    assert values[0] == 2.0 and values[4] == pytest.approx(1.0) and values[8] == 0.0
    assert all(a > b for a, b in itertools.pairwise(values))
    assert [base(s) for s in reversed(range(9))] == values[::-1]


def test_lr_metrics_follow_the_schedule_per_group(reference: Reference) -> None:
    cfg = reference.cfg
    opt = cfg.optimizer
    total = cfg.epochs * STEPS_PER_EPOCH
    base = lr_schedule(cfg.schedule, opt.lr, total)
    names = [b.name for b in reference.trial.blocks.blocks]
    for epoch, seen in enumerate(reference.epochs):
        m = seen.metrics
        last = int(m["step"]) - 1
        assert m["lr/head"] == pytest.approx(base(last), rel=1e-12)
        for i, name in enumerate(names):
            unfrozen_at = N_BLOCKS - i
            if epoch < unfrozen_at:
                assert m[f"lr/{name}"] == 0.0
                continue
            scale = opt.backbone_lr_mult * opt.layer_decay ** (N_BLOCKS - 1 - i)
            warmup = min(1.0, (last - STEPS_PER_EPOCH * unfrozen_at + 1) / 6)
            assert m[f"lr/{name}"] == pytest.approx(base(last) * scale * warmup, rel=1e-12)


# --- 9. metrics files -----------------------------------------------------------------------


def csv_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_files_have_one_row_per_epoch(reference: Reference) -> None:
    json_rows = rows(reference.out)
    table = csv_rows(reference.out)
    assert [r["metrics"]["epoch"] for r in json_rows] == [0.0, 1.0, 2.0, 3.0]
    assert len(table) == 4
    for line, row in zip(table, json_rows, strict=True):
        assert {k: float(v) for k, v in line.items()} == row["metrics"]
    assert reference.summary.final == json_rows[-1]["metrics"]


def test_running_again_without_resume_starts_over(two_epochs: TrialConfig) -> None:
    out = Path(two_epochs.output_dir)
    first = comparable(out)
    lines: list[str] = []
    train.run(two_epochs, log=lines.append)
    assert any("starting over" in line for line in lines)
    assert_same_rows(first, comparable(out))
    assert len(csv_rows(out)) == 2


def test_running_again_after_a_crash_between_renames_starts_over(
    two_epochs: TrialConfig,
) -> None:
    out = Path(two_epochs.output_dir)
    (out / trialdir.CHECKPOINT).unlink()
    train.run(two_epochs, log=quiet)
    assert [r["metrics"]["epoch"] for r in rows(out)] == [0.0, 1.0]
    assert len(csv_rows(out)) == 2


# --- 10. CLI --------------------------------------------------------------------------------


def write_yaml(path: Path, values: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_cli_train_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_yaml(tmp_path / "trial.yaml", values_for(tmp_path / "out", epochs=2))
    assert main(["train", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "epoch 0/1 |" in out and "epoch 1/1 |" in out
    assert "unfreeze event at epoch 1 (step 4)" in out
    assert "done: 2 epochs" in out

    assert main(["train", "--config", config, "--resume", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at epoch 2 (step 8)" in out
    assert "epoch 2/2 |" in out and "epoch 0/" not in out
    assert "done: 3 epochs" in out
    assert [r["metrics"]["epoch"] for r in rows(tmp_path / "out")] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("changes", "argv", "message"),
    [
        ({"optimizer": {"lr": -1.0}}, [], "optimizer.lr"),
        ({}, ["--resume"], "no checkpoint to resume from"),
    ],
    ids=["bad-value", "nothing-to-resume"],
)
def test_cli_train_config_error_exits_2_without_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    argv: list[str],
    message: str,
) -> None:
    config = write_yaml(tmp_path / "trial.yaml", values_for(tmp_path / "out", **changes))
    assert main(["train", "--config", config, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_cli_train_reports_a_failed_trial(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    on_setup: Callable[[Callable[[train.Trial], None]], None],
) -> None:
    on_setup(lambda trial: raise_at(trial, {1}, RuntimeError))
    config = write_yaml(tmp_path / "trial.yaml", values_for(tmp_path / "out", epochs=1))
    assert main(["train", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "trial failed: runtime_error at epoch 0, step 1: RuntimeError: (no message)" in err


# --- 11. the spike signal tells an aggressive schedule from a gentle one --------------------


def spike_run(out: Path, seed: int, aggressive: bool) -> list[dict[str, Any]]:
    if aggressive:
        strategy: dict[str, Any] = {"name": "fixed", "phases": [[0, 0], [2, N_BLOCKS]]}
        optimizer: dict[str, Any] = {"backbone_lr_mult": 50.0}
    else:
        strategy = {"name": "early_gradual", "freeze_epochs": 2, "target_ratio": 1.0}
        optimizer = {"backbone_lr_mult": 0.1, "unfreeze_warmup_steps": 4}
    cfg = make_cfg(
        out,
        data={"train_samples": 48, "val_samples": 8},
        epochs=3,
        seed=seed,
        strategy=strategy,
        optimizer=optimizer,
        schedule={"kind": "constant"},
        signals={"baseline_steps": 4, "window_steps": 6},
    )
    train.run(cfg, log=quiet)
    return comparable(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_aggressive_unfreezing_spikes_more_than_gentle(tmp_path: Path, seed: int) -> None:
    aggressive = spike_run(tmp_path / "aggressive", seed, aggressive=True)
    gentle = spike_run(tmp_path / "gentle", seed, aggressive=False)
    assert_same_rows(gentle[:2], aggressive[:2])
    hard, soft = aggressive[-1]["metrics"], gentle[-1]["metrics"]
    assert (hard["unfrozen_blocks"], soft["unfrozen_blocks"]) == (N_BLOCKS, 1)
    assert hard["spike_events"] == soft["spike_events"] == 1
    print(
        f"seed {seed}: loss ratio aggressive {hard['spike_worst_loss_ratio']:.3f} "
        f"gentle {soft['spike_worst_loss_ratio']:.3f}; grad ratio aggressive "
        f"{hard['spike_worst_grad_ratio']:.3f} gentle {soft['spike_worst_grad_ratio']:.3f}"
    )
    assert hard["spike_worst_loss_ratio"] > 1.3
    assert hard["spike_worst_loss_ratio"] - 1 > 3 * (soft["spike_worst_loss_ratio"] - 1)
