"""The drift probe: how far each block and the head moved in an epoch, and which did not move
when they should have (or moved when frozen) — the "parameters not moving" failure.

It measures without copies on the accelerator: trainable parameters are snapshotted to host
memory in their own dtype, frozen ones are only fingerprinted (a float64 sum and L1 norm per
tensor, two numbers), and the epoch's end reads everything back in one transfer per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from unfreeze_hpo.blocks import Blocks
from unfreeze_hpo.strategies import Plan


@dataclass
class Snapshot:
    """Each group's parameters before an epoch: host copies (trainable) or fingerprints."""

    copies: dict[int, list[torch.Tensor]]  # group index -> host copies, trainable groups
    fingerprints: dict[int, torch.Tensor]  # group index -> (n, 2) float64, on the device


def _groups(blocks: Blocks) -> list[tuple[int, list[str], bool]]:
    parts = (*blocks.blocks, blocks.head)
    return [(i, list(part.params), part is blocks.head) for i, part in enumerate(parts)]


def _fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, its float64 sum and L1 norm: any change of a value changes one of them (but
    for exact cancellations of a kind no optimizer update produces)."""
    rows = [
        torch.stack(
            [p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, 1, dtype=torch.float64)]
        )
        for p in params
    ]
    return torch.stack(rows)


def snapshot(model: nn.Module, blocks: Blocks, plan: Plan) -> Snapshot:
    """Take the snapshot an epoch is measured against (before any update of the epoch)."""
    named = dict(model.named_parameters())
    copies: dict[int, list[torch.Tensor]] = {}
    fingerprints: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for i, names, head in _groups(blocks):
            if not names:
                continue
            params = [named[n].detach() for n in names]
            if head or plan.is_trainable(i):
                copies[i] = [p.to("cpu", copy=True) for p in params]
            else:
                fingerprints[i] = _fingerprint(params)
    return Snapshot(copies, fingerprints)


def drift(
    model: nn.Module, blocks: Blocks, plan: Plan, before: Snapshot, steps_taken: float
) -> dict[str, float]:
    """How far each group moved since ``before``; trainable groups that did not move and frozen
    groups that did are counted."""
    named = dict(model.named_parameters())
    groups = _groups(blocks)
    stuck = moved_frozen = 0
    smallest = math.inf
    with torch.no_grad():
        for i, copies in before.copies.items():
            names = groups[i][1]
            squares = 0.0
            for name, old in zip(names, copies, strict=True):
                now = named[name].detach().to("cpu")
                squares += float((now.double() - old.double()).square().sum())
            delta = math.sqrt(squares)
            smallest = min(smallest, delta)
            stuck += steps_taken > 0 and delta == 0.0
        if before.fingerprints:
            indices = list(before.fingerprints)
            old = torch.cat([before.fingerprints[i] for i in indices])
            now = torch.cat(
                [_fingerprint([named[n].detach() for n in groups[i][1]]) for i in indices]
            )
            changed = (now != old).any(dim=1)
            sizes = [len(before.fingerprints[i]) for i in indices]
            moved_frozen = sum(bool(part.any()) for part in changed.cpu().split(sizes))
    return {
        "drift_min_trainable": smallest if math.isfinite(smallest) else 0.0,
        "drift_stuck_groups": float(stuck),
        "drift_moved_frozen_groups": float(moved_frozen),
    }
