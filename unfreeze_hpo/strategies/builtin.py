"""The strategies that ship with the package, registered under their names on import."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from unfreeze_hpo.errors import Problem
from unfreeze_hpo.params import param
from unfreeze_hpo.strategies.base import Strategy, blocks_for_ratio, register


@register(
    "early_gradual",
    "frozen for freeze_epochs, then blocks_per_epoch more blocks per "
    "epoch until target_ratio of the backbone is trainable",
)
@dataclass(frozen=True)
class EarlyGradual(Strategy):
    freeze_epochs: int = param(1, ge=0, help="epochs the whole backbone stays frozen")
    blocks_per_epoch: int = param(1, ge=1, help="blocks unfrozen at each epoch after that")
    target_ratio: float = param(
        0.5,
        gt=0,
        le=1,
        help="share of backbone parameters to unfreeze (the block that reaches it is included)",
    )

    def target(self, sizes: Sequence[int]) -> int:
        return blocks_for_ratio(sizes, self.target_ratio)

    def n_trainable(self, epoch: int, history: Sequence[float], sizes: Sequence[int]) -> int:
        if epoch < self.freeze_epochs:
            return 0
        return min((epoch - self.freeze_epochs + 1) * self.blocks_per_epoch, self.target(sizes))

    def notes(self, epochs: int, sizes: Sequence[int]) -> list[str]:
        steps = math.ceil(self.target(sizes) / self.blocks_per_epoch)
        done = self.freeze_epochs + steps - 1
        if done >= epochs:
            return [
                f"target_ratio {self.target_ratio} is reached at epoch {done}, beyond the "
                f"{epochs} epochs of training (epochs 0..{epochs - 1})"
            ]
        return []


@register(
    "adaptive",
    "unfreeze blocks_per_step more blocks whenever the validation metric has "
    "not improved by min_improvement for patience epochs",
)
@dataclass(frozen=True)
class Adaptive(Strategy):
    reads_history: ClassVar[bool] = True
    patience: int = param(2, ge=1, help="epochs without improvement before unfreezing more")
    min_improvement: float = param(
        0.005, ge=0, help="an epoch improves only if it beats the best metric by more than this"
    )
    blocks_per_step: int = param(1, ge=1, help="blocks unfrozen at each plateau")
    target_ratio: float = param(
        1.0,
        gt=0,
        le=1,
        help="share of backbone parameters to unfreeze "
        "at most (the block that reaches it is included)",
    )
    mode: str = param("max", choices=("max", "min"), help="max for accuracy, min for loss")

    def target(self, sizes: Sequence[int]) -> int:
        return blocks_for_ratio(sizes, self.target_ratio)

    def phase_deadline(self) -> int:
        # Twice its patience without an event: the head is still improving on a frozen
        # backbone, and the trial is judged as that.
        return 2 * self.patience

    def n_trainable(self, epoch: int, history: Sequence[float], sizes: Sequence[int]) -> int:
        sign = 1.0 if self.mode == "max" else -1.0
        best = -math.inf
        stale = n = 0
        for value in history:
            score = sign * value
            if score > best + self.min_improvement:  # False for NaN: a NaN epoch is no progress
                best, stale = score, 0
                continue
            stale += 1
            if stale >= self.patience:
                n, stale = n + self.blocks_per_step, 0
        return min(n, self.target(sizes))


@register(
    "progressive",
    "initial_blocks trainable, held for initial_freeze_epochs, then one "
    "more block every unfreeze_interval epochs (initial_blocks <= 0: all at once)",
)
@dataclass(frozen=True)
class Progressive(Strategy):
    initial_blocks: int = param(2, help="blocks trainable from the start; <= 0 unfreezes all")
    initial_freeze_epochs: int = param(10, ge=0, help="epochs to hold initial_blocks")
    unfreeze_interval: int = param(3, ge=1, help="epochs between later unfreeze events")

    def check_blocks(self, n_blocks: int) -> Iterator[Problem]:
        if self.initial_blocks > n_blocks:
            yield Problem(
                "strategy.initial_blocks",
                self.initial_blocks,
                f"asks for {self.initial_blocks} blocks but the model has {n_blocks}",
                f"use at most {n_blocks}, or 0 for all blocks from the start",
            )

    def n_trainable(self, epoch: int, history: Sequence[float], sizes: Sequence[int]) -> int:
        if self.initial_blocks <= 0:
            return len(sizes)
        n = self.initial_blocks
        if epoch >= self.initial_freeze_epochs:
            n += 1 + (epoch - self.initial_freeze_epochs) // self.unfreeze_interval
        return min(n, len(sizes))

    def last_unfreeze_epoch(self, n_blocks: int) -> int:
        """The epoch at which the last block becomes trainable."""
        if self.initial_blocks <= 0 or self.initial_blocks >= n_blocks:
            return 0
        extra = n_blocks - self.initial_blocks
        return self.initial_freeze_epochs + (extra - 1) * self.unfreeze_interval

    def notes(self, epochs: int, sizes: Sequence[int]) -> list[str]:
        last = self.last_unfreeze_epoch(len(sizes))
        if last >= epochs:
            return [
                f"the last block unfreezes at epoch {last}, beyond the {epochs} epochs of "
                f"training; raise epochs or shorten unfreeze_interval"
            ]
        return []


@register("fixed", "explicit phases: from epoch E on, the last N blocks are trainable")
@dataclass(frozen=True)
class Fixed(Strategy):
    phases: tuple[tuple[int, int], ...] = param(
        ((0, 0),),
        help="(epoch, n_blocks) pairs with increasing epochs and non-decreasing "
        "n_blocks; before the first phase the backbone is frozen",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", _as_phases(self.phases))
        super().__post_init__()

    def check(self) -> Iterator[Problem]:
        phases = self.phases
        if not isinstance(phases, tuple):
            yield Problem(
                "strategy.phases",
                phases,
                "must be a list of [epoch, n_blocks] pairs",
                "e.g. [[0, 0], [3, 2]]",
            )
            return
        if not phases:
            yield Problem("strategy.phases", [], "no phases", "give at least one [epoch, n]")
            return
        for i, phase in enumerate(phases):
            ok = (
                isinstance(phase, tuple)
                and len(phase) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in phase)
            )
            if not ok:
                yield Problem(
                    f"strategy.phases[{i}]",
                    phase,
                    "must be a pair of integers >= 0",
                    "write [epoch, n_blocks], e.g. [3, 2]",
                )
                return
        epochs = [p[0] for p in phases]
        counts = [p[1] for p in phases]
        if any(b <= a for a, b in itertools.pairwise(epochs)):
            yield Problem(
                "strategy.phases",
                [list(p) for p in phases],
                "epochs must increase",
                "sort the phases by epoch, one phase per epoch",
            )
        if any(b < a for a, b in itertools.pairwise(counts)):
            yield Problem(
                "strategy.phases",
                [list(p) for p in phases],
                "n_blocks must not decrease",
                "a phase never refreezes blocks",
            )

    def check_blocks(self, n_blocks: int) -> Iterator[Problem]:
        for i, (epoch, count) in enumerate(self.phases):
            if count > n_blocks:
                yield Problem(
                    f"strategy.phases[{i}]",
                    [epoch, count],
                    f"asks for {count} blocks but the model has {n_blocks}",
                    f"use at most {n_blocks}, e.g. [{epoch}, {n_blocks}] (all blocks)",
                )

    def n_trainable(self, epoch: int, history: Sequence[float], sizes: Sequence[int]) -> int:
        n = 0
        for start, count in self.phases:
            if epoch >= start:
                n = count
        return min(n, len(sizes))

    def notes(self, epochs: int, sizes: Sequence[int]) -> list[str]:
        out = []
        if self.phases[-1][1] > len(sizes):
            out.append(
                f"the last phase asks for {self.phases[-1][1]} blocks but the model has "
                f"{len(sizes)}; all are unfrozen"
            )
        late = [p for p in self.phases if p[0] >= epochs]
        if late:
            out.append(
                f"phases starting at epochs {[p[0] for p in late]} never run in {epochs} epochs"
            )
        return out


@register("full", "the whole backbone trainable from the first epoch (full fine-tuning)")
@dataclass(frozen=True)
class Full(Strategy):
    def n_trainable(self, epoch: int, history: Sequence[float], sizes: Sequence[int]) -> int:
        return len(sizes)


@register("frozen", "the backbone never trains; only the head does (linear probe)")
@dataclass(frozen=True)
class Frozen(Strategy):
    def target(self, sizes: Sequence[int]) -> int:
        return 0

    def n_trainable(self, epoch: int, history: Sequence[float], sizes: Sequence[int]) -> int:
        return 0


def _as_phases(value: Any) -> Any:
    """Accept [[epoch, n], ...] or [{epoch: E, blocks: N}, ...]; leave anything else to check()."""
    if not isinstance(value, list | tuple):
        return value
    out = []
    for item in value:
        if isinstance(item, Mapping) and set(item) == {"epoch", "blocks"}:
            item = (item["epoch"], item["blocks"])
        out.append(tuple(item) if isinstance(item, list | tuple) else item)
    return tuple(out)
