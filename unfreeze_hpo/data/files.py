"""Data on disk: checks of folders and CSVs, image folders (torchvision ``ImageFolder``) and
videos (``data.clips`` + pytorchvideo's clip sampler)."""

from __future__ import annotations

import csv
import difflib
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from unfreeze_hpo.data import clips
from unfreeze_hpo.data.preprocess import Preprocessing, Transform
from unfreeze_hpo.data.spec import (
    IMAGE_EXTENSIONS,
    OPTIONAL_SPLITS,
    SPLITS,
    VIDEO_EXTENSIONS,
    DataConfig,
    DataError,
    Datasets,
    Item,
)
from unfreeze_hpo.errors import Problem, describe

# ---------------------------------------------------------------------------------------------
# Config checks


def _check_int(field: str, value: Any, minimum: int | None, fix: str) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, int):
        return [Problem(field, value, "must be an integer", fix)]
    if minimum is not None and value < minimum:
        return [Problem(field, value, f"must be >= {minimum}", fix)]
    return []


def _did_you_mean(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=2, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "use one of " + ", ".join(choices)


def _check_root(cfg: DataConfig) -> list[Problem]:
    layouts = {
        "image_folder": "root/train/<class>/*.png and root/val/<class>/*.png (test/ optional)",
        "video_folder": "root/train/<class>/*.mp4 and root/val/<class>/*.mp4 (test/ optional)",
        "video_csv": "root/train.csv and root/val.csv (test.csv optional) with the header "
        "path,label",
    }
    fix = f"set data.root to a directory holding {layouts[cfg.kind]}"
    if cfg.root is None:
        return [Problem("data.root", None, f"{cfg.kind} reads its samples from a directory", fix)]
    if not isinstance(cfg.root, str | os.PathLike):
        return [Problem("data.root", cfg.root, "must be a path", fix)]
    root = Path(cfg.root).expanduser()
    try:
        if not root.exists():
            return [Problem("data.root", str(cfg.root), "no such directory", fix)]
        if not root.is_dir():
            return [Problem("data.root", str(cfg.root), "is not a directory", fix)]
        if cfg.kind == "video_csv":
            return _check_csvs(root)
        return _check_class_folders(root, _extensions(cfg.kind), fix)
    except OSError as exc:  # a name too long for the OS, a folder this user may not read
        return [Problem("data.root", str(cfg.root), f"cannot be read ({exc.strerror})", fix)]


def _extensions(kind: str) -> tuple[str, ...]:
    return IMAGE_EXTENSIONS if kind == "image_folder" else VIDEO_EXTENSIONS


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _check_class_folders(root: Path, extensions: tuple[str, ...], fix: str) -> list[Problem]:
    problems: list[Problem] = []
    classes: dict[str, list[str]] = {}
    for split in splits_in(root, "folders"):
        folder = root / split
        if not folder.is_dir():
            problems.append(Problem("data.root", str(root), f"has no {split}/ folder", fix))
            continue
        names = _class_folders(folder)
        if not names:
            problems.append(
                Problem("data.root", str(folder), "holds no class folders", "add one per class")
            )
            continue
        classes[split] = names
        empty = [n for n in names if _first_file(folder / n, extensions) is None]
        if empty:
            problems.append(
                Problem(
                    "data.root",
                    str(folder),
                    f"class folders without a {'/'.join(extensions[:3])}... file: " + _some(empty),
                    "add samples to them or remove them",
                )
            )
    for split in ("val", *OPTIONAL_SPLITS):
        if "train" not in classes or split not in classes or classes[split] == classes["train"]:
            continue
        only_train = sorted(set(classes["train"]) - set(classes[split]))
        only_here = sorted(set(classes[split]) - set(classes["train"]))
        problems.append(
            Problem(
                "data.root",
                str(root),
                f"train/ and {split}/ hold different classes (only in train/: "
                f"{_some(only_train)}; only in {split}/: {_some(only_here)})",
                f"give train/ and {split}/ the same class folders",
            )
        )
    return problems


def splits_in(root: Path, kind: str) -> tuple[str, ...]:
    """train and val, and the optional splits ``root`` holds: a folder, or a CSV for video_csv."""

    def present(split: str) -> bool:
        return (root / f"{split}.csv").is_file() if kind == "video_csv" else (root / split).is_dir()

    return SPLITS + tuple(split for split in OPTIONAL_SPLITS if present(split))


def _class_folders(folder: Path) -> list[str]:
    # The rule of torchvision's ImageFolder.find_classes, so image and video folders agree.
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _first_file(folder: Path, extensions: tuple[str, ...]) -> Path | None:
    return next(_files(folder, extensions), None)


def _files(folder: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(filenames):
            if name.lower().endswith(extensions):
                yield Path(dirpath) / name


def _some(names: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) or "none") + more


def _check_csvs(root: Path) -> list[Problem]:
    problems: list[Problem] = []
    labels: dict[str, set[str]] = {}
    for split in splits_in(root, "video_csv"):
        rows, found = _read_csv(root / f"{split}.csv")
        problems += found
        if rows:
            labels[split] = {label for _, label in rows}
    for split in ("val", *OPTIONAL_SPLITS):
        if "train" not in labels or split not in labels or labels[split] <= labels["train"]:
            continue
        unknown = sorted(labels[split] - labels["train"])
        problems.append(
            Problem(
                "data.root",
                str(root / f"{split}.csv"),
                f"labels that train.csv never uses: {_some(unknown)}",
                f"every {split} label needs training samples; fix the labels or add train rows",
            )
        )
    return problems


def _read_csv(path: Path) -> tuple[list[tuple[Path, str]], list[Problem]]:
    """Rows of a ``path,label`` CSV with paths resolved against its folder, and its problems."""
    fix = "write a CSV with the header path,label and one video per line"
    if not path.is_file():
        return [], [Problem("data.root", str(path.parent), f"has no {path.name}", fix)]
    with path.open(newline="", encoding="utf-8") as handle:
        lines = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not lines or [cell.strip() for cell in lines[0]] != ["path", "label"]:
        header = ",".join(lines[0]) if lines else ""
        return [], [Problem("data.root", str(path), f"header is {header!r}, not path,label", fix)]
    rows: list[tuple[Path, str]] = []
    bad: list[str] = []
    missing: list[str] = []
    for number, row in enumerate(lines[1:], start=2):
        cells = [cell.strip() for cell in row]
        if len(cells) != 2 or not all(cells):
            bad.append(str(number))
            continue
        video = Path(cells[0]).expanduser()
        video = video if video.is_absolute() else path.parent / video
        if not video.is_file():
            missing.append(cells[0])
        rows.append((video, cells[1]))
    problems = []
    if bad:
        problems.append(
            Problem(
                "data.root",
                str(path),
                f"lines without exactly a path and a label: {_some(bad)}",
                fix,
            )
        )
    if missing:
        problems.append(
            Problem(
                "data.root",
                str(path),
                f"{len(missing)} listed videos do not exist: {_some(missing, 3)}",
                "paths are relative to the CSV's folder, or absolute",
            )
        )
    if not rows and not bad:
        problems.append(Problem("data.root", str(path), "lists no videos", fix))
    return rows, problems


# ---------------------------------------------------------------------------------------------
# Images on disk


def _load_image_folder(cfg: DataConfig, prep: Preprocessing) -> Datasets:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root or "").expanduser()

    def folder(split: str) -> ImageFolder:
        transform = prep.train if split == "train" else prep.eval
        return ImageFolder(root / split, transform, loader=_read_image, is_valid_file=_is_image)

    found = {s: folder(s) for s in splits_in(root, cfg.kind)}
    names = tuple(found["train"].classes)
    shape = (3, prep.size, prep.size)
    test = found.get("test")
    return Datasets(found["train"], found["val"], len(names), names, shape, test, prep)


