"""A search on a real two-node Ray cluster on localhost, submitted through the Ray Jobs API with
``unfreeze-hpo submit``; the resource check; and what ``submit`` refuses before it uploads.

The two nodes are separate ``ray start --block`` processes, each in its own session. The head,
where the job's driver runs, offers no CPU to trials, so every trial must be placed on the worker
node (two CPUs): where trials run is decided by the cluster's resources, not by how fast a node
frees its CPU. The nodes are stopped by their own process ids (never ``ray stop``, which would
end every Ray on the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from support import TINY_BASE, reap_session

from unfreeze_hpo.cli import main, searching
from unfreeze_hpo.cluster import jobs
from unfreeze_hpo.errors import ConfigError
from unfreeze_hpo.search.driver import check_resources
from unfreeze_hpo.search.options import SearchConfig

RAY = Path(sys.executable).parent / "ray"
ROOT = Path(__file__).resolve().parents[1]
SPACE = """\
strategy: [early_gradual, frozen]
common:
  optimizer.lr: {type: float, low: 1e-3, high: 3e-2, log: true}
"""
TRIALS = 4


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports(ports: list[int]) -> list[str]:
    """The ports one node listens on, all distinct from the other node's."""
    names = [
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    ]
    return [f"--{name}={port}" for name, port in zip(names, ports, strict=False)]


