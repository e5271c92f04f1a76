"""A real search whose Optuna study lives in PostgreSQL (``--study-storage postgresql://...``),
read back with ``trials`` and ``best`` from the URL that ``search.yaml`` records.

The server: ``UNFREEZE_HPO_TEST_POSTGRES`` when set (CI starts one with ``scripts/ci-postgres``),
else a throwaway one started here with that script when PostgreSQL is installed, else the module
is skipped; with ``UNFREEZE_HPO_REQUIRE_POSTGRES=1`` (CI) it fails instead. Each run writes to a
database of its own, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import optuna
import pytest
import sqlalchemy
import yaml
from support import TINY_BASE, run, write

from unfreeze_hpo.search.options import STUDY_FILE

State = optuna.trial.TrialState
TERMINAL = {State.COMPLETE, State.PRUNED, State.FAIL}

SCRIPT = Path(__file__).parents[1] / "scripts" / "ci-postgres"
NUM_TRIALS = 3
SPACE = """\
strategy: [early_gradual, frozen]
common:
  optimizer.lr: {type: float, low: 1e-3, high: 3e-2, log: true}
"""


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("UNFREEZE_HPO_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"UNFREEZE_HPO_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    """A URL of a running server: the environment's, or a throwaway one started here."""
    if url := os.environ.get("UNFREEZE_HPO_TEST_POSTGRES"):
        yield url
        return
    pg_root = os.environ.get("UNFREEZE_HPO_PG_ROOT", "/usr/lib/postgresql")
    if not glob.glob(f"{pg_root}/*/bin/initdb"):
        unavailable(
            f"no PostgreSQL server: set UNFREEZE_HPO_TEST_POSTGRES, or install one "
            f"(no initdb under {pg_root}; `scripts/ci-postgres start` installs it as root)"
        )
    # Under the system temp dir, not pytest's: the postgres user must reach it.
    env = {**os.environ, "UNFREEZE_HPO_PG_DIR": tempfile.mkdtemp(prefix="unfreeze-hpo-pg-")}
    try:
        started = subprocess.run(
            ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120
        )
        if started.returncode != 0:
            unavailable(f"`scripts/ci-postgres start` failed:\n{started.stderr}")
        yield started.stdout.strip().rpartition("=")[2]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the server; dropped afterwards."""
    name = f"unfreeze_hpo_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as exc:
        admin.dispose()
        unavailable(f"cannot reach PostgreSQL at {postgres_server}: {exc}")
    try:
        yield with_database(postgres_server, name)
    finally:
        with admin.connect() as conn:  # FORCE: this process's Optuna engines are still open
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def searched(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """`unfreeze-hpo search` of 3 trials (2 epochs each) with the study in PostgreSQL."""
    folder = tmp_path_factory.mktemp("postgres")
    short = TINY_BASE.replace("epochs: 4", "epochs: 2")
    assert "epochs: 2" in short, "TINY_BASE changed: shorten it here again"
    base = write(folder / "base.yaml", short)
    space = write(folder / "space.yaml", SPACE)
    command = [
        sys.executable,
        "-m",
        "unfreeze_hpo.cli",
        "search",
        *("--name", "pgdemo", "--storage-path", str(folder / "runs")),
        *("--base", str(base), "--space", str(space), "--num-trials", str(NUM_TRIALS)),
        *("--max-concurrent", "2", "--cpus-per-trial", "1", "--scheduler", "fifo"),
        *("--no-preflight", "--study-storage", postgres_url),
    ]
    # Its own session: a timeout must not leave the search's Ray processes behind.
    proc = subprocess.Popen(
        command,
        cwd=folder,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    return SimpleNamespace(folder=folder / "runs" / "pgdemo", url=postgres_url, output=result)


def test_search_keeps_its_study_in_postgres(searched: SimpleNamespace) -> None:
    assert not (searched.folder / STUDY_FILE).exists(), "the study went to SQLite"
    trials = optuna.load_study(study_name="pgdemo", storage=searched.url).get_trials()
    assert len(trials) == NUM_TRIALS
    assert {t.state for t in trials} <= TERMINAL, [t.state for t in trials]
    assert any(t.state == State.COMPLETE for t in trials)
    assert searched.url in searched.output.stdout  # the summary says where the study is
    record = yaml.safe_load((searched.folder / "search.yaml").read_text(encoding="utf-8"))
    assert record["search"]["study_storage"] == searched.url


def test_trials_and_best_read_the_recorded_storage(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "trials", str(searched.folder))  # no --study-storage
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"search pgdemo: {NUM_TRIALS} trials")
    numbers = [line.split()[0] for line in lines[3:]]  # after the summary and column names
    assert numbers == [str(n) for n in range(NUM_TRIALS)], out

    code, out, err = run(capsys, "best", str(searched.folder))
    assert code == 0, err
    assert out.startswith("search pgdemo: best completed trials by last3_mean_val_acc")
    assert len(out.splitlines()) == 4, out  # summary (two lines), column names, the best trial


def missing_database(searched: SimpleNamespace) -> str:
    return with_database(searched.url, "no_such_db")


def test_missing_database_is_a_user_error(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    url = missing_database(searched)
    code, out, err = run(capsys, "trials", str(searched.folder), "--study-storage", url)
    assert code == 2 and out == ""
    assert "Traceback" not in err
    assert f"SEARCH: cannot open the storage {url}" in err
    assert '"no_such_db" does not exist' in err and "fix: check --study-storage" in err


def test_missing_database_is_reported_on_one_line(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    url = missing_database(searched)
    code, _, err = run(capsys, "trials", str(searched.folder), "--study-storage", url)
    assert code == 2
    header, *problems = err.strip().splitlines()
    assert header == "error: invalid input"
    assert len(problems) == 1, err
    assert url in problems[0] and "fix: check --study-storage" in problems[0]


def test_a_search_whose_database_is_missing_exits_2_before_writing_anything(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = missing_database(searched)
    argv = ["search", "--storage-path", str(tmp_path / "runs"), "--study-storage", url]
    code, _, err = run(capsys, *argv, "--no-preflight")
    assert code == 2
    assert "--study-storage:" in err and '"no_such_db" does not exist' in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # no search folder, no Ray started
