"""Smoke tests of the step-time benchmarks: each runs with --quick, exits 0 and writes its
figures as finite numbers. No timing is asserted: the figures of a quick run on a shared machine
mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path) -> dict[str, Any]:
    """Run ``benchmarks/<script> --quick --json out`` and return its figures."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == script.removesuffix(".py")
    assert "CPU cores" in record["machine"]
    assert record["figures"]["quick"] is True
    figures: dict[str, Any] = record["figures"]
    return figures


def finite(value: Any) -> bool:
    """A number, or a Stat (as JSON) whose median is one, that is finite."""
    if isinstance(value, dict):
        return finite(value["median"]) and finite(value["spread"]) and value["n"] >= 1
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_worker_overhead_quick(tmp_path: Path) -> None:
    figures = run_quick("worker_overhead.py", tmp_path / "x.json")
    for key in (
        "step_ratio",
        "ours_step_ms",
        "bare_step_ms",
        "final_loss_ours",
        "final_loss_bare",
        "loss_max_rel_diff",
        "steps_per_run",
    ):
        assert finite(figures[key]), (key, figures[key])
    assert figures["step_ratio"]["median"] > 0
    # Exit 0 means the two loops trained alike; the figures must say the same.
    assert figures["loss_max_rel_diff"] <= 1e-6
    assert figures["steps_per_run"] > 0


def test_frozen_savings_quick(tmp_path: Path) -> None:
    figures = run_quick("frozen_savings.py", tmp_path / "x.json")
    arms = {k.rsplit(".", 1)[0] for k in figures if k.endswith(".measured_ratio")}
    assert arms, sorted(figures)
    for arm in arms:
        for figure in (
            "measured_ratio",
            "ideal_ratio",
            "ideal_issue",
            "backward_flops_limit",
            "backward_flops_counted",
            "efficiency",
            "frozen_flop_share",
            "frozen_param_share",
            "rho",
            "omega",
        ):
            assert finite(figures[f"{arm}.{figure}"]), (arm, figure, figures.get(f"{arm}.{figure}"))
        assert 0 < figures[f"{arm}.frozen_flop_share"] <= 1
        assert 0 < figures[f"{arm}.ideal_ratio"] < 1
