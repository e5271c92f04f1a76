"""Turn a data config into train/val datasets of ``(tensor, int label)``: synthetic or from disk.

Synthetic kinds draw shapes moving on a noisy background, each sample a pure function of
(kind, task, split, seed, index). Real kinds read image folders (torchvision ``ImageFolder``) or
videos (pytorchvideo ``EncodedVideo`` + clip samplers) listed by folder or by CSV. Videos come out
as float32 ``(3, T, H, W)``, images as ``(3, H, W)``, both normalised to about zero mean and unit
variance.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from unfreeze_hpo.errors import ConfigError, Problem, UserError

SYNTHETIC_KINDS = ("synthetic_video", "synthetic_image")
REAL_KINDS = ("image_folder", "video_folder", "video_csv")
KINDS = SYNTHETIC_KINDS + REAL_KINDS
TASKS = ("source", "target")
SPLITS = ("train", "val")

SHAPES = ("square", "disk", "ring", "cross")
MOTIONS = ("right", "left", "down", "up")
GROUPS = ("solid", "thin")  # square, disk are filled; ring, cross are drawn with thin strokes
AXES = ("horizontal", "vertical")
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
    train_samples: int = 1024  # synthetic kinds only
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
        "image_folder": "root/train/<class>/*.png and root/val/<class>/*.png",
        "video_folder": "root/train/<class>/*.mp4 and root/val/<class>/*.mp4",
        "video_csv": "root/train.csv and root/val.csv with the header path,label",
    }
    fix = f"set data.root to a directory holding {layouts[cfg.kind]}"
    if cfg.root is None:
        return [Problem("data.root", None, f"{cfg.kind} reads its samples from a directory", fix)]
    if not isinstance(cfg.root, str | os.PathLike):
        return [Problem("data.root", cfg.root, "must be a path", fix)]
    root = Path(cfg.root).expanduser()
    if not root.exists():
        return [Problem("data.root", str(cfg.root), "no such directory", fix)]
    if not root.is_dir():
        return [Problem("data.root", str(cfg.root), "is not a directory", fix)]
    if cfg.kind == "video_csv":
        return _check_csvs(root)
    return _check_class_folders(root, _extensions(cfg.kind), fix)


def _extensions(kind: str) -> tuple[str, ...]:
    return IMAGE_EXTENSIONS if kind == "image_folder" else VIDEO_EXTENSIONS


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _check_class_folders(root: Path, extensions: tuple[str, ...], fix: str) -> list[Problem]:
    problems: list[Problem] = []
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
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
    if len(classes) == 2 and classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        problems.append(
            Problem(
                "data.root",
                str(root),
                f"train/ and val/ hold different classes (only in train/: {_some(only_train)}; "
                f"only in val/: {_some(only_val)})",
                "give train/ and val/ the same class folders",
            )
        )
    return problems


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
    for split in SPLITS:
        rows, found = _read_csv(root / f"{split}.csv")
        problems += found
        if rows:
            labels[split] = {label for _, label in rows}
    if len(labels) == 2 and not labels["val"] <= labels["train"]:
        unknown = sorted(labels["val"] - labels["train"])
        problems.append(
            Problem(
                "data.root",
                str(root / "val.csv"),
                f"labels that train.csv never uses: {_some(unknown)}",
                "every val label needs training samples; fix the labels or add train rows",
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
# Synthetic shapes

# Uniform draws per sample, in this order: shape, motion, speed, radius, x0, y0, colour family,
# hue, saturation, value, background. Appending draws keeps existing samples unchanged.
_N_DRAWS = 11
_NOISE = 0.1
# Pixel mean and std of the synthetic data in [0, 1], measured over 4096 samples; fixed so a
# sample does not depend on which other samples were generated.
_PIXEL_MEAN, _PIXEL_STD = 0.2811, 0.1779
_CACHE_BYTES = 256 * 2**20  # pre-render a split when it fits; render per item otherwise
_CHUNK_VALUES = 2**20  # render in batches of about this many floats: bounded temporaries


@dataclass(frozen=True)
class SyntheticSample:
    """What was drawn for one synthetic sample: the ground truth its labels come from."""

    shape: str
    motion: str | None  # None for images
    colour: str  # colour family: warm or cool
    speed: float  # pixels per frame
    radius: float  # pixels
    start: tuple[float, float]  # (x, y) of the shape's centre in the first frame


class SyntheticDataset(Dataset[Item]):
    """Shapes on a noisy background, moving (video) or still (image); deterministic per index.

    The shape wraps around the frame edges, so where it is in one frame says nothing about where
    it moves: motion can only be seen across frames.
    """

    def __init__(self, cfg: DataConfig, split: str, length: int) -> None:
        self.kind, self.task, self.split, self.seed = cfg.kind, cfg.task, split, cfg.seed
        self.video = cfg.kind == "synthetic_video"
        self.frames = cfg.frames if self.video else 1
        self.size = cfg.size
        self.length = length
        draws = torch.stack([self._draws(i)[0] for i in range(length)])
        self.targets: list[int] = _labels(draws, self.video, self.task).tolist()
        self._cache: torch.Tensor | None = None
        values = 3 * self.frames * self.size**2  # float32 values in one sample
        if 4 * values * length <= _CACHE_BYTES:
            step = max(1, _CHUNK_VALUES // values)
            self._cache = torch.cat(
                [self.render(range(i, min(i + step, length))) for i in range(0, length, step)]
            )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Item:
        index = _index(index, self.length)
        sample = self._cache[index] if self._cache is not None else self.render([index])[0]
        return sample, self.targets[index]

    def render(self, indices: Iterable[int]) -> torch.Tensor:
        """Samples ``indices`` as one batch; each equals the sample rendered alone."""
        indices = list(indices)
        draws = torch.empty(len(indices), _N_DRAWS)
        noise = torch.empty(len(indices), 3, self.frames, self.size, self.size)
        for row, i in enumerate(indices):
            u, generator = self._draws(i)
            draws[row] = u
            torch.randn(noise.shape[1:], generator=generator, out=noise[row])
        with _one_thread():
            batch = _render(draws, noise, self.size, self.video)
        return batch if self.video else batch[:, :, 0]

    def describe(self, index: int) -> SyntheticSample:
        """The shape, motion and colour drawn for sample ``index``."""
        u = self._draws(_index(index, self.length))[0]
        p = _params(u[None], self.size)
        return SyntheticSample(
            shape=SHAPES[int(p["shape"][0])],
            motion=MOTIONS[int(p["motion"][0])] if self.video else None,
            colour=COLOURS[int(p["family"][0])],
            speed=float(p["speed"][0]) if self.video else 0.0,
            radius=float(p["radius"][0]),
            start=(float(p["x0"][0]), float(p["y0"][0])),
        )

    def _draws(self, index: int) -> tuple[torch.Tensor, torch.Generator]:
        # One generator per sample, seeded from a hash of its identity: a sample never depends on
        # how many others exist or which were drawn before, and train/val/tasks never collide.
        key = f"{self.kind}/{self.task}/{self.split}/{self.seed}/{index}".encode()
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        )
        return torch.rand(_N_DRAWS, generator=generator), generator


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one thread, as DataLoader workers do.

    Rendering is many small ops; on a machine whose cores are busy (parallel trials), handing each
    to a second thread stalls it for milliseconds, which made ``load`` 20 to 50 times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _index(index: int, length: int) -> int:
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for {length} samples")
    return index % length


def _params(u: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    scale = size / 32  # the ranges are in pixels at size 32
    return {
        "shape": (u[:, 0] * len(SHAPES)).long().clamp(max=len(SHAPES) - 1),
        "motion": (u[:, 1] * len(MOTIONS)).long().clamp(max=len(MOTIONS) - 1),
        "speed": (2 + 2 * u[:, 2]) * scale,
        "radius": (5 + 3 * u[:, 3]) * scale,
        "x0": u[:, 4] * size,
        "y0": u[:, 5] * size,
        "family": (u[:, 6] * 2).long().clamp(max=1),
        # Warm hues run from red to orange-yellow, cool ones from green through blue.
        "hue": torch.where(u[:, 6] < 0.5, -0.05 + 0.17 * u[:, 7], 0.36 + 0.32 * u[:, 7]),
        "saturation": 0.55 + 0.35 * u[:, 8],
        "value": 0.75 + 0.25 * u[:, 9],
        "background": 0.1 + 0.3 * u[:, 10],
    }


def _labels(u: torch.Tensor, video: bool, task: str) -> torch.Tensor:
    p = _params(u, 32)
    if task == "source":
        return p["shape"]
    group = p["shape"] // 2  # square, disk -> solid; ring, cross -> thin
    if video:
        return group * 2 + p["motion"] // 2  # right, left -> horizontal; down, up -> vertical
    return group * 2 + p["family"]


def class_names(kind: str, task: str) -> tuple[str, ...]:
    """Readable names of the synthetic classes, in label order."""
    if task == "source":
        return SHAPES
    second = AXES if kind == "synthetic_video" else COLOURS
    return tuple(f"{group}/{other}" for group in GROUPS for other in second)


def _render(u: torch.Tensor, noise: torch.Tensor, size: int, video: bool) -> torch.Tensor:
    """Draw a batch ``(N, 3, T, H, W)`` from its uniform draws ``u`` and unit ``noise`` (reused).

    Elementwise float ops only, so a sample comes out bit-identical in any batch.
    """
    n, frames = u.shape[0], noise.shape[2]
    p = _params(u, size)
    step = torch.arange(frames, dtype=torch.float32)
    motion = p["motion"] if video else torch.full((n,), -1)
    # Motions are right, left, down, up; y grows downwards.
    vx = p["speed"] * ((motion == 0).float() - (motion == 1).float())
    vy = p["speed"] * ((motion == 2).float() - (motion == 3).float())
    cx = (p["x0"][:, None] + vx[:, None] * step).view(n, frames, 1, 1)
    cy = (p["y0"][:, None] + vy[:, None] * step).view(n, frames, 1, 1)
    grid = torch.arange(size, dtype=torch.float32)
    dx = _wrap(grid.view(1, 1, 1, size) - cx, size)
    dy = _wrap(grid.view(1, 1, size, 1) - cy, size)
    r = p["radius"].view(n, 1, 1, 1)
    # Signed distance to the sample's outline (negative inside).
    shape = p["shape"].view(n, 1, 1, 1)
    signed = _cross(dx, dy, r)
    for k, outline in enumerate(_OUTLINES[:-1]):
        signed = torch.where(shape == k, outline(dx, dy, r), signed)
    alpha = (0.5 - signed).clamp_(0, 1).unsqueeze(1)  # pixel coverage, anti-aliased edges
    colour = _hsv_to_rgb(p["hue"], p["saturation"], p["value"]).view(n, 3, 1, 1, 1)
    background = p["background"].view(n, 1, 1, 1, 1)
    pixels = noise.mul_(_NOISE).add_(background + (colour - background) * alpha)
    return pixels.clamp_(0, 1).sub_(_PIXEL_MEAN).div_(_PIXEL_STD)


def _square(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r


def _disk(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.hypot(dx, dy) - r


def _ring(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(dx, dy) - 0.72 * r).abs() - 0.28 * r


def _cross(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    ax, ay = dx.abs(), dy.abs()
    return torch.minimum(torch.maximum(ax - 0.3 * r, ay - r), torch.maximum(ay - 0.3 * r, ax - r))


_OUTLINES = (_square, _disk, _ring, _cross)  # in the order of SHAPES


def _wrap(offset: torch.Tensor, size: int) -> torch.Tensor:
    """Offsets on a torus of side ``size``, in [-size/2, size/2)."""
    return torch.remainder(offset + size / 2, size) - size / 2


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue * 6, 6)
        channels.append(value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)


def _load_synthetic(cfg: DataConfig) -> Datasets:
    names = class_names(cfg.kind, cfg.task)
    shape = (3, cfg.frames, cfg.size, cfg.size) if cfg.kind == "synthetic_video" else None
    return Datasets(
        train=SyntheticDataset(cfg, "train", cfg.train_samples),
        val=SyntheticDataset(cfg, "val", cfg.val_samples),
        num_classes=len(names),
        class_names=names,
        input_shape=shape or (3, cfg.size, cfg.size),
    )


# ---------------------------------------------------------------------------------------------
# Images on disk


def _load_image_folder(cfg: DataConfig) -> Datasets:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    root = Path(cfg.root or "").expanduser()
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((cfg.size, cfg.size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor(),
        ]
    )
    train, val = (
        ImageFolder(root / s, transform=transform, loader=_read_image, is_valid_file=_is_image)
        for s in SPLITS
    )
    names = tuple(train.classes)
    return Datasets(train, val, len(names), names, (3, cfg.size, cfg.size))


def _read_image(path: str) -> Any:
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except Exception as exc:  # PIL raises several types for truncated or foreign files
        raise DataError(
            Problem(
                "data.root", path, f"cannot read image ({_reason(exc)})", "re-save or remove it"
            )
        ) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Videos on disk


class VideoDataset(Dataset[Item]):
    """One clip per video per access: random in time for train, the centre clip for val.

    The train clip's start comes from pytorchvideo's random clip sampler, which draws from
    Python's ``random``: DataLoader workers seed it from the loader's torch generator, so a seeded
    loader gives the same clips run after run.
    """

    def __init__(
        self,
        videos: Sequence[tuple[Path, int]],
        frames: int,
        size: int,
        clip_seconds: float,
        train: bool,
    ) -> None:
        from pytorchvideo.data import make_clip_sampler

        self.videos = list(videos)
        self.targets = [label for _, label in self.videos]
        self.frames, self.size, self.train = frames, size, train
        self.clip_seconds = Fraction(clip_seconds).limit_denominator(10**6)
        # pytorchvideo has no centre sampler (its uniform one is stateful), so val computes it.
        self._sampler = make_clip_sampler("random", self.clip_seconds) if train else None

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> Item:
        path, label = self.videos[index]
        return self._transform(self._decode(path)), label

    def _decode(self, path: Path) -> torch.Tensor:
        from pytorchvideo.data.encoded_video import EncodedVideo

        fix = "re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or remove it"
        try:
            video = EncodedVideo.from_path(str(path), decode_audio=False, decoder="pyav")
            try:
                start, end = self._clip_times(Fraction(video.duration))
                clip = video.get_clip(start, end)["video"]
            finally:
                video.close()
        except Exception as exc:  # PyAV and pytorchvideo raise many types for a bad file
            raise DataError(
                Problem("data.root", str(path), f"cannot decode video ({_reason(exc)})", fix)
            ) from exc
        if clip is None:
            raise DataError(
                Problem("data.root", str(path), f"no frames in [{start}, {end}) s", fix)
            )
        return clip  # (3, T, H, W), float32 in [0, 255]

    def _clip_times(self, duration: Fraction) -> tuple[Fraction, Fraction]:
        if self._sampler is not None:
            info = self._sampler(0, duration, {})
            return info.clip_start_sec, info.clip_end_sec
        start = max(duration - self.clip_seconds, Fraction(0)) / 2
        return start, start + self.clip_seconds

    def _transform(self, clip: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvf

        # Uniform temporal subsampling as pytorchvideo's UniformTemporalSubsample does it
        # (its transforms module does not import with this torchvision).
        steps = clip.shape[1]
        picks = torch.linspace(0, steps - 1, self.frames).clamp(0, steps - 1).long()
        frames = clip[:, picks].permute(1, 0, 2, 3)  # (T, 3, H, W): v2 treats T as batch
        frames = tvf.resize(frames, [self.size, self.size], antialias=True) / 255.0
        frames = tvf.normalize(frames, list(KINETICS_MEAN), list(KINETICS_STD))
        return frames.permute(1, 0, 2, 3).contiguous()


def _load_videos(cfg: DataConfig) -> Datasets:
    root = Path(cfg.root or "").expanduser()
    listed: dict[str, list[tuple[Path, str]]] = {}
    if cfg.kind == "video_csv":
        for split in SPLITS:
            listed[split] = _read_csv(root / f"{split}.csv")[0]
        names = tuple(sorted({label for _, label in listed["train"]}))
    else:
        names = tuple(_class_folders(root / "train"))
        for split in SPLITS:
            listed[split] = [
                (path, name)
                for name in names
                for path in _files(root / split / name, VIDEO_EXTENSIONS)
            ]
    index = {name: i for i, name in enumerate(names)}

    def dataset(split: str) -> VideoDataset:
        videos = [(path, index[label]) for path, label in listed[split]]
        return VideoDataset(videos, cfg.frames, cfg.size, cfg.clip_seconds, split == "train")

    return Datasets(
        dataset("train"), dataset("val"), len(names), names, (3, cfg.frames, cfg.size, cfg.size)
    )
