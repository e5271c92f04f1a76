"""The vocabulary of the data package: kinds, class names, the config and the datasets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from unfreeze_hpo.errors import Problem, UserError
from unfreeze_hpo.params import param

if TYPE_CHECKING:
    from unfreeze_hpo.data.preprocess import Preprocessing

SYNTHETIC_KINDS = ("synthetic_video", "synthetic_image")
REAL_KINDS = ("image_folder", "video_folder", "video_csv")
KINDS = SYNTHETIC_KINDS + REAL_KINDS
TASKS = ("source", "target")
SPLITS = ("train", "val")
OPTIONAL_SPLITS = ("test",)  # read when present: held out from the search's choice
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# What synthetic kinds are drawn at when data.size / data.frames are not given.
SYNTHETIC_SIZE, SYNTHETIC_FRAMES = 32, 4

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
    """Where samples come from, the shape they are brought to, and how training augments them.

    ``size``, ``frames``, ``mean``, ``std``, ``interpolation`` and ``crop_pct`` left unset take
    the model's own values (timm's pretrained config, pytorchvideo's hub inputs) for data on disk,
    and today's small sizes for synthetic kinds. The augmentation fields apply to data on disk.
    """

    kind: str = "synthetic_video"
    task: str = "target"  # synthetic kinds only: "source" (pretraining) or "target"
    root: str | None = None  # real kinds only
    train_samples: int = 512  # synthetic kinds only
    val_samples: int = 256  # synthetic kinds only
    frames: int | None = None  # None: the model's (4 for synthetic kinds)
    size: int | None = None  # None: the model's input size (32 for synthetic kinds)
    clip_seconds: float = 1.0
    seed: int = 0
    mean: tuple[float, ...] | None = param(None, help="per-channel mean; default: the model's")
    std: tuple[float, ...] | None = param(None, help="per-channel std; default: the model's")
    interpolation: str | None = param(
        None, choices=INTERPOLATIONS, help="resize filter; default: the model's"
    )
    crop_pct: float | None = param(
        None, gt=0, le=1, help="eval centre crop / resized side; default: the model's"
    )
    augment: bool = param(True, help="random crops and flips for training (data on disk)")
    scale: tuple[float, ...] = param((0.08, 1.0), help="images: RandomResizedCrop area range")
    hflip: float = param(0.5, ge=0, le=1, help="horizontal flip probability for training")
    color_jitter: float = param(0.4, ge=0, help="images: timm's colour jitter strength")
    auto_augment: str | None = param(None, help="images: timm policy, e.g. rand-m9-mstd0.5")
    random_erasing: float = param(0.0, ge=0, le=1, help="images: timm's random erasing prob")
    mixup: float = param(0.0, ge=0, help="mixup alpha (timm.data.Mixup); 0 disables")
    cutmix: float = param(0.0, ge=0, help="cutmix alpha (timm.data.Mixup); 0 disables")


@dataclass(frozen=True)
class ModelInput:
    """The input a pretrained model was trained on, as its family reports it."""

    size: int  # side of the (square) crop the model sees
    frames: int | None  # clip length for video models, None for image models
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875  # eval: resize the short side to size / crop_pct, centre-crop size
    source: str = ""  # where these values come from, for `validate`


@dataclass(frozen=True)
class Datasets:
    """Train, val (and test, when the data has one) with what a model needs to know."""

    train: Dataset[Item]
    val: Dataset[Item]
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # one sample: (3, frames, size, size) or (3, size, size)
    test: Dataset[Item] | None = None
    preprocessing: Preprocessing | None = None  # what the samples went through


class DataError(UserError):
    """A data file cannot be read (an undecodable video, a corrupt image).

    Also accepts a plain message: DataLoader workers re-raise an exception as ``type(exc)(text)``.
    """

    def __init__(self, problems: Problem | Iterable[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = Problem("data", None, problems, "see the original error above")
        super().__init__(problems)
