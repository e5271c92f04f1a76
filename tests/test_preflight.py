from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from support import cpu_fp16_autocast

from unfreeze_hpo import preflight as preflight_module
from unfreeze_hpo.cli import main
from unfreeze_hpo.config import TrialConfig, from_dict
from unfreeze_hpo.preflight import PreflightResult, preflight
from unfreeze_hpo.train import Log, Trial

SAMPLES, STEPS = 8, 20
CLI_BUDGET = ["--samples", str(SAMPLES), "--steps", str(STEPS)]
BASE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny"},
    "data": {"kind": "synthetic_video", "train_samples": 16, "val_samples": 8, "frames": 4},
    "epochs": 2,
    "batch_size": 8,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def values_for(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    values = copy.deepcopy(BASE)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    values["output_dir"] = str(tmp_path / "out")
    return values


def make_cfg(tmp_path: Path, **changes: Any) -> TrialConfig:
    return from_dict(values_for(tmp_path, **changes))


def write_yaml(tmp_path: Path, **changes: Any) -> str:
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(values_for(tmp_path, **changes)))
    return str(path)


def quiet(line: str) -> None:
    pass


def check(cfg: TrialConfig) -> PreflightResult:
    return preflight(cfg, samples=SAMPLES, steps=STEPS, log=quiet)


def checks(result: PreflightResult) -> dict[str, bool]:
    return {c.name: c.passed for c in result.checks}


def detail(result: PreflightResult, name: str) -> str:
    return next(c.detail for c in result.checks if c.name == name)


@pytest.fixture
def on_setup(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[Trial], None]], None]:
    """Register callbacks run on the Trial preflight builds, right after it is built."""
    callbacks: list[Callable[[Trial], None]] = []
    original = preflight_module.setup

    def setup(cfg: TrialConfig, log: Log = print, **kwargs: Any) -> Trial:
        trial = original(cfg, log, **kwargs)
        for callback in callbacks:
            callback(trial)
        return trial

    monkeypatch.setattr(preflight_module, "setup", setup)
    return callbacks.append


def block_params(trial: Trial, index: int) -> list[torch.nn.Parameter]:
    named = dict(trial.model.named_parameters())
    return [named[n] for n in trial.blocks.blocks[index].params]


def test_healthy_config_passes(tmp_path: Path) -> None:
    result = check(make_cfg(tmp_path))
    assert result.passed
    assert all(checks(result).values())
    assert result.diagnosis == ()
    assert len(result.losses) == STEPS
    assert all(math.isfinite(loss) for loss in result.losses)
    assert sum(result.losses[-5:]) < 0.7 * sum(result.losses[:5])
    assert detail(result, "trainable parameters move") == "all of 4 trainable groups moved"
    assert detail(result, "frozen parameters stay put") == "2 frozen groups unchanged"
    report = result.report()
    assert report.splitlines()[0] == "preflight PASSED"
    assert "[FAIL]" not in report and "diagnosis" not in report


def test_cli_check_passes_a_healthy_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", write_yaml(tmp_path), *CLI_BUDGET]) == 0
    out = capsys.readouterr().out
    assert out.startswith("preflight PASSED")
    assert out.count("[ok]") == 4


class AlwaysOverflowingScaler(torch.amp.GradScaler):
    """A GradScaler whose scale is far too large for fp16: every step overflows."""

    def __init__(self, device: str = "cuda", **kwargs: Any) -> None:
        super().__init__(
            device,
            init_scale=2.0**100,
            growth_interval=10**9,
            enabled=kwargs.get("enabled", True),
        )


@pytest.fixture
def overflowing_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    if not cpu_fp16_autocast():
        pytest.skip("this torch has no fp16 autocast on CPU")
    monkeypatch.setattr(torch.amp, "GradScaler", AlwaysOverflowingScaler)


