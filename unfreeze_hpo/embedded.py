"""The embedded default's pretrained backbone: trained once on the synthetic source task, cached.

Freezing only matters for a backbone that knows something. Without hub downloads, the backbone
is pretrained here on the *source* task (label = shape x motion axis) and fine-tuned on the
*target* task (shape group x which way along the axis the shape moves). The weights are cached
on disk, keyed by everything they depend on, and written atomically under a file lock so
parallel trials build them once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from unfreeze_hpo import strategies
from unfreeze_hpo.config import OptimizerConfig, ScheduleConfig, TrialConfig
from unfreeze_hpo.storage import cache_dir

SOURCE_EPOCHS = 12
SOURCE_SAMPLES = 2048  # the source task is the "large" pretraining set; the target stays small
SOURCE_SEED = 0
SOURCE_OPTIMIZER = OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.01)
# Bump when the recipe, a small model's architecture or the synthetic data change, so that no
# cache built by older code is reused.
RECIPE_VERSION = 4


def source_config(cfg: TrialConfig, output_dir: str) -> TrialConfig:
    """The pretraining run for ``cfg``'s model: full training on the source task."""
    if not cfg.data.kind.startswith("synthetic"):
        from unfreeze_hpo.errors import ConfigError, Problem

        raise ConfigError(
            Problem(
                "model.pretrain_on_source",
                True,
                f"needs synthetic data, not {cfg.data.kind}",
                "use model.pretrained or model.checkpoint for real data",
            )
        )
    return TrialConfig(
        model=dataclasses.replace(
            cfg.model, pretrain_on_source=False, pretrained=False, checkpoint=None, num_classes=None
        ),
        data=dataclasses.replace(
            cfg.data, task="source", seed=SOURCE_SEED, train_samples=SOURCE_SAMPLES
        ),
        optimizer=SOURCE_OPTIMIZER,
        schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
        strategy=strategies.create("full"),
        epochs=SOURCE_EPOCHS,
        batch_size=cfg.batch_size,
        device=cfg.device,
        seed=SOURCE_SEED,
        output_dir=output_dir,
    )


def cache_key(cfg: TrialConfig) -> str:
    source = source_config(cfg, output_dir="").to_dict()
    for volatile in ("output_dir", "device", "num_workers", "prefetch_factor"):
        source.pop(volatile)
    blob = json.dumps({"recipe": RECIPE_VERSION, "source": source}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_for(cfg: TrialConfig, log: Any = print) -> Path | None:
    """The pretrained backbone ``train.run`` loads for ``cfg``: the source-pretrained weights
    when ``model.pretrain_on_source`` (trained once, then cached), else None."""
    return source_checkpoint(cfg, log) if cfg.model.pretrain_on_source else None


def source_checkpoint(cfg: TrialConfig, log: Any = print) -> Path:
    """Path of the source-pretrained weights for ``cfg``'s model, training them if needed."""
    from unfreeze_hpo import train, trialdir

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"source-{cache_key(cfg)}.pt"
    with (root / f"{path.stem}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel trial waits here instead of retraining
        if path.exists():
            return path
        log(
            f"pretraining {cfg.model.name} on the synthetic source task "
            f"({SOURCE_EPOCHS} epochs, once; cached at {path})"
        )
        with tempfile.TemporaryDirectory(dir=root) as work:
            source = source_config(cfg, output_dir=work)
            summary = train.run(source, log=lambda line: _epoch_lines(line, log))
            state = torch.load(
                Path(work) / trialdir.CHECKPOINT, map_location="cpu", weights_only=True
            )["model"]
            tmp = Path(work) / "weights.pt"
            torch.save(state, tmp)
            os.replace(tmp, path)
        log(f"source task: val acc {summary.best_val_acc:.3f}")
    return path


def _epoch_lines(line: str, log: Any) -> None:
    """Pass on the pretraining's one line per epoch, not its per-epoch parameter tables."""
    if line.startswith("epoch"):
        log(f"  [source] {line}")
