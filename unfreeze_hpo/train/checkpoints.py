"""Checkpoints: written atomically (no name in the trial folder ever goes missing), read back
by ``--resume`` with a fallback to the one before, refused when they carry Python objects."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from unfreeze_hpo import trialdir
from unfreeze_hpo.errors import ConfigError, Problem, UnfreezeHPOError, describe
from unfreeze_hpo.signals import SpikeMonitor
from unfreeze_hpo.train.trial import Log, LoopState, Trial
from unfreeze_hpo.trialdir import CHECKPOINT, PREVIOUS

# Config keys a resume may change: where it writes, how long it runs, how it loads data.
RESUMABLE_CHANGES = ("epochs", "output_dir", "provenance", "num_workers", "prefetch_factor")


def save(trial: Trial, monitor: SpikeMonitor, state: LoopState, out: Path) -> Path | None:
    """Write atomically: a temp file renamed over the latest, whose old copy becomes previous.

    In a data-parallel trial every rank calls it (each rank's random state is gathered: each
    resumes its own), rank 0 writes, and the other ranks get None.

    No name in ``out`` ever goes missing, not even for a moment, so a copy of the folder taken
    while the trial runs (Ray Tune syncs a trial's folder with each experiment snapshot) never
    finds a listed file gone: the new file and a second link to the old one are made in a
    scratch folder on the same filesystem, then renamed over ``checkpoint.pt`` and
    ``checkpoint.prev.pt``."""
    ranks = trial.replicas.ranks
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    every_rank = trial.replicas.gather(rng)
    if not ranks.lead:
        return None
    payload = {
        "model": trial.model.state_dict(),
        "optimizer": trial.optimizer.state_dict(),
        "scaler": trial.scaler.state_dict(),
        "freezer": trial.freezer.state_dict(),
        "monitor": monitor.state_dict(),
        "loop": vars(state),
        "rng": rng,
        "config": trial.cfg.to_dict(),
    }
    if ranks.distributed:
        payload["ranks"] = {"world_size": ranks.world_size, "rng": every_rank}
    scratch = _scratch(out)
    tmp = scratch / (CHECKPOINT + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    if trial.faults:
        trial.faults.before_rename(state.epoch - 1)
    latest = out / CHECKPOINT
    if latest.exists():
        old = scratch / (PREVIOUS + ".tmp")
        try:
            old.unlink(missing_ok=True)
            os.link(latest, old)
        except OSError:  # a filesystem without hard links: the latest name is gone a moment
            os.replace(latest, out / PREVIOUS)
        else:
            os.replace(old, out / PREVIOUS)
    os.replace(tmp, latest)
    return latest


def _scratch(out: Path) -> Path:
    """Where ``out``'s next checkpoint is written before it is renamed into place: a folder of
    its own in the system's temp folder when that is on the same filesystem (a rerun reuses
    it), else ``out`` itself."""
    folder = Path(tempfile.gettempdir()) / "unfreeze-hpo-checkpoints"
    folder /= hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if folder.stat().st_dev == out.stat().st_dev:
            return folder
    except OSError:
        pass
    return out


def resume(trial: Trial, monitor: SpikeMonitor, out: Path, log: Log) -> LoopState:
    """Restore the loop's state from the latest checkpoint in ``out``: in a data-parallel trial,
    rank 0's, read by rank 0 and sent to the others (each takes its own random state)."""
    path, payload = _read(trial, out, log)
    saved = {k: v for k, v in payload["config"].items() if k not in RESUMABLE_CHANGES}
    current = {k: v for k, v in trial.cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    if saved != current:
        changed = sorted(k for k in current if saved.get(k) != current[k])
        raise ConfigError(
            Problem(
                "--resume",
                changed,
                "the checkpoint was written with a different config",
                "resume with the same config (only epochs and output_dir may change)",
            )
        )
    ranks = trial.replicas.ranks
    saved_ranks = payload.get("ranks", {"world_size": 1, "rng": [payload["rng"]]})
    if saved_ranks["world_size"] != ranks.world_size:
        raise ConfigError(
            Problem(
                "--workers-per-trial",
                ranks.world_size,
                f"{path} was written by a trial of {saved_ranks['world_size']} worker(s); its "
                "data shards and random streams are theirs",
                f"resume with {saved_ranks['world_size']} worker(s) per trial",
            )
        )
    trial.model.load_state_dict(payload["model"])
    trial.optimizer.load_state_dict(payload["optimizer"])
    trial.scaler.load_state_dict(payload["scaler"])
    trial.freezer.load_state_dict(payload["freezer"])
    monitor.load_state_dict(payload["monitor"])
    rng = saved_ranks["rng"][ranks.rank]
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = LoopState(**payload["loop"])
    if ranks.lead:
        trialdir.truncate(out, state.epoch)
    log(f"resumed from {path} at epoch {state.epoch} (step {state.step})")
    return state


def _read(trial: Trial, out: Path, log: Log) -> tuple[Path, dict[str, Any]]:
    """``load`` on one rank; in a data-parallel trial rank 0 loads (to the host) and every
    rank gets what it found, or the error it met."""
    replicas = trial.replicas
    if not replicas.ranks.distributed:
        return load(out, trial.device, log)
    found: tuple[Path, dict[str, Any]] | UnfreezeHPOError | None = None
    if replicas.ranks.lead:
        try:
            found = load(out, torch.device("cpu"), log)
        except UnfreezeHPOError as exc:  # raised on every rank, or the others would wait
            found = exc
    found = replicas.broadcast(found)
    if isinstance(found, UnfreezeHPOError):
        raise found
    assert found is not None
    return found


def load(out: Path, device: torch.device, log: Log) -> tuple[Path, dict[str, Any]]:
    """The latest readable checkpoint: a truncated or corrupt latest one falls back to the one
    before. One that carries Python objects is refused outright (weights-only loading)."""
    candidates = [p for p in (out / CHECKPOINT, out / PREVIOUS) if p.exists()]
    if not candidates:
        fix = "run without --resume first"
        raise ConfigError(Problem("--resume", str(out), "no checkpoint to resume from", fix))
    for path in candidates:
        try:
            return path, torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as exc:
            refused = re.search(r"GLOBAL (\S+)", str(exc))  # else the bytes are just damaged
            if refused is None:
                log(f"warning: {path} is unreadable ({describe(exc)}); trying the one before")
                continue
            raise ConfigError(
                Problem(
                    "--resume",
                    str(path),
                    f"carries a Python object ({refused.group(1)}) that weights-only loading "
                    "refuses; nothing in it ran",
                    "delete it; resume only from checkpoints unfreeze-hpo wrote",
                )
            ) from exc
        except Exception as exc:  # truncated, corrupt zip, bad header: any unreadable file
            log(f"warning: {path} is unreadable ({describe(exc)}); trying the one before")
    raise ConfigError(
        Problem(
            "--resume",
            str(out),
            f"no readable checkpoint ({', '.join(p.name for p in candidates)} are damaged)",
            "run without --resume to start over",
        )
    )


def start_over(out: Path, log: Log) -> None:
    """A fresh run in a used folder: drop the old run's checkpoints and metrics."""
    stale = [out / n for n in trialdir.STALE]
    if any(p.exists() for p in stale[:2]):
        log(f"note: {out} holds an earlier run; starting over (use --resume to continue it)")
    for path in stale:
        path.unlink(missing_ok=True)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
