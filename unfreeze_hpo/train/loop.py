"""``run(cfg, report) -> Summary``: the epochs of one trial. Each applies the strategy's plan
(an unfreeze event opens a spike window), trains, validates, probes drift, writes a metrics line
and a checkpoint by policy, and reports."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unfreeze_hpo import trialdir
from unfreeze_hpo.blocks import Blocks
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.data import loading
from unfreeze_hpo.errors import ConfigError, Problem, describe
from unfreeze_hpo.faults import Injector
from unfreeze_hpo.models import unwrap
from unfreeze_hpo.signals import SpikeMonitor
from unfreeze_hpo.train import checkpoints, drift, memory
from unfreeze_hpo.train.replicas import Ranks
from unfreeze_hpo.train.step import StepValues, autocast, backward, optimizer_step
from unfreeze_hpo.train.trial import (
    Log,
    LoopState,
    Report,
    Summary,
    Trial,
    TrialFailed,
    np_random_seed,
    seed_everything,
    setup,
)

# A rank's dropout seed: seed * stride + rank, apart from every other trial seed's.
RANK_SEED_STRIDE = 1_000_033


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
    ranks: Ranks | None = None,
) -> Summary:
    """Train one trial to ``cfg.epochs``; with ``resume``, continue from the last checkpoint.

    ``weights``: a backbone pretrained on another task, loaded before training with a fresh
    classifier (the embedded default's source pretraining: ``embedded.weights_for(cfg)``).
    ``trial_id`` names the trial to the fault injector of the reliability tests (no other use).
    ``cpus``: the CPUs the trial was given (default: the process's), which set the loader
    workers when ``num_workers`` is unset. ``checkpoint_every``: epochs between checkpoints (the
    last epoch always has one); ``report`` gets None for the path on the others. ``progress``:
    draw a progress bar within each epoch on stderr.

    ``ranks``: this process's place in a data-parallel trial (torch.distributed already set
    up; see ``train.replicas``). Every rank runs this loop on its shard of each global batch
    and reports the same metrics; rank 0 alone writes the trial folder and its checkpoints,
    and passes their path to ``report`` (the others get None). ``cfg.output_dir`` is each
    rank's own: the others only read a checkpoint there to resume.
    """
    integer = isinstance(checkpoint_every, int) and not isinstance(checkpoint_every, bool)
    if not integer or checkpoint_every < 1:
        raise ConfigError(
            Problem("--checkpoint-every", checkpoint_every, "must be an integer >= 1", "e.g. 1")
        )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = ranks or Ranks()
    seed_everything(cfg.seed)  # the same on every rank: each builds the same model
    trial = setup(cfg, log, weights=weights, cpus=cpus, ranks=ranks)
    if ranks.distributed:  # from here each rank draws its own dropout
        torch.default_generator.manual_seed(cfg.seed * RANK_SEED_STRIDE + ranks.rank)
    try:
        return _run(trial, report, resume, log, trial_id, checkpoint_every, progress and ranks.lead)
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
    replicas, lead = trial.replicas, trial.replicas.ranks.lead
    trial.faults = Injector(cfg.faults, trial_id, rank=replicas.ranks.rank)
    unfreezer = trial.unfreezer
    monitor = SpikeMonitor(
        cfg.signals.baseline_steps,
        cfg.signals.window_steps,
        higher_is_better=cfg.monitor == "val_acc",
    )
    state = LoopState()
    if resume:
        state = checkpoints.resume(trial, monitor, out, log)
    elif lead:
        checkpoints.start_over(out, log)
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
        + (f", {replicas.ranks.world_size} ranks" if replicas.ranks.distributed else "")
    )
    for note in cfg.strategy.notes(cfg.epochs, sizes):
        log(f"note: {note}")
    prep = trial.datasets.preprocessing
    for warning in prep.warnings() if prep is not None else ():
        log(f"warning: {warning}")

    final: dict[str, float] = {}
    resumed_at = state.epoch
    for epoch in range(state.epoch, cfg.epochs):
        started = time.perf_counter()
        first_plan = unfreezer.plan is None
        newly = unfreezer.on_epoch_start(epoch)
        plan = unfreezer.plan
        assert plan is not None
        event = bool(newly) and not first_plan  # blocks trainable from the start are no event
        if event:
            opened = _opened(trial, newly)
            trainable = sum(p.numel() for p in trial.model.parameters() if p.requires_grad)
            added_trainable = sum(p.numel() for p in opened)
            monitor.on_unfreeze(
                epoch,
                state.step,
                newly,
                prior_params=trainable - added_trainable,
                new_params=added_trainable,
            )
            added = sum(b.numel for b in trial.blocks.blocks if b.name in newly)
            log(
                f"unfreeze event at epoch {epoch} (step {state.step}): {', '.join(newly)} "
                f"(+{added:,} parameters)"
            )
        if newly or epoch == resumed_at:  # DDP over what is trainable now: first, and on growth
            replicas.wrap()
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
        replicas.sync_buffers()
        replicas.check_identical(epoch)
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
            # How many samples val_acc is the share of: its sampling error, sqrt(p(1-p)/n).
            "val_samples": float(len(trial.datasets.val)),  # type: ignore[arg-type]
            **test,
            "grad_norm": train["grad_norm"],
            "grad_norm_max": train["grad_norm_max"],
            "skipped_steps": train["skipped"],
            "amp_skipped_steps": train["amp_skipped"],
            "skipped_total": float(state.skipped_total),
            "amp_skipped_total": float(state.amp_skipped_total),
            "peak_memory_mb": replicas.max(memory.peak_mb(trial.device)),
            "trainable_params": float(status.trainable),
            "frozen_params": float(status.frozen),
            "trainable_ratio": status.trainable_ratio,
            "backbone_trainable_ratio": status.backbone_ratio,
            "unfrozen_blocks": float(plan.n_trainable),
            **_latest_event(trial.blocks, monitor),
            "phase_epochs": _phase_epochs(cfg, sizes, monitor, epoch),
            "spike_window_steps": float(cfg.signals.window_steps),
            "epoch_seconds": time.perf_counter() - started,
            **{f"lr/{name}": lr for name, lr in unfreezer.freezer.lrs().items()},
            **moved,
            **monitor.metrics(),
            **replicas.metrics(),
        }
        if trial.faults:
            trial.faults.after_epoch(epoch, metrics)
        state.epoch = epoch + 1
        checkpoint = None
        if state.epoch % checkpoint_every == 0 or state.epoch == cfg.epochs:
            checkpoint = checkpoints.save(trial, monitor, state, out)
        if lead:
            trialdir.append(out, metrics, status.unfrozen)
            trialdir.write_csv(out)  # rewritten each epoch: a failed trial still leaves its table
        log(_epoch_line(cfg, metrics))
        log(status.line(epoch))
        if report is not None:
            report(metrics, checkpoint)
        final = metrics

    if state.epoch > 0 and not final:  # resumed after its last epoch: read what it wrote
        final = trialdir.read_rows(out)[-1] if lead else {}
    return Summary(
        state.epoch,
        state.step,
        final,
        state.best_val_acc,
        state.best_epoch,
        state.timeline,
        str(out),
    )


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
    trainable = sum(p.numel() for p in params)  # what DDP must all-reduce each step
    # The latest event's blocks, measured apart while its spike window is open.
    opened = _opened(trial, monitor.events[-1].blocks) if monitor.events else []
    values = StepValues(cfg.max_nonfinite_steps, monitor, state, epoch, bar, trial.replicas)
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
        new = opened if monitor.in_window(state.step) else ()
        try:
            if trial.faults and position == 0:
                first_after_event = unfroze and state.step == event_step
                stage = len(monitor.events) if first_after_event else 0
                inputs = trial.faults.before_step(epoch, state.step, stage, params, inputs)
            last = position == size - 1
            batch_loss = backward(trial, inputs, labels, 1.0 / size, synced=last)
            loss = batch_loss / size if position == 0 or loss is None else loss + batch_loss / size
            if last:
                trial.replicas.check_synced(trainable, epoch, state.step)
            outcome = optimizer_step(trial, loss, params, new) if last else None
        except RuntimeError as exc:
            if trial.faults:
                trial.faults.after_step()
            if _out_of_memory(exc):
                raise _oom(exc, trial, monitor, epoch, state.step) from exc
            near_event = unfroze and state.step - event_step < cfg.signals.window_steps
            # Ranks retrying alone would leave the others waiting in a collective: one process.
            alone = not trial.replicas.ranks.distributed
            if retried or not near_event or not alone:
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
                outcome = optimizer_step(trial, loss, params, new) if position == size - 1 else None
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


def _opened(trial: Trial, blocks: Sequence[str]) -> list[nn.Parameter]:
    """The trainable parameters of ``blocks``."""
    named = dict(unwrap(trial.model).named_parameters())
    chosen = [named[n] for b in trial.blocks.blocks if b.name in blocks for n in b.params]
    return [p for p in chosen if p.requires_grad]


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
    total: float = 0
    with torch.no_grad():
        for inputs, labels in loading.batches(loader, 0):
            inputs = inputs.to(trial.device, non_blocking=True)
            labels = labels.to(trial.device, non_blocking=True)
            with autocast(trial):
                logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
            total += len(labels)
    # Each rank evaluated its shard: the sums over all ranks, in one all-reduce and one read.
    sums = torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(float(total))])
    summed, right, total = trial.replicas.sum(sums).tolist()
    if not total:
        return math.nan, math.nan
    return summed / total, right / total


def _test_metrics(trial: Trial) -> dict[str, float]:
    if trial.datasets.test is None:
        return {}
    test_loss, test_acc = evaluate(trial, "test")
    return {"test_loss": test_loss, "test_acc": test_acc}


def _phase_epochs(
    cfg: TrialConfig, sizes: Sequence[int], monitor: SpikeMonitor, epoch: int
) -> float:
    """Epochs run in the schedule's fine-tuning phase, ``epoch`` included (0 before it starts):
    what ``--phase-grace`` reads before a rung may stop the trial (``Strategy.phase_start``)."""
    first = monitor.events[0].epoch if monitor.events else None
    start = cfg.strategy.phase_start(sizes, first)
    return 0.0 if start is None else float(max(0, epoch + 1 - start))


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
