"""The pruning benchmark: its recorded curves keep their documented shape, and the replay runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "benchmarks" / "data" / "curves.json"
PRUNERS = {
    "FIFO (no pruning)",
    "ASHA (Ray)",
    "median stopping (Ray)",
    "successive halving (Optuna)",
    "Hyperband (Optuna)",
    "median (Optuna)",
    "spike + FIFO",
    "spike + ASHA, no phase grace",
    "spike + ASHA, phase grace 1 (default)",
}
# What the schedulers, the spike rule and the replay read from each epoch.
READ = {
    "epoch",
    "train_loss",
    "val_acc",
    "best_val_acc",
    "val_loss",
    "spike_events",
    "spike_event_epoch",
    "spike_event_block",
    "spike_loss_ratio",
    "spike_grad_ratio",
    "spike_nonfinite",
    "spike_recovered",
    "spike_recovery_steps",
    "spike_window_steps",
    "spike_val_drop",
    "spike_worst_loss_ratio",
    "phase_epochs",
}


def test_recorded_curves_have_the_documented_structure() -> None:
    assert CURVES.stat().st_size < 1_000_000
    data = json.loads(CURVES.read_text(encoding="utf-8"))
    assert data["format"] == 2
    settings = data["settings"]
    for key in ("base", "space", "trials", "seed", "epochs", "train_samples", "metric", "mode"):
        assert key in settings
    trials = data["trials"]
    assert len(trials) == settings["trials"] >= 8
    for position, trial in enumerate(trials):
        assert trial["index"] == position
        assert trial["cohort"] in ("space", "aggressive", "stress", "diverge", "late")
        assert isinstance(trial["params"], dict) and "strategy" in trial["params"]
        assert trial["status"] in ("completed", "failed")
        columns = trial["metrics"]
        lengths = {len(values) for values in columns.values()}
        assert len(lengths) <= 1  # one value (or null) per reported epoch for every key
        epochs = lengths.pop() if lengths else 0
        if trial["status"] == "completed":
            assert trial["failure"] is None
            assert epochs == settings["epochs"]
        else:
            assert set(trial["failure"]) == {"reason", "detail", "epoch", "step"}
            assert epochs < settings["epochs"]
        if epochs:
            assert READ.issubset(columns)
            assert columns["epoch"] == [float(e) for e in range(epochs)]
        for values in columns.values():
            for value in values:
                assert value is None or isinstance(value, float) or value in ("nan", "inf", "-inf")


def test_pruning_replay_quick_reports_every_pruner(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/pruning_replay.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verdict" in done.stdout
    figures = json.loads(out.read_text(encoding="utf-8"))["figures"]
    pruners = figures["pruners"]
    assert set(pruners) == PRUNERS
    for name, row in pruners.items():
        keys = ("total_epochs", "unstable_epochs", "false_prune_rate", "pruned")
        for key in (*keys, "late_false_prune_rate"):
            assert math.isfinite(row[key]), (name, key)
        assert 0 <= row["false_prune_rate"] <= 1
        # Epochs to the best quality are finite unless the pruner pruned the best trials in
        # most orders (then null, and the count of orders that got there says so).
        if row["epochs_to_best"] is None:
            assert row["orders_reaching_best"] < row["orders"], name
        else:
            assert math.isfinite(row["epochs_to_best"]), name
    # Without pruning every trial runs to its end, so the best one is always reached.
    fifo = pruners["FIFO (no pruning)"]
    assert fifo["pruned"] == 0 and fifo["orders_reaching_best"] == fifo["orders"]
    assert figures["settings"]["n_curves"] == 9
    assert figures["settings"][
        "unstable"
    ]  # the quick set keeps a failed trial: on_trial_error runs


def test_the_recorded_curves_hold_late_unfreezers_and_their_phase_clock() -> None:
    # At least 12 trials whose first unfreeze event comes at or after the first rung (epoch 4),
    # each reporting the phase clock the rungs count: 0 until that event.
    data = json.loads(CURVES.read_text(encoding="utf-8"))
    late = []
    for trial in data["trials"]:
        columns = trial["metrics"]
        firsts = [
            e
            for n, e in zip(columns["spike_events"], columns["spike_event_epoch"], strict=True)
            if n is not None and n >= 1
        ]
        if firsts and firsts[0] >= 4:
            late.append(trial)
            if trial["params"]["strategy"] == "adaptive":
                continue  # its phase starts at twice its patience at the latest
            start = int(firsts[0])
            assert columns["phase_epochs"][:start] == [0.0] * start
            assert columns["phase_epochs"][start] == 1.0
    assert len(late) >= 12
