"""The pytorchvideo family: ``pytorchvideo:<name>`` is a builder of ``pytorchvideo.models.hub``
(hub weights with ``pretrained: true``) or one of the small CPU architectures of ``models.tiny``.
Heads return logits (a softmax some hub heads end in is removed)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from unfreeze_hpo.errors import ModelError, Problem
from unfreeze_hpo.models.base import Family, ModelSpec, call_builder, register_family
from unfreeze_hpo.models.tiny import SMALL


def build(arch: str, spec: ModelSpec) -> nn.Module:
    builder: Callable[..., nn.Module]
    if arch in SMALL:
        if spec.pretrained:
            raise ModelError(
                Problem(
                    "model.pretrained",
                    True,
                    f"pytorchvideo:{arch} has no hub weights",
                    "set pretrained: false and give model.checkpoint",
                )
            )
        builder = SMALL[arch]
        kwargs: dict[str, Any] = dict(spec.kwargs)
    else:
        builder = _hub()[arch]
        kwargs = {"pretrained": spec.pretrained, **spec.kwargs}
    model = call_builder(builder, spec, **kwargs)
    head: Any = model.get_submodule(str(classifier(model)).rpartition(".")[0])
    # pytorchvideo heads may end in a softmax (x3d, r2plus1d); the loss expects logits.
    if getattr(head, "activation", None) is not None:
        head.activation = None
    if spec.num_classes is not None and head.proj.out_features != spec.num_classes:
        head.proj = nn.Linear(head.proj.in_features, spec.num_classes)
    return model


def _hub() -> dict[str, Callable[..., nn.Module]]:
    from pytorchvideo.models import hub

    return {
        name: fn
        for name, fn in vars(hub).items()
        if inspect.isfunction(fn) and not name.startswith("_") and "detection" not in name
    }


def available() -> list[str]:
    return sorted([*_hub(), *SMALL])


def classifier(model: nn.Module) -> str | None:
    from pytorchvideo.models.net import Net
    from pytorchvideo.models.vision_transformers import MultiscaleVisionTransformers

    if isinstance(model, MultiscaleVisionTransformers):
        return "head.proj"
    if isinstance(model, Net):
        return f"blocks.{len(model.blocks) - 1}.proj"
    return None


FAMILY = register_family(
    Family(
        "pytorchvideo",
        build,
        available,
        classifier,
        example="resnet3d_tiny",
        example_input=(1, 3, 4, 32, 32),
        builtin=frozenset(SMALL),
    )
)
