"""Clips of video files read with PyAV: seek to the clip, decode forward to its end, and convert to
RGB only the frames a uniform temporal subsample keeps.

A clip ``[start, end)`` holds the frames pytorchvideo's pyav decoder (``EncodedVideo.get_clip``)
returns for it, and the kept frames are the ones subsampling that whole clip picks, so a sample
is the same as decoding every frame and dropping most of them, at a fraction of the cost.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from fractions import Fraction
from typing import Any

import numpy as np
import torch

# pytorchvideo seeks this many time-base units before the clip start ("seeking in the stream is
# imprecise"); the same seek lands on the same keyframe, so decoding gives the same frames.
SEEK_MARGIN = 1024
# Open files a process keeps. Each holds a file, its demuxer index and, once decoded, a decoder
# with its buffers and threads; a hit saves the open and index read, not the decoding.
OPEN_FILES = 8


class Video:
    """One open video file: its duration as pytorchvideo measures it, and its clips."""

    def __init__(self, path: str) -> None:
        import av

        self.stamp = _stamp(path)
        self.container = av.open(path)
        try:
            self.stream = self.container.streams.video[0]
            self.time_base = Fraction(self.stream.time_base or 1)
            self.start_pts = self.stream.start_time or 0
            # Without a stream duration pytorchvideo decodes everything and takes the last
            # frame's timestamp; the packets' largest one is the same, read without decoding.
            last = self.stream.duration
            if last is None:
                last = max(p.pts for p in self.container.demux(self.stream) if p.pts is not None)
        except Exception:
            self.container.close()
            raise
        self.duration = (last - self.start_pts) * self.time_base

    def clip(self, start: Fraction, end: Fraction, frames: int) -> torch.Tensor | None:
        """``frames`` frames of ``[start, end)`` s picked as ``torch.linspace`` over the frames
        there: float32 ``(3, frames, H, W)`` in [0, 255]; None when none is in the clip."""
        first, stop = self._pts(start), self._pts(end)
        self.container.seek(max(first - SEEK_MARGIN, 0), stream=self.stream)
        found: dict[int, Any] = {}
        for frame in self.container.decode(self.stream):
            pts = frame.pts
            if pts is None:
                raise ValueError("a frame has no timestamp")
            if pts >= stop:
                break
            if pts >= first:
                found[pts] = frame
        if not found:
            return None
        window = [found[pts] for pts in sorted(found)]
        # pytorchvideo's UniformTemporalSubsample, written out (its transforms module does not
        # import with this torchvision).
        picks = torch.linspace(0, len(window) - 1, frames).clamp(0, len(window) - 1).long()
        rgb = np.stack([_rgb(window[i]) for i in picks.tolist()])
        return torch.from_numpy(rgb).permute(3, 0, 1, 2).to(torch.float32)

    def _pts(self, seconds: Fraction) -> int:
        return math.ceil(seconds / self.time_base) + self.start_pts

    def close(self) -> None:
        self.container.close()


def _rgb(frame: Any) -> np.ndarray:
    """A decoded frame as RGB, scaled on one thread. PyAV 18 scales on ffmpeg's thread pool by
    default, and a DataLoader worker forked from a process that had scaled frames inherits that
    pool without its threads and waits on it forever. A worker is already one of several, and a
    clip keeps few frames. (PyAV before the ``threads`` option scales on one thread anyway.)"""
    try:
        return frame.to_ndarray(format="rgb24", threads=1)
    except TypeError:
        return frame.to_ndarray(format="rgb24")


def open_video(path: str) -> Video:
    """The video at ``path``, kept open in this process for the next call."""
    return _OPEN.get(path)


def close_video(path: str) -> None:
    """Close ``path`` if this process has it open (after an error: the next call reopens it)."""
    _OPEN.drop(path)


class OpenVideos:
    """The videos this process has open, by path; the least recently used closed past ``size``.

    A forked DataLoader worker inherits its parent's open files, whose read offsets it would share
    with the parent, and decoders whose threads it does not have: it opens its own, and keeps the
    parent's referenced, unclosed (freeing a decoder waits on its threads). One thread per process
    reads, as DataLoader workers do.
    """

    def __init__(self, size: int = OPEN_FILES) -> None:
        self.size, self.pid = size, os.getpid()
        self.videos: OrderedDict[str, Video] = OrderedDict()
        self.inherited: list[OrderedDict[str, Video]] = []

    def get(self, path: str) -> Video:
        if self.pid != os.getpid():
            self.inherited.append(self.videos)
            self.videos, self.pid = OrderedDict(), os.getpid()
        video = self.videos.get(path)
        if video is not None and video.stamp == _stamp(path):
            self.videos.move_to_end(path)
            return video
        self.drop(path)  # absent, or the file was replaced since it was opened
        video = self.videos[path] = Video(path)
        while len(self.videos) > self.size:
            self.videos.popitem(last=False)[1].close()
        return video

    def drop(self, path: str) -> None:
        video = self.videos.pop(path, None)
        if video is not None:
            video.close()


def _stamp(path: str) -> tuple[int, int]:
    """What tells a replaced file from the one opened: its modification time and size."""
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size


_OPEN = OpenVideos()
