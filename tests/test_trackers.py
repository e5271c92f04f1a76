"""``--log-to``: names and problems, and real Tune runs read back from each tracker's own files."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from unfreeze_hpo.search import trackers
from unfreeze_hpo.search.options import SearchConfig

EXPERIMENT = "demo"
EPOCHS = 4
UNFREEZE_EPOCH = 2  # the epoch whose report first counts the second block as trainable


def fake_trial(config: dict[str, Any]) -> None:
    """Reports shaped like the product's trainable: one block more from UNFREEZE_EPOCH on."""
    from ray import tune

    offset = 0.5 if config["strategy.name"] == "progressive" else 0.0
    for epoch in range(1, EPOCHS + 1):
        unfrozen = epoch >= UNFREEZE_EPOCH
        tune.report(
            {
                "epoch": float(epoch),
                "step": float(10 * epoch),
                "train_loss": 1.0 / epoch,
                "val_loss": 1.5 / epoch,
                "val_acc": offset + epoch / 10,
                "best_val_acc": offset + epoch / 10,
                "grad_norm": 2.0,
                "trainable_ratio": 0.5 if unfrozen else 0.25,
                "backbone_trainable_ratio": 0.4 if unfrozen else 0.0,
                "unfrozen_blocks": 2.0 if unfrozen else 1.0,
                "spike_event_epoch": float(UNFREEZE_EPOCH) if unfrozen else -1.0,
                "spike_event_block": 1.0 if unfrozen else -1.0,
                "lr/block.0": config["lr.head"] * epoch,
                "lr/blocks[1]": 0.001,  # a name MLflow refuses as it is
                "node_id": "f00d",
            }
        )


def run_search(folder: Path, names: tuple[str, ...]) -> list[Any]:
    """Two trials (one per strategy) with the trackers ``names``; their Ray results."""
    from ray import tune

    tuner = tune.Tuner(
        fake_trial,
        param_space={
            "strategy.name": tune.grid_search(["gradual", "progressive"]),
            "progressive.blocks_per_epoch": tune.choice([1]),
            "lr.head": tune.uniform(0.001, 0.01),
        },
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name="ray",
            storage_path=str(folder),
            callbacks=trackers.callbacks(names, experiment=EXPERIMENT, folder=folder),
            verbose=0,
        ),
    )
    results = tuner.fit()
    assert not results.errors
    return sorted(results, key=lambda r: r.config["strategy.name"])


def expected(result: Any) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per epoch of the series every tracker must show, from Ray's own record."""
    rows = result.metrics_dataframe.sort_values("training_iteration")
    series = {
        name: [
            (int(s), float(v)) for s, v in zip(rows["training_iteration"], rows[name], strict=True)
        ]
        for name in ("val_acc", "unfrozen_blocks", "spike_event_epoch", "lr/block.0")
    }
    # Tune's step is the report count, which here is the epoch.
    steps = range(1, EPOCHS + 1)
    assert series["unfrozen_blocks"] == [(e, 2.0 if e >= UNFREEZE_EPOCH else 1.0) for e in steps]
    return series


def assert_series(got: list[tuple[int, float]], points: list[tuple[int, float]], name: str) -> None:
    assert [step for step, _ in got] == [step for step, _ in points], name
    assert [value for _, value in got] == pytest.approx([value for _, value in points]), name


