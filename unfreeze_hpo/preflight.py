"""Preflight: overfit a tiny subset before a search spends a cluster, and diagnose what fails.

Half the backbone is made trainable (the last blocks), so one short run shows whether the loss
falls, whether trainable parameters move and whether frozen ones stay put.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from unfreeze_hpo import embedded
from unfreeze_hpo.config import ScheduleConfig, TrialConfig
from unfreeze_hpo.strategies import Plan, lr_scales
from unfreeze_hpo.train import Log, seed_everything, setup, train_step


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class PreflightResult:
    checks: tuple[Check, ...]
    diagnosis: tuple[str, ...]
    losses: tuple[float, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def report(self) -> str:
        lines = [f"preflight {'PASSED' if self.passed else 'FAILED'}"]
        lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        lines += [f"  diagnosis: {d}" for d in self.diagnosis]
        return "\n".join(lines)


def preflight(
    cfg: TrialConfig,
    *,
    samples: int = 16,
    steps: int = 60,
    min_drop: float = 0.3,
    log: Log = print,
) -> PreflightResult:
    """Train ``steps`` steps on ``samples`` training examples at the config's LR and check."""
    seed_everything(cfg.seed)
    # A constant LR: the check is about whether training works, not about the schedule.
    trial = setup(
        cfg.replace(schedule=ScheduleConfig(kind="constant"), epochs=1),
        log,
        weights=embedded.weights_for(cfg, log),
    )
    n_blocks = len(trial.blocks)
    n_trainable = math.ceil(n_blocks / 2)
    plan = Plan(
        0,
        n_trainable,
        lr_scales(n_blocks, n_trainable, cfg.optimizer.backbone_lr_mult, cfg.optimizer.layer_decay),
    )
    trial.freezer.train()
    trial.freezer.apply(plan, 0)
    params = [p for p in trial.model.parameters() if p.requires_grad]
    named = dict(trial.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}

    subset = Subset(trial.datasets.train, range(min(samples, len(trial.datasets.train))))  # type: ignore[arg-type]
    batches = itertools.cycle(DataLoader(subset, batch_size=min(cfg.batch_size, samples)))
    losses: list[float] = []
    skipped: dict[str, int] = {}
    for step in range(steps):
        inputs, labels = next(batches)
        trial.freezer.set_lr(step)
        outcome = train_step(trial, inputs.to(trial.device), labels.to(trial.device), params)
        read = outcome.read()  # a short check: one read per step is fine here
        loss, reason = read.loss, read.skipped
        losses.append(loss)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1

    parts = [*trial.blocks.blocks, trial.blocks.head]
    trainable = [b for i, b in enumerate(parts) if i == n_blocks or plan.is_trainable(i)]
    frozen = [b for i, b in enumerate(parts[:-1]) if not plan.is_trainable(i)]
    stuck = [b.name for b in trainable if all(torch.equal(before[n], named[n]) for n in b.params)]
    moved = [b.name for b in frozen if not all(torch.equal(before[n], named[n]) for n in b.params)]
    k = max(1, min(5, steps // 4))
    first, last = _mean(losses[:k]), _mean(losses[-k:])
    falls = math.isfinite(last) and last < first * (1 - min_drop)
    checks = (
        Check(
            "loss falls",
            falls,
            f"mean of the first {k} steps {first:.4f} -> last {k} "
            f"steps {last:.4f} (needs a drop of {min_drop:.0%})",
        ),
        Check(
            "trainable parameters move",
            not stuck,
            f"all of {len(trainable)} trainable groups moved"
            if not stuck
            else f"did not move: {', '.join(stuck)}",
        ),
        Check(
            "frozen parameters stay put",
            not moved,
            f"{len(frozen)} frozen groups unchanged"
            if not moved
            else f"changed while frozen: {', '.join(moved)}",
        ),
        Check(
            "no skipped steps",
            not skipped,
            "all steps ran"
            if not skipped
            else ", ".join(f"{n} {reason}" for reason, n in skipped.items()) + f" of {steps}",
        ),
    )
    result = PreflightResult(
        checks, tuple(_diagnose(cfg, checks, skipped, steps, stuck)), tuple(losses)
    )
    return result


def _diagnose(
    cfg: TrialConfig,
    checks: tuple[Check, ...],
    skipped: dict[str, int],
    steps: int,
    stuck: list[str],
) -> list[str]:
    out = []
    overflow = skipped.get("amp_overflow", 0)
    if overflow:
        out.append(
            f"fp16 mixed precision: the GradScaler found inf/NaN gradients and skipped {overflow}"
            f" of {steps} steps, so parameters {'did not move' if stuck else 'moved less'}; "
            "use amp: bf16 (no scaler needed) or amp: none, or lower optimizer.lr"
        )
    if skipped.get("nonfinite_loss") or skipped.get("nonfinite_grad"):
        out.append(
            "non-finite loss or gradients: lower optimizer.lr, set optimizer.grad_clip, "
            "and check that inputs are normalised and labels are in range"
        )
    if stuck and not overflow:
        out.append(
            f"trainable groups did not move ({', '.join(stuck)}): their LR is 0 "
            "(check backbone_lr_mult / layer_decay) or no gradient reaches them "
            "(a detach or no_grad in the model's forward)"
        )
    if not checks[2].passed:
        out.append(
            "frozen parameters changed: something outside the plan updates them "
            "(an EMA, a second optimizer, or in-place edits in the forward)"
        )
    if not checks[0].passed and not skipped and not stuck:
        out.append(
            f"the loss does not fall on a tiny subset at lr {cfg.optimizer.lr:g}: try a "
            "larger or smaller lr, and check that labels match inputs"
        )
    return out


def _mean(values: Any) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
