"""Data loaders alone, no model: images/s of an image folder and clips/s of a video folder through
the product's loaders and through bare torchvision / timm / pytorchvideo ones, side by side.

    .venv/bin/python benchmarks/loaders.py                 # 8 rounds, ~3 min on 2 cores
    .venv/bin/python benchmarks/loaders.py --quick         # 1 round, small folders, ~10 s
    .venv/bin/python benchmarks/loaders.py --workers 0 1 2 --data videos --json loaders.json

Data, written at start into a temporary folder: an image folder of ``--images`` 256x256 JPEGs
(smooth random colour fields, 4 classes, train/ and val/) and a video folder of ``--videos`` clips
of 3 s at 25 fps, 320x240, mpeg4 (a moving gradient, 4 classes, ``root/train/<class>/*.mp4``).
Only train/ is read: the train transforms, batch ``--batch-size``, shuffled, each worker count of
``--workers``.

Ours: ``unfreeze_hpo.data.load`` (images preprocessed for ``timm:resnet18``'s pretrained config,
videos for the default video input: 8 frames, 224 px, 1 s clips) through
``unfreeze_hpo.data.loading.loader``, one epoch per ``loading.batches(loader, epoch)``. Bare, what
a user would write instead, importing nothing from unfreeze_hpo: torchvision's ``ImageFolder`` +
timm's ``create_transform(**resolve_data_config(model=resnet18), is_training=True)``; and a
map-style dataset over pytorchvideo's ``EncodedVideo.get_clip`` (pyav, a random 1 s clip from
pytorchvideo's random clip sampler) + uniform temporal subsampling to 8 frames + the same
``torchvision.transforms.v2`` short-side jitter, crop, flip and normalisation. Bare loaders are
plain ``DataLoader(shuffle=True, persistent_workers=True)``; every loader is built once and kept.

Each arm's measurement is one epoch of its loader (every batch fetched), after one warm-up epoch
of each (workers started, files in the page cache); arms alternate ours, bare, ours, bare ...
(``common.interleave``). Rates are samples per second of the median epoch; the ratio is ours /
bare with the spread of the per-round ratios. The bare video arm is what the product's video
decoding was before it seeked to each clip and converted only the frames it keeps.
"""

from __future__ import annotations

import itertools
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from common import Stat, interleave, machine, parser, ratio, report, table
from PIL import Image
from torch.utils.data import DataLoader, Dataset

IMAGE_MODEL = "resnet18"  # timm's; its pretrained config gives the transforms (no weights)
CLASSES = 4
IMAGE_SIDE = 256
VIDEO_SECONDS, VIDEO_FPS, VIDEO_SIZE = 3, 25, (320, 240)
CLIP_SECONDS, CLIP_FRAMES, CLIP_SIDE = 1.0, 8, 224  # the product's video defaults
CLIP_JITTER = 1.25  # train clips: short side drawn from [side, side * 1.25], as the product's
KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
KINDS = {"images": ("image_folder", "images/s"), "videos": ("video_folder", "clips/s")}


# --- the data ----------------------------------------------------------------------------------


