"""One trial: the full fine-tuning loop with gradual unfreezing, ``run(cfg, report) -> Summary``.

Each epoch: the strategy's plan is applied and audited; each step trains with non-finite
numbers skipped and counted, never sanitised; each epoch ends with validation (and the test
split, when the data has one: reported, never chosen on), the drift probe, spike signals, a
metrics line, an atomic checkpoint (every ``checkpoint_every`` epochs) and a report.

A step never waits on the host: its loss, gradient norm and skip flag stay on the device (a
non-finite step is skipped there, by the fused optimizer's ``found_inf``), and the loop reads
them ``READ_EVERY`` steps at a time. No Ray or pandas here.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from unfreeze_hpo import data, drift, memory, trialdir
from unfreeze_hpo.blocks import Blocks
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.data import loading
from unfreeze_hpo.errors import ConfigError, Problem, UnfreezeHPOError, describe
from unfreeze_hpo.faults import Injector
from unfreeze_hpo.freezing import Freezer
from unfreeze_hpo.models import build, load_checkpoint, model_input, unwrap
from unfreeze_hpo.signals import SpikeMonitor
from unfreeze_hpo.trialdir import CHECKPOINT, PREVIOUS
from unfreeze_hpo.unfreezer import Unfreezer

Report = Callable[[dict[str, float], Path | None], None]
Log = Callable[[str], None]
# Config keys a resume may change: where it writes, how long it runs, how it loads data.
RESUMABLE_CHANGES = ("epochs", "output_dir", "provenance", "num_workers", "prefetch_factor")
# Steps between the loop's reads of its per-step values (loss, grad norm, skip flag) from the
# device: one transfer per READ_EVERY steps instead of several per step.
READ_EVERY = 32
# What a step's skip code means (StepOutcome.skipped): 0, the step ran.
SKIPPED: tuple[str | None, ...] = (None, "nonfinite_loss", "nonfinite_grad", "amp_overflow")


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
class StepOutcome:
    """One optimizer step's values, left on the device (reading them is a host sync)."""

    loss: torch.Tensor  # 0-d: mean over the step's batches
    grad_norm: torch.Tensor  # 0-d: before clipping
    skipped: torch.Tensor  # 0-d int: an index into SKIPPED, 0 when the step ran

    def read(self) -> tuple[float, float, str | None]:
        """The values on the host (one transfer)."""
        return read_outcomes([self])[0]


def read_outcomes(outcomes: Sequence[StepOutcome]) -> list[tuple[float, float, str | None]]:
    """(loss, grad norm, skip reason) of each step, read from the device in one transfer."""
    columns = [
        torch.stack([getattr(o, name).float() for o in outcomes])
        for name in ("loss", "grad_norm", "skipped")
    ]
    rows = torch.stack(columns, dim=1).tolist()
    return [(loss, norm, SKIPPED[int(code)]) for loss, norm, code in rows]


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


def run(
    cfg: TrialConfig,
    report: Report | None = None,
    *,
    resume: bool = False,
    log: Log = print,
    trial_id: str = "local",
    weights: Path | None = None,
    cpus: float | None = None,
    checkpoint_every: int = 1,
    progress: bool = False,
) -> Summary:
    """Train one trial to ``cfg.epochs``; with ``resume``, continue from the last checkpoint.

    ``weights``: a backbone pretrained on another task, loaded before training with a fresh
    classifier (the embedded default's source pretraining: ``embedded.weights_for(cfg)``).
    ``trial_id`` names the trial to the fault injector of the reliability tests (no other use).
    ``cpus``: the CPUs the trial was given (default: the process's), which set the loader
    workers when ``num_workers`` is unset. ``checkpoint_every``: epochs between checkpoints (the
    last epoch always has one); ``report`` gets None for the path on the others. ``progress``:
    draw a progress bar within each epoch on stderr.
    """
    integer = isinstance(checkpoint_every, int) and not isinstance(checkpoint_every, bool)
    if not integer or checkpoint_every < 1:
        raise ConfigError(
            Problem("--checkpoint-every", checkpoint_every, "must be an integer >= 1", "e.g. 1")
        )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    trial = setup(cfg, log, weights=weights, cpus=cpus)
    try:
        return _run(trial, report, resume, log, trial_id, checkpoint_every, progress)
    finally:
        trial.loaders.close()


