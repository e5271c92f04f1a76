"""Tests of the report and the dashboard, on synthetic studies shaped as StudyRecorder writes them.

No Ray: the studies are built with ``optuna.create_trial`` and the trial folders are written by
hand, some with their metrics.jsonl, some without.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from support import free_port, http_get, process_stats, server

from unfreeze_hpo.errors import UnfreezeHPOError, UserError
from unfreeze_hpo.results.dashboard import dashboard_command, run_dashboard
from unfreeze_hpo.results.report import (
    TrialRecord,
    build_report,
    objective_name,
    open_study,
    read_trials,
)
from unfreeze_hpo.search.options import STUDY_FILE

PNGS = ("history", "importances", "curves", "spikes", "ratios")
PRUNE_REASON = "loss x4.20 over baseline after unfreezing block 3 at epoch 2"
FAIL_REASON = "RuntimeError: CUDA error: an illegal memory access was encountered"
STRATEGIES = ["early_gradual", "progressive", "fixed", "adaptive", "full"]
DISTRIBUTIONS = {
    "strategy": CategoricalDistribution(STRATEGIES),
    "optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True),
}


def _metrics(epochs: int, events: dict[int, int], spike: float = 1.0) -> list[dict[str, Any]]:
    """Per-epoch lines as train.py appends them to metrics.jsonl (5 blocks in the backbone)."""
    rows, n = [], 0
    for epoch in range(epochs):
        n = events.get(epoch, n)
        acc = 0.3 + 0.08 * epoch
        rows.append(
            {
                "metrics": {
                    "epoch": float(epoch),
                    "train_loss": 1.5 - 0.1 * epoch,
                    "val_loss": 1.4 - 0.1 * epoch + (spike - 1.0 if epoch in events else 0.0),
                    "val_acc": acc - 0.01,  # unlike best_val_acc, so the objective is unambiguous
                    "best_val_acc": acc,
                    "backbone_trainable_ratio": n / 5,
                    "unfrozen_blocks": float(n),
                    "spike_worst_loss_ratio": spike,
                    "spike_worst_grad_ratio": spike * 2,
                },
                "unfrozen": [f"blocks.{4 - i}" for i in range(n)],
            }
        )
    return rows


def _add(
    study: optuna.Study,
    folder: Path,
    *,
    state: TrialState,
    strategy: str,
    lr: float,
    epochs: int,
    events: dict[int, int],
    reason: str = "",
    spike: float = 1.0,
    files: str = "work",  # work | checkpoint | gone | none
) -> None:
    """One trial as StudyRecorder records it, with its Ray trial folder as asked."""
    rows = _metrics(epochs, events, spike)
    number = len(study.trials)
    name = f"run_trial_{number:08x}_{number + 1}_{strategy}"
    # The recorded dir is Ray's session staging folder; the durable copy is under <search>/ray.
    staged = folder.parent / "ray-session" / name
    target = {"work": staged / "work", "checkpoint": folder / "ray" / name / "checkpoint_000002"}
    if files in target:
        target[files].mkdir(parents=True)
        lines = [json.dumps(r) for r in rows]
        (target[files] / "metrics.jsonl").write_text("\n".join(lines) + '\n{"metrics": {"ep')
    curve = {i + 1: r["metrics"]["best_val_acc"] for i, r in enumerate(rows)}
    failed = state == TrialState.FAIL
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=None if failed else max(curve.values()),
            params={"strategy": strategy, "optimizer.lr": lr},
            distributions=DISTRIBUTIONS,
            intermediate_values={} if failed else curve,
            user_attrs={
                "ray_trial_id": f"{number:08x}",
                "status": state.name.lower(),
                "reason": reason,
                "config": {"strategy": strategy, "optimizer.lr": lr},
                "final": {**rows[-1]["metrics"], "training_iteration": epochs},
                "trial_dir": "" if files == "none" else str(staged),
                "timeline": [{"epoch": e, "n_trainable": n} for e, n in sorted(events.items())],
            },
        )
    )


def _search(root: Path, name: str = "search") -> tuple[Path, optuna.Study]:
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    study = optuna.create_study(
        storage=f"sqlite:///{folder / STUDY_FILE}", study_name=name, direction="maximize"
    )
    return folder, study


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five trials: complete (files in the staging dir), pruned (only a checkpoint copy left),
    complete with its files gone, failed without a trial dir, complete with everything from epoch 0.
    """
    folder, study = _search(tmp_path_factory.mktemp("report"))
    complete = TrialState.COMPLETE
    _add(study, folder, state=complete, strategy="early_gradual", lr=0.01, epochs=6,
         events={2: 1, 4: 3}, spike=1.3)  # fmt: skip
    _add(study, folder, state=TrialState.PRUNED, strategy="progressive", lr=0.05, epochs=3,
         events={2: 5}, reason=PRUNE_REASON, spike=4.2, files="checkpoint")  # fmt: skip
    _add(study, folder, state=complete, strategy="fixed", lr=0.002, epochs=5, events={1: 2, 3: 4},
         spike=1.1, files="gone")  # fmt: skip
    _add(study, folder, state=TrialState.FAIL, strategy="adaptive", lr=0.09, epochs=2, events={},
         reason=FAIL_REASON, files="none")  # fmt: skip
    _add(study, folder, state=complete, strategy="full", lr=0.0003, epochs=4, events={0: 5})
    return folder


