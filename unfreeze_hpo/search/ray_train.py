"""Trials that span several workers: the Tune trial launches a Ray Train run (Train V2's
``TorchTrainer``), and each of its workers runs ``train.run`` as one rank of a data-parallel
trial (``train.replicas``: DDP wrapped again at every unfreeze event, replicas checked each
epoch). There is no second training loop.

- The Tune trial only waits on the run: it reserves no CPU or GPU (``DRIVER_RESOURCES``), so
  N workers of one CPU fit on N cores. Ray Train reserves the workers' own.
- Every rank reports each epoch to Ray Train; rank 0 with the checkpoint. Ray's
  ``TuneReportCallback`` forwards rank 0's metrics to Tune, with the path of the checkpoint Ray
  Train stored (``checkpoint_path``): the scheduler and the searcher see what a one-worker trial
  reports, and the trial has no Tune checkpoint of its own.
- The run is named after the Tune trial and stored under ``<search>/train/<trial id>``, with
  each checkpoint in ``checkpoint_<epoch>``: the study recorder, the results and the
  nothing-lost check find a trial's latest one there (``latest_checkpoint``).
- Retries are Tune's, for one-worker and multi-worker trials alike (Ray Train's own
  ``max_failures`` is 0): a lost worker fails the run, Tune runs the trial again, and the new
  run, of the same name, resumes from Ray Train's latest checkpoint on every rank. So the
  study's ``restarts`` is Tune's count of failed attempts, whatever the worker count.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from unfreeze_hpo import embedded, storage, train, trialdir
from unfreeze_hpo.errors import UnfreezeHPOError, describe
from unfreeze_hpo.models import hub
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.space import SearchSpace
from unfreeze_hpo.search.trainable import (
    FAILED,
    raise_if_failed,
    record_failure,
    reporter,
    restore_checkpoint,
    sampled_config,
    trial_folder,
)

RUNS = trialdir.RUNS  # the search folder's subfolder of Ray Train runs, one per trial
CHECKPOINT_DIR = "checkpoint_{epoch:06d}"  # a run's checkpoint folder, by its last epoch
# The Tune trial of a multi-worker trial only waits on its Ray Train run: a byte of memory is
# the smallest reservation Tune accepts (an empty one is refused), and it holds no CPU.
DRIVER_RESOURCES: dict[str, float] = {"cpu": 0, "memory": 1}

__all__ = ["CHECKPOINT_PATH_KEY", "DRIVER_RESOURCES", "RUNS", "Workers", "run_trial_on_workers"]


@dataclass(frozen=True)
class Workers:
    """The Ray Train workers of one trial: how many, and what each holds."""

    count: int
    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def run_folder(search: str, trial_id: str) -> str:
    """Where the Ray Train run of the multi-worker trial ``trial_id`` of the search stored in
    ``search`` (a local path or a URI) keeps its checkpoints."""
    return storage.join(search, RUNS, trial_id)


def latest_checkpoint(search: str, trial_id: str) -> str | None:
    """The latest checkpoint folder of a multi-worker trial's run (None if it has none)."""
    fs, path = storage.open_location(run_folder(search, trial_id))
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return None
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and re.fullmatch(r"checkpoint_\d+", i.base_name)
    )
    return storage.join(run_folder(search, trial_id), names[-1]) if names else None


def run_trial_on_workers(
    config: dict[str, Any],
    *,
    base: Mapping[str, Any],
    space: SearchSpace,
    objective: Objective,
    workers: Workers,
    search: str,
    checkpoint_every: int = 1,
    checkpoints_kept: int = 2,
    weights_cache: str | None = None,
) -> None:
    """The Tune trial ``config`` as a Ray Train run of ``workers``; ``search`` is the search
    folder (its runs go to ``<search>/train``)."""
    context = tune.get_context()
    trial_id = context.get_trial_id()
    failed_file = trial_folder(context) / FAILED
    raise_if_failed(failed_file)
    trainer = TorchTrainer(
        _rank,
        train_loop_config={
            "config": config,
            "base": dict(base),
            "space": space,
            "objective": objective,
            "threads": workers.threads,
            "checkpoint_every": checkpoint_every,
            "weights_cache": weights_cache,
            "trial_id": trial_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers.count,
            use_gpu=workers.gpus > 0,
            resources_per_worker={"CPU": workers.cpus, "GPU": workers.gpus},
        ),
        torch_config=TorchConfig(backend="nccl" if workers.gpus > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=trial_id,  # the same in every attempt: a new run resumes the last one's
            storage_path=storage.join(search, RUNS),
            failure_config=ray.train.FailureConfig(max_failures=0),  # Tune retries
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints_kept),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a Train V2 callback
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        cause = _worker_error(exc)
        if isinstance(cause, train.TrialFailed):
            record_failure(failed_file, cause)
        raise cause from exc


def _worker_error(exc: BaseException) -> BaseException:
    """What failed a run: the first rank's own exception (a TrialFailed, a user error) where
    a worker raised one, else a description of the run's error."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        error = failures[rank]
        cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the worker's
        if isinstance(cause, UnfreezeHPOError):
            return cause
    if failures:
        first = min(failures)
        return RuntimeError(f"worker {first} of the trial failed: {describe(failures[first])}")
    return RuntimeError(describe(exc))


def _rank(loop: dict[str, Any]) -> None:
    """One rank of a multi-worker trial: ``train.run`` on this worker's shard."""
    ranks = train.Ranks.current()
    torch.set_num_threads(loop["threads"])
    hub.use_cache(loop["weights_cache"])
    # This rank's scratch folder on its node: rank 0 writes the trial folder there, the others
    # only read a checkpoint to resume from.
    root = Path(tempfile.gettempdir()) / "unfreeze-hpo-ranks" / loop["trial_id"]
    work = root / f"rank{ranks.rank}"
    cfg = sampled_config(loop["config"], loop["base"], loop["space"], work)
    # Rank 0 reads the checkpoint and sends it to the others (train.checkpoints.resume).
    checkpoint = ray.train.get_checkpoint()
    resume = restore_checkpoint(work, checkpoint) if ranks.lead else checkpoint is not None

    def send(metrics: dict[str, Any], staged: Path | None) -> None:
        epoch = int(metrics["epoch"])
        checkpoint = None if staged is None else ray.train.Checkpoint.from_directory(staged)
        # Tune counts a trial's results itself, from 1 in each attempt, unless the result says
        # where it stands: a run resumed after a retry goes on at its epoch, not at 1.
        metrics = {**metrics, "training_iteration": epoch + 1}
        name = CHECKPOINT_DIR.format(epoch=epoch)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    lead_report = reporter(work, loop["objective"], send)

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        if ranks.lead:
            lead_report(metrics, checkpoint)
        else:  # Tune hears rank 0; the others take part in the report's barrier
            send(dict(metrics), None)

    with contextlib.ExitStack() as stack:
        log: train.Log = _quiet  # rank 0 alone writes the trial's log
        if ranks.lead:
            log_file = stack.enter_context((work / trialdir.LOG).open("a"))
            log = lambda line: print(line, file=log_file, flush=True)  # noqa: E731
        train.run(
            cfg,
            report,
            resume=resume,
            log=log,
            trial_id=loop["trial_id"],
            checkpoint_every=loop["checkpoint_every"],
            cpus=loop["threads"],
            weights=embedded.weights_for(cfg, log=log),
            ranks=ranks,
        )


def _quiet(_: str) -> None:
    pass
