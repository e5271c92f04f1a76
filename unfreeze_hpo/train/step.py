"""One optimizer step, left on the device: ``backward`` (forward and a weighted backward of a
batch), ``optimizer_step`` (unscale, clip, and a step a non-finite loss or gradient skips on the
device), and ``StepValues``, which reads an epoch's step values ``READ_EVERY`` steps at a time.

Within an unfreeze event's spike window a step also measures the gradient norm of the
parameters that were trainable before the event apart from that of the newly unfrozen ones, so
the spike signals compare like with like (``signals.SpikeMonitor``).

An fp16 overflow is the GradScaler at work: it skips the step and halves its scale. Such a step
counts as non-finite (a spike step, a step towards divergence) only once the scale it leaves is
below ``MIN_AMP_SCALE``: the gradients then overflow fp16 even unscaled.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from unfreeze_hpo.signals import SpikeMonitor
from unfreeze_hpo.train.replicas import Replicas
from unfreeze_hpo.train.trial import LoopState, Trial, TrialFailed

# Steps between the loop's reads of its per-step values (loss, grad norm, skip flag) from the
# device: one transfer per READ_EVERY steps instead of several per step.
READ_EVERY = 32
# What a step's skip code means (StepOutcome.skipped): 0, the step ran.
SKIPPED: tuple[str | None, ...] = (None, "nonfinite_loss", "nonfinite_grad", "amp_overflow")
# The GradScaler scale under which an fp16 overflow is a non-finite step, not the scaler at work
# (from its initial 2**16, 17 overflows with no growth between them).
MIN_AMP_SCALE = 1.0


@dataclass
class StepOutcome:
    """One optimizer step's values, left on the device (reading them is a host sync)."""

    loss: torch.Tensor  # 0-d: mean over the step's batches
    grad_norm: torch.Tensor  # 0-d: before clipping
    skipped: torch.Tensor  # 0-d int: an index into SKIPPED, 0 when the step ran
    # 0-d, before clipping, nan outside a spike window: the norm of the gradients of the
    # parameters trainable before the latest event, and of those it unfroze.
    prior_norm: torch.Tensor
    new_norm: torch.Tensor
    scale: torch.Tensor  # 0-d: the GradScaler's scale after the step (1 without fp16)

    def read(self) -> StepRead:
        """The values on the host (one transfer)."""
        return read_outcomes([self])[0]


class StepRead(NamedTuple):
    """A step's values on the host."""

    loss: float
    grad_norm: float
    skipped: str | None  # why the step was skipped; None: it ran
    prior_norm: float
    new_norm: float
    scale: float

    @property
    def overflow(self) -> bool:
        """An fp16 overflow the GradScaler skipped, its scale still at or above MIN_AMP_SCALE."""
        return self.skipped == "amp_overflow" and self.scale >= MIN_AMP_SCALE


FIELDS = ("loss", "grad_norm", "skipped", "prior_norm", "new_norm", "scale")


def read_outcomes(
    outcomes: Sequence[StepOutcome], replicas: Replicas | None = None
) -> list[StepRead]:
    """Each step's values, read from the device in one transfer; with the ``replicas`` of a
    data-parallel trial, taken over all its ranks first (one all-reduce)."""
    columns = [torch.stack([getattr(o, name).float() for o in outcomes]) for name in FIELDS]
    rows = torch.stack(columns, dim=1)
    if replicas is not None and replicas.ranks.distributed:
        rows = _across_ranks(rows, replicas)
    return [
        StepRead(loss, norm, SKIPPED[int(code)], prior, new, scale)
        for loss, norm, code, prior, new, scale in rows.tolist()
    ]


def _across_ranks(rows: torch.Tensor, replicas: Replicas) -> torch.Tensor:
    """The steps' values over all ranks: the mean loss (non-finite if any rank's was, so one
    rank's NaN counts), the norms and scale (the same on every rank: they are read after DDP's
    all-reduce), and the first reason in ``SKIPPED`` order that any rank skipped for."""
    code = FIELDS.index("skipped")
    reasons = nn.functional.one_hot(rows[:, code].long(), len(SKIPPED)).float()
    summed = replicas.sum(torch.cat([rows, reasons], dim=1))
    values, counts = summed[:, : len(FIELDS)] / replicas.ranks.world_size, summed[:, len(FIELDS) :]
    skipped = counts[:, 1:] > 0
    values[:, code] = torch.where(skipped.any(dim=1), skipped.float().argmax(dim=1) + 1, 0)
    return values


def train_step(
    trial: Trial, inputs: torch.Tensor, labels: torch.Tensor, params: Sequence[nn.Parameter]
) -> StepOutcome:
    """One optimizer step on one batch (see ``backward`` and ``optimizer_step``)."""
    return optimizer_step(trial, backward(trial, inputs, labels, 1.0), params)


