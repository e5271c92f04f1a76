"""A worker node lost mid-trial: the trial is retried from its checkpoint on a node that is left,
and nothing is lost or recorded twice.

The cluster is ``ray.cluster_utils.Cluster``: every node is a set of processes of this test's, on
this machine, added and removed from the test itself. The search is the ``search`` command in a
session of its own, connected with ``--address``. ``tests/test_load.py`` uses the same helpers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import optuna
import pytest
import ray
import ray._common.utils
import ray._private.utils
import yaml
from nothing_lost import assert_nothing_lost
from ray._private import ray_constants
from ray._private.node import Node
from ray.cluster_utils import Cluster
from support import process_stats, reap_session, write

from unfreeze_hpo import faults
from unfreeze_hpo.search.options import STUDY_FILE

# Epochs of one step on 2 frames of 16x16: about the smallest trial that trains and validates.
TINY_BASE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny", "pretrain_on_source": False},
    "data": {
        "kind": "synthetic_video",
        "train_samples": 16,
        "val_samples": 8,
        "frames": 2,
        "size": 16,
    },
    "epochs": 2,
    "batch_size": 16,
    "signals": {"baseline_steps": 1, "window_steps": 1},
    "schedule": {"kind": "constant"},
}
SPACE = """\
strategy: fixed
strategies:
  fixed:
    phases: [[0, 0], [{unfreeze}, 5]]
common:
  optimizer.lr: {{type: float, low: 1e-3, high: 3e-2, log: true}}
"""


# ---------------------------------------------------------------------------------------------
# A local cluster whose every process is accounted for


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    return {pid: int(fields[1]) for pid, fields in process_stats().items() if fields[0] != "Z"}


def descendants(root: int) -> set[int]:
    """The live processes below ``root``: a node's raylet has its agents and workers there."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def reap(pids: set[int], grace_s: float) -> set[int]:
    """Wait up to grace_s for ``pids`` to end, then SIGKILL those left; the leftovers."""
    deadline = time.monotonic() + grace_s
    while (left := pids & set(_parents())) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


class LocalCluster:
    """A head and one-CPU worker nodes, all processes of this test (see ``local_cluster``)."""

    def __init__(self, cluster: Cluster, workers: list[Node], before: set[int]):
        self.cluster, self.workers = cluster, workers
        self._before = before
        self.started: set[int] = set()  # every process seen, so removed nodes' count too

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def node_ids(self) -> set[str]:
        return {node.node_id for node in self.cluster.list_all_nodes()}

    def processes(self) -> set[int]:
        self.started |= descendants(os.getpid()) - self._before
        return self.started

    def remove(self, node: Node, *, graceful: bool) -> None:
        self.processes()  # its workers die with it: note them while they are there
        if not graceful:
            # A machine that dies takes its processes with it at once. Killing only the raylet
            # leaves its workers running until Ray notices the node is gone, time enough for a
            # short trial to finish there.
            raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
            for pid in descendants(raylet):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=graceful)
        self.workers.remove(node)

    def trials_on(self, node: Node) -> set[str]:
        """The Ray trial folders (names) whose trial runs on ``node`` now: each running trial
        holds its ``work/train.log`` open in an actor process under the node's raylet."""
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        names = set()
        for pid in descendants(raylet):
            if not command_line(pid).startswith("ray::ImplicitFunc"):
                continue
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = Path(os.readlink(fd))
                        if target.name == "train.log":
                            names.add(target.parents[1].name)
        return names


@contextlib.contextmanager
def local_cluster(*, head_cpus: int, workers: int) -> Iterator[LocalCluster]:
    """A head with ``head_cpus`` CPUs and ``workers`` one-CPU worker nodes on this machine. When
    the block ends every process the cluster started is gone (leftovers are killed, and fail the
    test); none of them is found by any ``ray.init()`` on the machine meanwhile."""
    temp = Path(tempfile.mkdtemp(prefix="uh-", dir="/tmp"))  # short: Ray's socket paths
    before = descendants(os.getpid())  # e.g. an in-process Ray of another test: not ours
    # Cluster writes the head's address to /tmp/ray/ray_current_cluster, which every ray.init()
    # on the machine without an address reads, and deletes that file at shutdown: the other
    # test runs on this machine must neither connect here nor lose their own cluster's file.
    no_op = mock.Mock(return_value=None)
    with (
        mock.patch.object(ray._private.utils, "write_ray_address", no_op),
        mock.patch.object(ray._common.utils, "reset_ray_address", no_op),
    ):
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": head_cpus,
                "include_dashboard": False,
                "temp_dir": str(temp),
            },
        )
        local = LocalCluster(cluster, [], before)
        try:
            local.workers += [
                cluster.add_node(num_cpus=1, temp_dir=str(temp)) for _ in range(workers)
            ]
            cluster.wait_for_nodes()
            yield local
        finally:
            started = local.processes()
            cluster.shutdown()
            left = reap(started, grace_s=30)
            shutil.rmtree(temp, ignore_errors=True)
    assert not left, {pid: command_line(pid) for pid in left}


# ---------------------------------------------------------------------------------------------
# The search command against it