def _run(
    trial: Trial,
    report: Report | None,
    resume: bool,
    log: Log,
    trial_id: str,
    checkpoint_every: int,
    progress: bool,
) -> Summary:
    cfg, out = trial.cfg, Path(trial.cfg.output_dir)
    trial.faults = Injector(cfg.faults, trial_id)
    unfreezer = trial.unfreezer
    monitor = SpikeMonitor(
        cfg.signals.baseline_steps,
        cfg.signals.window_steps,
        higher_is_better=cfg.monitor == "val_acc",
    )
    state = LoopState()
    if resume:
        state = _resume(trial, monitor, out, log)
    else:
        _start_over(out, log)
    # The loop's state (checkpointed) and the Unfreezer share the history and the step count.
    unfreezer.history, unfreezer.global_step = state.history, state.step
    sizes = trial.blocks.sizes
    workers = trial.loaders.train.num_workers
    accumulate = cfg.optimizer.accumulate_steps
    log(
        f"trial: {cfg.model.name}, {len(trial.blocks)} blocks, strategy {cfg.strategy}, "
        f"{cfg.epochs} epochs x {trial.steps_per_epoch} steps"
        + (f" of {accumulate} batches" if accumulate > 1 else "")
        + f", device {trial.device}, amp {cfg.amp}, {workers} loader workers"
    )
    for note in cfg.strategy.notes(cfg.epochs, sizes):
        log(f"note: {note}")
    prep = trial.datasets.preprocessing
    for warning in prep.warnings() if prep is not None else ():
        log(f"warning: {warning}")

    for epoch in range(state.epoch, cfg.epochs):
        started = time.perf_counter()
        first_plan = unfreezer.plan is None
        newly = unfreezer.on_epoch_start(epoch)
        plan = unfreezer.plan
        assert plan is not None
        event = bool(newly) and not first_plan  # blocks trainable from the start are no event
        if event:
            monitor.on_unfreeze(epoch, state.step, newly)
            added = sum(b.numel for b in trial.blocks.blocks if b.name in newly)
            log(
                f"unfreeze event at epoch {epoch} (step {state.step}): {', '.join(newly)} "
                f"(+{added:,} parameters)"
            )
        if newly:
            state.timeline.append(
                {
                    "epoch": epoch,
                    "step": state.step,
                    "blocks": newly,
                    "n_trainable": plan.n_trainable,
                }
            )
        memory.reset_peak(trial.device)
        before = drift.snapshot(trial.model, trial.blocks, plan)
        bar = _progress_bar(trial, epoch) if progress else None
        try:
            train = _train_epoch(trial, monitor, state, epoch, unfroze=event, log=log, bar=bar)
        finally:
            if bar is not None:
                bar.close()
        val_loss, val_acc = evaluate(trial)
        test = _test_metrics(trial)
        monitored = val_acc if cfg.monitor == "val_acc" else val_loss
        status = unfreezer.on_epoch_end({cfg.monitor: monitored})  # history, audit, status
        monitor.on_epoch_end(epoch, monitored)
        moved = drift.drift(trial.model, trial.blocks, plan, before, train["steps_taken"])
        if val_acc > state.best_val_acc:
            state.best_val_acc, state.best_epoch = val_acc, epoch
            state.test_acc_at_best = test.get("test_acc")
        if test and state.test_acc_at_best is not None:
            test["test_acc_at_best"] = state.test_acc_at_best
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "step": float(state.step),
            "train_loss": train["loss"],
            "val_loss": val_loss,
            "val_acc": val_acc,
            "best_val_acc": state.best_val_acc,
            **test,
            "grad_norm": train["grad_norm"],
            "grad_norm_max": train["grad_norm_max"],
            "skipped_steps": train["skipped"],
            "skipped_total": float(state.skipped_total),
            "amp_skipped_total": float(state.amp_skipped_total),
            "peak_memory_mb": memory.peak_mb(trial.device),
            "trainable_params": float(status.trainable),
            "frozen_params": float(status.frozen),
            "trainable_ratio": status.trainable_ratio,
            "backbone_trainable_ratio": status.backbone_ratio,
            "unfrozen_blocks": float(plan.n_trainable),
            **_latest_event(trial.blocks, monitor),
            "spike_window_steps": float(cfg.signals.window_steps),
            "epoch_seconds": time.perf_counter() - started,
            **{f"lr/{name}": lr for name, lr in unfreezer.freezer.lrs().items()},
            **moved,
            **monitor.metrics(),
        }
        if trial.faults:
            trial.faults.after_epoch(epoch, metrics)
        state.epoch = epoch + 1
        checkpoint = None
        if state.epoch % checkpoint_every == 0 or state.epoch == cfg.epochs:
            checkpoint = _save_checkpoint(trial, monitor, state, out)
        trialdir.append(out, metrics, status.unfrozen)
        trialdir.write_csv(out)  # rewritten each epoch, so a failed trial still leaves its table
        log(_epoch_line(cfg, metrics))
        log(status.line(epoch))
        if report is not None:
            report(metrics, checkpoint)

    final = trialdir.read_rows(out)[-1] if state.epoch > 0 else {}
    return Summary(
        state.epoch,
        state.step,
        final,
        state.best_val_acc,
        state.best_epoch,
        state.timeline,
        str(out),
    )


