"""The trial folder's format: one writer (train), one tolerant reader for everyone else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from unfreeze_hpo import trialdir


def epoch(e: int, unfrozen: int) -> dict[str, float]:
    return {"epoch": float(e), "val_acc": 0.1 * e, "unfrozen_blocks": float(unfrozen)}


def test_rows_round_trip_and_a_line_cut_short_is_skipped(tmp_path: Path) -> None:
    for e, n in ((0, 0), (1, 1), (2, 1)):
        trialdir.append(tmp_path, epoch(e, n), [f"blocks.{i}" for i in range(n)])
    with (tmp_path / trialdir.METRICS).open("a") as f:
        f.write('{"metrics": {"epoch": 3.0, "val_ac')  # a worker killed mid-write
    assert trialdir.read_rows(tmp_path) == [epoch(0, 0), epoch(1, 1), epoch(2, 1)]
    assert trialdir.rows('{"metrics": {"val_acc": 1}}\nnot json\n[1]\n') == []


def test_truncate_keeps_the_epochs_before_a_resume(tmp_path: Path) -> None:
    for e in range(4):
        trialdir.append(tmp_path, epoch(e, 0), [])
    trialdir.truncate(tmp_path, 2)
    assert [r["epoch"] for r in trialdir.read_rows(tmp_path)] == [0.0, 1.0]
    trialdir.truncate(tmp_path / "missing", 2)  # nothing to keep, nothing written


def test_the_csv_has_a_column_per_metric_any_epoch_reported(tmp_path: Path) -> None:
    trialdir.append(tmp_path, {"epoch": 0.0, "a": 1.0}, [])
    trialdir.append(tmp_path, {"epoch": 1.0, "b": 2.0}, [])
    trialdir.write_csv(tmp_path)
    assert (tmp_path / trialdir.METRICS_CSV).read_text().splitlines() == [
        "epoch,a,b",
        "0.0,1.0,",
        "1.0,,2.0",
    ]


def test_the_timeline_is_each_epoch_the_trainable_count_grew_once() -> None:
    history = [epoch(0, 0), epoch(1, 2), epoch(2, 2), epoch(2, 2), epoch(3, 5), epoch(4, 3)]
    assert trialdir.timeline(history) == [
        {"epoch": 1, "n_trainable": 2},
        {"epoch": 3, "n_trainable": 5},
    ]


def test_the_events_name_the_blocks_each_one_opened(tmp_path: Path) -> None:
    names = ["stem", "b1", "b2", "b3"]
    opened = [(0, 1), (1, 1), (2, 3), (2, 3), (3, 4)]  # epoch 2 written again after a restart
    for e, n in opened:
        trialdir.append(tmp_path, epoch(e, n), names[len(names) - n :])
    assert trialdir.events((tmp_path / trialdir.METRICS).read_text()) == [
        {"epoch": 0, "n_trainable": 1, "blocks": ["b3"]},
        {"epoch": 2, "n_trainable": 3, "blocks": ["b1", "b2"]},
        {"epoch": 3, "n_trainable": 4, "blocks": ["stem"]},
    ]


def test_reading_a_trial_folder_imports_neither_torch_nor_ray() -> None:
    code = "import sys, unfreeze_hpo.trialdir; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
