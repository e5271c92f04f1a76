from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import run

from unfreeze_hpo.cli import main
from unfreeze_hpo.errors import UserError
from unfreeze_hpo.strategies import REGISTRY


def test_blocks_prints_table_and_schedule_preview(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "blocks",
        "timm:resnet18",
        "--granularity",
        "coarse",
        "--strategy",
        "early_gradual",
        "--set",
        "target_ratio=5e-1",
        "--epochs",
        "4",
    )
    assert code == 0
    assert "backbone 11,176,512 in 5 blocks" in out
    lines = out.splitlines()
    layer4 = next(line for line in lines if " layer4 " in line)
    assert layer4.split() == ["4", "layer4", "8,393,728", "75.1%", "75.1%"]
    stem = next(line for line in lines if "conv1+bn1" in line)
    assert stem.split()[-1] == "100.0%"
    preview = lines[lines.index(next(x for x in lines if x.startswith("schedule preview"))) :]
    assert "target_ratio=0.5" in preview[0]
    rows = [line.split() for line in preview[2:6]]
    assert rows == [
        ["0", "0", "0.0%", "-"],
        ["1", "1", "75.1%", "layer4"],
        ["2", "1", "75.1%", "-"],
        ["3", "1", "75.1%", "-"],
    ]
    assert "reached at epoch 1" in out


def test_progressive_preview_warns_when_schedule_outlasts_training(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys, "blocks", "pytorchvideo:resnet3d_tiny", "--strategy", "progressive", "--epochs", "5"
    )
    assert code == 0
    assert "note: the last block unfreezes at epoch 16, beyond the 5 epochs" in out


def test_every_bad_input_is_reported_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "blocks",
        "timm:resnt18",
        "--strategy",
        "early_gradual",
        "--set",
        "target_ratio=2",
        "--set",
        "freeze_epoch=1",
        "--epochs",
        "0",
    )
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    for field in ("model.name", "strategy.target_ratio", "strategy.freeze_epoch", "--epochs"):
        assert field in err
    assert "did you mean timm:resnet18" in err
    assert "did you mean freeze_epochs" in err


def test_debug_shows_the_exception(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError):
        main(["--debug", "blocks", "timm:resnt18"])


def test_missing_checkpoint_is_a_user_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "blocks", "timm:resnet18", "--checkpoint", str(tmp_path / "x.pt"))
    assert code == 2
    assert "model.checkpoint" in err and "no such file" in err


def test_strategies_lists_every_registered_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "strategies")
    assert code == 0
    for name in REGISTRY:
        assert f"{name}:" in out
    assert "patience = 2  (>= 1)" in out
    assert "min_improvement = 0.005" in out


def test_models_lists_names_with_family(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "pytorchvideo", "--filter", "mvit")
    assert code == 0
    assert set(out.split()) == {
        "pytorchvideo:mvit_base_16",
        "pytorchvideo:mvit_base_16x4",
        "pytorchvideo:mvit_base_32x3",
        "pytorchvideo:mvit_tiny",
    }


def test_console_script_exit_code_and_no_traceback() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unfreeze_hpo.cli",
            "blocks",
            "timm:resnet18",
            "--matcher",
            "[not, a, mapping]",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--matcher" in result.stderr
    assert "Traceback" not in result.stderr
