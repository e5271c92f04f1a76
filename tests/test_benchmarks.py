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

import pytest
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
    held = figures["held_out"]
    # One winner per search arm (one search seed), then the five baselines.
    assert [k for k in held if "winner" in k] == [
        "unfreeze-hpo winner (search seed 0)",
        "plain Ray Tune winner (search seed 0)",
        "plain Optuna winner (search seed 0)",
    ]
    assert len(held) == 8 and all(accuracies(v) and len(v) == 1 for v in held.values())
    # Every arm's search reached the target or says it did not (inf), in epochs it trained.
    assert set(figures["epochs_to_target"]) == {"unfreeze-hpo", "plain Ray Tune", "plain Optuna"}
    for epochs in figures["epochs_to_target"].values():
        assert len(epochs) == 1 and (epochs[0] >= 2 or math.isinf(epochs[0]))
    assert 0 < figures["target"] <= 1 and figures["budget"] == 3


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


def test_throughput_quick(tmp_path: Path) -> None:
    """Needs the `real` extra: skipped without it, failed instead with CI set."""
    require_real()
    figures = run_quick("throughput.py", tmp_path)["figures"]
    for arm in ("ours", "bare"):
        measured = figures[f"workers=1 {arm}"]
        assert all(measured[k] > 0 for k in ("images_per_s", "val_s", "checkpoint_s"))
        assert measured["reads_per_step"] >= 0
    assert figures["workers=1 ours/bare"]["median"] > 0


@pytest.mark.full
def test_data_parallel_quick(tmp_path: Path) -> None:
    """Two-rank runs (torch.multiprocessing, gloo): under full, as make test has its one."""
    figures = run_quick("data_parallel.py", tmp_path)["figures"]
    arms = ("1 worker, 2 threads", "2 workers, 1 thread each", "1 worker, 1 thread")
    assert all(figures[arm]["median"] > 0 for arm in arms)
    assert figures["ratio_2_workers_to_1"] > 0
    # Two unfreeze events, each re-wrapping DDP in a measured time.
    assert len(figures["rewrap_seconds"]) == 2 and all(s > 0 for s in figures["rewrap_seconds"])


# The GPU check as the lent machine runs it: nothing but torch, torchvision, timm and our code.
WITHOUT_CLUSTER_PACKAGES = (
    "import runpy, sys\n"
    "for name in ('ray', 'optuna', 'pytorchvideo', 'av', 'pandas'):\n"
    "    sys.modules[name] = None  # absent: importing it fails\n"
    "import timm, torchvision, unfreeze_hpo.train, unfreeze_hpo.config  # the arms' imports\n"
    "sys.argv = ['gpu_check.py', *sys.argv[1:]]\n"
    "runpy.run_path('scripts/gpu_check.py', run_name='__main__')\n"
)


def gpu_check(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_CLUSTER_PACKAGES, *argv],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_gpu_check_runs_without_ray_optuna_pytorchvideo_pyav_or_pandas(
    tmp_path: Path,
) -> None:
    """Without CUDA the script gets as far as saying so, after importing all its arms need."""
    (tmp_path / "lite0.pth").write_bytes(b"")
    done = gpu_check("--data", str(tmp_path))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "no CUDA device here" in done.stderr


@pytest.mark.full
def test_the_gpu_check_dry_run_writes_its_table(tmp_path: Path) -> None:
    """Every arm of the script, on CPU at 16 px (minutes): the table has each arm's row."""
    require_real()
    prepared = subprocess.run(
        [
            sys.executable,
            "scripts/gpu_check.py",
            "--prepare",
            str(tmp_path / "data"),
            "--per-class",
            "8",
        ],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    out = tmp_path / "table.md"
    done = gpu_check("--data", str(tmp_path / "data"), "--quick", "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    arms = [
        "ours bf16",
        "bare bf16",
        "ours fp16",
        *(f"ours bf16, 2 processes: trial {i}" for i in (0, 1)),
    ]
    for arm in arms:
        assert f"| {arm} |" in table, table
    assert "two processes together" in table
    # Two ranks on the one device: the loop's audits passed across both unfreeze events.
    assert "data-parallel, 2 ranks on one device over gloo, 2 unfreeze events" in table
