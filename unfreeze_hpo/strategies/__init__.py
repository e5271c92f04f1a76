"""Freezing strategies: pure rules from (epoch, metric history, block sizes) to a plan.

A strategy only decides how many of the *last* blocks (nearest the output) are trainable. It holds
no state: the plan for epoch ``e`` is recomputed from its inputs, so a resumed run gets the same
plan as an uninterrupted one. ``history[i]`` is the monitored metric after epoch ``i``; the plan
for epoch ``e`` reads ``history[:e]`` only. ``REGISTRY`` holds every strategy by name: the shipped
ones (``builtin``) and any a user adds with ``register``.
"""

from unfreeze_hpo.strategies.base import (
    REGISTRY,
    Plan,
    Strategy,
    blocks_for_ratio,
    create,
    lr_scales,
    register,
)
from unfreeze_hpo.strategies.builtin import Adaptive, EarlyGradual, Fixed, Frozen, Full, Progressive

__all__ = [
    "REGISTRY",
    "Adaptive",
    "EarlyGradual",
    "Fixed",
    "Frozen",
    "Full",
    "Plan",
    "Progressive",
    "Strategy",
    "blocks_for_ratio",
    "create",
    "lr_scales",
    "register",
]
