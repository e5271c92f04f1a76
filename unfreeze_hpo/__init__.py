"""unfreeze-hpo: find out how to unfreeze a pretrained vision or video backbone.

The library layer: build a model, discover its blocks, pick a freezing strategy and apply its
plans to the model and optimizer.

The names below are imported on first use, so a reader of results (``trials``, ``report``, the
trial-folder format) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "Block": ("blocks", "Block"),
    "Blocks": ("blocks", "Blocks"),
    "discover": ("blocks", "discover"),
    "AuditError": ("errors", "AuditError"),
    "BlockError": ("errors", "BlockError"),
    "ConfigError": ("errors", "ConfigError"),
    "ModelError": ("errors", "ModelError"),
    "Problem": ("errors", "Problem"),
    "UnfreezeHPOError": ("errors", "UnfreezeHPOError"),
    "UserError": ("errors", "UserError"),
    "Freezer": ("freezing", "Freezer"),
    "Status": ("freezing", "Status"),
    "build_optimizer": ("freezing", "build_optimizer"),
    "ModelSpec": ("models", "ModelSpec"),
    "build_model": ("models", "build"),
    "Unfreezer": ("unfreezer", "Unfreezer"),
    "STRATEGIES": ("strategies", "REGISTRY"),
    "Plan": ("strategies", "Plan"),
    "Strategy": ("strategies", "Strategy"),
    "create_strategy": ("strategies", "create"),
    "register_strategy": ("strategies", "register"),
}

if TYPE_CHECKING:
    from unfreeze_hpo.blocks import Block, Blocks, discover
    from unfreeze_hpo.errors import (
        AuditError,
        BlockError,
        ConfigError,
        ModelError,
        Problem,
        UnfreezeHPOError,
        UserError,
    )
    from unfreeze_hpo.freezing import Freezer, Status, build_optimizer
    from unfreeze_hpo.models import ModelSpec
    from unfreeze_hpo.models import build as build_model
    from unfreeze_hpo.strategies import REGISTRY as STRATEGIES
    from unfreeze_hpo.strategies import Plan, Strategy
    from unfreeze_hpo.strategies import create as create_strategy
    from unfreeze_hpo.strategies import register as register_strategy
    from unfreeze_hpo.unfreezer import Unfreezer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unfreeze_hpo' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f"unfreeze_hpo.{module}"), attribute)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "STRATEGIES",
    "AuditError",
    "Block",
    "BlockError",
    "Blocks",
    "ConfigError",
    "Freezer",
    "ModelError",
    "ModelSpec",
    "Plan",
    "Problem",
    "Status",
    "Strategy",
    "UnfreezeHPOError",
    "Unfreezer",
    "UserError",
    "__version__",
    "build_model",
    "build_optimizer",
    "create_strategy",
    "discover",
    "register_strategy",
]
