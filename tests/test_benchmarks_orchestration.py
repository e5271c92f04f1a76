"""Smoke test of the orchestration benchmark: ``--quick`` runs all three arms through a Ray of its
own in a subprocess (isolated from the in-process Ray other test modules start), exits 0, writes
finite figures and leaves no process behind. No timing is asserted: the figures of a quick run on
a shared machine mean nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import reap_session

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("unfreeze-hpo", "ray-tune", "optuna")


def finite(value: Any) -> bool:
    """A number, or a Stat (as JSON) whose median and spread are, that is finite."""
    if isinstance(value, dict):
        return finite(value["median"]) and finite(value["spread"]) and value["n"] >= 1
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_orchestration_quick(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    command = [sys.executable, "benchmarks/orchestration.py", "--quick", "--json", str(out)]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so whatever Ray leaves behind can be found, and reaped
    )
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
        leftovers = reap_session(proc.pid, grace_s=15)
    assert proc.returncode == 0, output[-4000:]
    assert not leftovers, f"processes left running after the benchmark: {leftovers}"
    assert "verdict:" in output
    record = json.loads(out.read_text())
    assert record["benchmark"] == "orchestration"
    figures = record["figures"]
    assert figures["quick"] is True
    for arm in ARMS:
        assert finite(figures[f"{arm} wall/ideal"]), (arm, figures[f"{arm} wall/ideal"])
        assert figures[f"{arm} wall/ideal"]["median"] > 0
        assert figures[f"{arm} epochs_run"] == [figures["trials"] * figures["epochs"]]
    for key in ("unfreeze-hpo / ray-tune", "ray_init_s", "unfreeze-hpo callbacks_s"):
        assert finite(figures[key]), (key, figures[key])
