"""What one trial trains with: ``setup(cfg) -> Trial`` (data and its loaders, model and its
weights, the Unfreezer's blocks, optimizer and schedule), and the loop's state and outcomes."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from unfreeze_hpo import data
from unfreeze_hpo.blocks import Blocks
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.data import loading
from unfreeze_hpo.errors import ConfigError, Problem, UnfreezeHPOError
from unfreeze_hpo.faults import Injector
from unfreeze_hpo.freezing import Freezer
from unfreeze_hpo.models import build, load_checkpoint, model_input, unwrap
from unfreeze_hpo.train.replicas import Ranks, Replicas
from unfreeze_hpo.unfreezer import Unfreezer

Report = Callable[[dict[str, float], Path | None], None]
Log = Callable[[str], None]


class TrialFailed(UnfreezeHPOError):
    """The trial cannot go on; ``reason`` is a short code (diverged, oom, runtime_error)."""

    def __init__(self, reason: str, detail: str, epoch: int, step: int) -> None:
        self.reason, self.detail, self.epoch, self.step = reason, detail, epoch, step
        super().__init__(f"{reason} at epoch {epoch}, step {step}: {detail}")

    def __reduce__(self) -> tuple[Any, tuple[str, str, int, int]]:
        # Ray copies and pickles a trial's exception; the default would lose the arguments.
        return type(self), (self.reason, self.detail, self.epoch, self.step)


@dataclass
class Summary:
    """What a finished trial reached, and the unfreeze events it actually took."""

    epochs_run: int
    steps: int
    final: dict[str, float]
    best_val_acc: float
    best_epoch: int
    timeline: list[dict[str, Any]]
    output_dir: str


@dataclass
class LoopState:
    """The loop's counters: everything besides model/optimizer a resumed run needs."""

    epoch: int = 0  # the next epoch to run
    step: int = 0
    history: list[float] = field(default_factory=list)  # monitored metric after each epoch
    timeline: list[dict[str, Any]] = field(default_factory=list)
    skipped_total: int = 0
    amp_skipped_total: int = 0
    nonfinite_streak: int = 0  # consecutive skipped steps, across epochs
    best_val_acc: float = -math.inf
    best_epoch: int = -1
    test_acc_at_best: float | None = None  # test accuracy at the best val epoch, if any


@dataclass
class Loaders:
    """The trial's DataLoaders, built once; their workers live until ``close``."""

    train: DataLoader[Any]
    val: DataLoader[Any]
    test: DataLoader[Any] | None

    def close(self) -> None:
        for loader in (self.train, self.val, self.test):
            if loader is not None:
                loading.close(loader)


@dataclass
class Trial:
    """The objects one trial trains with (also what preflight drives)."""

    cfg: TrialConfig
    device: torch.device
    model: nn.Module
    unfreezer: Unfreezer  # blocks, optimizer, plan and LR schedule: the library's own API
    scaler: torch.amp.GradScaler
    datasets: data.Datasets
    loaders: Loaders
    steps_per_epoch: int  # optimizer steps
    replicas: Replicas  # the ranks of a data-parallel trial, and what a step calls
    faults: Injector = field(default_factory=Injector)  # armed only by a faults: block
    mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def blocks(self) -> Blocks:
        return self.unfreezer.blocks

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.unfreezer.optimizer

    @property
    def freezer(self) -> Freezer:
        return self.unfreezer.freezer


