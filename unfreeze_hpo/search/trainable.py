"""The Ray Tune function trainable: a sampled config dict -> one trial of ``train.run``.

Each epoch's metrics go to ``tune.report``, every ``checkpoint_every`` epochs (and the last) with
the trial's checkpoint, so a worker that dies is retried from its last checkpoint and redoes the
epochs after it. Each result carries the search's objective (``Objective.key``) as it stands after
that epoch; it is always a finite number or the trial fails.

A trial that fails for a reason of its own (diverged, out of memory, a non-finite metric) would fail
the same way again: Ray's retry (``max_failures``) is meant for workers that died. The failure is
written to the trial's working directory, and a retry there ends at once with the same reason,
training nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from unfreeze_hpo import embedded, train, trialdir
from unfreeze_hpo.config import TrialConfig, from_dict
from unfreeze_hpo.models import hub
from unfreeze_hpo.search import seeds
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.space import SearchSpace

CARRIED = trialdir.CARRIED  # what a Ray checkpoint of a trial holds
FAILED = "failed.json"  # the TrialFailed that ended an earlier attempt of the trial


def run_trial(
    config: dict[str, Any],
    *,
    base: Mapping[str, Any],
    space: SearchSpace,
    objective: Objective,
    threads: int = 1,
    checkpoint_every: int = 1,
    weights_cache: str | None = None,
) -> None:
    """Train the trial ``config`` (as sampled by OptunaSearch) on top of ``base``."""
    torch.set_num_threads(max(1, threads))
    hub.use_cache(weights_cache)
    context = tune.get_context()
    # Scratch space on this node, outside the folder Tune copies to storage_path with each
    # experiment snapshot: the checkpoints reach storage through tune.report only.
    folder = trial_folder(context)
    work = folder / "work"
    cfg = sampled_config(config, base, space, work)
    failed_file = folder / FAILED
    raise_if_failed(failed_file)
    resume = restore_checkpoint(work, tune.get_checkpoint())

    def send(metrics: dict[str, Any], staged: Path | None) -> None:
        checkpoint = None if staged is None else tune.Checkpoint.from_directory(staged)
        tune.report(metrics, checkpoint=checkpoint)

    with (work / trialdir.LOG).open("a") as log_file:
        try:
            train.run(
                cfg,
                reporter(work, objective, send),
                resume=resume,
                log=lambda line: print(line, file=log_file, flush=True),
                trial_id=context.get_trial_id(),
                checkpoint_every=checkpoint_every,
                cpus=threads,  # the trial's CPUs: its loader workers are these minus one
                weights=embedded.weights_for(cfg, log=lambda line: print(line, file=log_file)),
            )
        except train.TrialFailed as failed:
            record_failure(failed_file, failed)
            raise


# Tune's or Ray Train's report of one epoch: its metrics, and a folder holding the checkpoint's
# files on checkpoint epochs (None on the others), gone once it returns.
Send = Callable[[dict[str, Any], Path | None], None]


def sampled_config(
    config: Mapping[str, Any], base: Mapping[str, Any], space: SearchSpace, work: Path
) -> TrialConfig:
    """The TrialConfig of a sampled ``config``, training into ``work``."""
    sampled = {k: v for k, v in config.items() if k != seeds.RESEED_OF}  # a re-run's bookkeeping
    return space.trial_config(from_dict(base), sampled).replace(output_dir=str(work))


def reporter(work: Path, objective: Objective, send: Send) -> train.Report:
    """``train.run``'s report for a trial training into ``work``: each epoch's metrics with the
    objective as it stands after it (over every epoch the folder holds, a resumed trial's too:
    its metrics.jsonl came back with the checkpoint), the node, and on checkpoint epochs the
    trial's files staged in a folder, passed to ``send``."""
    node = ray.get_runtime_context().get_node_id()  # which cluster node ran it, for the record

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        history = [row.get(objective.metric, math.nan) for row in trialdir.read_rows(work)]
        metrics = {**metrics, objective.key: objective.value(history)}
        if not math.isfinite(metrics[objective.key]):
            # A NaN objective would leave the Optuna trial unfinished; fail the trial instead.
            raise train.TrialFailed(
                "nonfinite_metric",
                f"{objective.key} is {metrics[objective.key]} ({objective.describe()})",
                int(metrics["epoch"]),
                int(metrics["step"]),
            )
        if checkpoint is None:  # an epoch between checkpoints
            send({**metrics, "node_id": node}, None)
            return
        # The report copies the checkpoint to storage before it returns (Tune's
        # persist_current_checkpoint, Ray Train's synchronous upload), so links to the files,
        # gone when it returns, suffice. Staged outside the trial folder: Tune syncs that folder,
        # and a staging folder that vanishes mid-sync fails the experiment snapshot.
        with tempfile.TemporaryDirectory(prefix="unfreeze-hpo-report-") as staged:
            for name in CARRIED:
                _link(work / name, Path(staged) / name)
            send({**metrics, "node_id": node}, Path(staged))

    return report


def raise_if_failed(failed_file: Path) -> None:
    """An earlier attempt of this trial failed for a reason of its own: fail again, at once."""
    if failed_file.is_file():
        raise train.TrialFailed(**json.loads(failed_file.read_text()))


def record_failure(failed_file: Path, failed: train.TrialFailed) -> None:
    record = {k: getattr(failed, k) for k in ("reason", "detail", "epoch", "step")}
    failed_file.write_text(json.dumps(record))


def trial_folder(context: Any) -> Path:
    """A folder of the trial's that every attempt on this node sees and Tune does not upload:
    the working directory Ray moves each trial into (``get_trial_dir`` names the driver's
    staging folder, synced to storage, and may name another folder after a retry)."""
    if os.environ.get("RAY_CHDIR_TO_TRIAL_DIR", "1") != "0":
        return Path.cwd()
    return Path(context.get_trial_dir())


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (no copy of the weights), else a copy: where the
    filesystem has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def restore_checkpoint(work: Path, checkpoint: Any) -> bool:
    """Copy a trial's last Ray checkpoint (Tune's or Ray Train's) into its work folder; True if
    there was one."""
    work.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as folder:
        for name in CARRIED:
            kept = name == trialdir.LOG and (work / name).exists()  # this node's is longer
            if (Path(folder) / name).exists() and not kept:
                shutil.copy2(Path(folder) / name, work / name)
    return True


def trial_config_of(
    base: Mapping[str, Any], space: SearchSpace, flat: Mapping[str, Any]
) -> TrialConfig:
    """The TrialConfig a sampled flat dict stands for (used by the driver for records)."""
    return space.trial_config(from_dict(base), flat)
