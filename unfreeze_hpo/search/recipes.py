"""Recipes the field uses, tried first as warm starts: the search begins from known schedules.

Each recipe is a strategy with its parameters and the optimizer fields that belong to it
(``optimizer.layer_decay`` for discriminative learning rates, ``optimizer.backbone_lr_mult``).
Against a search space a recipe is one of:

- tried as it is, when the space can produce every value;
- tried clipped, when it asks for every block at once (``ALL``) and the space's range stops
  short: the range's highest value is used, and the search's log says so;
- tried without an optimizer field the space does not search or fix (the base config's value
  is used), said in the log;
- not tried, with the reason in the log, when any other value is outside the space or differs
  from what the space fixes. Never dropped silently.

The recipes:

- the field notes' ``early_gradual 1/1/0.5`` with the backbone at a tenth of the head's LR
  ("e.g. 10x smaller than the head LR"), ``adaptive 2/0.005``, GazeLLE's progressive
  ``gentle finetune`` and ``slow burn`` (meant for runs of 30 epochs or more), the linear probe
  and full fine-tuning;
- fastai's ``fine_tune``: the backbone frozen for one epoch, then everything, with
  discriminative LRs (fastai's ``slice(lr / 100, lr)``: ``layer_decay`` 0.3 takes the fifth
  block from the head to lr / 123);
- ULMFiT's gradual unfreezing: one more block each epoch, each block's LR the one above's
  divided by 2.6, from the head down (``backbone_lr_mult`` and ``layer_decay`` 1 / 2.6);
- LP-FT: a linear probe (three epochs), then the whole network at a tenth of the head's LR.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from unfreeze_hpo import strategies
from unfreeze_hpo.search.distributions import contains
from unfreeze_hpo.search.space import SearchSpace, describe_range

ALL = "all"  # a block count meaning every block at once: the space's highest value


@dataclass(frozen=True)
class Recipe:
    title: str
    strategy: str
    params: Mapping[str, Any]  # the strategy's; a block count may be ALL
    optimizer: Mapping[str, Any] = field(default_factory=dict)  # common keys: optimizer.<field>
    spaces: tuple[str, ...] = ()  # the shipped search spaces it is meant to fit


_EVERYTHING = ("all.yaml",)
RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "early_gradual 1/1/0.5",
        "early_gradual",
        {"freeze_epochs": 1, "blocks_per_epoch": 1, "target_ratio": 0.5},
        {"optimizer.backbone_lr_mult": 0.1},
        (*_EVERYTHING, "early_gradual.yaml"),
    ),
    Recipe(
        "adaptive 2/0.005",
        "adaptive",
        {"patience": 2, "min_improvement": 0.005},
        spaces=(*_EVERYTHING, "adaptive.yaml"),
    ),
    Recipe(
        "gentle finetune",
        "progressive",
        {"initial_blocks": 2, "initial_freeze_epochs": 5, "unfreeze_interval": 2},
        spaces=(*_EVERYTHING, "progressive.yaml"),
    ),
    Recipe(  # 15 epochs frozen: longer runs than the shipped spaces' 12 epochs
        "slow burn",
        "progressive",
        {"initial_blocks": 4, "initial_freeze_epochs": 15, "unfreeze_interval": 5},
    ),
    Recipe("linear probe", "frozen", {}, spaces=(*_EVERYTHING, "fixed_and_baselines.yaml")),
    Recipe("full fine-tuning", "full", {}, spaces=(*_EVERYTHING, "fixed_and_baselines.yaml")),
    Recipe(
        "fastai fine_tune",
        "early_gradual",
        {"freeze_epochs": 1, "blocks_per_epoch": ALL, "target_ratio": 1.0},
        {"optimizer.layer_decay": 0.3},
        (*_EVERYTHING, "early_gradual.yaml"),
    ),
    Recipe(
        "ULMFiT",
        "early_gradual",
        {"freeze_epochs": 1, "blocks_per_epoch": 1, "target_ratio": 1.0},
        {
            "optimizer.backbone_lr_mult": round(1 / 2.6, 4),
            "optimizer.layer_decay": round(1 / 2.6, 4),
        },
        (*_EVERYTHING, "early_gradual.yaml"),
    ),
    Recipe(
        "LP-FT",
        "early_gradual",
        {"freeze_epochs": 3, "blocks_per_epoch": ALL, "target_ratio": 1.0},
        {"optimizer.backbone_lr_mult": 0.1},
        (*_EVERYTHING, "early_gradual.yaml"),
    ),
)


@dataclass(frozen=True)
class Fit:
    """A recipe against one space: its point (None: not tried) and what the log says of it."""

    recipe: Recipe
    point: dict[str, Any] | None  # define_by_run's keys and 'strategy'
    notes: tuple[str, ...]  # why it is not tried, or how it was adapted

    @property
    def exact(self) -> bool:
        return self.point is not None and not self.notes


def fit(recipe: Recipe, space: SearchSpace) -> Fit:
    """``recipe`` as a point of ``space`` (see the module's docstring for the rules)."""
    specs = space.per_strategy.get(recipe.strategy, {})
    defaults = strategies.REGISTRY[recipe.strategy]().params()
    point: dict[str, Any] = {"strategy": recipe.strategy}
    notes: list[str] = []
    for param, value in recipe.params.items():
        key = f"{recipe.strategy}.{param}"
        spec = specs.get(param, defaults[param])
        if value == ALL and isinstance(spec, IntDistribution):
            point[key] = spec.high
            notes.append(f"{key} {ALL!r} clipped to {spec.high}, the space's highest")
        elif value == ALL:
            why = f"{key} {ALL!r}: the space fixes {spec!r}" if param in specs else ""
            return Fit(recipe, None, (why or f"{key} {ALL!r} needs a range in the space",))
        elif isinstance(spec, BaseDistribution):
            if not contains(spec, value):
                why = f"{key} {value!r} is outside the space's {describe_range(spec)}"
                return Fit(recipe, None, (why,))
            point[key] = value
        elif spec != value:  # fixed by the space, or left at the strategy's default
            how = "fixes" if param in specs else "leaves it at the strategy's default,"
            return Fit(recipe, None, (f"{key} {value!r}: the space {how} {spec!r}",))
    for key, value in recipe.optimizer.items():
        spec = space.common.get(key)
        if spec is None:
            notes.append(f"{key} {value!r} left out: the space neither searches nor fixes it")
        elif isinstance(spec, FloatDistribution | IntDistribution):
            if not contains(spec, value):
                why = f"{key} {value!r} is outside the space's {describe_range(spec)}"
                return Fit(recipe, None, (why,))
            point[key] = value
        elif spec != value:
            return Fit(recipe, None, (f"{key} {value!r}: the space fixes {spec!r}",))
    return Fit(recipe, point, tuple(notes))


def fits(space: SearchSpace) -> list[Fit]:
    """Every recipe of one of the space's strategies against it."""
    return [fit(r, space) for r in RECIPES if r.strategy in space.strategies]


def tried(space: SearchSpace) -> list[tuple[str, dict[str, Any]]]:
    """(title, point) of each recipe the search starts from, for
    OptunaSearch(points_to_evaluate=...); the common parameters they leave out are sampled."""
    return [(f.recipe.title, f.point) for f in fits(space) if f.point is not None]


def log_lines(space: SearchSpace) -> list[str]:
    """What the search's log says of each recipe it does not try as it is."""
    out = []
    for f in fits(space):
        how = "not tried" if f.point is None else "tried with changes"
        out += [f"recipe {f.recipe.title!r} {how}: {note}" for note in f.notes]
    return out