def setup(
    cfg: TrialConfig, log: Log = print, *, weights: Path | None = None, cpus: float | None = None
) -> Trial:
    """Data and its loaders, model (with its weights; see ``run`` for ``weights`` and
    ``cpus``), blocks, optimizer and freezer for ``cfg``."""
    device = resolve_device(cfg.device)
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
    samples = len(datasets.train)  # type: ignore[arg-type]
    # Mixup pairs samples within a batch, so a ragged last batch is dropped.
    batches = samples // cfg.batch_size if mixup else math.ceil(samples / cfg.batch_size)
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
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            shuffle=train,
            workers=workers,
            device=device,
            drop_last=train and mixup is not None,
            prefetch_factor=cfg.prefetch_factor,
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
        mixup=mixup,
    )


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


def train_step(
    trial: Trial, inputs: torch.Tensor, labels: torch.Tensor, params: Sequence[nn.Parameter]
) -> StepOutcome:
    """One optimizer step on one batch (see ``backward`` and ``optimizer_step``)."""
    return optimizer_step(trial, backward(trial, inputs, labels, 1.0), params)


def backward(
    trial: Trial, inputs: torch.Tensor, labels: torch.Tensor, weight: float
) -> torch.Tensor:
    """Forward and backward of one batch, its loss weighted by ``weight`` (1 / the batches of
    the step); returns the unweighted loss, detached, on the device.

    ``labels``: class indices, or soft targets (mixup), which carry their label smoothing."""
    with autocast(trial):
        logits = trial.model(inputs)
    smoothing = trial.cfg.label_smoothing if labels.ndim == 1 else 0.0
    loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    # A non-finite loss backpropagates non-finite gradients, and the step is skipped on them.
    trial.scaler.scale(loss * weight).backward()
    return loss.detach()


def optimizer_step(trial: Trial, loss: torch.Tensor, params: Sequence[nn.Parameter]) -> StepOutcome:
    """Unscale, clip and step on the accumulated gradients; a non-finite loss or gradient
    skips the step on the device. Nothing is read back and nothing is sanitised."""
    optimizer, scaler = trial.optimizer, trial.scaler
    scaler.unscale_(optimizer)
    clip = trial.cfg.optimizer.grad_clip or math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else loss.new_zeros(())
    loss_ok, grad_ok = torch.isfinite(loss), torch.isfinite(norm)
    # With fp16 an inf gradient is the GradScaler's overflow: it skips the step (on the device,
    # with a fused optimizer) and lowers its scale. Without a scaler the loop skips it itself.
    overflow = SKIPPED.index("amp_overflow" if scaler.is_enabled() else "nonfinite_grad")
    code = torch.where(loss_ok, torch.where(grad_ok, 0, overflow), SKIPPED.index("nonfinite_loss"))
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        _step_unless(optimizer, code != 0)
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, norm.detach(), code)


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip``, decided on the device where the optimizer can."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # The protocol the GradScaler uses with fused optimizers: their kernels leave the
        # parameters, their state and the step count as they were where found_inf is set.
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(skip):  # an optimizer without device-side skipping: one read per step
        optimizer.step()


