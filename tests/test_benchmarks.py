"""Each benchmark runs in ``--quick`` mode and writes its figures: a smoke test, never a timing
assertion (the figures themselves live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import require_real

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    """Run ``benchmarks/<script> --quick --json``; its JSON record."""
    out = tmp_path / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNFREEZE_HPO_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--json", str(out), *extra],
        cwd=BENCHMARKS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert record["benchmark"] == script.removesuffix(".py")
    assert "CPU cores" in record["machine"]
    return record


def accuracies(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)


def test_embedded_transfer_quick(tmp_path: Path) -> None:
    figures = run_quick("embedded_transfer.py", tmp_path)["figures"]
    assert len(figures) == 6
    assert all(accuracies(arm["values"]) for arm in figures.values())


def test_search_quality_quick(tmp_path: Path) -> None:
    figures = run_quick("search_quality.py", tmp_path)["figures"]
    arms = [name for name, value in figures.items() if isinstance(value, dict)]
    assert arms[0] == "searched (best trial)" and len(arms) == 4
    for name in arms:
        assert accuracies(figures[name]["values"])
        assert len(figures[name]["searched_minus"]) == len(figures[name]["values"])
    assert figures["budget"] == 2


def test_real_transfer_quick(tmp_path: Path) -> None:
    """Needs the `real` extra: skipped without it, failed instead with CI set."""
    require_real()
    figures = run_quick("real_transfer.py", tmp_path)["figures"]
    preprocessings = [name for name in figures if name != "settings"]
    assert len(preprocessings) == 2
    for name in preprocessings:
        arms = {arm: v for arm, v in figures[name].items() if arm != "full_minus_bare"}
        assert {"full fine-tuning", "bare timm + torch full fine-tuning"} <= set(arms)
        assert len(arms) == 5
        assert all(accuracies(arm["values"]) and len(arm["values"]) == 1 for arm in arms.values())


def test_loaders_quick(tmp_path: Path) -> None:
    figures = run_quick("loaders.py", tmp_path)["figures"]
    rows = [f"{data} workers={w}" for data in ("images", "videos") for w in (0, 1)]
    for row in rows:
        assert all(figures[f"{row} {arm}"]["median"] > 0 for arm in ("ours", "bare", "ours/bare"))
    assert figures["quick"] is True
