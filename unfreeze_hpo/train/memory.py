"""Peak memory of one epoch: the accelerator's allocator on CUDA, the process's resident set on
the host (Linux resets its high-water mark through ``/proc/self/clear_refs``)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> bool:
    """Start a new peak; False where only the process's lifetime peak can be read."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size (proc(5))
    except OSError:
        return False
    return True


def peak_mb(device: torch.device) -> float:
    """The peak since ``reset_peak``, in MiB: allocated tensors on CUDA, else resident memory
    (the lifetime peak where it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
