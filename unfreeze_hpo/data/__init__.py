"""Turn a data config into train/val datasets of ``(tensor, int label)``: synthetic or from disk.

Synthetic kinds draw shapes moving on a noisy background, each sample a pure function of
(kind, task, split, seed, index). Real kinds read image folders (torchvision ``ImageFolder``) or
videos (clips read with PyAV by ``data.clips``, timed by pytorchvideo's clip sampler) listed by
folder or by CSV, through the preprocessing the model needs (``data.preprocess``), with a test
split when the data has one.
Videos come out as float32 ``(3, T, H, W)``, images as ``(3, H, W)``, normalised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unfreeze_hpo.data.files import (
    VideoDataset,
    _check_int,
    _check_root,
    _class_folders,
    _did_you_mean,
    _load_image_folder,
    _load_videos,
    _read_csv,
)
from unfreeze_hpo.data.preprocess import Preprocessing, resolve
from unfreeze_hpo.data.spec import (
    AXES,
    COLOURS,
    DIRECTIONS,
    GROUPS,
    KINDS,
    MOTIONS,
    REAL_KINDS,
    SHAPES,
    SYNTHETIC_KINDS,
    TASKS,
    DataConfig,
    DataError,
    Datasets,
    Item,
    ModelInput,
)
from unfreeze_hpo.data.synthetic import (
    SyntheticDataset,
    SyntheticSample,
    _load_synthetic,
    class_names,
)
from unfreeze_hpo.errors import ConfigError, Problem

__all__ = [
    "AXES",
    "COLOURS",
    "DIRECTIONS",
    "GROUPS",
    "KINDS",
    "MOTIONS",
    "REAL_KINDS",
    "SHAPES",
    "SYNTHETIC_KINDS",
    "TASKS",
    "DataConfig",
    "DataError",
    "Datasets",
    "Item",
    "ModelInput",
    "Preprocessing",
    "SyntheticDataset",
    "SyntheticSample",
    "VideoDataset",
    "check",
    "class_names",
    "classes",
    "load",
    "resolve",
]


def load(cfg: DataConfig, model: ModelInput | None = None) -> Datasets:
    """Build the datasets ``cfg`` describes, preprocessed for a model expecting ``model``
    (``data.resolve``); raises ConfigError listing every problem with ``cfg`` first."""
    problems = check(cfg)
    if problems:
        raise ConfigError(problems)
    prep = resolve(cfg, model)
    if cfg.kind in SYNTHETIC_KINDS:
        return dataclasses.replace(_load_synthetic(cfg), preprocessing=prep)
    if cfg.kind == "image_folder":
        return _load_image_folder(cfg, prep)
    return _load_videos(cfg, prep)


def classes(cfg: DataConfig) -> tuple[str, ...]:
    """The class names of ``cfg``'s data, read from the listing only (no sample is decoded)."""
    problems = check(cfg)
    if problems:
        raise ConfigError(problems)
    if cfg.kind in SYNTHETIC_KINDS:
        return class_names(cfg.kind, cfg.task)
    root = Path(cfg.root or "").expanduser()
    if cfg.kind == "video_csv":
        return tuple(sorted({label for _, label in _read_csv(root / "train.csv")[0]}))
    return tuple(_class_folders(root / "train"))


def check(cfg: DataConfig) -> list[Problem]:
    """Every problem with ``cfg``, found by looking at the config and listing files only."""
    problems: list[Problem] = []
    if not isinstance(cfg.kind, str) or cfg.kind not in KINDS:
        problems.append(
            Problem("data.kind", cfg.kind, "unknown data kind", _did_you_mean(cfg.kind, KINDS))
        )
    synthetic = cfg.kind in SYNTHETIC_KINDS
    if synthetic and cfg.task not in TASKS:
        problems.append(
            Problem("data.task", cfg.task, "unknown synthetic task", _did_you_mean(cfg.task, TASKS))
        )
    if synthetic:
        problems += _check_int("data.train_samples", cfg.train_samples, 1, "e.g. 512")
        problems += _check_int("data.val_samples", cfg.val_samples, 1, "e.g. 256")
    if cfg.frames is not None:
        problems += _check_int("data.frames", cfg.frames, 1, "e.g. 4, or leave it unset")
    # Below 8 pixels the synthetic shapes are a blur of one or two pixels and cannot be told apart.
    if cfg.size is not None:
        fix = "e.g. 32, or leave it unset for the model's"
        problems += _check_int("data.size", cfg.size, 8 if synthetic else 1, fix)
    problems += _check_augmentation(cfg)
    problems += _check_int("data.seed", cfg.seed, None, "e.g. 0")
    seconds = cfg.clip_seconds
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        problems.append(
            Problem("data.clip_seconds", seconds, "must be a number > 0", "e.g. 1.0 or 2.0")
        )
    if synthetic and cfg.root is not None:
        problems.append(
            Problem(
                "data.root",
                cfg.root,
                f"is not used by {cfg.kind}",
                "remove data.root, or set data.kind to image_folder, video_folder or video_csv",
            )
        )
    if cfg.kind in REAL_KINDS:
        problems += _check_root(cfg)
    return problems


def _check_augmentation(cfg: DataConfig) -> list[Problem]:
    problems: list[Problem] = []
    for name in ("mean", "std"):
        value = getattr(cfg, name)
        if value is not None and not _numbers(value, 3, positive=name == "std"):
            problems.append(
                Problem(
                    f"data.{name}",
                    value,
                    "must be 3 numbers" + (" > 0" if name == "std" else ""),
                    f"e.g. {name}: [0.5, 0.5, 0.5], or leave it unset for the model's",
                )
            )
    scale = cfg.scale
    if not (_numbers(scale, 2) and 0 < scale[0] <= scale[1] <= 1):
        problems.append(
            Problem(
                "data.scale",
                scale,
                "must be [low, high] with 0 < low <= high <= 1",
                "e.g. [0.08, 1.0]",
            )
        )
    video = cfg.kind not in ("image_folder", "synthetic_image")
    for name in ("cutmix", "auto_augment", "random_erasing"):
        if video and getattr(cfg, name):
            problems.append(
                Problem(
                    f"data.{name}",
                    getattr(cfg, name),
                    f"applies to images, not {cfg.kind}",
                    f"remove data.{name}",
                )
            )
    return problems


def _numbers(value: Any, n: int, positive: bool = False) -> bool:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        return False
    return all(
        isinstance(v, int | float) and not isinstance(v, bool) and (v > 0 or not positive)
        for v in value
    )