def search_argv(
    tmp_path: Path, name: str, base: dict[str, Any], *, unfreeze: int = 1, **options: Any
) -> list[str]:
    """``search`` arguments for the trial ``base``; ``options`` are --option values (True: a bare
    flag)."""
    argv = [
        *("--name", name, "--storage-path", str(tmp_path / "runs")),
        *("--base", str(write(tmp_path / f"{name}-base.yaml", yaml.safe_dump(base)))),
        *("--space", str(write(tmp_path / f"{name}-space.yaml", SPACE.format(unfreeze=unfreeze)))),
        *("--scheduler", "fifo", "--no-preflight", "--no-recipes"),
    ]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


@contextlib.contextmanager
def search_process(argv: list[str], log: Path, timeout_s: float) -> Iterator[subprocess.Popen]:
    """The search command in a session of its own; when the block ends it has exited (within
    ``timeout_s``, else it is killed and the test fails) and left no process behind."""
    # This environment as it is: an in-process ray.init() earlier in the session sets
    # RAY_AUTH_MODE=token here, which the nodes inherited, so the search must send the token too.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unfreeze_hpo.cli", "search", *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        left = reap_session(proc.pid, grace_s=10)
    assert not left, f"processes left by the search: {left}"
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]


def study_trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / STUDY_FILE}")
    return study.get_trials()


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f}s\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    return found


# ---------------------------------------------------------------------------------------------
# A node lost mid-trial

EPOCHS = 8
UNFREEZE = 4  # after the node is lost: the resumed trial must recompute its schedule
HOLD = 2  # the epoch at which the victim's trial waits for its node to go


@pytest.mark.parametrize(
    "graceful",
    [
        pytest.param(False, id="killed"),  # the machine died: SIGKILL, no drain
        pytest.param(True, id="terminated", marks=pytest.mark.full),  # SIGTERM, as on preemption
    ],
)
def test_a_trial_on_a_removed_node_resumes_from_its_checkpoint_on_another(
    tmp_path: Path, graceful: bool, record_property: Callable[[str, object], None]
) -> None:
    started = time.perf_counter()
    # The first trial to finish epoch HOLD waits there: it is mid-run, by construction, when
    # its node goes. Its retry on another node does not wait again (a fault fires once a trial).
    fault_log = tmp_path / "faults.jsonl"
    hold = {"kind": "hold", "epoch": HOLD, "trials": 1, "release": str(tmp_path / "release")}
    base = {
        **TINY_BASE,
        "epochs": EPOCHS,
        "data": {**TINY_BASE["data"], "train_samples": 64},
        "faults": {"log": str(fault_log), "inject": [hold]},
    }
    argv = search_argv(
        tmp_path,
        "lost-node",
        base,
        unfreeze=UNFREEZE,
        num_trials=2,
        max_concurrent=2,
        cpus_per_trial=1,
        max_failures=2,
        # Both trials must complete: this test is about the node, not the pruner.
        no_prune_unrecovered=True,
        prune_loss_ratio=1e9,
        prune_grad_ratio=1e9,
    )
    folder = tmp_path / "runs" / "lost-node"
    log = tmp_path / "search.log"
    with (
        local_cluster(head_cpus=0, workers=2) as cluster,  # trials run on the workers only
        search_process([*argv, "--address", cluster.address], log, timeout_s=300) as proc,
    ):

        def held() -> str | None:
            assert proc.poll() is None, log.read_text(errors="replace")
            entries = faults.read_log(fault_log)
            return str(entries[0]["trial_id"]) if entries else None

        trial_id = wait_for(held, 180, f"a trial at epoch {HOLD}", log)
        victim = wait_for(
            lambda: next(
                (n for n in cluster.workers if any(trial_id in t for t in cluster.trials_on(n))),
                None,
            ),
            60,
            f"the node of trial {trial_id}",
            log,
        )
        cluster.remove(victim, graceful=graceful)
        removed_at = time.perf_counter() - started

    trials = {t.user_attrs["ray_trial_id"]: t for t in study_trials(folder)}
    lost = trials.pop(trial_id)
    (other,) = trials.values()
    assert lost.state == other.state == optuna.trial.TrialState.COMPLETE
    assert lost.user_attrs["restarts"] >= 1
    assert lost.user_attrs["node_id"] != victim.node_id  # it ended on a node that was left
    # Ray counts on from the checkpoint's iteration: trained again from epoch 0, it would end past
    # EPOCHS.
    assert lost.user_attrs["final"]["training_iteration"] == EPOCHS
    assert lost.user_attrs["timeline"] == other.user_attrs["timeline"]
    # One event, opening every block; once each, though the lost trial wrote some epochs twice.
    events = [
        (e["epoch"], e["n_trainable"], len(set(e["blocks"]))) for e in other.user_attrs["timeline"]
    ]
    assert events == [(UNFREEZE, 5, 5)]
    assert other.user_attrs["restarts"] == 0
    assert_nothing_lost(folder, 2, faults_log=fault_log, max_failures=2)
    seconds = time.perf_counter() - started
    print(
        f"lost a node after {HOLD} epoch(s) of trial {trial_id} "
        f"({removed_at:.0f}s in); restarts {lost.user_attrs['restarts']}; {seconds:.0f}s in all"
    )
    record_property("node_removed_after_s", round(removed_at, 1))
    record_property("test_seconds", round(seconds, 1))
