"""The strategy contract: a ``Plan`` per epoch, the ``Strategy`` base class, and the registry
(``register``, ``create``) that the shipped strategies and users' own ones join."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.params import check_value, coerce
from unfreeze_hpo.registry import Registry

# ---------------------------------------------------------------------------------------------
# Plans


# Epochs ahead a plan is searched for its first unfreeze event (``Strategy.phase_start``): the
# run's own epochs may change on a resume, so the search does not stop there.
PLAN_HORIZON = 1000


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
    # Whether ``n_trainable`` reads the metric history: a plan that does cannot be known ahead
    # of training (previews show its fastest course; exports replay the events it recorded).
    reads_history: ClassVar[bool] = False

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

    def phase_start(self, sizes: Sequence[int], first_event: int | None) -> int | None:
        """The epoch this schedule's fine-tuning phase starts (None: not yet known to have):
        from then on a rung may stop it (``--phase-grace``).

        - A schedule whose plan follows only the epoch: its first planned unfreeze event, or
          epoch 0 when none is planned (``full``, ``frozen``, a ``fixed`` plan from epoch 0:
          what it trains at epoch 0 is what it trains throughout).
        - A schedule whose plan follows the metric (``reads_history``): its first event
          (``first_event``, the epoch it happened; None while none has), or its
          ``phase_deadline`` if that comes first, so one that never unfreezes is judged in the
          end as what it is, a linear probe.

        It depends on nothing a resume may change (not the run's epochs)."""
        if self.reads_history:
            deadline = self.phase_deadline()
            if first_event is None:
                return deadline
            return first_event if deadline is None else min(first_event, deadline)
        start = self.n_trainable(0, (), sizes)
        grows = (e for e in range(1, PLAN_HORIZON) if self.n_trainable(e, (), sizes) > start)
        return next(grows, 0)

    def phase_deadline(self) -> int | None:
        """For a schedule that follows the metric: the latest epoch its phase starts, event or
        not (None: only at its first event)."""
        return None

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


REGISTRY: Registry[type[Strategy]] = Registry("strategy")

S = TypeVar("S", bound=type[Strategy])


def register(name: str, summary: str) -> Callable[[S], S]:
    """Class decorator adding a strategy to the registry under ``name``; duplicates are errors."""

    def add(cls: S) -> S:
        if name in REGISTRY:  # refused before the class is renamed after an entry it won't replace
            REGISTRY.add(name, cls)
        cls.name = name
        cls.summary = summary
        REGISTRY.add(name, cls)
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
