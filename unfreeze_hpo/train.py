"""One trial: the full fine-tuning loop with gradual unfreezing, ``run(cfg, report) -> Summary``.

Each epoch: the strategy's plan is applied and audited; each step trains with non-finite
numbers skipped and counted, never sanitised; each epoch ends with validation (and the test
split, when the data has one: reported, never chosen on), the drift probe, spike signals, a
metrics line, an atomic checkpoint and a report. No Ray or pandas here.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from unfreeze_hpo import data, trialdir
from unfreeze_hpo.blocks import Blocks
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem, UnfreezeHPOError, describe
from unfreeze_hpo.faults import Injector
from unfreeze_hpo.freezing import Freezer
from unfreeze_hpo.models import build, load_checkpoint, model_input
from unfreeze_hpo.signals import SpikeMonitor
from unfreeze_hpo.trialdir import CHECKPOINT, PREVIOUS
from unfreeze_hpo.unfreezer import Unfreezer

Report = Callable[[dict[str, float], Path | None], None]
Log = Callable[[str], None]
RESUMABLE_CHANGES = ("epochs", "output_dir", "provenance")  # config keys a resume may change


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
    loss: float
    grad_norm: float
    skipped: str | None  # None, "nonfinite_loss", "nonfinite_grad" or "amp_overflow"


@dataclass
class Trial:
    """The objects one trial trains with (also what preflight drives)."""

    cfg: TrialConfig
    device: torch.device
    model: nn.Module
    unfreezer: Unfreezer  # blocks, optimizer, plan and LR schedule: the library's own API
    scaler: torch.amp.GradScaler
    datasets: data.Datasets
    steps_per_epoch: int
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
) -> Summary:
    """Train one trial to ``cfg.epochs``; with ``resume``, continue from the last checkpoint.

    ``weights``: a backbone pretrained on another task, loaded before training with a fresh
    classifier (the embedded default's source pretraining: ``embedded.weights_for(cfg)``).
    ``trial_id`` names the trial to the fault injector of the reliability tests (no other use).
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    trial = setup(cfg, log, weights=weights)
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
    log(
        f"trial: {cfg.model.name}, {len(trial.blocks)} blocks, strategy {cfg.strategy}, "
        f"{cfg.epochs} epochs x {trial.steps_per_epoch} steps, device {trial.device}, "
        f"amp {cfg.amp}"
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
        before = _snapshot(trial)
        train = _train_epoch(trial, monitor, state, epoch, unfroze=event, log=log)
        val_loss, val_acc = evaluate(trial)
        test = _test_metrics(trial)
        monitored = val_acc if cfg.monitor == "val_acc" else val_loss
        status = unfreezer.on_epoch_end({cfg.monitor: monitored})  # history, audit, status
        monitor.on_epoch_end(epoch, monitored)
        drift = _drift(trial, before, steps_taken=train["steps_taken"])
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
            "trainable_params": float(status.trainable),
            "frozen_params": float(status.frozen),
            "trainable_ratio": status.trainable_ratio,
            "backbone_trainable_ratio": status.backbone_ratio,
            "unfrozen_blocks": float(plan.n_trainable),
            **_latest_event(trial.blocks, monitor),
            "spike_window_steps": float(cfg.signals.window_steps),
            "epoch_seconds": time.perf_counter() - started,
            **{f"lr/{name}": lr for name, lr in unfreezer.freezer.lrs().items()},
            **drift,
            **monitor.metrics(),
        }
        if trial.faults:
            trial.faults.after_epoch(epoch, metrics)
        state.epoch = epoch + 1
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


def setup(cfg: TrialConfig, log: Log = print, *, weights: Path | None = None) -> Trial:
    """Data, model (with its weights; see ``run`` for ``weights``), blocks, optimizer and
    freezer for ``cfg``."""
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
    model.to(device)
    mixup = _mixup(cfg, num_classes)
    samples = len(datasets.train)  # type: ignore[arg-type]
    # Mixup pairs samples within a batch, so a ragged last batch is dropped.
    steps_per_epoch = samples // cfg.batch_size if mixup else math.ceil(samples / cfg.batch_size)
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
    return Trial(
        cfg,
        device,
        model,
        unfreezer,
        scaler,
        datasets,
        steps_per_epoch,
        mixup=mixup,
    )


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
    """One optimizer step. A non-finite loss or gradient skips the step; nothing is sanitised.

    ``labels``: class indices, or soft targets (mixup), which carry their label smoothing."""
    optimizer, scaler = trial.optimizer, trial.scaler
    with autocast(trial):
        logits = trial.model(inputs)
    smoothing = trial.cfg.label_smoothing if labels.ndim == 1 else 0.0
    loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss_value, math.nan, "nonfinite_loss")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    clip = trial.cfg.optimizer.grad_clip or math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else 0.0
    skipped = None
    if not math.isfinite(grad_norm):
        # With fp16 the scaler skips the step itself and lowers its scale; without a scaler
        # the step must not run at all.
        skipped = "amp_overflow" if scaler.is_enabled() else "nonfinite_grad"
    if skipped != "nonfinite_grad":
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss_value, grad_norm, skipped)


