"""Apply a plan to a model and its optimizer: requires_grad, norm-layer mode, per-group LR, audit.

The optimizer is built once with a pair of param groups per block plus the head's pair (with and
without weight decay, timm's rule), so unfreezing never rebuilds it or drops its state. Frozen
parameters keep ``grad=None``: torch optimizers skip them, so they hold no optimizer state and do
not move, weight decay included.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unfreeze_hpo.blocks import Blocks
from unfreeze_hpo.errors import AuditError, ConfigError, Problem
from unfreeze_hpo.models import unwrap
from unfreeze_hpo.strategies import Plan

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
# Layers whose train/eval mode changes what they compute (running statistics).
_STATEFUL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def build_optimizer(
    model: nn.Module, blocks: Blocks, name: str = "adamw", **kwargs: Any
) -> torch.optim.Optimizer:
    """Two param groups per block, both named after it (``decay`` True and False), then the
    head's pair, all at LR 0 until a plan is applied. The no-decay group holds what timm and ViT
    recipes exclude from weight decay (``no_decay_names``) at weight decay 0. ``kwargs`` go to
    the torch optimizer (weight_decay, momentum, betas …).

    The optimizer is torch's fused one where every parameter is on a device torch has fused
    kernels for: besides being faster, it can skip a step on the device (``found_inf``, as the
    GradScaler uses it), so the training loop never reads a flag back per step."""
    if name not in OPTIMIZERS:
        raise ConfigError(
            Problem(
                "optimizer.name", name, "unknown optimizer", f"use one of {', '.join(OPTIMIZERS)}"
            )
        )
    target = unwrap(model)
    params = dict(target.named_parameters())
    excluded = no_decay_names(target)
    groups = []
    for part in (*blocks.blocks, blocks.head):
        for decay in (True, False):
            members = [params[p] for p in part.params if (p not in excluded) == decay]
            group = {"params": members, "name": part.name, "decay": decay, "lr": 0.0}
            if not decay:
                group["weight_decay"] = 0.0
            groups.append(group)
    if "fused" not in kwargs and "foreach" not in kwargs and fused_supported(params.values()):
        kwargs = {**kwargs, "fused": True}
    try:
        return OPTIMIZERS[name]([g for g in groups if g["params"]], **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            Problem(
                f"optimizer ({name})",
                kwargs,
                str(exc),
                "pass only arguments the torch optimizer takes",
            )
        ) from exc


def fused_supported(params: Collection[torch.Tensor]) -> bool:
    """Whether torch's fused Adam/AdamW/SGD kernels take every one of ``params``."""
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )


def no_decay_names(model: nn.Module, extra: Collection[str] = ()) -> set[str]:
    """Parameters that take no weight decay, by timm's rule (``param_groups_weight_decay``):
    1-d tensors (norm weights, biases, scales), ``*.bias``, and the names or patterns the model's
    ``no_weight_decay()`` lists (``pos_embed``, ``cls_token`` …), plus ``extra``."""
    listed = getattr(model, "no_weight_decay", None)
    patterns = {*(listed() if callable(listed) else ()), *extra}
    return {
        name
        for name, p in model.named_parameters()
        if p.ndim <= 1
        or name.endswith(".bias")
        or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
    }


@dataclass(frozen=True)
class Status:
    """Parameter counts as they actually are (read from ``requires_grad``), not as planned."""

    total: int
    trainable: int
    backbone: int
    backbone_trainable: int
    head: int
    head_trainable: int
    unfrozen: tuple[str, ...]  # names of trainable blocks, input -> output

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def backbone_ratio(self) -> float:
        return self.backbone_trainable / self.backbone if self.backbone else 0.0

    def line(self, epoch: int) -> str:
        """The per-epoch log line."""

        def pct(a: int, b: int) -> str:
            return f"{100 * a / b:.1f}%" if b else "n/a"

        unfrozen = ", ".join(self.unfrozen) if self.unfrozen else "none"
        return (
            f"[params] epoch {epoch}: model {self.trainable:,}/{self.total:,} trainable "
            f"({pct(self.trainable, self.total)}) | backbone {self.backbone_trainable:,}/"
            f"{self.backbone:,} ({pct(self.backbone_trainable, self.backbone)}) | head "
            f"{self.head_trainable:,}/{self.head:,} | frozen {self.frozen:,} "
            f"({pct(self.frozen, self.total)}) | unfrozen blocks: {unfrozen}"
        )


