"""The preprocessing a model needs: its input size, frames, mean/std and interpolation (the
model's own unless the data config overrides them), and the train and eval transforms built from
them — timm's ``create_transform`` for images, ``torchvision.transforms.v2`` on video clips."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from unfreeze_hpo.data.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KINETICS_MEAN,
    KINETICS_STD,
    SYNTHETIC_FRAMES,
    SYNTHETIC_KINDS,
    SYNTHETIC_SIZE,
    DataConfig,
    ModelInput,
)

# Inputs for models whose family says nothing: what ImageNet and Kinetics models mostly use.
IMAGE_DEFAULT = ModelInput(224, None, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875, "default")
VIDEO_DEFAULT = ModelInput(224, 8, KINETICS_MEAN, KINETICS_STD, "bilinear", 1.0, "default")
# Train clips: the short side is drawn from [size, size * 1.25] before the random crop, the
# range of pytorchvideo's Kinetics recipes (short side 256-320 for 224 crops).
CLIP_SCALE_JITTER = 1.25
# Below this share of the model's input side, pretrained features have too few pixels to work.
TOO_SMALL = 0.25

Transform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """What every sample goes through, resolved for one data config and model."""

    kind: str
    size: int
    frames: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    source: str  # where the defaults came from
    model: ModelInput | None  # what the model expects, when its family says
    train: Transform | None = None  # None: the dataset's samples are ready (synthetic kinds)
    eval: Transform | None = None

    def lines(self) -> list[str]:
        """The resolved preprocessing, for ``validate``."""
        frames = f", {self.frames} frames" if self.frames else ""
        if self.kind in SYNTHETIC_KINDS:
            return [f"preprocessing: synthetic {self.size} px{frames}, normalised as drawn"]
        return [
            f"preprocessing: {self.size} px{frames}, {self.interpolation}, crop_pct "
            f"{self.crop_pct:g}, mean {_numbers(self.mean)}, std {_numbers(self.std)} "
            f"(defaults from {self.source})",
            f"  train: {describe(self.train)}",
            f"  eval:  {describe(self.eval)}",
        ]

    def warnings(self) -> list[str]:
        """What is likely to go wrong with these sizes."""
        model = self.model
        if model is None or self.size >= TOO_SMALL * model.size:
            return []
        return [
            f"data.size {self.size} is below a quarter of the model's input size ({model.size} "
            f"px, from {model.source}): the pretrained features see too few pixels, so a frozen "
            "backbone gives the head little to learn from (expect near-chance accuracy until "
            f"blocks unfreeze); set data.size to {model.size} or leave it unset"
        ]


def resolve(cfg: DataConfig, model: ModelInput | None = None) -> Preprocessing:
    """The preprocessing for ``cfg`` and a model expecting ``model`` (None: family defaults)."""
    if cfg.kind in SYNTHETIC_KINDS:
        frames = (cfg.frames or SYNTHETIC_FRAMES) if cfg.kind == "synthetic_video" else None
        size = cfg.size or SYNTHETIC_SIZE
        return Preprocessing(
            cfg.kind, size, frames, (), (), "bilinear", 1.0, "synthetic", model, None, None
        )
    video = cfg.kind != "image_folder"
    base = model or (VIDEO_DEFAULT if video else IMAGE_DEFAULT)
    frames = (cfg.frames or base.frames or VIDEO_DEFAULT.frames) if video else None
    prep = Preprocessing(
        kind=cfg.kind,
        size=cfg.size or base.size,
        frames=frames,
        mean=tuple(cfg.mean or base.mean),
        std=tuple(cfg.std or base.std),
        interpolation=cfg.interpolation or base.interpolation,
        crop_pct=cfg.crop_pct or base.crop_pct,
        source=base.source,
        model=model,
    )
    build = _clip_transform if video else _image_transform
    train = build(cfg, prep, training=cfg.augment)
    return dataclasses.replace(prep, train=train, eval=build(cfg, prep, training=False))


def _image_transform(cfg: DataConfig, prep: Preprocessing, *, training: bool) -> Transform:
    from timm.data import create_transform

    common: dict[str, Any] = {
        "input_size": (3, prep.size, prep.size),
        "interpolation": prep.interpolation,
        "mean": prep.mean,
        "std": prep.std,
    }
    if not training:
        return create_transform(**common, is_training=False, crop_pct=prep.crop_pct)
    low, high = cfg.scale
    return create_transform(
        **common,
        is_training=True,
        scale=(low, high),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        re_prob=cfg.random_erasing,
    )


def _clip_transform(cfg: DataConfig, prep: Preprocessing, *, training: bool) -> Transform:
    """Clips come as float ``(3, T, H, W)`` in [0, 255]; v2 transforms see ``(T, 3, H, W)``."""
    from torchvision.transforms import v2

    mode = v2.InterpolationMode[prep.interpolation.upper()]
    size = prep.size
    if training:
        sides = list(range(size, round(size * CLIP_SCALE_JITTER) + 1))
        spatial = [
            v2.RandomShortestSize(sides, interpolation=mode, antialias=True),
            v2.RandomCrop(size),
            v2.RandomHorizontalFlip(cfg.hflip),
        ]
    else:
        side = int(size / prep.crop_pct)
        spatial = [v2.Resize(side, interpolation=mode, antialias=True), v2.CenterCrop(size)]
    return v2.Compose(
        [_ToFrames(), *spatial, _Scale(1 / 255), v2.Normalize(prep.mean, prep.std), _ToClip()]
    )


class _ToFrames:
    """``(3, T, H, W)`` -> a ``tv_tensors.Video`` ``(T, 3, H, W)``, which v2 transforms whole."""

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        from torchvision import tv_tensors

        return tv_tensors.Video(clip.permute(1, 0, 2, 3))

    def __repr__(self) -> str:
        return "Video(T, C, H, W)"


class _Scale:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return frames * self.factor

    def __repr__(self) -> str:
        return "Scale(1/255)"


class _ToClip:
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.as_subclass(torch.Tensor).permute(1, 0, 2, 3).contiguous()

    def __repr__(self) -> str:
        return "Clip(C, T, H, W)"


def describe(transform: Transform | None) -> str:
    """One line: the transform's steps in order."""
    if transform is None:
        return "none"
    steps = getattr(transform, "transforms", [transform])
    return " -> ".join(" ".join(repr(t).split()) for t in steps)


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
