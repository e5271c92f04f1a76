from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader

from unfreeze_hpo.data import (
    AXES,
    DIRECTIONS,
    SHAPES,
    DataConfig,
    DataError,
    Datasets,
    SyntheticDataset,
    check,
    load,
)
from unfreeze_hpo.errors import ConfigError

SMALL = DataConfig(train_samples=64, val_samples=32)


def fields(cfg: DataConfig) -> list[str]:
    return [p.field for p in check(cfg)]


def digest(dataset: SyntheticDataset, count: int = 8) -> str:
    return hashlib.sha256(
        b"".join(dataset[i][0].numpy().tobytes() for i in range(count))
    ).hexdigest()


# --- synthetic video -------------------------------------------------------------------------


def test_synthetic_video_items_have_the_model_layout() -> None:
    threads = torch.get_num_threads()
    data = load(SMALL)
    assert torch.get_num_threads() == threads  # rendering on one thread leaves the setting be
    assert data.num_classes == 4 and len(data.class_names) == 4
    assert data.input_shape == (3, 4, 32, 32)
    assert (len(data.train), len(data.val)) == (64, 32)  # type: ignore[arg-type]
    clip, label = data.train[0]
    assert clip.shape == data.input_shape and clip.dtype == torch.float32
    assert isinstance(label, int)
    labels = [data.train[i][1] for i in range(64)] + [data.val[i][1] for i in range(32)]
    assert set(labels) <= set(range(4))
    batch = torch.stack([data.train[i][0] for i in range(64)])
    assert abs(batch.mean().item()) < 0.3 and 0.7 < batch.std().item() < 1.4  # normalised
    x, y = next(iter(DataLoader(data.train, batch_size=8)))
    assert x.shape == (8, 3, 4, 32, 32) and y.dtype == torch.int64


@pytest.mark.parametrize("task", ["source", "target"])
@pytest.mark.parametrize("kind", ["synthetic_video", "synthetic_image"])
def test_synthetic_labels_are_balanced(kind: str, task: str) -> None:
    data = load(DataConfig(kind=kind, task=task, train_samples=512, val_samples=1, frames=1))
    counts = Counter(data.train[i][1] for i in range(512))
    n = 8 if (kind, task) == ("synthetic_video", "source") else 4
    assert sorted(counts) == list(range(n)) and data.num_classes == n
    expected = 512 / n
    assert all(0.65 * expected <= c <= 1.35 * expected for c in counts.values()), counts


def test_synthetic_class_names_are_readable() -> None:
    source = load(DataConfig(task="source", train_samples=1, val_samples=1)).class_names
    assert source == tuple(f"{shape}/{axis}" for shape in SHAPES for axis in AXES)
    assert load(SMALL).class_names == (
        "solid/right-or-down",
        "solid/left-or-up",
        "thin/right-or-down",
        "thin/left-or-up",
    )
    source_image = load(
        DataConfig(kind="synthetic_image", task="source", train_samples=1, val_samples=1)
    )
    assert source_image.class_names == SHAPES
    image = load(DataConfig(kind="synthetic_image", train_samples=1, val_samples=1))
    assert image.class_names == ("solid/warm", "solid/cool", "thin/warm", "thin/cool")


def test_synthetic_data_is_a_function_of_the_seed() -> None:
    first, again = load(SMALL), load(SMALL)
    other = load(DataConfig(train_samples=64, val_samples=32, seed=1))
    for a, b in ((first.train, again.train), (first.val, again.val)):
        assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(32))
    assert not any(torch.equal(first.train[i][0], other.train[i][0]) for i in range(32))


def test_a_sample_does_not_depend_on_the_others() -> None:
    # Pre-rendered in a batch (small sets) or alone (large sets): the same bits either way,
    # and the same for any dataset length.
    short = load(DataConfig(train_samples=10, val_samples=1)).train
    long = load(SMALL).train
    assert isinstance(short, SyntheticDataset) and isinstance(long, SyntheticDataset)
    for i in (0, 7, 9):
        assert torch.equal(short[i][0], long[i][0])
        assert torch.equal(short.render([i])[0], long[i][0])


