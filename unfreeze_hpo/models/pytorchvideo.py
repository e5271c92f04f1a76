"""The pytorchvideo family: ``pytorchvideo:<name>`` is a builder of ``pytorchvideo.models.hub``
(hub weights with ``pretrained: true``) or one of the small CPU architectures of ``models.tiny``.
Heads return logits (a softmax some hub heads end in is removed). The input each hub model
expects (frames, crop) is the one of pytorchvideo's Kinetics-400 model zoo."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from unfreeze_hpo.data.spec import KINETICS_MEAN, KINETICS_STD, ModelInput
from unfreeze_hpo.errors import ModelError, Problem
from unfreeze_hpo.models.base import (
    Family,
    ModelSpec,
    call_builder,
    instance_of,
    register_family,
)
from unfreeze_hpo.models.tiny import SMALL


def build(arch: str, spec: ModelSpec) -> nn.Module:
    builder: Callable[..., nn.Module]
    if spec.pretrained_file is not None:
        raise ModelError(
            Problem(
                "model.pretrained_file",
                spec.pretrained_file,
                "is read the timm way, for timm models",
                "for pytorchvideo models give model.checkpoint (a state dict of this model)",
            )
        )
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


def weights_url(arch: str, spec: ModelSpec) -> str | None:
    """The model-zoo file a hub builder downloads (``checkpoint_paths`` of its hub module)."""
    builder = _hub().get(arch)
    paths = getattr(inspect.getmodule(builder), "checkpoint_paths", {}) if builder else {}
    url = paths.get(arch) if isinstance(paths, dict) else None
    return url if isinstance(url, str) else None


def classifier(model: nn.Module) -> str | None:
    if instance_of(model, "pytorchvideo.models.vision_transformers.MultiscaleVisionTransformers"):
        return "head.proj"
    if instance_of(model, "pytorchvideo.models.net.Net"):
        return f"blocks.{len(model.blocks) - 1}.proj"  # type: ignore[arg-type]
    return None


# arch -> (frames, crop, short side at eval), from pytorchvideo's Kinetics-400 model zoo (clip
# length x sampling rate; training crops; the eval short side before the centre crop).
HUB_INPUTS: dict[str, tuple[int, int, int]] = {
    "c2d_r50": (8, 224, 256),
    "i3d_r50": (8, 224, 256),
    "slow_r50": (8, 224, 256),
    "slowfast_r50": (32, 224, 256),
    "slowfast_r101": (32, 224, 256),
    "slowfast_16x8_r101_50_50": (16, 224, 256),
    "csn_r101": (32, 224, 256),
    "r2plus1d_r50": (16, 224, 256),
    "x3d_xs": (4, 160, 182),
    "x3d_s": (13, 160, 182),
    "x3d_m": (16, 224, 256),
    "x3d_l": (16, 312, 356),
    "efficient_x3d_xs": (4, 160, 182),
    "efficient_x3d_s": (13, 160, 182),
    "mvit_base_16x4": (16, 224, 256),
    "mvit_base_32x3": (32, 224, 256),
    "mvit_base_16": (1, 224, 256),
}


def model_input(arch: str, model: nn.Module) -> ModelInput:
    if arch in SMALL:  # built for the synthetic clips of the embedded default
        return ModelInput(32, 4, KINETICS_MEAN, KINETICS_STD, "bilinear", 1.0, "models.tiny")
    frames, crop, side = HUB_INPUTS.get(arch, (8, 224, 256))
    source = "pytorchvideo's Kinetics-400 model zoo" if arch in HUB_INPUTS else "defaults"
    return ModelInput(
        crop, frames, KINETICS_MEAN, KINETICS_STD, "bilinear", crop / side, f"{source} ({arch})"
    )


FAMILY = register_family(
    Family(
        "pytorchvideo",
        build,
        available,
        classifier,
        example="resnet3d_tiny",
        example_input=(1, 3, 4, 32, 32),
        builtin=frozenset(SMALL),
        input=model_input,
        weights_url=weights_url,
    )
)
