"""Drive gradual unfreezing in your own training loop, from an exported schedule or a strategy.

``Unfreezer`` owns the optimizer (built once, one param group per block), the plan and the LR
schedule: call ``on_epoch_start`` / ``step`` / ``on_epoch_end`` from any PyTorch loop. Every
trial of a search runs through it too (``train.run``), so a schedule behaves in a user's loop as
it did in the search. No YAML here but in ``from_schedule``, which reads an exported file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from unfreeze_hpo.blocks import Blocks, discover
from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.freezing import Freezer, Status, build_optimizer
from unfreeze_hpo.lr import ScheduleConfig, lr_schedule
from unfreeze_hpo.strategies import Plan, Strategy

if TYPE_CHECKING:
    from unfreeze_hpo.config import TrialConfig


class Unfreezer:
    """Applies a strategy's plan each epoch and sets every group's LR each step.

    ``metric`` names the value ``on_epoch_end`` records for strategies that watch a metric
    (``adaptive``); pass the same metric the schedule was searched with.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        *,
        lr: float,
        epochs: int,
        steps_per_epoch: int,
        optimizer: str = "adamw",
        optimizer_kwargs: Mapping[str, Any] | None = None,
        backbone_lr_mult: float = 1.0,
        layer_decay: float = 1.0,
        unfreeze_warmup_steps: int = 0,
        schedule: ScheduleConfig | None = None,
        granularity: str = "fine",
        matcher: Mapping[str, Any] | None = None,
        frozen_norm_eval: bool = True,
        unfrozen_norm_eval: bool = False,
        metric: str = "val_acc",
    ) -> None:
        if steps_per_epoch < 1:
            raise ConfigError(
                Problem(
                    "steps_per_epoch", steps_per_epoch, "must be >= 1", "pass len(train_loader)"
                )
            )
        self.model, self.strategy, self.epochs, self.metric = model, strategy, epochs, metric
        self.backbone_lr_mult, self.layer_decay = backbone_lr_mult, layer_decay
        self.blocks: Blocks = discover(model, granularity, matcher)  # type: ignore[arg-type]
        self.optimizer = build_optimizer(
            model, self.blocks, optimizer, lr=lr, **dict(optimizer_kwargs or {})
        )
        base_lr = lr_schedule(schedule or ScheduleConfig(), lr, epochs * steps_per_epoch)
        self.freezer = Freezer(
            model,
            self.blocks,
            self.optimizer,
            base_lr,
            warmup_steps=unfreeze_warmup_steps,
            frozen_norm_eval=frozen_norm_eval,
            unfrozen_norm_eval=unfrozen_norm_eval,
        )
        self.history: list[float] = []
        self.global_step = 0

    @classmethod
    def from_schedule(
        cls, schedule: str | Path | TrialConfig, model: nn.Module, *, steps_per_epoch: int
    ) -> Unfreezer:
        """Everything but the model from an exported schedule (or any trial YAML, or config)."""
        from unfreeze_hpo import config

        cfg = config.load(schedule) if isinstance(schedule, str | Path) else schedule
        opt = cfg.optimizer
        return cls(
            model,
            cfg.strategy,
            lr=opt.lr,
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch,
            optimizer=opt.name,
            optimizer_kwargs=opt.kwargs(),
            backbone_lr_mult=opt.backbone_lr_mult,
            layer_decay=opt.layer_decay,
            unfreeze_warmup_steps=opt.unfreeze_warmup_steps,
            schedule=cfg.schedule,
            granularity=cfg.model.granularity,
            matcher=cfg.model.matcher,
            frozen_norm_eval=cfg.frozen_norm_eval,
            unfrozen_norm_eval=cfg.unfrozen_norm_eval,
            metric=cfg.monitor,
        )

    @property
    def plan(self) -> Plan | None:
        """The plan in force (None before the first ``on_epoch_start``)."""
        return self.freezer.plan

    def on_epoch_start(self, epoch: int) -> list[str]:
        """Put the model in train mode under this epoch's plan; returns newly unfrozen blocks."""
        plan = self.strategy.plan(
            epoch,
            self.history,
            self.blocks.sizes,
            backbone_lr_mult=self.backbone_lr_mult,
            layer_decay=self.layer_decay,
        )
        self.freezer.train()
        return self.freezer.apply(plan, self.global_step)

    def step(self) -> None:
        """Set this step's LRs; call once per batch, before ``optimizer.step()``."""
        self.freezer.set_lr(self.global_step)
        self.global_step += 1

    def on_epoch_end(self, metrics: Mapping[str, float]) -> Status:
        """Record the watched metric, check the freeze state, and return the parameter status."""
        if self.metric not in metrics:
            raise ConfigError(
                Problem(
                    "metrics",
                    sorted(metrics),
                    f"no {self.metric!r}",
                    f"pass the metric the schedule watches, {self.metric}",
                )
            )
        self.history.append(float(metrics[self.metric]))
        self.freezer.audit()
        return self.freezer.status()

    def state_dict(self) -> dict[str, Any]:
        return {
            "freezer": self.freezer.state_dict(),
            "history": list(self.history),
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.freezer.load_state_dict(state["freezer"])
        self.history = [float(v) for v in state["history"]]
        self.global_step = int(state["global_step"])
