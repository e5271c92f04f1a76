"""The vocabulary of the data package: kinds, class names, the config and the datasets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from unfreeze_hpo.errors import Problem, UserError

SYNTHETIC_KINDS = ("synthetic_video", "synthetic_image")
REAL_KINDS = ("image_folder", "video_folder", "video_csv")
KINDS = SYNTHETIC_KINDS + REAL_KINDS
TASKS = ("source", "target")
SPLITS = ("train", "val")

SHAPES = ("square", "disk", "ring", "cross")
MOTIONS = ("right", "left", "down", "up")
GROUPS = ("solid", "thin")  # square, disk are filled; ring, cross are drawn with thin strokes
AXES = ("horizontal", "vertical")
DIRECTIONS = ("right-or-down", "left-or-up")  # the way a shape moves along its axis
COLOURS = ("warm", "cool")

# torchvision's IMG_EXTENSIONS, given to ImageFolder too: check() agrees with it without
# importing torchvision (a second or more).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
# Statistics the pretrained families were trained with: ImageNet for timm, Kinetics for
# pytorchvideo. Using theirs keeps pretrained features meaningful.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)

Item = tuple[torch.Tensor, int]


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and the shape they are brought to."""

    kind: str = "synthetic_video"
    task: str = "target"  # synthetic kinds only: "source" (pretraining) or "target"
    root: str | None = None  # real kinds only
    train_samples: int = 512  # synthetic kinds only
    val_samples: int = 256  # synthetic kinds only
    frames: int = 4
    size: int = 32
    clip_seconds: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Datasets:
    """Train and val datasets with what a model needs to know about them."""

    train: Dataset[Item]
    val: Dataset[Item]
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # one sample: (3, frames, size, size) or (3, size, size)


class DataError(UserError):
    """A data file cannot be read (an undecodable video, a corrupt image).

    Also accepts a plain message: DataLoader workers re-raise an exception as ``type(exc)(text)``.
    """

    def __init__(self, problems: Problem | Iterable[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = Problem("data", None, problems, "see the original error above")
        super().__init__(problems)