@pytest.fixture(scope="module")
def page(search: Path) -> Path:
    return build_report(search)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_writes_a_page_and_every_plot(search: Path, page: Path) -> None:
    assert page == search / "report" / "index.html"
    text = page.read_text()
    for name in PNGS:
        png = page.parent / f"{name}.png"
        width, height = _png_size(png)
        assert 600 <= width <= 2000 and 300 <= height <= 1000, (name, width, height)
        assert png.stat().st_size > 10_000, name
    assert text.count('src="data:image/png;base64,') == len(PNGS)  # one file to share
    assert text.count("<figcaption>") == len(PNGS)
    rows = re.findall(r"<tr>\s*<td>(\d+)</td>\s*<td>(\w+)</td>\s*<td>(\w+)</td>", text)
    assert rows == [
        ("0", "complete", "early_gradual"),
        ("1", "pruned", "progressive"),
        ("2", "complete", "fixed"),
        ("3", "fail", "adaptive"),
        ("4", "complete", "full"),
    ]
    assert PRUNE_REASON in text and FAIL_REASON in text
    assert "5 trials: 3 complete, 1 pruned, 1 fail" in text
    assert "Best: trial 0 (early_gradual), best_val_acc = 0.7" in text


def test_report_reads_surviving_files_and_says_which_are_gone(search: Path, page: Path) -> None:
    records = {r.number: r for r in read_trials(open_study(search), search)}
    assert len(records[0].rows) == 6  # the cut-off last line is skipped
    assert len(records[1].rows) == 3  # found under <search>/ray, in the checkpoint
    assert records[2].rows == [] and records[3].rows == []
    assert records[0].events == [2, 4] and records[4].events == []  # epoch 0 is no event
    text = page.read_text()
    assert "No metrics.jsonl left for #2 (right panel only)" in text
    assert "Dotted (#2): metrics.jsonl is gone; rebuilt from the unfreeze timeline" in text


def test_one_trial_report_explains_the_missing_importances(tmp_path: Path) -> None:
    folder, study = _search(tmp_path, "one")
    _add(study, folder, state=TrialState.COMPLETE, strategy="fixed", lr=0.01, epochs=4,
         events={1: 2}, files="none")  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "importances.png").write_bytes(b"stale")  # from an earlier, bigger report
    text = build_report(folder / STUDY_FILE, out).read_text()  # the study file works as SEARCH
    assert "Needs at least 2 complete trials to compare; this search has 1." in text
    assert not (out / "importances.png").exists()
    for name in ("history", "curves", "spikes", "ratios"):
        _png_size(out / f"{name}.png")
    assert "<td>0</td>\n      <td>complete</td>" in text


def test_report_with_only_pruned_and_failed_trials(tmp_path: Path) -> None:
    folder, study = _search(tmp_path, "bad")
    _add(study, folder, state=TrialState.PRUNED, strategy="full", lr=0.1, epochs=3,
         events={0: 5}, reason=PRUNE_REASON, spike=9.0)  # fmt: skip
    _add(study, folder, state=TrialState.FAIL, strategy="fixed", lr=0.1, epochs=1, events={},
         reason=FAIL_REASON, files="none")  # fmt: skip
    text = build_report(folder).read_text()
    assert "No complete trial yet" in text
    assert "No complete trial with a trainable-ratio record." in text
    assert PRUNE_REASON in text and FAIL_REASON in text


