"""Searches on object storage: ``--storage-path s3://...`` against a real S3 endpoint on localhost
(moto's server), read back with ``trials``/``best``/``report``; and the checks on storage input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from moto.server import ThreadedMotoServer
from support import TINY_BASE, run

from unfreeze_hpo import storage
from unfreeze_hpo.cli import main
from unfreeze_hpo.search.inputs import SEARCH_FILE

BUCKET = "runs"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
SPACE = """\
strategy: [early_gradual, frozen]
common:
  optimizer.lr: {type: float, low: 1e-3, high: 3e-2, log: true}
"""


def keys(s3: SimpleNamespace, prefix: str = "") -> list[str]:
    listing = s3.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


@pytest.fixture(scope="module")
def s3() -> Iterator[SimpleNamespace]:
    """An S3 endpoint on 127.0.0.1 with an empty bucket; credentials in the environment before
    Ray starts, so trial workers inherit them as they would on a cluster node."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    yield SimpleNamespace(client=client, query=query, uri=f"s3://{BUCKET}/searches?{query}")
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def searched(
    s3: SimpleNamespace, ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("s3search")
    (folder / "base.yaml").write_text(TINY_BASE.replace("epochs: 4", "epochs: 2"))
    (folder / "space.yaml").write_text(SPACE)
    study = f"sqlite:///{folder / 'study.db'}"
    argv = [
        "search",
        "--name", "ons3",
        "--storage-path", s3.uri,
        "--study-storage", study,
        "--base", str(folder / "base.yaml"),
        "--space", str(folder / "space.yaml"),
        "--num-trials", "3",
        "--max-concurrent", "2",
        "--cpus-per-trial", "1",
        "--scheduler", "fifo",
        "--no-preflight",
        "--no-recipes",
    ]  # fmt: skip
    code = main(argv)
    location = storage.join(s3.uri, "ons3")
    return SimpleNamespace(code=code, folder=folder, location=location, argv=argv, study=study)


# ---------------------------------------------------------------------------------------------
# A search on S3


def test_a_search_writes_its_record_and_ray_experiment_to_the_bucket(
    searched: SimpleNamespace, s3: SimpleNamespace
) -> None:
    assert searched.code == 0
    written = keys(s3, "searches/ons3/")
    assert f"searches/ons3/{SEARCH_FILE}" in written
    assert any(k.startswith("searches/ons3/ray/experiment_state") for k in written)
    results = [k for k in written if k.endswith("/result.json")]
    assert len(results) == 3, written
    # Trials carry their metrics in their checkpoints, so curves survive on the bucket.
    assert any(k.endswith("/metrics.jsonl") and "/checkpoint_" in k for k in written)
    assert not (Path.cwd() / "searches").exists()  # nothing of it landed locally instead


def test_trials_and_best_read_the_search_from_its_uri(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "trials", searched.location, "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 3
    assert {r["state"] for r in rows} <= {"complete", "pruned", "failed"}
    assert any(r["state"] == "complete" for r in rows)

    code, out, err = run(capsys, "best", searched.location)
    assert code == 0, err
    assert "last3_mean_val_acc" in out


def test_report_of_a_search_on_s3_draws_the_loss_curves_from_its_checkpoints(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "report", searched.location, "--out", str(tmp_path))
    assert code == 0, err
    page = (tmp_path / "index.html").read_text()
    assert "No trial's metrics.jsonl was found" not in page


def test_running_the_same_search_again_resumes_it_from_the_bucket(
    searched: SimpleNamespace, capsys: pytest.CaptureFixture[str], s3: SimpleNamespace
) -> None:
    before = keys(s3, "searches/ons3/")
    code, out, err = run(capsys, *searched.argv)
    assert code == 0, err
    assert "resuming the search" in out
    assert "trials: " in out
    after = keys(s3, "searches/ons3/")
    assert len([k for k in after if k.endswith("/result.json")]) == 3  # no new trial
    assert set(before) <= set(after)


def test_a_uri_that_is_not_a_search_is_a_user_error(
    searched: SimpleNamespace, s3: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    location = f"s3://{BUCKET}/searches/nothing-here?{s3.query}"
    code, _, err = run(capsys, "trials", location)
    assert code == 2
    assert "SEARCH" in err and SEARCH_FILE in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Bad storage input: one message per problem, nothing written


def test_a_uri_storage_path_needs_a_study_database(
    s3: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["search", "--name", "nodb", "--storage-path", s3.uri, "--no-preflight"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "--study-storage" in err and "postgresql://" in err
    assert keys(s3, "searches/nodb/") == []


def test_bad_storage_path_and_study_storage_are_reported_together(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [
        "search",
        "--storage-path", "s4://bucket/runs",
        "--study-storage", "mysql://user:hunter2@db.example/optuna",
    ]  # fmt: skip
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.splitlines()
    assert any(line.strip().startswith("--storage-path:") and "s4://" in line for line in lines)
    study_line = next(line for line in lines if line.strip().startswith("--study-storage:"))
    assert "driver is not installed" in study_line and "pip install" in study_line
    assert "hunter2" not in err  # the password is masked
    assert "Traceback" not in err


def test_an_unreachable_bucket_is_a_user_error_naming_storage_path(
    s3: SimpleNamespace, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    location = f"s3://no-such-bucket/runs?{s3.query}"
    argv = [
        "search",
        "--storage-path", location,
        "--study-storage", f"sqlite:///{tmp_path / 'study.db'}",
        "--no-preflight",
    ]  # fmt: skip
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "--storage-path" in err and "no-such-bucket" in err
    assert not (tmp_path / "study.db").exists()


def test_join_keeps_the_uri_query_and_resolves_local_paths(tmp_path: Path) -> None:
    uri = "s3://b/runs?endpoint_override=h:1&scheme=http"
    assert (
        storage.join(uri, "demo", "ray") == "s3://b/runs/demo/ray?endpoint_override=h:1&scheme=http"
    )
    assert storage.name_of(storage.join(uri, "demo")) == "demo"
    assert storage.join(str(tmp_path), "demo") == str(tmp_path / "demo")
    assert storage.resolve("~/runs") == str(Path.home() / "runs")
