"""The search driver killed (SIGKILL to its whole process group) or interrupted (SIGINT, as Ctrl-C
sends it) while trials run, then the same command run again: the search completes with nothing
lost. The study is SQLite, a relational Optuna storage.

Each run is a subprocess with its own Ray (no in-process Ray here); the kill in the middle of a
search is in tests/test_search.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from nothing_lost import assert_nothing_lost
from support import SHORT_BASE, SHORT_SPACE, count_recorded, reap_session, write

from unfreeze_hpo import faults
from unfreeze_hpo.search.options import STUDY_FILE

TRIALS = 4


def recorded(folder: Path) -> int:
    return count_recorded(folder / STUDY_FILE)


def held(folder: Path) -> bool:
    """A trial has reported epoch 0 and waits, before epoch 1's report, for the test (every trial
    that gets there does: none can end until the test lets them go on)."""
    return bool(faults.read_log(folder.parents[1] / "faults.jsonl"))


def command(tmp_path: Path) -> list[str]:
    hold = {"kind": "hold", "epoch": 1, "release": str(tmp_path / "release")}
    trial = {**SHORT_BASE, "faults": {"log": str(tmp_path / "faults.jsonl"), "inject": [hold]}}
    base = write(tmp_path / "base.yaml", yaml.safe_dump(trial))
    space = write(tmp_path / "space.yaml", SHORT_SPACE)
    return [
        sys.executable,
        "-m",
        "unfreeze_hpo.cli",
        "search",
        *("--name", "driver", "--storage-path", str(tmp_path / "runs")),
        *("--base", str(base), "--space", str(space), "--num-trials", str(TRIALS)),
        *("--max-concurrent", "2", "--cpus-per-trial", "1", "--scheduler", "fifo"),
        *("--no-preflight", "--no-recipes"),
    ]


def run_until(
    tmp_path: Path, log_name: str, ready: Callable[[Path], bool], sig: signal.Signals
) -> tuple[int, str]:
    """Start the search, send ``sig`` to its process group once ``ready(folder)``; its exit code
    and output. Every process of its session is gone afterwards."""
    folder = tmp_path / "runs" / "driver"
    log_path = tmp_path / log_name
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            command(tmp_path),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not ready(folder) and driver.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert driver.poll() is None, "the search ended before it could be stopped"
        os.killpg(driver.pid, sig)
        code = driver.wait(timeout=120)
        assert reap_session(driver.pid, grace_s=30) == [] or sig == signal.SIGKILL
    finally:
        reap_session(driver.pid, grace_s=0)
    return code, log_path.read_text()


def finish(tmp_path: Path) -> str:
    """Let held trials go on, and run the same command again to its end; its output."""
    (tmp_path / "release").touch()
    done = subprocess.run(
        command(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "resuming the search" in output
    return output


@pytest.mark.parametrize(
    ("ready", "hold"),
    [
        pytest.param(held, True, id="first-epoch"),
        pytest.param(
            lambda folder: recorded(folder) >= TRIALS - 1,
            False,
            id="last-trial",
            marks=pytest.mark.full,
        ),
    ],
)
def test_a_driver_killed_then_rerun_completes_the_search(
    tmp_path: Path, ready: Callable[[Path], bool], hold: bool
) -> None:
    if not hold:
        (tmp_path / "release").touch()
    code, _ = run_until(tmp_path, "first.log", ready, signal.SIGKILL)
    assert code == -signal.SIGKILL
    finish(tmp_path)
    folder = tmp_path / "runs" / "driver"
    assert_nothing_lost(folder, TRIALS, faults_log=tmp_path / "faults.jsonl")


def test_ctrl_c_stops_the_search_gracefully_and_the_rerun_resumes_it(tmp_path: Path) -> None:
    (tmp_path / "release").touch()  # trials do not wait
    code, output = run_until(
        tmp_path, "first.log", lambda folder: recorded(folder) >= 1, signal.SIGINT
    )
    assert code == 130, output
    assert "interrupted" in output and "run the same command again" in output, output
    assert "Traceback" not in output, output
    finish(tmp_path)
    assert_nothing_lost(tmp_path / "runs" / "driver", TRIALS)