def test_synthetic_data_is_identical_in_another_process() -> None:
    data = load(SMALL)
    assert isinstance(data.train, SyntheticDataset)
    code = (
        "import hashlib; from unfreeze_hpo.data import DataConfig, load; "
        "d = load(DataConfig(train_samples=64, val_samples=32)).train; "
        "print(hashlib.sha256(b''.join(d[i][0].numpy().tobytes() for i in range(8))).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(data.train)


def test_train_and_val_share_no_sample() -> None:
    data = load(DataConfig(train_samples=256, val_samples=128))

    def hashes(dataset: object, n: int) -> set[bytes]:
        return {dataset[i][0].numpy().tobytes() for i in range(n)}  # type: ignore[index]

    train, val = hashes(data.train, 256), hashes(data.val, 128)
    assert len(train) == 256 and len(val) == 128
    assert not train & val


def test_target_label_is_shape_group_times_direction_and_source_is_shape_times_axis() -> None:
    data = load(DataConfig(train_samples=256, val_samples=1))
    source = load(DataConfig(task="source", train_samples=256, val_samples=1))
    assert isinstance(data.train, SyntheticDataset) and isinstance(source.train, SyntheticDataset)
    labels_by_shape: dict[str, set[int]] = {}
    for i in range(256):
        sample, label = data.train.describe(i), data.train[i][1]
        assert sample.motion is not None
        group = SHAPES.index(sample.shape) // 2
        direction = 0 if sample.motion in ("right", "down") else 1
        assert label == 2 * group + direction
        assert data.class_names[label].split("/")[1] == DIRECTIONS[direction]
        labels_by_shape.setdefault(sample.shape, set()).add(label)
        seen = source.train.describe(i)
        assert seen.motion is not None
        axis = 0 if seen.motion in ("right", "left") else 1
        assert source.train[i][1] == 2 * SHAPES.index(seen.shape) + axis
    # Same shape, opposite directions: different target labels. Shape alone does not decide it,
    # and neither does the axis the source task taught.
    assert all(len(labels) == 2 for labels in labels_by_shape.values())


def shift_between(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """The circular (dx, dy) that moves image a (3, H, W) onto image b, by cross-correlation."""
    a, b = a - a.mean(), b - b.mean()
    corr = torch.fft.ifft2(torch.fft.fft2(b) * torch.fft.fft2(a).conj()).real.sum(0)
    size = corr.shape[-1]
    dy, dx = divmod(int(corr.argmax()), size)
    return (dx + size // 2) % size - size // 2, (dy + size // 2) % size - size // 2


def test_motion_is_visible_and_goes_the_drawn_way() -> None:
    data = load(DataConfig(train_samples=24, val_samples=1, frames=4))
    assert isinstance(data.train, SyntheticDataset)
    expected = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
    for i in range(24):
        clip, sample = data.train[i][0], data.train.describe(i)
        assert sample.motion is not None
        assert (clip[:, 0] - clip[:, 3]).abs().mean() > 0.1  # frames differ
        dx, dy = shift_between(clip[:, 0], clip[:, 3])
        ex, ey = expected[sample.motion]
        travelled = 3 * sample.speed
        assert abs(dx - ex * travelled) <= 1.5 and abs(dy - ey * travelled) <= 1.5, (i, sample)


def test_synthetic_images_are_still_and_coloured_by_family() -> None:
    data = load(DataConfig(kind="synthetic_image", train_samples=64, val_samples=8))
    assert isinstance(data.train, SyntheticDataset)
    assert data.input_shape == (3, 32, 32) and data.train[0][0].shape == (3, 32, 32)
    checked = 0
    for i in range(64):
        image, label = data.train[i]
        sample = data.train.describe(i)
        assert sample.motion is None
        group = SHAPES.index(sample.shape) // 2
        assert label == 2 * group + (0 if sample.colour == "warm" else 1)
        if group == 0:  # solid shapes: the pixels round the centre are the shape's colour
            x, y = (round(c) % 32 for c in sample.start)
            red, _, blue = image[:, y, x].tolist()
            assert (red > blue) == (sample.colour == "warm"), (i, sample)
            checked += 1
    assert checked >= 16


def four(dx: float, dy: float) -> list[tuple[float, float]]:
    """An offset and its rotations by 90 degrees."""
    return [(dx, dy), (-dx, -dy), (-dy, dx), (dy, -dx)]


def mean_pixel(
    image: torch.Tensor, centre: tuple[float, float], offsets: list[tuple[float, float]]
) -> torch.Tensor:
    """Mean colour of the pixels nearest to ``centre + offset`` on the wrapped-around image."""
    size, (x, y) = image.shape[-1], centre
    pixels = [image[:, round(y + dy) % size, round(x + dx) % size] for dx, dy in offsets]
    return torch.stack(pixels).mean(0)


def test_shapes_are_drawn_as_named() -> None:
    # At 128 px the shapes are large enough to probe a few points: covered (1) or not (0) at the
    # centre, on the diagonal at 0.51 r and 0.8 r, and on the axes at 0.95 r.
    signatures = {
        "square": (1, 1, 1, 0),
        "disk": (1, 1, 0, 1),
        "ring": (0, 1, 0, 1),
        "cross": (1, 0, 0, 1),
    }
    data = load(DataConfig(kind="synthetic_image", train_samples=48, val_samples=1, size=128))
    assert isinstance(data.train, SyntheticDataset)
    seen = set()
    for i in range(48):
        image, sample = data.train[i][0], data.train.describe(i)
        r = sample.radius
        background = image.flatten(1).median(1).values
        # On the axes at 0.72 r every shape is drawn: that gives the shape's colour.
        colour = mean_pixel(image, sample.start, four(0, 0.72 * r)) - background
        probes = (
            [(0, 0), *four(1, 0)],
            *(four(c * r, c * r) for c in (0.51, 0.8)),
            four(0, 0.95 * r),
        )
        covered = [
            float((mean_pixel(image, sample.start, p) - background) @ colour / (colour @ colour))
            for p in probes
        ]
        assert tuple(int(c > 0.5) for c in covered) == signatures[sample.shape], (i, covered)
        seen.add(sample.shape)
    assert seen == set(SHAPES)


# --- files on disk ---------------------------------------------------------------------------


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_loads_classes_and_labels(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for n in range(2):
            write_png(tmp_path / split / "cat" / f"{n}.png", (255, 0, 0))
            write_png(tmp_path / split / "dog" / f"{n}.jpg", (0, 0, 255))
    data = load(DataConfig(kind="image_folder", root=str(tmp_path), size=16))
    assert data.class_names == ("cat", "dog") and data.num_classes == 2
    assert data.input_shape == (3, 16, 16)
    assert len(data.train) == 4 and len(data.val) == 4  # type: ignore[arg-type]
    items = [data.val[i] for i in range(4)]
    assert [label for _, label in items] == [0, 0, 1, 1]
    for image, label in items:
        assert type(image) is torch.Tensor and image.shape == (3, 16, 16)
        assert image.dtype == torch.float32
        assert (image[0].mean() > image[2].mean()) == (label == 0)  # red cats, blue dogs


def write_video(path: Path, frames: int = 20, fps: int = 10, size: int = 32) -> None:
    """Frame k is grey level 12 k, so a decoded frame tells where in the video it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            pixels = np.full((size, size, 3), 12 * k, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def grey_levels(clip: torch.Tensor) -> list[float]:
    """Mean 0..255 grey level of each frame of a normalised (3, T, H, W) clip."""
    return ((clip * 0.225 + 0.45) * 255).mean(dim=(0, 2, 3)).tolist()


def check_videos(data: Datasets, names: tuple[str, ...], val_labels: list[int]) -> None:
    assert data.class_names == names and data.num_classes == len(names)
    assert data.input_shape == (3, 4, 16, 16)
    assert [data.val[i][1] for i in range(len(val_labels))] == val_labels
    clip, _ = data.train[0]
    assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.float32
    # Train: a random 1 s clip out of 2 s, so its frames are 1 s apart end to end.
    levels = grey_levels(clip)
    assert levels == sorted(levels) and 90 <= levels[-1] - levels[0] <= 130
    # Val: the centre clip, frames 5 to 14, at the same place every time.
    first, last = grey_levels(data.val[0][0])[::3]
    assert abs(first - 60) < 10 and abs(last - 168) < 10
    assert torch.equal(data.val[0][0], data.val[0][0])


def test_video_folder_decodes_centre_and_random_clips(tmp_path: Path) -> None:
    for split in ("train", "val"):
        write_video(tmp_path / split / "jump" / "a.mp4")
        write_video(tmp_path / split / "run" / "b.mp4")
    data = load(DataConfig(kind="video_folder", root=str(tmp_path), frames=4, size=16))
    check_videos(data, ("jump", "run"), [0, 1])


def test_video_csv_takes_relative_and_absolute_paths(tmp_path: Path) -> None:
    write_video(tmp_path / "clips" / "a.mp4")
    write_video(tmp_path / "clips" / "b.mp4")
    absolute = tmp_path / "clips" / "b.mp4"
    (tmp_path / "train.csv").write_text(f"path,label\nclips/a.mp4,walk\n{absolute},sit\n")
    (tmp_path / "val.csv").write_text(f"path,label\n{absolute},sit\nclips/a.mp4,walk\n")
    data = load(DataConfig(kind="video_csv", root=str(tmp_path), frames=4, size=16))
    assert len(data.train) == 2  # type: ignore[arg-type]
    check_videos(data, ("sit", "walk"), [0, 1])


def test_an_unreadable_video_is_named_even_from_a_worker(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "jump").mkdir(parents=True)
        (tmp_path / split / "jump" / "broken.mp4").write_bytes(b"not a video")
    data = load(DataConfig(kind="video_folder", root=str(tmp_path)))
    with pytest.raises(DataError, match=r"broken\.mp4") as exc:
        data.val[0]
    assert exc.value.problems[0].field == "data.root"
    # A DataLoader worker sends the error back as text and re-raises it as type(exc)(text); done
    # here the way torch does it (a real worker costs 5 s of shutdown after an error).
    wrapper = ExceptionWrapper(exc_info=(exc.type, exc.value, exc.tb), where="in worker 0")
    with pytest.raises(DataError, match=r"broken\.mp4"):
        wrapper.reraise()


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    for split in ("train", "val"):
        write_png(tmp_path / split / "cat" / "0.png", (1, 2, 3))
    (tmp_path / "val" / "cat" / "1.png").write_bytes(b"not an image")
    data = load(DataConfig(kind="image_folder", root=str(tmp_path)))
    with pytest.raises(DataError, match=r"1\.png") as exc:
        data.val[1]
    assert exc.value.problems[0].value.endswith("1.png")


# --- bad configs -----------------------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    cfg = DataConfig(kind="synthetic_vidoe", frames=0, size=-3, clip_seconds=0, seed=1.5)  # type: ignore[arg-type]
    problems = check(cfg)
    assert [p.field for p in problems] == [
        "data.kind",
        "data.frames",
        "data.size",
        "data.seed",
        "data.clip_seconds",
    ]
    assert "synthetic_video" in problems[0].fix
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    assert exc.value.problems == tuple(problems)


def test_synthetic_fields_are_checked() -> None:
    cfg = DataConfig(task="targte", train_samples=-1, val_samples=0, root="/data")
    assert fields(cfg) == ["data.task", "data.train_samples", "data.val_samples", "data.root"]
    assert "target" in check(cfg)[0].fix
    assert fields(DataConfig(size=4)) == ["data.size"]  # too small to draw the shapes
    assert check(SMALL) == []


@pytest.mark.parametrize("kind", ["image_folder", "video_folder", "video_csv"])
def test_real_kinds_need_an_existing_root(kind: str, tmp_path: Path) -> None:
    assert fields(DataConfig(kind=kind)) == ["data.root"]
    missing = check(DataConfig(kind=kind, root=str(tmp_path / "nowhere"), size=0))
    assert [p.field for p in missing] == ["data.size", "data.root"]
    assert "no such directory" in missing[1].message
    with pytest.raises(ConfigError, match=r"data\.root"):
        load(DataConfig(kind=kind, root=str(tmp_path)))  # exists, but holds nothing


def test_folders_without_classes_or_with_different_classes(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    cfg = DataConfig(kind="image_folder", root=str(tmp_path))
    messages = [p.message for p in check(cfg)]
    assert messages == ["holds no class folders"] * 2
    write_png(tmp_path / "train" / "cat" / "0.png", (1, 2, 3))
    write_png(tmp_path / "train" / "dog" / "0.png", (1, 2, 3))
    write_png(tmp_path / "val" / "cat" / "0.png", (1, 2, 3))
    write_png(tmp_path / "val" / "cow" / "0.png", (1, 2, 3))
    (tmp_path / "val" / "empty").mkdir()
    problems = check(cfg)
    assert [p.field for p in problems] == ["data.root", "data.root"]
    assert "empty" in problems[0].message
    assert "only in train/: dog" in problems[1].message
    assert "only in val/: cow, empty" in problems[1].message


def test_bad_csvs_are_reported(tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4", frames=2)
    (tmp_path / "train.csv").write_text("file,class\na.mp4,walk\n")
    (tmp_path / "val.csv").write_text("path,label\na.mp4,fly\nmissing.mp4,walk\njust-a-path\n")
    messages = [p.message for p in check(DataConfig(kind="video_csv", root=str(tmp_path)))]
    assert len(messages) == 3
    assert "not path,label" in messages[0]
    assert "lines without exactly a path and a label: 4" in messages[1]
    assert "missing.mp4" in messages[2]
    (tmp_path / "train.csv").write_text("path,label\na.mp4,walk\n")
    (tmp_path / "val.csv").write_text("path,label\na.mp4,fly\n")
    problems = check(DataConfig(kind="video_csv", root=str(tmp_path)))
    assert len(problems) == 1 and "fly" in problems[0].message
    (tmp_path / "val.csv").write_text("path,label\n")
    problems = check(DataConfig(kind="video_csv", root=str(tmp_path)))
    assert [p.message for p in problems] == ["lists no videos"]