class _StepValues:
    """An epoch's per-step values: kept on the device, read ``READ_EVERY`` steps at a time,
    then fed to the spike monitor and the divergence check in step order."""

    def __init__(
        self, max_nonfinite: int, monitor: SpikeMonitor, state: LoopState, epoch: int, bar: Any
    ) -> None:
        self.max_nonfinite, self.monitor, self.state = max_nonfinite, monitor, state
        self.epoch, self.bar = epoch, bar
        self.pending: list[StepOutcome] = []
        self.next_step = state.step  # global step of pending[0]
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.skipped = 0

    def add(self, outcome: StepOutcome) -> None:
        self.pending.append(outcome)
        if len(self.pending) >= READ_EVERY:
            self.read()

    def read(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        state = self.state
        for loss, norm, reason in read_outcomes(pending):  # the one read of these steps
            step, self.next_step = self.next_step, self.next_step + 1
            # A step whose loss was already non-finite has no meaningful gradient norm.
            self.monitor.update(step, loss, math.nan if reason == "nonfinite_loss" else norm)
            if reason is None:
                state.nonfinite_streak = 0
                self.losses.append(loss)
                self.norms.append(norm)
                continue
            self.skipped += 1
            state.nonfinite_streak += 1
            state.skipped_total += 1
            state.amp_skipped_total += reason == "amp_overflow"
            if state.nonfinite_streak >= self.max_nonfinite:
                raise TrialFailed(
                    "diverged",
                    f"{state.nonfinite_streak} consecutive steps with non-finite "
                    f"loss or gradients (last: {reason})",
                    self.epoch,
                    step + 1,
                )
        if self.bar is not None and self.losses:
            self.bar.set_postfix_str(f"loss {self.losses[-1]:.4f}")  # redraws the bar

    def summary(self) -> dict[str, float]:
        self.read()
        return {
            "loss": _mean(self.losses),
            "grad_norm": _mean(self.norms),
            "grad_norm_max": max(self.norms, default=0.0),
            "skipped": float(self.skipped),
            "steps_taken": float(len(self.losses)),
        }


def _train_epoch(
    trial: Trial,
    monitor: SpikeMonitor,
    state: LoopState,
    epoch: int,
    unfroze: bool,
    log: Log,
    bar: Any = None,
) -> dict[str, float]:
    """One pass over the training data: ``accumulate_steps`` batches per optimizer step (the
    epoch's last step takes what is left)."""
    cfg, device = trial.cfg, trial.device
    params = [p for p in trial.model.parameters() if p.requires_grad]
    values = _StepValues(cfg.max_nonfinite_steps, monitor, state, epoch, bar)
    accumulate = cfg.optimizer.accumulate_steps
    total = len(trial.loaders.train)
    event_step = state.step
    retried = False
    if trial.mixup is not None:
        # timm's Mixup draws from numpy's global generator: seeded per epoch, so a resumed run
        # mixes as the uninterrupted one did.
        np_random_seed(cfg.seed * 1_000_003 + epoch)
    loss: torch.Tensor | None = None
    for i, (inputs, labels) in enumerate(loading.batches(trial.loaders.train, epoch)):
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if trial.mixup is not None:
            inputs, labels = trial.mixup(inputs, labels)
        position = i % accumulate  # batch of this step
        size = min(accumulate, total - (i - position))  # batches in this step
        if position == 0:
            trial.unfreezer.step()  # this step's LRs
        try:
            if trial.faults and position == 0:
                first_after_event = unfroze and state.step == event_step
                stage = len(monitor.events) if first_after_event else 0
                inputs = trial.faults.before_step(epoch, state.step, stage, params, inputs)
            batch_loss = backward(trial, inputs, labels, 1.0 / size)
            loss = batch_loss / size if position == 0 or loss is None else loss + batch_loss / size
            outcome = optimizer_step(trial, loss, params) if position == size - 1 else None
        except RuntimeError as exc:
            if trial.faults:
                trial.faults.after_step()
            if _out_of_memory(exc):
                raise _oom(exc, trial, monitor, epoch, state.step) from exc
            near_event = unfroze and state.step - event_step < cfg.signals.window_steps
            if retried or not near_event:
                raise TrialFailed("runtime_error", describe(exc), epoch, state.step) from exc
            # Newly unfrozen parameters may be non-contiguous views; one retry after fixing that.
            # The step starts again from this batch (what the failed backward left is dropped).
            log(
                f"warning: {describe(exc)} right after an unfreeze; retrying the step once "
                "with contiguous parameters"
            )
            retried = True
            trial.optimizer.zero_grad(set_to_none=True)
            _make_contiguous(params)
            try:
                loss = backward(trial, inputs, labels, 1.0 / size) / size
                outcome = optimizer_step(trial, loss, params) if position == size - 1 else None
            except RuntimeError as again:
                if _out_of_memory(again):
                    raise _oom(again, trial, monitor, epoch, state.step) from again
                raise TrialFailed(
                    "runtime_error", f"{describe(again)} (also after the retry)", epoch, state.step
                ) from again
        if bar is not None:
            bar.update(len(inputs))
        if outcome is None:
            continue
        if trial.faults:
            trial.faults.after_step()
        values.add(outcome)
        state.step += 1
        if bar is not None:
            done = state.step - event_step
            bar.set_description_str(f"epoch {epoch} step {done}/{trial.steps_per_epoch}", False)
    return values.summary()


def _progress_bar(trial: Trial, epoch: int) -> Any:
    """A bar over the epoch's samples (so its rate reads images/s or clips/s), on stderr."""
    from tqdm import tqdm

    loader = trial.loaders.train
    samples = len(loader) * (loader.batch_size or 1)
    if not loader.drop_last:
        samples = len(trial.datasets.train)  # type: ignore[arg-type]
    unit = "clip" if len(trial.datasets.input_shape) == 4 else "img"
    return tqdm(total=samples, unit=unit, desc=f"epoch {epoch}", leave=False, file=sys.stderr)


def evaluate(trial: Trial, split: str = "val") -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the validation (or test) split (one read at the end)."""
    model = trial.model
    model.eval()
    loader = trial.loaders.test if split == "test" else trial.loaders.val
    assert loader is not None, f"the data has no {split} split"
    loss_sum = torch.zeros((), dtype=torch.float64, device=trial.device)
    correct = torch.zeros((), dtype=torch.int64, device=trial.device)
    total = 0
    with torch.no_grad():
        for inputs, labels in loading.batches(loader, 0):
            inputs = inputs.to(trial.device, non_blocking=True)
            labels = labels.to(trial.device, non_blocking=True)
            with autocast(trial):
                logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
            total += len(labels)
    if not total:
        return math.nan, math.nan
    summed, right = torch.stack([loss_sum, correct.double()]).tolist()
    return summed / total, right / total


def _test_metrics(trial: Trial) -> dict[str, float]:
    if trial.datasets.test is None:
        return {}
    test_loss, test_acc = evaluate(trial, "test")
    return {"test_loss": test_loss, "test_acc": test_acc}


def autocast(trial: Trial) -> contextlib.AbstractContextManager[Any]:
    if trial.cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if trial.cfg.amp == "bf16" else torch.float16
    return torch.autocast(trial.device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            Problem("device", name, "CUDA is not available here", "use device: auto or cpu")
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def np_random_seed(seed: int) -> None:
    import numpy as np

    np.random.seed(seed % 2**32)


def _latest_event(blocks: Blocks, monitor: SpikeMonitor) -> dict[str, float]:
    """Where the latest unfreeze event happened, as numbers: its epoch and the index of the
    deepest block it opened (-1 when there was none)."""
    if not monitor.events:
        return {"spike_event_epoch": -1.0, "spike_event_block": -1.0}
    event = monitor.events[-1]
    index = {b.name: b.index for b in blocks.blocks}
    return {
        "spike_event_epoch": float(event.epoch),
        "spike_event_block": float(min(index[name] for name in event.blocks)),
    }


def _make_contiguous(params: Sequence[nn.Parameter]) -> None:
    with torch.no_grad():
        for p in params:
            if not p.is_contiguous():
                p.data = p.data.contiguous()


def _out_of_memory(exc: RuntimeError) -> bool:
    """A CUDA OOM is its own type; the CPU allocator raises a RuntimeError that says so."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or any(
        marker in text for marker in ("can't allocate memory", "not enough memory")
    )