def backward(
    trial: Trial, inputs: torch.Tensor, labels: torch.Tensor, weight: float, synced: bool = True
) -> torch.Tensor:
    """Forward and backward of one batch, its loss weighted by ``weight`` (1 / the batches of
    the step); returns the unweighted loss, detached, on the device.

    ``labels``: class indices, or soft targets (mixup), which carry their label smoothing.
    In a data-parallel trial the gradients are all-reduced across the ranks unless ``synced``
    is False (a micro-batch of an accumulated step but its last)."""
    with trial.replicas.sync(synced):
        with autocast(trial):
            logits = trial.replicas.module(inputs)
        smoothing = trial.cfg.label_smoothing if labels.ndim == 1 else 0.0
        loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        # A non-finite loss backpropagates non-finite gradients, and the step is skipped on
        # them (on every rank: DDP's all-reduce spreads them).
        trial.scaler.scale(loss * weight).backward()
    return loss.detach()


def optimizer_step(
    trial: Trial,
    loss: torch.Tensor,
    params: Sequence[nn.Parameter],
    new: Sequence[nn.Parameter] = (),
) -> StepOutcome:
    """Unscale, clip and step on the accumulated gradients; a non-finite loss or gradient
    skips the step on the device. Nothing is read back and nothing is sanitised.

    ``new``: the parameters among ``params`` that the latest unfreeze event opened, given while
    its spike window is open; their gradient norm and that of the others are measured apart."""
    optimizer, scaler = trial.optimizer, trial.scaler
    scaler.unscale_(optimizer)
    prior_norm, new_norm = _split_norms(params, new, loss)
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
        # The scale tensor itself (get_scale() would read it): updated in place on each step.
        scale = scaler._get_scale_async().detach().clone()  # type: ignore[union-attr]
    else:
        _step_unless(optimizer, code != 0)
        scale = loss.new_ones(())
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, norm.detach(), code, prior_norm, new_norm, scale)


def _split_norms(
    params: Sequence[nn.Parameter], new: Sequence[nn.Parameter], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient norms of ``params`` outside ``new`` and inside it (nan, nan without
    ``new``), on the device; the total norm of the clip is computed as it always is."""
    if not new:
        missing = like.new_full((), math.nan)
        return missing, missing
    opened = {id(p) for p in new}
    prior = [p.grad for p in params if p.grad is not None and id(p) not in opened]
    newly = [p.grad for p in new if p.grad is not None]

    def norm(tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return like.new_zeros((), dtype=torch.float32)
        return torch.nn.utils.get_total_norm(tensors).detach().float()

    return norm(prior), norm(newly)


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


class StepValues:
    """An epoch's per-step values: kept on the device, read ``READ_EVERY`` steps at a time,
    then fed to the spike monitor and the divergence check in step order."""

    def __init__(
        self,
        max_nonfinite: int,
        monitor: SpikeMonitor,
        state: LoopState,
        epoch: int,
        bar: Any,
        replicas: Replicas | None = None,
    ) -> None:
        self.max_nonfinite, self.monitor, self.state = max_nonfinite, monitor, state
        self.replicas = replicas
        self.epoch, self.bar = epoch, bar
        self.pending: list[StepOutcome] = []
        self.next_step = state.step  # global step of pending[0]
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.skipped = 0
        self.amp_skipped = 0

    def add(self, outcome: StepOutcome) -> None:
        self.pending.append(outcome)
        if len(self.pending) >= READ_EVERY:
            self.read()

    def read(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        state = self.state
        for values in read_outcomes(pending, self.replicas):  # the one read of these steps
            step, self.next_step = self.next_step, self.next_step + 1
            loss, norm, reason = values.loss, values.grad_norm, values.skipped
            # A step whose loss was already non-finite has no meaningful gradient norm.
            self.monitor.update(
                step,
                loss,
                math.nan if reason == "nonfinite_loss" else norm,
                prior_norm=None if math.isnan(values.prior_norm) else values.prior_norm,
                new_norm=None if math.isnan(values.new_norm) else values.new_norm,
                overflow=values.overflow,
            )
            if reason is None:
                state.nonfinite_streak = 0
                self.losses.append(loss)
                self.norms.append(norm)
                continue
            self.skipped += 1
            state.skipped_total += 1
            if reason == "amp_overflow":
                self.amp_skipped += 1
                state.amp_skipped_total += 1
            if values.overflow:  # the GradScaler at work: no step towards divergence
                continue
            state.nonfinite_streak += 1
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
            "amp_skipped": float(self.amp_skipped),
            "steps_taken": float(len(self.losses)),
        }


def autocast(trial: Trial) -> contextlib.AbstractContextManager[Any]:
    if trial.cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if trial.cfg.amp == "bf16" else torch.float16
    return torch.autocast(trial.device.type, dtype=dtype)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