def start_node(
    args: list[str], cpus: int, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(RAY), "start", "--block", f"--num-cpus={cpus}", "--disable-usage-stats", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout_s:.0f}s (last error: {last})")


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    """Head and worker as separate processes; the Jobs server on 127.0.0.1 only."""
    temp = Path(tempfile.mkdtemp(prefix="uh-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"  # `unfreeze-hpo` for the job
    env["OMP_NUM_THREADS"] = "1"
    # Token auth, as the cluster templates set it: nodes, driver and clients share the token.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    gcs, dashboard, client_port, *ports = free_ports(15)
    head = start_node(
        [
            "--head",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client_port}",
            f"--temp-dir={temp}",
            *node_ports(ports[:6]),
        ],
        0,  # the driver's node: no trial fits here
        env,
        temp / "head.log",
    )
    address = f"http://127.0.0.1:{dashboard}"
    nodes = [head]
    try:
        wait_for(
            lambda: cli(env, "job", "list", "--address", address).returncode == 0,
            90,
            "the head's Jobs API",
        )
        worker = start_node(
            [
                f"--address=127.0.0.1:{gcs}",
                "--node-ip-address=127.0.0.1",
                # Its own temp dir, as on a second machine: nodes sharing one would delete
                # each other's copy of the job's working dir when their trials end.
                f"--temp-dir={temp / 'w'}",
                *node_ports(ports[6:]),
            ],
            2,
            env,
            temp / "worker.log",
        )
        nodes.append(worker)
        yield SimpleNamespace(address=address, gcs=f"127.0.0.1:{gcs}", temp=temp, env=env)
    finally:
        for node in nodes:  # SIGTERM: `ray start --block` stops the processes it started
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        leftovers = [reap_session(node.pid, 10) for node in nodes]
        for log in ("head.log", "worker.log"):
            print(f"--- {log}", (temp / log).read_text(errors="replace")[-2000:])
        shutil.rmtree(temp, ignore_errors=True)
        assert not any(leftovers), f"processes left after the nodes stopped: {leftovers}"


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, with the cluster's token in its environment."""
    return subprocess.run(
        [str(RAY.parent / "unfreeze-hpo"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def alive_node_ids(cluster: SimpleNamespace) -> dict[str, str]:
    """node id -> "head" or "worker", for the nodes alive now."""
    code = (
        "import ray, json; ray.init(address='auto', log_to_driver=False); "
        "print(json.dumps({n['NodeID']: 'node:__internal_head__' in n['Resources'] "
        "for n in ray.nodes() if n['Alive']}))"
    )
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    return {node: "head" if is_head else "worker" for node, is_head in nodes.items()}


@pytest.fixture(scope="module")
def submitted(
    cluster: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    project = tmp_path_factory.mktemp("project")  # what the user uploads: their YAMLs
    (project / "base.yaml").write_text(TINY_BASE.replace("epochs: 4", "epochs: 2"))
    (project / "space.yaml").write_text(SPACE)
    runs = tmp_path_factory.mktemp("shared") / "runs"  # "shared storage": both nodes see it
    wait_for(lambda: len(alive_node_ids(cluster)) == 2, 90, "the second node")
    done = cli(
        cluster.env,
        "--debug",
        "submit",
        "--address", cluster.address,
        "--working-dir", str(project),
        "--job-id", "two-node-search",
        "--name", "twonode",
        "--storage-path", str(runs),
        "--base", "base.yaml",
        "--space", "space.yaml",
        "--num-trials", str(TRIALS),
        "--max-concurrent", "2",
        "--cpus-per-trial", "1",
        "--scheduler", "fifo",
        "--no-preflight",
        "--no-recipes",
        "--follow",
    )  # fmt: skip
    return SimpleNamespace(done=done, folder=runs / "twonode", nodes=alive_node_ids(cluster))


def test_a_submitted_search_runs_its_trials_on_the_worker_node(
    submitted: SimpleNamespace,
) -> None:
    assert submitted.done.returncode == 0, submitted.done.stdout[-3000:] + submitted.done.stderr
    assert "job two-node-search: SUCCEEDED" in submitted.done.stdout
    assert "cluster: 2 node(s) with 2 CPUs" in submitted.done.stdout  # the resource check
    # The job ran the unfreeze_hpo it shipped (Ray's py_modules), not one installed on the nodes.
    (code,) = re.findall(r"unfreeze-hpo \S+ from (\S+), Ray", submitted.done.stdout)
    assert "runtime_resources" in code and not Path(code).is_relative_to(ROOT), code
    study = optuna.load_study(
        study_name="twonode", storage=f"sqlite:///{submitted.folder / 'study.db'}"
    )
    trials = study.get_trials()
    assert len(trials) == TRIALS  # every trial accounted for, once
    assert len({t.user_attrs["ray_trial_id"] for t in trials}) == TRIALS
    assert all(t.state.is_finished() for t in trials)
    # The driver ran on the head; each trial was placed on, and recorded with, the node that
    # had the CPUs for it.
    assert sorted(submitted.nodes.values()) == ["head", "worker"]
    ran_on = {submitted.nodes.get(t.user_attrs["node_id"]) for t in trials}
    assert ran_on == {"worker"}, ([t.user_attrs["node_id"] for t in trials], submitted.nodes)


def test_the_results_are_queryable_after_the_job(
    submitted: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["trials", str(submitted.folder), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 1 + TRIALS
    assert main(["best", str(submitted.folder)]) == 0


def test_job_status_logs_and_list(submitted: SimpleNamespace, cluster: SimpleNamespace) -> None:
    status = cli(cluster.env, "job", "status", "two-node-search", "--address", cluster.address)
    assert status.returncode == 0, status.stderr
    assert "SUCCEEDED" in status.stdout and str(submitted.folder) in status.stdout
    logs = cli(cluster.env, "job", "logs", "two-node-search", "--address", cluster.address)
    assert logs.returncode == 0, logs.stderr
    assert "best trial #" in logs.stdout  # the search's own summary line
    listed = cli(cluster.env, "job", "list", "--address", cluster.address)
    assert listed.returncode == 0 and "two-node-search" in listed.stdout


def test_job_stop_ends_a_running_search(
    submitted: SimpleNamespace, cluster: SimpleNamespace, tmp_path: Path
) -> None:
    (tmp_path / "base.yaml").write_text(TINY_BASE.replace("epochs: 4", "epochs: 50"))
    argv = [
        "submit", "--address", cluster.address, "--working-dir", str(tmp_path),
        "--job-id", "to-stop", "--name", "long", "--storage-path", str(tmp_path / "runs"),
        "--base", "base.yaml", "--num-trials", "2", "--no-preflight", "--no-recipes",
    ]  # fmt: skip
    done = cli(cluster.env, *argv)
    assert done.returncode == 0, done.stderr
    assert "unfreeze-hpo job stop to-stop" in done.stdout

    def running() -> bool:
        status = cli(cluster.env, "job", "status", "to-stop", "--address", cluster.address)
        return "RUNNING" in status.stdout

    wait_for(running, 60, "the job")
    stopped = cli(cluster.env, "job", "stop", "to-stop", "--address", cluster.address)
    assert stopped.returncode == 0, stopped.stderr
    assert "STOPPED" in stopped.stdout


def test_an_unknown_job_is_a_user_error(cluster: SimpleNamespace) -> None:
    done = cli(cluster.env, "job", "status", "no-such-job", "--address", cluster.address)
    assert done.returncode == 2
    assert "JOB" in done.stderr and "no-such-job" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Checked before anything is uploaded or started


def test_no_jobs_server_is_a_user_error_naming_the_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (port,) = free_ports(1)
    code = main(["job", "list", "--address", f"http://127.0.0.1:{port}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--address" in err and str(port) in err and "ssh -L" in err


def test_submit_refuses_paths_that_only_exist_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "base.yaml").write_text(
        TINY_BASE.replace("kind: synthetic_video", "kind: video_folder, root: clips")
    )
    argv = ["submit", "--working-dir", str(tmp_path), "--base", "base.yaml", "--num-trials", "0"]
    code = main([*argv, "--weights-cache", "weights"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--storage-path: " in err and "relative" in err  # default unfreeze-runs
    assert "--weights-cache: relative" in err and "/nfs/weights" in err
    assert "data.root: " in err and "absolute path" in err
    assert "--num-trials: " in err


def test_submit_refuses_what_search_refuses_in_the_space(tmp_path: Path) -> None:
    """The same checks as ``search``: a space naming more blocks than the model has, and a space
    other than the one the search being resumed started with."""
    from unfreeze_hpo.search.inputs import load_inputs, write_inputs

    (tmp_path / "base.yaml").write_text(TINY_BASE)  # resnet3d_tiny: 5 blocks
    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "big.yaml").write_text(
        "strategy: fixed\nstrategies:\n  fixed:\n    phases: [[0, 0], [1, 9]]\n"
    )
    values = {"name": "s", "base": "base.yaml", "storage_path": str(tmp_path / "runs")}
    with pytest.raises(ConfigError) as caught:
        jobs.prepare({**values, "space": "big.yaml"}, tmp_path)
    (problem,) = caught.value.problems
    assert problem.field == "strategies.fixed.phases[1]" and "the model has 5" in problem.message

    started = SearchConfig(
        name="s", storage_path=str(tmp_path / "runs"), base=str(tmp_path / "base.yaml")
    )
    (tmp_path / "runs" / "s").mkdir(parents=True)
    write_inputs(started, *load_inputs(started))  # a search begun on the default space
    with pytest.raises(ConfigError) as caught:
        jobs.prepare({**values, "space": "space.yaml"}, tmp_path)
    assert caught.value.problems
    assert all("search 's' started with" in p.message for p in caught.value.problems), [
        p.message for p in caught.value.problems
    ]


def search_values_of(argv: list[str]) -> dict[str, Any]:
    """The options ``unfreeze-hpo search argv`` gives, as the command reads them (--address
    left out: a job's is the cluster's own)."""
    parser = argparse.ArgumentParser()
    searching.search_args(parser)
    values = searching.given_search_values(parser.parse_args(argv))
    assert values.pop("address") == "auto"
    return values


def test_the_entrypoint_carries_every_given_option(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(TINY_BASE)
    values = {
        "name": "x",
        "storage_path": "/nfs/runs",
        "base": "base.yaml",
        "gpus_per_trial": "0.5",
        "preflight": False,
        "study_storage": "sqlite:////nfs/runs/x.db",
        "asha": {"grace_period": "2"},
        "pruning": {"require_recovery": False, "max_val_drop": "0.1"},
        "log_to": "mlflow",
        "checkpoint_every": "3",
        "checkpoints_kept": "4",
        "weights_cache": "/nfs/weights",
    }
    submission = jobs.prepare(values, tmp_path)
    # In SearchConfig's order, nested settings by the flags `search` takes (search_options).
    assert submission.entrypoint == (
        "python -m unfreeze_hpo.cli search --name x --storage-path /nfs/runs --base base.yaml "
        "--gpus-per-trial 0.5 --grace-period 2 --no-prune-unrecovered --max-val-drop 0.1 "
        "--study-storage sqlite:////nfs/runs/x.db --no-preflight --checkpoint-every 3 "
        "--checkpoints-kept 4 --weights-cache /nfs/weights --log-to mlflow --address auto"
    )
    # What the job runs is what was given: its arguments parse back to the same options.
    argv = shlex.split(submission.entrypoint)[4:]
    assert jobs.prepare(search_values_of(argv), tmp_path).entrypoint == submission.entrypoint


@pytest.mark.parametrize(
    ("cpus", "gpus", "field"),
    [(1, 1, "gpus_per_trial"), (4, 0, "cpus_per_trial"), (1, 0.75, "gpus_per_trial")],
)
def test_trials_no_node_fits_are_refused_before_the_search(
    cpus: float, gpus: float, field: str
) -> None:
    nodes = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 0.5}]
    cfg = SearchConfig(cpus_per_trial=cpus, gpus_per_trial=gpus)
    with pytest.raises(ConfigError) as caught:
        check_resources(cfg, nodes)
    (problem,) = caught.value.problems
    assert problem.field == field
    assert "no node of the cluster fits one trial" in problem.message
    assert "2 CPU/0.5 GPU" in problem.message


def test_fractional_gpus_pack_trials_onto_one_gpu() -> None:
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0}]
    cfg = SearchConfig(cpus_per_trial=1, gpus_per_trial=0.5, max_concurrent=4)
    line = check_resources(cfg, nodes)
    assert "2 trial(s) fit at once" in line and "fewer than --max-concurrent 4" in line
    packed = check_resources(dataclasses.replace(cfg, gpus_per_trial=0.25), nodes)
    assert "4 trial(s) fit at once" in packed and "fewer" not in packed


def test_a_trial_of_several_workers_needs_that_many_workers_at_once() -> None:
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 2.0}]
    cfg = SearchConfig(workers_per_trial=2, cpus_per_worker=1, gpus_per_worker=1, max_concurrent=2)
    line = check_resources(cfg, nodes)  # 3 one-GPU workers in all: one trial of 2 at a time
    assert "1 trial(s) fit at once (2 workers of 1 CPU and 1 GPU each)" in line
    assert "fewer than --max-concurrent 2" in line
    with pytest.raises(ConfigError) as caught:
        check_resources(dataclasses.replace(cfg, workers_per_trial=4), nodes)
    (problem,) = caught.value.problems
    assert problem.field == "workers_per_trial" and problem.value == 4
    assert "holds 3 workers of 1 CPU and 1 GPU at once, fewer than one trial's 4" in problem.message
    assert "--workers-per-trial 3 or fewer" in problem.fix
    # A worker no node can hold names the per-worker option that asked for it.
    with pytest.raises(ConfigError) as caught:
        check_resources(dataclasses.replace(cfg, gpus_per_worker=4), nodes)
    (problem,) = caught.value.problems
    assert problem.field == "gpus_per_worker"
    assert "no node of the cluster fits one worker of a trial" in problem.message


def test_per_worker_resources_default_to_the_per_trial_ones() -> None:
    assert SearchConfig(cpus_per_trial=3, gpus_per_trial=0.5).worker_resources == (3, 0.5)
    both = SearchConfig(cpus_per_trial=3, cpus_per_worker=2, gpus_per_worker=1)
    assert both.worker_resources == (2, 1)