def setup(
    cfg: TrialConfig,
    log: Log = print,
    *,
    weights: Path | None = None,
    cpus: float | None = None,
    ranks: Ranks | None = None,
) -> Trial:
    """Data and its loaders, model (with its weights; see ``run`` for ``weights``, ``cpus``
    and ``ranks``), blocks, optimizer and freezer for ``cfg``."""
    ranks = ranks or Ranks()
    batch_size = per_rank_batch(cfg.batch_size, ranks)
    device = resolve_device(cfg.device, ranks)
    classes = data.classes(cfg.data)
    num_classes = cfg.model.num_classes or len(classes)
    if num_classes != len(classes):
        raise ConfigError(
            Problem(
                "model.num_classes",
                num_classes,
                f"the data has {len(classes)} classes",
                "remove model.num_classes or match the data",
            )
        )
    spec = cfg.model.spec(num_classes)
    model = build(spec)
    # The model is built first: its family says which preprocessing its weights expect.
    datasets = data.load(cfg.data, model_input(spec, model))
    if cfg.model.pretrain_on_source and weights is None:
        raise ConfigError(
            Problem(
                "model.pretrain_on_source",
                True,
                "the source-pretrained backbone was not given to the training loop",
                "pass weights=unfreeze_hpo.embedded.weights_for(cfg) to train.run / train.setup",
            )
        )
    if weights is not None:
        load_checkpoint(model, weights, fresh_classifier=True)
    if cfg.model.grad_checkpointing:
        _grad_checkpointing(model, cfg.model.name)
    model.to(device)
    mixup = _mixup(cfg, num_classes)
    # This rank's shard of the training samples (all of them with one rank).
    samples = math.ceil(len(datasets.train) / ranks.world_size)  # type: ignore[arg-type]
    # Mixup pairs samples within a batch, so a ragged last batch is dropped.
    batches = samples // batch_size if mixup else math.ceil(samples / batch_size)
    steps_per_epoch = math.ceil(batches / cfg.optimizer.accumulate_steps)
    if steps_per_epoch < 1:
        raise ConfigError(
            Problem(
                "batch_size",
                cfg.batch_size,
                f"larger than the {samples} training samples, with mixup/cutmix",
                f"use batch_size <= {samples - samples % 2}",
            )
        )
    unfreezer = Unfreezer.from_schedule(cfg, model, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    workers = loading.default_workers(cpus) if cfg.num_workers is None else cfg.num_workers

    def loader(split: Dataset[Any], train: bool) -> DataLoader[Any]:
        return loading.loader(
            split,
            batch_size=batch_size,
            seed=cfg.seed,
            shuffle=train,
            workers=workers,
            device=device,
            drop_last=train and mixup is not None,
            prefetch_factor=cfg.prefetch_factor,
            rank=ranks.rank,
            world_size=ranks.world_size,
        )

    test = None if datasets.test is None else loader(datasets.test, train=False)
    loaders = Loaders(loader(datasets.train, True), loader(datasets.val, False), test)
    return Trial(
        cfg,
        device,
        model,
        unfreezer,
        scaler,
        datasets,
        loaders,
        steps_per_epoch,
        Replicas(model, ranks, device),
        mixup=mixup,
    )


def per_rank_batch(batch_size: int, ranks: Ranks) -> int:
    """Each rank's part of the global ``batch_size``: a trial's batch means the same with any
    number of workers, so a searched schedule does not change with the resources it ran on."""
    if batch_size % ranks.world_size:
        raise ConfigError(
            Problem(
                "batch_size",
                batch_size,
                f"is the global batch, split evenly over the trial's {ranks.world_size} workers",
                f"use a multiple of {ranks.world_size}, or another --workers-per-trial",
            )
        )
    return batch_size // ranks.world_size


def _grad_checkpointing(model: nn.Module, name: str) -> None:
    """timm's activation checkpointing (non-reentrant: blocks after a frozen, grad-free input
    still get their gradients)."""
    target = unwrap(model)
    enable = getattr(target, "set_grad_checkpointing", None)
    if enable is None:
        raise ConfigError(
            Problem(
                "model.grad_checkpointing",
                True,
                f"{name} has no set_grad_checkpointing (timm models have it)",
                "remove model.grad_checkpointing, or use a timm model",
            )
        )
    enable(True)


def _mixup(
    cfg: TrialConfig, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """timm's Mixup/CutMix with label smoothing folded into its soft targets, or None."""
    if not (cfg.data.mixup or cfg.data.cutmix):
        return None
    from timm.data import Mixup

    mix = Mixup(
        mixup_alpha=cfg.data.mixup,
        cutmix_alpha=cfg.data.cutmix,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )
    return mix


def resolve_device(name: str, ranks: Ranks | None = None) -> torch.device:
    """The device ``name`` means here; on CUDA a rank of a data-parallel trial takes the GPU
    of its local rank among those it sees (one each, as Ray Train and torchrun assign them)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            Problem("device", name, "CUDA is not available here", "use device: auto or cpu")
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and ranks is not None:
        device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def np_random_seed(seed: int) -> None:
    import numpy as np

    np.random.seed(seed % 2**32)