@pytest.fixture(scope="module", autouse=True)
def wandb_server() -> Iterator[list[str]]:
    """A W&B "server" on loopback that only counts who calls. Module-scoped and autouse, so it
    is in the environment before ray_session starts Ray, whose workers run W&B's loggers."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    calls: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            calls.append(str(peer))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    yield calls
    mp.undo()
    stop.set()
    thread.join()
    listener.close()


def names(log_to: str | None) -> tuple[str, ...]:
    return SearchConfig(log_to=log_to).trackers


def test_log_to_splits_dedupes_and_keeps_order() -> None:
    assert names("tensorboard, MLflow,tensorboard,,") == ("tensorboard", "mlflow")
    assert names("wandb,mlflow,wandb") == ("wandb", "mlflow")
    assert names("") == ()
    assert names(None) == ()


def test_unknown_name_is_one_problem_listing_the_known_ones() -> None:
    found = trackers.problems(names("tensorboard,comet,tensorboard"))
    assert len(found) == 1
    problem = found[0]
    assert (problem.field, problem.value) == ("log_to", "comet")
    assert all(name in problem.message for name in trackers.NAMES)
    assert "comet" in str(problem)
    with pytest.raises(ValueError, match="comet"):
        trackers.callbacks(("comet",), experiment=EXPERIMENT, folder="unused")


def test_installed_trackers_have_no_problems() -> None:
    assert trackers.problems(("tensorboard", "mlflow")) == []


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec then reports it missing
    [problem] = trackers.problems(("tensorboard", "mlflow"))
    assert (problem.field, problem.value) == ("log_to", "mlflow")
    assert "pip install 'unfreeze-hpo[trackers]'" in problem.fix
    assert "mlflow-skinny" in problem.fix


def test_mlflow_names_are_made_valid() -> None:
    assert trackers.mlflow_key("lr/block.0") == "lr/block.0"
    assert trackers.mlflow_key("lr/blocks[1]") == "lr/blocks_1_"
    assert trackers.mlflow_key("/lr//../x/") == "lr/_/x"
    metrics = trackers.mlflow_metrics(
        {"val_acc": 0.5, "done": True, "node_id": "f00d", "config": {"lr.head": 0.1}, "a": {"b": 1}}
    )
    assert metrics == {"val_acc": 0.5, "done": 1.0, "a/b": 1.0}


def test_mlflow_defaults_to_a_local_store_unless_the_environment_names_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    [local] = trackers.callbacks(("mlflow",), experiment=EXPERIMENT, folder=tmp_path)
    assert local.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert local.experiment_name == EXPERIMENT
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    [remote] = trackers.callbacks(("mlflow",), experiment=EXPERIMENT, folder=tmp_path)
    assert remote.tracking_uri is None  # mlflow reads the environment itself


@pytest.mark.full  # the search-level check is in test_search.py
def test_tensorboard_and_mlflow_record_every_trial(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient
    from ray import cloudpickle
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    results = run_search(tmp_path, ("tensorboard", "mlflow"))
    assert [r.config["strategy.name"] for r in results] == ["gradual", "progressive"]

    # TensorBoard: event files in each trial's own folder, metrics under ray/tune/.
    for result in results:
        events = EventAccumulator(result.path)
        events.Reload()
        for name, points in expected(result).items():
            got = [(e.step, e.value) for e in events.Scalars(f"ray/tune/{name}")]
            assert_series(got, points, name)
        hparams = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        ).session_start_info.hparams
        # Here every key is sampled; Ray's TBX logger writes only what the searcher chose.
        assert {k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()} == result.config

    # MLflow: one run per trial in the local store, params = config, one point per epoch.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len(results)
    for result in results:
        # Ray names each run after its trial: "<trainable>_<trial id>".
        [run] = [r for r in runs if r.info.run_name.endswith(result.metrics["trial_id"])]
        assert run.info.status == "FINISHED"
        assert run.data.params == {k: str(v) for k, v in result.config.items()}
        for name, points in expected(result).items():
            history = client.get_metric_history(run.info.run_id, name)
            assert_series(sorted((m.step, m.value) for m in history), points, name)
        assert "lr/blocks_1_" in run.data.metrics
        assert not any(k.startswith("config/") or k == "node_id" for k in run.data.metrics)

    # Ray pickles the callbacks into tuner.pkl; Tuner.restore takes them from there.
    state = cloudpickle.loads((tmp_path / "ray" / "tuner.pkl").read_bytes())
    restored = state["_run_config"].callbacks
    assert [type(c).__name__ for c in restored] == ["TBXLoggerCallback", "MLflowCallback"]


@pytest.mark.full
def test_wandb_runs_offline_into_the_search_folder(
    ray_session: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    wandb_server: list[str],
) -> None:
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # deleted, and restored to absent after the test
    results = run_search(tmp_path, ("wandb",))

    assert not wandb_server, f"W&B called its server: {wandb_server}"
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    trial_ids = sorted(r.metrics["trial_id"] for r in results)
    assert sorted(run.name.rsplit("-", 1)[-1] for run in runs) == trial_ids
    for result in results:
        [path] = (tmp_path / "wandb").glob(f"offline-run-*-{result.metrics['trial_id']}/*.wandb")
        records = [wandb_internal_pb2.Record.FromString(data) for data in _wandb_records(path)]
        [run] = [r.run for r in records if r.HasField("run")]
        assert run.project == EXPERIMENT
        assert _items(run.config.update) == {
            **result.config,
            "_wandb": {},
        }
        steps = [r.history.step.num for r in records if r.HasField("history")]
        history = [_items(r.history.item) for r in records if r.HasField("history")]
        for name, points in expected(result).items():
            assert_series(list(zip(steps, (h[name] for h in history), strict=True)), points, name)
        assert all("node_id" not in h for h in history)


def _items(items: Any) -> dict[str, Any]:
    """W&B's repeated key/value_json items as a dict (a key may come as ``nested_key``)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file: a 7-byte ":W&B" header, then LevelDB's log format
    (32 KiB blocks of chunks, each with a 7-byte header: crc, little-endian length, type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            yield record
            record = b""
