"""Freezing strategies: pure rules from (epoch, metric history, block sizes) to a plan.

A strategy only decides how many of the *last* blocks (nearest the output) are trainable. It holds
no state: the plan for epoch ``e`` is recomputed from its inputs, so a resumed run gets the same
plan as an uninterrupted one. ``history[i]`` is the monitored metric after epoch ``i``; the plan
for epoch ``e`` reads ``history[:e]`` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.params import check_value, coerce, param

# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class Plan:
    """What a strategy decides for one epoch: the trainable blocks and each block's LR scale."""

    epoch: int
    n_trainable: int
    lr_scales: tuple[float, ...]  # one per block, input -> output; 0.0 for a frozen block

    @property
    def n_blocks(self) -> int:
        return len(self.lr_scales)

    @property
    def trainable(self) -> tuple[int, ...]:
        """Indices of the trainable blocks: the last ``n_trainable``."""
        return tuple(range(self.n_blocks - self.n_trainable, self.n_blocks))

    def is_trainable(self, index: int) -> bool:
        return index >= self.n_blocks - self.n_trainable


def lr_scales(
    n_blocks: int, n_trainable: int, backbone_lr_mult: float = 1.0, layer_decay: float = 1.0
) -> tuple[float, ...]:
    """Per-block LR scale relative to the head's LR.

    A trainable block ``i`` gets ``backbone_lr_mult * layer_decay ** (n_blocks - 1 - i)``: the
    block next to the head gets ``backbone_lr_mult``, each one further from it ``layer_decay``
    times less. Frozen blocks get 0.
    """
    first = n_blocks - n_trainable
    return tuple(
        backbone_lr_mult * layer_decay ** (n_blocks - 1 - i) if i >= first else 0.0
        for i in range(n_blocks)
    )


def blocks_for_ratio(sizes: Sequence[int], ratio: float) -> int:
    """How many of the last blocks it takes for their share of the backbone to reach ``ratio``.

    Counting from the output, blocks are added while the unfrozen share is below ``ratio``; the
    block that makes the share reach or pass ``ratio`` is included, and none after it. So the
    share reached is the smallest one achievable that is >= ``ratio``, and without the last
    block counted it is < ``ratio``.
    """
    total = sum(sizes)
    if total == 0:
        return len(sizes)
    unfrozen = 0
    for n, size in enumerate(reversed(sizes), start=1):
        unfrozen += size
        # A relative tolerance so that ratio=0.5 over two equal blocks counts exactly one.
        if unfrozen >= ratio * total * (1 - 1e-12):
            return n
    return len(sizes)


# ---------------------------------------------------------------------------------------------
# The strategy interface and its registry


class Strategy(ABC):
    """A freezing strategy. Subclasses are frozen dataclasses whose fields are ``param(...)``."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def __post_init__(self) -> None:
        problems = [
            p
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if (p := check_value(f"strategy.{f.name}", getattr(self, f.name), f.metadata))
            is not None
        ]
        problems += list(self.check())
        if problems:
            raise ConfigError(problems)

    def check(self) -> Iterator[Problem]:
        """Cross-field and structured checks beyond each field's bounds."""
        return iter(())

    def check_blocks(self, n_blocks: int) -> Iterator[Problem]:
        """Parameters that name more blocks than a model of ``n_blocks`` blocks has."""
        return iter(())

    @abstractmethod
    def n_trainable(self, epoch: int, history: Sequence[float], sizes: Sequence[int]) -> int:
        """How many of the last blocks are trainable during ``epoch`` (0-based)."""

    def target(self, sizes: Sequence[int]) -> int:
        """The most blocks this strategy will ever make trainable for these block sizes."""
        return len(sizes)

    def notes(self, epochs: int, sizes: Sequence[int]) -> list[str]:
        """Warnings about this strategy over a run of ``epochs`` (e.g. target never reached)."""
        return []

    def plan(
        self,
        epoch: int,
        history: Sequence[float],
        sizes: Sequence[int],
        *,
        backbone_lr_mult: float = 1.0,
        layer_decay: float = 1.0,
    ) -> Plan:
        """The plan for ``epoch``: a pure function of the arguments."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(Problem("epoch", epoch, "must be an integer >= 0", "count from 0"))
        if not sizes:
            raise ConfigError(
                Problem("sizes", list(sizes), "no backbone blocks", "discover blocks first")
            )
        n = self.n_trainable(epoch, tuple(history[:epoch]), sizes)
        assert 0 <= n <= self.target(sizes) <= len(sizes), (self, epoch, n)
        return Plan(epoch, n, lr_scales(len(sizes), n, backbone_lr_mult, layer_decay))

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})"


REGISTRY: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register(name: str, summary: str) -> Callable[[S], S]:
    """Class decorator adding a strategy to the registry under ``name``; duplicates are errors."""

    def add(cls: S) -> S:
        if name in REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered by {REGISTRY[name]}")
        cls.name = name
        cls.summary = summary
        REGISTRY[name] = cls
        return cls

    return add


def create(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build a registered strategy from YAML/CLI values, reporting every problem at once."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=2)
        hint = f"did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            Problem(
                "strategy.name",
                name,
                "unknown strategy",
                f"{hint} known: {', '.join(REGISTRY)}".strip(),
            )
        )
    cls = REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for key, value in (params or {}).items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = (
                f"did you mean {close[0]}?"
                if close
                else (f"{name} takes {', '.join(fields) or 'no parameters'}")
            )
            problems.append(Problem(f"strategy.{key}", value, f"not a parameter of {name}", fix))
            continue
        values[key], problem = coerce(f"strategy.{key}", value, hints[key])
        if problem is None:
            problem = check_value(f"strategy.{key}", values[key], fields[key].metadata)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# The strategies


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
