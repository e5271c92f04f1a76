"""Turn a data config into train/val datasets of ``(tensor, int label)``: synthetic or from disk.

Synthetic kinds draw shapes moving on a noisy background, each sample a pure function of
(kind, task, split, seed, index). Real kinds read image folders (torchvision ``ImageFolder``) or
videos (pytorchvideo ``EncodedVideo`` + clip samplers) listed by folder or by CSV. Videos come out
as float32 ``(3, T, H, W)``, images as ``(3, H, W)``, both normalised to about zero mean and unit
variance.
"""

from __future__ import annotations

import math

from unfreeze_hpo.data.files import (
    VideoDataset,
    _check_int,
    _check_root,
    _did_you_mean,
    _load_image_folder,
    _load_videos,
)
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
    "SyntheticDataset",
    "SyntheticSample",
    "VideoDataset",
    "check",
    "class_names",
    "load",
]


def load(cfg: DataConfig) -> Datasets:
    """Build the train and val datasets ``cfg`` describes; raises ConfigError listing every
    problem with ``cfg`` first."""
    problems = check(cfg)
    if problems:
        raise ConfigError(problems)
    if cfg.kind in SYNTHETIC_KINDS:
        return _load_synthetic(cfg)
    if cfg.kind == "image_folder":
        return _load_image_folder(cfg)
    return _load_videos(cfg)


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
    problems += _check_int("data.frames", cfg.frames, 1, "e.g. 4 (8 or 16 for hub models)")
    # Below 8 pixels the synthetic shapes are a blur of one or two pixels and cannot be told apart.
    problems += _check_int("data.size", cfg.size, 8 if synthetic else 1, "e.g. 32 (224 for hub)")
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
