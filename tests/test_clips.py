"""data.clips: a clip read by seeking and converting only its kept frames is bitwise the clip
pytorchvideo's decoder gives subsampled; open files are reused, never across a fork."""

from __future__ import annotations

import multiprocessing
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from unfreeze_hpo.data import DataConfig, DataError, VideoDataset, clips, resolve


def write_video(path: Path, frames: int, fps: int = 10, codec: str = "mpeg4") -> Path:
    """Noise frames (every pixel differs, so a wrong frame or resize shows), 48x40."""
    rng = np.random.default_rng(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def before(dataset: VideoDataset, index: int) -> torch.Tensor:
    """The sample as VideoDataset read it before data.clips: pytorchvideo decodes the whole clip,
    then ``linspace`` picks the frames; the same clip sampler and transform."""
    from pytorchvideo.data.encoded_video import EncodedVideo

    path, _ = dataset.videos[index]
    video = EncodedVideo.from_path(str(path), decode_audio=False, decoder="pyav")
    start, end = dataset._clip_times(Fraction(video.duration))
    clip = video.get_clip(start, end)["video"]
    video.close()
    steps = clip.shape[1]
    picks = torch.linspace(0, steps - 1, dataset.frames).clamp(0, steps - 1).long()
    return dataset.transform(clip[:, picks])


# 23 frames at 10 fps: 2.3 s, a frame count that no clip length below divides evenly; libx264
# reorders frames (B-frames); Matroska has no stream duration, so pytorchvideo decodes it all.
VIDEOS = [("a.mp4", "mpeg4", 23), ("b.mp4", "libx264", 23), ("c.mkv", "mpeg4", 17)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
@pytest.mark.parametrize("seconds", [0.7, 1.0, 5.0], ids=["0.7s", "1s", "longer-than-video"])
def test_a_clip_is_bitwise_the_subsampled_pytorchvideo_clip(
    tmp_path: Path, train: bool, seconds: float
) -> None:
    videos = [(write_video(tmp_path / name, n, codec=codec), 0) for name, codec, n in VIDEOS]
    prep = resolve(DataConfig(kind="video_folder", frames=4, size=24, clip_seconds=seconds))
    assert prep.train is not None and prep.eval is not None
    transform = prep.train if train else prep.eval
    dataset = VideoDataset(videos, 4, seconds, train, transform)
    for index in range(len(videos)):
        for draw in range(3):  # train: three clip starts and crops
            random.seed(draw)
            torch.manual_seed(draw)
            ours, _ = dataset[index]
            random.seed(draw)
            torch.manual_seed(draw)
            assert torch.equal(ours, before(dataset, index)), (VIDEOS[index], draw)
            assert ours.shape == (3, 4, 24, 24)


def test_open_videos_are_reused_and_a_replaced_file_reopened(tmp_path: Path) -> None:
    path = str(write_video(tmp_path / "a.mp4", 10))
    video = clips.open_video(path)
    assert clips.open_video(path) is video
    write_video(tmp_path / "a.mp4", 30)
    again = clips.open_video(path)
    assert again is not video and again.duration == 3


def test_the_least_recently_used_video_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []

    class Unopened:
        def __init__(self, path: str) -> None:
            self.path, self.stamp = path, clips._stamp(path)

        def close(self) -> None:
            closed.append(self.path)

    monkeypatch.setattr(clips, "Video", Unopened)
    opened = clips.OpenVideos(size=2)
    a, b, c = __file__, str(Path(__file__).parent / "support.py"), str(Path(__file__).parent)
    for path in (a, b, a, c):
        opened.get(path)
    assert closed == [b] and list(opened.videos) == [a, c]


def _inherited_is_reused(path: str) -> bool:
    return clips.open_video(path) is _PARENT[0]


_PARENT: list[clips.Video] = []


def test_a_forked_worker_opens_its_own_videos(tmp_path: Path) -> None:
    path = str(write_video(tmp_path / "a.mp4", 20))
    _PARENT[:] = [clips.open_video(path)]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_inherited_is_reused, (path,)) is False
    assert clips.open_video(path) is _PARENT[0]


def test_workers_and_the_parent_read_the_same_clips(tmp_path: Path) -> None:
    videos = [(write_video(tmp_path / f"{n}.mp4", n), n) for n in (15, 20, 25)]
    prep = resolve(DataConfig(kind="video_folder", frames=4, size=24))
    assert prep.eval is not None
    dataset = VideoDataset(videos, 4, 1.0, False, prep.eval)
    first = torch.stack([dataset[i][0] for i in range(3)])  # the parent has them open now
    for _ in range(2):  # workers seek in files the parent has open; the parent reads after
        (batch, labels), *_ = DataLoader(dataset, batch_size=3, num_workers=1)
        assert torch.equal(batch, first) and labels.tolist() == [15, 20, 25]
        assert torch.equal(torch.stack([dataset[i][0] for i in range(3)]), first)


def test_a_file_that_breaks_after_opening_is_named_and_reopened(tmp_path: Path) -> None:
    path = write_video(tmp_path / "a.mp4", 20)
    prep = resolve(DataConfig(kind="video_folder", frames=4, size=24))
    assert prep.eval is not None
    dataset = VideoDataset([(path, 0)], 4, 1.0, False, prep.eval)
    good = dataset[0][0]
    path.write_bytes(b"not a video")
    with pytest.raises(DataError, match=r"a\.mp4") as exc:
        dataset[0]
    assert exc.value.problems[0].field == "data.root"
    write_video(path, 20)
    assert torch.equal(dataset[0][0], good)