def assert_amp_diagnosis(result: PreflightResult) -> None:
    assert not result.passed
    assert checks(result) == {
        "loss falls": False,
        "trainable parameters move": False,
        "frozen parameters stay put": True,
        "no skipped steps": False,
    }
    assert detail(result, "no skipped steps") == f"{STEPS} amp_overflow of {STEPS}"
    (line,) = [d for d in result.diagnosis if "fp16" in d]
    assert "GradScaler" in line and "did not move" in line
    assert "amp: bf16" in line and "amp: none" in line


@pytest.mark.usefixtures("overflowing_fp16")
def test_fp16_scaler_skipping_every_step_is_diagnosed(tmp_path: Path) -> None:
    result = check(make_cfg(tmp_path, amp="fp16"))
    assert_amp_diagnosis(result)
    assert "did not move: " in detail(result, "trainable parameters move")
    assert "head" in detail(result, "trainable parameters move")
    assert "FAIL" in result.report().splitlines()[0]


@pytest.mark.usefixtures("overflowing_fp16")
def test_cli_check_exits_1_when_fp16_parameters_do_not_move(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", write_yaml(tmp_path, amp="fp16"), *CLI_BUDGET]) == 1
    out = capsys.readouterr().out
    assert out.startswith("preflight FAILED")
    assert "[FAIL] trainable parameters move" in out
    assert "diagnosis: fp16 mixed precision" in out


def test_inf_gradients_without_amp_are_diagnosed(
    tmp_path: Path, on_setup: Callable[[Callable[[Trial], None]], None]
) -> None:
    def inf_grads(trial: Trial) -> None:
        for p in trial.model.parameters():
            p.register_hook(lambda grad: torch.full_like(grad, math.inf))

    on_setup(inf_grads)
    result = check(make_cfg(tmp_path))
    assert not checks(result)["trainable parameters move"]
    assert not checks(result)["no skipped steps"]
    assert detail(result, "no skipped steps") == f"{STEPS} nonfinite_grad of {STEPS}"
    assert any("non-finite loss or gradients" in d for d in result.diagnosis)
    assert not any("fp16" in d for d in result.diagnosis)


def test_frozen_group_that_moves_is_diagnosed(
    tmp_path: Path, on_setup: Callable[[Callable[[Trial], None]], None]
) -> None:
    def edit_frozen_stem(trial: Trial) -> None:
        stem = block_params(trial, 0)[0]

        def hook(module: torch.nn.Module, args: Any) -> None:
            if module.training:
                with torch.no_grad():
                    stem.mul_(1.001)

        trial.model.register_forward_pre_hook(hook)

    on_setup(edit_frozen_stem)
    result = check(make_cfg(tmp_path))
    assert not result.passed
    failed = [name for name, ok in checks(result).items() if not ok]
    assert failed == ["frozen parameters stay put"]
    assert detail(result, "frozen parameters stay put") == "changed while frozen: blocks.0"
    (line,) = result.diagnosis
    assert line.startswith("frozen parameters changed")


def test_trainable_group_that_does_not_move_is_diagnosed(
    tmp_path: Path, on_setup: Callable[[Callable[[Trial], None]], None]
) -> None:
    def cut_gradient(trial: Trial) -> None:
        for p in block_params(trial, len(trial.blocks) - 1):
            p.register_hook(torch.zeros_like)

    on_setup(cut_gradient)
    result = check(make_cfg(tmp_path))
    assert not checks(result)["trainable parameters move"]
    assert detail(result, "trainable parameters move") == "did not move: blocks.4.res_blocks.0"
    assert any(d.startswith("trainable groups did not move") for d in result.diagnosis)


def test_lr_too_low_is_diagnosed(tmp_path: Path) -> None:
    result = check(make_cfg(tmp_path, optimizer={"lr": 1e-9}))
    assert not result.passed
    failed = [name for name, ok in checks(result).items() if not ok]
    assert failed == ["loss falls"]
    (line,) = result.diagnosis
    assert "lr 1e-09" in line and "does not fall" in line