class Freezer:
    """Applies plans to ``model`` and its optimizer; applying the same plan twice changes nothing.

    ``base_lr(step)`` is the head's LR at a step; block ``i`` gets
    ``base_lr(step) * plan.lr_scales[i] * warmup``, where ``warmup`` rises linearly from
    ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps after the block was unfrozen
    by an unfreeze event (blocks trainable in the first plan have no warmup).
    With ``frozen_norm_eval``, BatchNorm/InstanceNorm layers of frozen blocks stay in eval mode,
    so their running statistics are frozen too; with ``unfrozen_norm_eval``, those of trainable
    backbone blocks do as well (their affine weights still train): the pretrained statistics are
    kept, and a small batch's noisy ones never replace them at an unfreeze event.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Blocks,
        optimizer: torch.optim.Optimizer,
        base_lr: Callable[[int], float],
        *,
        warmup_steps: int = 0,
        frozen_norm_eval: bool = True,
        unfrozen_norm_eval: bool = False,
    ) -> None:
        if warmup_steps < 0:
            raise ConfigError(
                Problem(
                    "unfreeze_warmup_steps", warmup_steps, "must be >= 0", "use 0 for no warmup"
                )
            )
        self.model = unwrap(model)
        self.blocks = blocks
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.frozen_norm_eval, self.unfrozen_norm_eval = frozen_norm_eval, unfrozen_norm_eval
        self.plan: Plan | None = None
        self._step = 0  # step at which the current plan was applied
        self.unfrozen_at: dict[int, int] = {}  # block -> step of its unfreeze event (warmup)
        params = dict(self.model.named_parameters())
        self._params = [[params[n] for n in b.params] for b in blocks.blocks]
        self._head = [params[n] for n in blocks.head.params]
        self._norms = _norm_layers(self.model, blocks)

    def apply(self, plan: Plan, step: int) -> list[str]:
        """Make the model and optimizer match ``plan`` at ``step``; returns blocks newly unfrozen.

        Before changing anything, the state left by the previous plan is audited, so a
        ``requires_grad`` flipped behind the plan's back is reported, not silently overwritten.
        """
        if plan.n_blocks != len(self.blocks):
            raise ConfigError(
                Problem(
                    "plan",
                    plan.n_blocks,
                    f"made for a different model ({len(self.blocks)} blocks)",
                    "plan with this model's block sizes",
                )
            )
        if self.plan is not None:
            self.audit()
        newly = []
        for i, params in enumerate(self._params):
            trainable = plan.is_trainable(i)
            was = self.plan.is_trainable(i) if self.plan is not None else False
            if trainable and not was:
                newly.append(self.blocks.blocks[i].name)
                if self.plan is not None:
                    self.unfrozen_at[i] = step
            for p in params:
                p.requires_grad_(trainable)
                if not trainable:
                    p.grad = None
        for p in self._head:
            p.requires_grad_(True)
        self.plan = plan
        self._step = step
        self.set_norm_modes()
        self.set_lr(step)
        self.audit()
        return newly

    def set_lr(self, step: int) -> None:
        """Set every group's LR for ``step``: a pure function of the step and the plan."""
        assert self.plan is not None, "apply a plan first"
        base = self.base_lr(step)
        lrs = {
            block.name: base * self.plan.lr_scales[i] * self._warmup(i, step)
            for i, block in enumerate(self.blocks.blocks)
        }
        lrs[self.blocks.head.name] = base
        # Read each time: optimizer.load_state_dict replaces the group dicts.
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["name"]]

    def lrs(self) -> dict[str, float]:
        """The LR of every block (its decay and no-decay groups share it), by block name."""
        return {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups}

    def set_norm_modes(self) -> None:
        """Put norm layers of frozen blocks (and with ``unfrozen_norm_eval`` of trainable ones)
        in eval mode; call again after ``model.train()``."""
        evals = self.frozen_norm_eval or self.unfrozen_norm_eval
        if not (evals and self.model.training and self.plan is not None):
            return
        for i, layers in enumerate(self._norms):
            trainable = self.plan.is_trainable(i)
            keep = self.unfrozen_norm_eval if trainable else self.frozen_norm_eval
            for layer in layers:
                layer.train(not keep)

    def train(self) -> None:
        """``model.train()`` that keeps the norm layers of frozen blocks in eval mode."""
        self.model.train()
        self.set_norm_modes()

    def status(self) -> Status:
        """Counts read from the parameters themselves."""
        backbone = [p for ps in self._params for p in ps]
        every = list(self.model.parameters())
        return Status(
            total=_numel(every),
            trainable=_numel(every, trainable_only=True),
            backbone=_numel(backbone),
            backbone_trainable=_numel(backbone, trainable_only=True),
            head=_numel(self._head),
            head_trainable=_numel(self._head, trainable_only=True),
            unfrozen=tuple(
                b.name
                for b, ps in zip(self.blocks.blocks, self._params, strict=True)
                if ps and all(p.requires_grad for p in ps)
            ),
        )

    def audit(self) -> None:
        """Raise AuditError if any parameter's ``requires_grad`` differs from the plan."""
        assert self.plan is not None, "apply a plan first"
        wrong = []
        for i, params in enumerate(self._params):
            expected = self.plan.is_trainable(i)
            names = self.blocks.blocks[i].params
            wrong += [
                (n, expected)
                for n, p in zip(names, params, strict=True)
                if p.requires_grad != expected
            ]
        wrong += [
            (n, True)
            for n, p in zip(self.blocks.head.params, self._head, strict=True)
            if not p.requires_grad
        ]
        if wrong:
            shown = ", ".join(f"{n} (requires_grad should be {e})" for n, e in wrong[:5])
            more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
            raise AuditError(
                f"freeze state differs from the plan for epoch {self.plan.epoch}: {shown}{more}. "
                "Something outside the plan changed requires_grad (model code, a callback); "
                "remove that code and let the strategy decide."
            )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the last plan applied, at which step, and the warmup starts."""
        assert self.plan is not None, "apply a plan first"
        return {
            "plan": {
                "epoch": self.plan.epoch,
                "n_trainable": self.plan.n_trainable,
                "lr_scales": list(self.plan.lr_scales),
            },
            "step": self._step,
            "unfrozen_at": {str(k): v for k, v in self.unfrozen_at.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-apply the saved plan, so the next ``apply`` sees the same unfreeze events."""
        plan = state["plan"]
        self.plan = None  # a first apply records no unfreeze events: the saved ones are used
        self.unfrozen_at = {int(k): int(v) for k, v in state["unfrozen_at"].items()}
        self.apply(
            Plan(
                int(plan["epoch"]),
                int(plan["n_trainable"]),
                tuple(float(x) for x in plan["lr_scales"]),
            ),
            int(state["step"]),
        )

    def _warmup(self, index: int, step: int) -> float:
        start = self.unfrozen_at.get(index)
        if start is None or self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - start + 1) / self.warmup_steps)


def _norm_layers(model: nn.Module, blocks: Blocks) -> list[list[nn.Module]]:
    """Stateful norm layers of each block; a layer belongs to the block owning its parameters."""
    owner: dict[str, int] = {p: b.index for b in blocks.blocks for p in b.params}
    layers: list[list[nn.Module]] = [[] for _ in blocks.blocks]
    for name, module in model.named_modules():
        if not isinstance(module, _STATEFUL_NORMS):
            continue
        index = _owner(name, module, owner)
        if index is not None:
            layers[index].append(module)
    return layers


def _owner(name: str, module: nn.Module, owner: dict[str, int]) -> int | None:
    """Block of a module: through its own parameters, else its closest ancestor's (affine=False)."""
    own = {owner.get(f"{name}.{n}") for n, _ in module.named_parameters()}
    if own:
        return own.pop() if len(own) == 1 else None
    prefix = name
    while "." in prefix:
        prefix = prefix.rsplit(".", 1)[0]
        found = {i for p, i in owner.items() if p.startswith(prefix + ".")}
        if found:
            return found.pop() if len(found) == 1 else None
    return None


def _numel(params: list[nn.Parameter], trainable_only: bool = False) -> int:
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)
