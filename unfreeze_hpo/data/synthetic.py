"""Synthetic clips and images: shapes moving on a noisy background, each a pure function of
(kind, task, split, seed, index)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from unfreeze_hpo.data.spec import (
    AXES,
    COLOURS,
    DIRECTIONS,
    GROUPS,
    MOTIONS,
    SHAPES,
    SYNTHETIC_FRAMES,
    SYNTHETIC_SIZE,
    DataConfig,
    Datasets,
    Item,
)

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
        self.frames = (cfg.frames or SYNTHETIC_FRAMES) if self.video else 1
        self.size = cfg.size or SYNTHETIC_SIZE
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
    group = p["shape"] // 2  # square, disk -> solid; ring, cross -> thin
    if not video:  # images: source = shape; target = shape group x colour family
        return p["shape"] if task == "source" else group * 2 + p["family"]
    if task == "source":  # shape x motion axis (right, left -> horizontal; down, up -> vertical)
        return p["shape"] * 2 + p["motion"] // 2
    # Target: shape group x direction along the axis (right, down -> 0; left, up -> 1). The
    # source backbone sees motion along an axis but was never asked which way it goes.
    return group * 2 + p["motion"] % 2


def class_names(kind: str, task: str) -> tuple[str, ...]:
    """Readable names of the synthetic classes, in label order."""
    if kind == "synthetic_image":
        if task == "source":
            return SHAPES
        return tuple(f"{g}/{c}" for g in GROUPS for c in COLOURS)
    if task == "source":
        return tuple(f"{s}/{a}" for s in SHAPES for a in AXES)
    return tuple(f"{g}/{d}" for g in GROUPS for d in DIRECTIONS)


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
    train = SyntheticDataset(cfg, "train", cfg.train_samples)
    size = train.size
    shape = (3, train.frames, size, size) if train.video else (3, size, size)
    return Datasets(
        train=train,
        val=SyntheticDataset(cfg, "val", cfg.val_samples),
        num_classes=len(names),
        class_names=names,
        input_shape=shape,
    )