def write_images(root: Path, count: int) -> None:
    """``count`` JPEGs per split, smooth colour fields (upscaled 8x8 noise) in CLASSES folders."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for n in range(count):
            folder = root / split / f"c{n % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            big = small.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)
            big.save(folder / f"{n}.jpg", quality=90)


def write_videos(root: Path, count: int) -> None:
    """``count`` mpeg4 videos per split: a colour gradient moving a few pixels a frame."""
    width, height = VIDEO_SIZE
    x = np.arange(width)[None, :, None]
    y = np.arange(height)[:, None, None]
    for split in ("train", "val"):
        for n in range(count if split == "train" else CLASSES):
            path = root / split / f"c{n % CLASSES}" / f"{n}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(path), "w") as container:
                stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for k in range(VIDEO_SECONDS * VIDEO_FPS):
                    phase = (x * (1 + n % 3) + y * 2 + 4 * k + np.array([0, 85, 170])) % 256
                    frame = av.VideoFrame.from_ndarray(phase.astype(np.uint8), format="rgb24")
                    for packet in stream.encode(frame):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)


# --- our arm -----------------------------------------------------------------------------------


def our_loader(kind: str, root: Path, batch_size: int, workers: int) -> Callable[[], None]:
    from unfreeze_hpo import data
    from unfreeze_hpo.data import loading
    from unfreeze_hpo.models import ModelSpec, input_of

    cfg = data.DataConfig(kind=kind, root=str(root), clip_seconds=CLIP_SECONDS)
    model = input_of(ModelSpec(f"timm:{IMAGE_MODEL}")) if kind == "image_folder" else None
    datasets = data.load(cfg, model)
    loader = loading.loader(
        datasets.train,
        batch_size=batch_size,
        seed=0,
        shuffle=True,
        workers=workers,
        device=torch.device("cpu"),
    )
    size, epochs = len(datasets.train), itertools.count()  # type: ignore[arg-type]
    return lambda: drain(loading.batches(loader, next(epochs)), size)


# --- the bare arm ------------------------------------------------------------------------------


class BareClips(Dataset[tuple[torch.Tensor, int]]):
    """A random 1 s clip of each video as pytorchvideo decodes it, 8 frames of it kept."""

    def __init__(self, root: Path) -> None:
        from pytorchvideo.data import make_clip_sampler
        from torchvision.datasets.folder import make_dataset
        from torchvision.transforms import v2

        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.videos = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, (".mp4",))
        self.sampler = make_clip_sampler("random", Fraction(CLIP_SECONDS))
        sides = list(range(CLIP_SIDE, round(CLIP_SIDE * CLIP_JITTER) + 1))
        self.spatial = v2.Compose(
            [
                v2.RandomShortestSize(sides, antialias=True),
                v2.RandomCrop(CLIP_SIDE),
                v2.RandomHorizontalFlip(),
            ]
        )
        self.normalize = v2.Normalize(KINETICS_MEAN, KINETICS_STD)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from pytorchvideo.data.encoded_video import EncodedVideo

        path, label = self.videos[index]
        video = EncodedVideo.from_path(path, decode_audio=False, decoder="pyav")
        info = self.sampler(0, video.duration, {})
        clip = video.get_clip(info.clip_start_sec, info.clip_end_sec)["video"]
        video.close()
        steps = clip.shape[1]
        picks = torch.linspace(0, steps - 1, CLIP_FRAMES).clamp(0, steps - 1).long()
        frames = self.spatial(clip[:, picks].permute(1, 0, 2, 3))  # v2 sees (T, 3, H, W)
        return self.normalize(frames / 255).permute(1, 0, 2, 3).contiguous(), label


def bare_loader(kind: str, root: Path, batch_size: int, workers: int) -> Callable[[], None]:
    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    dataset: ImageFolder | BareClips
    if kind == "image_folder":
        model = timm.create_model(IMAGE_MODEL, pretrained=False)
        transform = create_transform(**resolve_data_config(model=model), is_training=True)
        dataset = ImageFolder(str(root / "train"), transform)
    else:
        dataset = BareClips(root / "train")
    options: dict[str, Any] = {"persistent_workers": True} if workers else {}
    loader = DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, **options)
    return lambda: drain(iter(loader), len(dataset))


def drain(batches: Iterator[Any], size: int) -> None:
    """Fetch every batch of one epoch (returns nothing: ``interleave`` times the call)."""
    seen = sum(len(labels) for _, labels in batches)
    assert seen == size, f"an epoch gave {seen} samples, not {size}"


# --- the run -----------------------------------------------------------------------------------


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=8, help="measured epochs of each arm")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="worker counts")
    p.add_argument("--images", type=int, default=384, help="JPEGs in train/")
    p.add_argument("--videos", type=int, default=40, help="videos in train/")
    p.add_argument("--data", nargs="+", choices=tuple(KINDS), default=list(KINDS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = p.parse_args()
    warmup = 1
    if args.quick:
        args.repeats, args.images, args.videos, warmup = 1, 16, 4, 0
    torch.set_num_threads(args.threads)
    print(machine())
    print(
        f"{args.images} {IMAGE_SIDE}x{IMAGE_SIDE} JPEGs ({IMAGE_MODEL} train transforms); "
        f"{args.videos} videos of {VIDEO_SECONDS} s at {VIDEO_FPS} fps, "
        f"{VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} mpeg4 ({CLIP_SECONDS:g} s clips, {CLIP_FRAMES} frames, "
        f"{CLIP_SIDE} px); batch {args.batch_size}, workers {args.workers}, {args.threads} "
        f"thread(s); {args.repeats} epochs of each arm after {warmup} warm-up epoch(s)",
        flush=True,
    )
    random.seed(0)
    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loaders-") as tmp:
        roots = {"images": Path(tmp) / "images", "videos": Path(tmp) / "videos"}
        sizes = {"images": args.images, "videos": args.videos}
        writers = {"images": write_images, "videos": write_videos}
        arms: dict[str, Callable[[], None]] = {}
        for data in args.data:
            writers[data](roots[data], sizes[data])
            # Loaders with workers first: their persistent workers are forked in the first round,
            # before this process decodes a video itself. PyAV 18 scales frames on ffmpeg's thread
            # pool, which pytorchvideo's decoder (the bare arm) uses, and a worker forked after
            # the parent had used it waits on it forever.
            for workers in sorted(args.workers, reverse=True):
                for name, build in (("ours", our_loader), ("bare", bare_loader)):
                    loader = build(KINDS[data][0], roots[data], args.batch_size, workers)
                    arms[f"{data} {workers} {name}"] = loader
        seconds = interleave(arms, args.repeats, warmup)
    elapsed = time.perf_counter() - started

    rows: list[list[Any]] = []
    figures: dict[str, Any] = {}
    for data in args.data:
        kind, unit = KINDS[data]
        for workers in args.workers:
            ours, bare = (seconds[f"{data} {workers} {name}"] for name in ("ours", "bare"))
            rates = {
                name: Stat.of([sizes[data] / s for s in times])
                for name, times in (("ours", ours), ("bare", bare))
            }
            speedup = ratio(bare, ours)  # of rates: ours / bare = bare seconds / ours seconds
            rows.append(
                [
                    kind,
                    workers,
                    f"{rates['ours'].median:.1f} {unit}",
                    f"{rates['bare'].median:.1f} {unit}",
                    f"{speedup.median:.2f} (spread {speedup.spread:.2g})",
                ]
            )
            key = f"{data} workers={workers}"
            figures |= {f"{key} ours": rates["ours"], f"{key} bare": rates["bare"]}
            figures[f"{key} ours/bare"] = speedup
    print(f"\n{elapsed:.0f}s")
    print(table(rows, ["data", "workers", "ours", "bare", "ours / bare"]))
    report(args.json, "loaders", {**figures, "quick": args.quick, "seconds": elapsed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
