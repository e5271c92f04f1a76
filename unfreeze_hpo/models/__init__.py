"""Build a model from its name (``family:arch``, e.g. ``timm:resnet18``) and local weights.

Every model comes back returning logits for ``num_classes`` classes; weights from a checkpoint are
loaded with ``torch.load(weights_only=True)`` and never through pickle. The families are a
registry (``models.base.FAMILIES``): ``timm`` and ``pytorchvideo`` ship with the package.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from unfreeze_hpo.data.spec import ModelInput
from unfreeze_hpo.errors import ModelError, Problem

# The shipped families register themselves on import.
from unfreeze_hpo.models import hub
from unfreeze_hpo.models import pytorchvideo as _pytorchvideo  # noqa: F401
from unfreeze_hpo.models import timm as _timm  # noqa: F401
from unfreeze_hpo.models.base import (
    FAMILIES,
    Family,
    ModelSpec,
    classifier_name,
    did_you_mean,
    instance_of,
    register_family,
    unwrap,
)
from unfreeze_hpo.models.weights import load_checkpoint

__all__ = [
    "FAMILIES",
    "Family",
    "ModelSpec",
    "available",
    "build",
    "classifier_name",
    "fetch",
    "hub",
    "input_of",
    "instance_of",
    "load_checkpoint",
    "model_input",
    "parse_name",
    "register_family",
    "unwrap",
]


def build(spec: ModelSpec) -> nn.Module:
    """Build ``spec``: architecture, pretrained hub weights, classifier size, then checkpoint."""
    family, arch = parse_name(spec.name)
    if spec.num_classes is not None and (
        isinstance(spec.num_classes, bool) or not isinstance(spec.num_classes, int)
    ):
        raise ModelError(
            Problem("model.num_classes", spec.num_classes, "must be an integer", "e.g. 10")
        )
    if spec.num_classes is not None and spec.num_classes < 1:
        raise ModelError(Problem("model.num_classes", spec.num_classes, "must be >= 1", "e.g. 10"))
    model = FAMILIES[family].build(arch, spec)
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model


def fetch(spec: ModelSpec) -> None:
    """Bring ``spec``'s hub weights into the weights cache (``hub.use_cache``) before trials
    need them: the model is built once on CPU, the way a trial builds it, so the cache holds
    exactly the files a trial looks for; under the cache's lock, so a second process waits
    and then finds them instead of downloading them again. Nothing to do without
    ``pretrained``."""
    if not spec.pretrained:
        return
    with hub.locked(), torch.device("cpu"):
        build(dataclasses.replace(spec, checkpoint=None))


def model_input(spec: ModelSpec, model: nn.Module) -> ModelInput | None:
    """The input ``model`` (built from ``spec``) expects, as its family reports it."""
    family, arch = parse_name(spec.name)
    return FAMILIES[family].input(arch, unwrap(model))


def input_of(spec: ModelSpec) -> ModelInput | None:
    """``model_input`` without weights: the model is built on the meta device (cheap for any
    size, nothing downloaded). None when it cannot be built there."""
    bare = dataclasses.replace(spec, pretrained=False, checkpoint=None, pretrained_file=None)
    try:
        with torch.device("meta"):
            model = build(bare)
    except Exception:  # some builders compute on their tensors (pytorchvideo's MViT)
        return None
    return model_input(bare, model)


def parse_name(name: str) -> tuple[str, str]:
    """Split ``family:arch`` and check that the family is registered and builds ``arch``."""
    family, sep, arch = name.partition(":")
    examples = " or ".join(f"{f.name}:<name> (e.g. {f.name}:{f.example})" for f in _families())
    if not sep or not arch:
        raise ModelError(
            Problem("model.name", name, "a model name carries its family", f"write {examples}")
        )
    if family not in FAMILIES:
        raise ModelError(
            Problem("model.name", name, f"unknown model family {family!r}", f"use {examples}")
        )
    registered = FAMILIES[family]
    if arch in registered.builtin:
        return family, arch  # no need to list (or import) a hub to know it exists
    known = registered.available()
    base = registered.base_name(arch)
    if base not in known:
        raise ModelError(
            Problem(
                "model.name",
                name,
                f"unknown {family} model",
                did_you_mean(
                    base,
                    known,
                    f"list them with `unfreeze-hpo models {family}`",
                    prefix=f"{family}:",
                ),
            )
        )
    return family, arch


def available(family: str) -> list[str]:
    """Architecture names a family can build, sorted."""
    if family not in FAMILIES:
        raise ModelError(
            Problem("family", family, "unknown model family", f"one of {', '.join(FAMILIES)}")
        )
    return FAMILIES[family].available()


def _families() -> list[Family]:
    return list(FAMILIES.values())
