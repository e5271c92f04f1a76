"""The Ray tasks a search runs before its first trial, where trials run: the hub weights fetched
once on every node that holds trials, and the preflight on one trial's CPUs and GPUs.

An error of ours raised in a task (a ConfigError, a ModelError) reaches the driver as itself,
not wrapped in Ray's RayTaskError, so the user reads the one message it carries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from unfreeze_hpo import models
from unfreeze_hpo.config import TrialConfig, from_dict
from unfreeze_hpo.errors import UnfreezeHPOError
from unfreeze_hpo.models import hub
from unfreeze_hpo.preflight import PreflightResult


@dataclass(frozen=True)
class Ran:
    """A preflight's result and the worker process that ran it."""

    result: PreflightResult
    pid: int
    node_id: str


def fetch_weights(spec: models.ModelSpec, nodes: Sequence[str], weights_cache: str | None) -> None:
    """Bring ``spec``'s hub weights into the weights cache of each of ``nodes`` (Ray node ids),
    all nodes at once; on a cache on shared storage the first holds the lock and downloads, the
    others then find the files. An unreachable hub is the ModelError ``models.build`` raises."""
    task = ray.remote(num_cpus=0)(_fetch)  # no trial runs yet; a node's CPUs are free
    _get(
        [
            task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(spec, weights_cache)
            for node in nodes
        ]
    )


def preflight(cfg: TrialConfig, cpus: float, gpus: float, weights_cache: str | None) -> Ran:
    """``unfreeze_hpo.preflight.preflight(cfg)`` in a Ray worker holding one trial's resources."""
    task = ray.remote(_preflight).options(num_cpus=cpus, num_gpus=gpus)
    ran: Ran = _get(task.remote(cfg.to_dict(), max(1, int(cpus)), weights_cache))
    return ran


def _fetch(spec: models.ModelSpec, weights_cache: str | None) -> None:
    hub.use_cache(weights_cache)
    models.fetch(spec)


def _preflight(values: dict[str, Any], threads: int, weights_cache: str | None) -> Ran:
    from unfreeze_hpo.preflight import preflight as run

    torch.set_num_threads(threads)  # as a trial on these CPUs does
    hub.use_cache(weights_cache)
    result = run(from_dict(values), log=lambda _: None)
    return Ran(result, os.getpid(), ray.get_runtime_context().get_node_id())


def _get(refs: Any) -> Any:
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UnfreezeHPOError):
            raise exc.cause from exc
        raise