def _train_epoch(
    trial: Trial, monitor: SpikeMonitor, state: LoopState, epoch: int, unfroze: bool, log: Log
) -> dict[str, float]:
    cfg = trial.cfg
    params = [p for p in trial.model.parameters() if p.requires_grad]
    losses, norms = [], []
    skipped = 0
    retried = False
    event_step = state.step
    if trial.mixup is not None:
        # timm's Mixup draws from numpy's global generator: seeded per epoch, so a resumed run
        # mixes as the uninterrupted one did.
        np_random_seed(cfg.seed * 1_000_003 + epoch)
    for inputs, labels in _loader(trial, epoch):
        inputs, labels = inputs.to(trial.device), labels.to(trial.device)
        if trial.mixup is not None:
            inputs, labels = trial.mixup(inputs, labels)
        trial.unfreezer.step()  # this step's LRs
        try:
            if trial.faults:
                first_after_event = unfroze and state.step == event_step
                stage = len(monitor.events) if first_after_event else 0
                inputs = trial.faults.before_step(epoch, state.step, stage, params, inputs)
            outcome = train_step(trial, inputs, labels, params)
        except RuntimeError as exc:
            if _out_of_memory(exc):
                raise _oom(exc, trial, monitor, epoch, state.step) from exc
            near_event = unfroze and state.step - event_step < cfg.signals.window_steps
            if retried or not near_event:
                raise TrialFailed("runtime_error", describe(exc), epoch, state.step) from exc
            # Newly unfrozen parameters may be non-contiguous views; one retry after fixing that.
            log(
                f"warning: {describe(exc)} right after an unfreeze; retrying the step once "
                "with contiguous parameters"
            )
            retried = True
            trial.optimizer.zero_grad(set_to_none=True)
            _make_contiguous(params)
            try:
                outcome = train_step(trial, inputs, labels, params)
            except RuntimeError as again:
                if _out_of_memory(again):
                    raise _oom(again, trial, monitor, epoch, state.step) from again
                raise TrialFailed(
                    "runtime_error", f"{describe(again)} (also after the retry)", epoch, state.step
                ) from again
        finally:
            if trial.faults:
                trial.faults.after_step()
        monitor.update(state.step, outcome.loss, outcome.grad_norm)
        state.step += 1
        if outcome.skipped:
            skipped += 1
            state.nonfinite_streak += 1
            state.skipped_total += 1
            state.amp_skipped_total += outcome.skipped == "amp_overflow"
            if state.nonfinite_streak >= cfg.max_nonfinite_steps:
                raise TrialFailed(
                    "diverged",
                    f"{state.nonfinite_streak} consecutive steps with non-finite "
                    f"loss or gradients (last: {outcome.skipped})",
                    epoch,
                    state.step,
                )
            continue
        state.nonfinite_streak = 0
        losses.append(outcome.loss)
        norms.append(outcome.grad_norm)
    return {
        "loss": _mean(losses),
        "grad_norm": _mean(norms),
        "grad_norm_max": max(norms, default=0.0),
        "skipped": float(skipped),
        "steps_taken": float(len(losses)),
    }


def evaluate(trial: Trial, split: str = "val") -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the validation (or test) split."""
    model = trial.model
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    dataset = trial.datasets.test if split == "test" else trial.datasets.val
    assert dataset is not None, f"the data has no {split} split"
    loader = DataLoader(dataset, batch_size=trial.cfg.batch_size, num_workers=trial.cfg.num_workers)
    with torch.no_grad():
        for inputs, labels in loader:
            inputs, labels = inputs.to(trial.device), labels.to(trial.device)
            with autocast(trial):
                logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == labels).sum())
            total += len(labels)
    return (loss_sum / total, correct / total) if total else (math.nan, math.nan)


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


def _loader(trial: Trial, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # The order of an epoch is a pure function of (seed, epoch): a resumed run sees the same.
    generator = torch.Generator().manual_seed(trial.cfg.seed * 1_000_003 + epoch)
    return iter(
        DataLoader(
            trial.datasets.train,
            batch_size=trial.cfg.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=trial.cfg.num_workers,
            drop_last=trial.mixup is not None,
        )
    )


def _snapshot(trial: Trial) -> list[torch.Tensor]:
    """Parameter values per block and head, taken before the epoch (before any EMA)."""
    params = dict(trial.model.named_parameters())
    return [
        torch.cat([params[n].detach().flatten().float() for n in part.params]).clone()
        if part.params
        else torch.zeros(0)
        for part in (*trial.blocks.blocks, trial.blocks.head)
    ]


def _drift(trial: Trial, before: list[torch.Tensor], steps_taken: float) -> dict[str, float]:
    """How far each group moved this epoch; trainable groups that did not move and frozen
    groups that did are counted (the "parameters not moving" failure)."""
    now = _snapshot(trial)
    plan = trial.freezer.plan
    assert plan is not None
    stuck = moved_frozen = 0
    smallest = math.inf
    parts = (*trial.blocks.blocks, trial.blocks.head)
    for i, (part, old, new) in enumerate(zip(parts, before, now, strict=True)):
        if not part.params:
            continue
        delta = float((new - old).norm())
        trainable = part is trial.blocks.head or plan.is_trainable(i)
        if trainable:
            smallest = min(smallest, delta)
            stuck += steps_taken > 0 and delta == 0.0
        else:
            moved_frozen += delta != 0.0
    return {
        "drift_min_trainable": smallest if math.isfinite(smallest) else 0.0,
        "drift_stuck_groups": float(stuck),
        "drift_moved_frozen_groups": float(moved_frozen),
    }


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
    """Write atomically: a temp file renamed over the latest, whose old copy becomes previous."""
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
    tmp = out / (CHECKPOINT + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    if trial.faults:
        trial.faults.before_rename(state.epoch - 1)
    latest = out / CHECKPOINT
    if latest.exists():
        os.replace(latest, out / PREVIOUS)
    os.replace(tmp, latest)
    return latest


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
