"""unfreeze-hpo: find out how to unfreeze a pretrained vision or video backbone.

The library layer: build a model, discover its blocks, pick a freezing strategy and apply its
plans to the model and optimizer.
"""

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
from unfreeze_hpo.schedule import Unfreezer
from unfreeze_hpo.strategies import REGISTRY as STRATEGIES
from unfreeze_hpo.strategies import Plan, Strategy
from unfreeze_hpo.strategies import create as create_strategy
from unfreeze_hpo.strategies import register as register_strategy

__version__ = "0.1.0"

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
    "build_model",
    "build_optimizer",
    "create_strategy",
    "discover",
    "register_strategy",
]