def _oom(
    exc: RuntimeError, trial: Trial, monitor: SpikeMonitor, epoch: int, step: int
) -> TrialFailed:
    # The stage is the number of unfreeze events so far: what grew the memory.
    grown = f"stage {len(monitor.events)}, {len(trial.freezer.status().unfrozen)} blocks"
    return TrialFailed("oom", f"{describe(exc)} ({grown})", epoch, step)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _epoch_line(cfg: TrialConfig, m: dict[str, float]) -> str:
    return (
        f"epoch {int(m['epoch'])}/{cfg.epochs - 1} | train loss {m['train_loss']:.4f} | "
        f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.3f}"
        + (f" | test acc {m['test_acc']:.3f}" if "test_acc" in m else "")
        + " | backbone trainable "
        f"{100 * m['backbone_trainable_ratio']:.1f}% ({int(m['unfrozen_blocks'])} blocks) | "
        f"lr head {m['lr/head']:.2e} | grad {m['grad_norm']:.3g} | skipped "
        f"{int(m['skipped_steps'])} | spike loss x{m['spike_loss_ratio']:.2f} grad "
        f"x{m['spike_grad_ratio']:.2f} | {m['epoch_seconds']:.1f}s"
    )


# --- checkpoints and metrics files ------------------------------------------------------------


