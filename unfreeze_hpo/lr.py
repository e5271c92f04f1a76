"""The base (head) learning rate over a run's steps: its config and the pure schedule function.

The ``Unfreezer`` (and so every trial) sets each block's LR from this base, scaled per block by
the plan and ramped after an unfreeze event by the ``Freezer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from unfreeze_hpo.params import param


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = param("cosine", choices=("constant", "cosine"), help="base LR over the steps")
    warmup_steps: int = param(0, ge=0, help="linear warmup from the first step")
    min_lr_ratio: float = param(0.0, ge=0, le=1, help="cosine floor as a share of lr")


def lr_schedule(schedule: ScheduleConfig, lr: float, total_steps: int) -> Callable[[int], float]:
    """The base (head) LR as a pure function of the global step."""
    warmup, floor = schedule.warmup_steps, schedule.min_lr_ratio

    def base_lr(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if schedule.kind == "constant":
            return lr
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return base_lr