def test_explicit_storage_and_study_name(search: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{search / STUDY_FILE}"
    out = tmp_path / "elsewhere"
    page = build_report(tmp_path / "anything", out, study_storage=url, study_name="search", top=2)
    assert page == out / "index.html"
    assert "Trainable backbone of the best 2 complete trials" in page.read_text()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: tmp / "no-such-search", "no such search folder"),
        (lambda tmp: tmp, "holds no study.db"),
    ],
)
def test_a_folder_that_is_not_a_search_names_search(tmp_path: Path, make: Any, words: str) -> None:
    with pytest.raises(UserError) as info:
        build_report(make(tmp_path))
    (problem,) = info.value.problems
    assert problem.field == "SEARCH" and words in problem.message
    assert not (tmp_path / "report").exists()


def test_wrong_study_name_and_empty_study(tmp_path: Path) -> None:
    folder, _ = _search(tmp_path, "empty")
    with pytest.raises(UserError, match="no trials yet") as info:
        build_report(folder)
    assert info.value.problems[0].field == "SEARCH"
    with pytest.raises(UserError, match=r"study 'other' is not in .* \(it holds empty\)"):
        build_report(folder, study_name="other")


def test_objective_name_is_the_one_final_metric_matching_every_curve() -> None:
    def record(last: float, final: dict[str, float]) -> TrialRecord:
        return TrialRecord(0, "complete", "full", last, "", final, {0: 0.1, 1: last}, [], [])

    a = record(0.5, {"val_acc": 0.5, "best_val_acc": 0.5, "val_loss": 0.9})
    b = record(0.6, {"val_acc": 0.4, "best_val_acc": 0.6})
    assert objective_name([a, b]) == "best_val_acc"
    assert objective_name([a]) == "objective"  # ambiguous: say nothing wrong


def test_dashboard_command_is_local_by_default(search: Path) -> None:
    argv = dashboard_command(search)
    assert Path(argv[0]).name == "optuna-dashboard" and Path(argv[0]).is_file()
    assert argv[1] == f"sqlite:///{(search / STUDY_FILE).resolve()}"
    assert argv[2:] == ["--host", "127.0.0.1", "--port", "8080"]
    other = dashboard_command(search, host="0.0.0.0", port=9000, study_storage="sqlite:///x.db")
    assert other[1:] == ["sqlite:///x.db", "--host", "0.0.0.0", "--port", "9000"]
    with pytest.raises(UserError) as info:
        dashboard_command(search.parent / "missing")
    assert info.value.problems[0].field == "SEARCH"


def test_the_dashboard_command_serves_the_study_and_ends_its_child_when_stopped(
    search: Path, tmp_path: Path
) -> None:
    """Stopped as `kill` (SIGTERM) or Ctrl-C (SIGINT) stops it, the command leaves no
    optuna-dashboard running."""
    with contextlib.ExitStack() as stack:
        commands = {}
        for sig in (signal.SIGTERM, signal.SIGINT):  # both start at once: one wait, not two
            port, log = free_port(), tmp_path / f"dashboard-{sig.name}.log"
            argv = [sys.executable, "-m", "unfreeze_hpo.cli", "dashboard", str(search)]
            command = stack.enter_context(server([*argv, "--port", str(port)], log))
            commands[sig] = (command, port, log)
        for sig, (command, port, log) in commands.items():
            body = http_get(f"http://127.0.0.1:{port}/api/studies", command, log)
            names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
            assert names == ["search"]
            children = [pid for pid, f in process_stats().items() if int(f[1]) == command.pid]
            assert children, "optuna-dashboard runs as the command's child"
            command.send_signal(sig)  # to the command alone, as `kill` or a supervisor sends it
            command.wait(timeout=30)
            alive = {pid for pid, f in process_stats().items() if f[0] != "Z"}
            left = [pid for pid in children if pid in alive]
            assert left == [], f"{sig.name}: optuna-dashboard left running: {left}"


def test_run_dashboard_reports_a_port_in_use(search: Path) -> None:
    lines: list[str] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        with pytest.raises(UnfreezeHPOError, match="optuna-dashboard exited with code"):
            run_dashboard(search, port=port, log=lines.append)
    assert lines == [
        f"optuna-dashboard on http://127.0.0.1:{port}/ for "
        f"sqlite:///{(search / STUDY_FILE).resolve()} (Ctrl-C stops it)"
    ]


def test_a_storage_url_that_does_not_open_is_reported(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot open the storage") as info:
        build_report(tmp_path, study_storage="nosuchdb://host/x")
    assert info.value.problems[0].field == "SEARCH"