def _save_checkpoint(trial: Trial, monitor: SpikeMonitor, state: LoopState, out: Path) -> Path:
    """Write atomically: a temp file renamed over the latest, whose old copy becomes previous.

    No name in ``out`` ever goes missing, not even for a moment, so a copy of the folder taken
    while the trial runs (Ray Tune syncs a trial's folder with each experiment snapshot) never
    finds a listed file gone: the new file and a second link to the old one are made in a
    scratch folder on the same filesystem, then renamed over ``checkpoint.pt`` and
    ``checkpoint.prev.pt``."""
    payload = {
        "model": trial.model.state_dict(),
        "optimizer": trial.optimizer.state_dict(),
        "scaler": trial.scaler.state_dict(),
        "freezer": trial.freezer.state_dict(),
        "monitor": monitor.state_dict(),
        "loop": vars(state),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "config": trial.cfg.to_dict(),
    }
    if torch.cuda.is_available():
        payload["rng"]["cuda"] = torch.cuda.get_rng_state_all()
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
    import hashlib
    import tempfile

    folder = Path(tempfile.gettempdir()) / "unfreeze-hpo-checkpoints"
    folder /= hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if folder.stat().st_dev == out.stat().st_dev:
            return folder
    except OSError:
        pass
    return out


def _resume(trial: Trial, monitor: SpikeMonitor, out: Path, log: Log) -> LoopState:
    path, payload = _load_checkpoint(out, trial.device, log)
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
    trial.model.load_state_dict(payload["model"])
    trial.optimizer.load_state_dict(payload["optimizer"])
    trial.scaler.load_state_dict(payload["scaler"])
    trial.freezer.load_state_dict(payload["freezer"])
    monitor.load_state_dict(payload["monitor"])
    torch.set_rng_state(payload["rng"]["torch"].cpu())
    random.setstate(_as_tuple(payload["rng"]["python"]))
    if "cuda" in payload["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    state = LoopState(**payload["loop"])
    trialdir.truncate(out, state.epoch)
    log(f"resumed from {path} at epoch {state.epoch} (step {state.step})")
    return state


def _load_checkpoint(out: Path, device: torch.device, log: Log) -> tuple[Path, dict[str, Any]]:
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


def _start_over(out: Path, log: Log) -> None:
    """A fresh run in a used folder: drop the old run's checkpoints and metrics."""
    stale = [out / n for n in trialdir.STALE]
    if any(p.exists() for p in stale[:2]):
        log(f"note: {out} holds an earlier run; starting over (use --resume to continue it)")
    for path in stale:
        path.unlink(missing_ok=True)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