def _read_image(path: str) -> Any:
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except Exception as exc:  # PIL raises several types for truncated or foreign files
        raise DataError(
            Problem(
                "data.root", path, f"cannot read image ({describe(exc)})", "re-save or remove it"
            )
        ) from exc


# ---------------------------------------------------------------------------------------------
# Videos on disk


class VideoDataset(Dataset[Item]):
    """One clip per video per access: random in time for train, the centre clip for val.

    The train clip's start comes from pytorchvideo's random clip sampler, which draws from
    Python's ``random`` (``data.loading`` seeds it per sample). Clips are read by ``data.clips``:
    only the ``frames`` kept of each are converted, and a process keeps its files open.
    """

    def __init__(
        self,
        videos: Sequence[tuple[Path, int]],
        frames: int,
        clip_seconds: float,
        train: bool,
        transform: Transform,
    ) -> None:
        from pytorchvideo.data import make_clip_sampler

        self.videos = list(videos)
        self.targets = [label for _, label in self.videos]
        self.frames, self.train, self.transform = frames, train, transform
        self.clip_seconds = Fraction(clip_seconds).limit_denominator(10**6)
        # pytorchvideo has no centre sampler (its uniform one is stateful), so val computes it.
        self._sampler = make_clip_sampler("random", self.clip_seconds) if train else None

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> Item:
        path, label = self.videos[index]
        return self.transform(self._decode(str(path))), label

    def _decode(self, path: str) -> torch.Tensor:
        fix = "re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or remove it"
        try:
            video = clips.open_video(path)
            start, end = self._clip_times(video.duration)
            clip = video.clip(start, end, self.frames)
        except Exception as exc:  # PyAV raises many types for a bad file
            clips.close_video(path)
            raise DataError(
                Problem("data.root", path, f"cannot decode video ({describe(exc)})", fix)
            ) from exc
        if clip is None:
            raise DataError(Problem("data.root", path, f"no frames in [{start}, {end}) s", fix))
        return clip  # (3, frames, H, W), float32 in [0, 255]

    def _clip_times(self, duration: Fraction) -> tuple[Fraction, Fraction]:
        if self._sampler is not None:
            info = self._sampler(0, duration, {})
            return info.clip_start_sec, info.clip_end_sec
        start = max(duration - self.clip_seconds, Fraction(0)) / 2
        return start, start + self.clip_seconds


def _load_videos(cfg: DataConfig, prep: Preprocessing) -> Datasets:
    root = Path(cfg.root or "").expanduser()
    listed: dict[str, list[tuple[Path, str]]] = {}
    if cfg.kind == "video_csv":
        for split in splits_in(root, "video_csv"):
            listed[split] = _read_csv(root / f"{split}.csv")[0]
        names = tuple(sorted({label for _, label in listed["train"]}))
    else:
        names = tuple(_class_folders(root / "train"))
        for split in splits_in(root, cfg.kind):
            listed[split] = [
                (path, name)
                for name in names
                for path in _files(root / split / name, VIDEO_EXTENSIONS)
            ]
    index = {name: i for i, name in enumerate(names)}
    frames, train, evaluate = prep.frames, prep.train, prep.eval
    assert frames is not None and train is not None and evaluate is not None

    def dataset(split: str) -> VideoDataset:
        videos = [(path, index[label]) for path, label in listed[split]]
        transform = train if split == "train" else evaluate
        return VideoDataset(videos, frames, cfg.clip_seconds, split == "train", transform)

    test = dataset("test") if "test" in listed else None
    shape = (3, frames, prep.size, prep.size)
    return Datasets(dataset("train"), dataset("val"), len(names), names, shape, test, prep)
