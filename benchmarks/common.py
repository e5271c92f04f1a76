"""What every benchmark shares: interleaved measurement of arms, median and spread, the machine
line, and the command-line options (``--quick`` for the smoke test, ``--json`` for the record).

Arms are measured side by side in one run, A B A B ..., after a warm-up of each, so a machine
that slows down mid-run slows every arm alike; figures are reported as ratios between arms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stat:
    """The median of repeated measurements and their spread (max - min)."""

    median: float
    spread: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), max(values) - min(values), len(values))

    def __str__(self) -> str:
        return f"{self.median:.4g} (spread {self.spread:.2g}, n={self.n})"


def interleave(
    arms: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of each arm's call, ``repeats`` rounds of A B A B ... after ``warmup`` rounds
    that are not kept. An arm may return a float: then that is its measurement, not the wall time
    (for arms that time only part of their work, e.g. steps after the first)."""
    for _ in range(warmup):
        for run in arms.values():
            run()
    out: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, run in arms.items():
            started = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - started
            out[name].append(float(result) if isinstance(result, int | float) else elapsed)
    return out


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Stat:
    """The ratio of medians, with the spread of the per-round ratios (rounds are paired)."""
    rounds = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return Stat(
        statistics.median(numerator) / statistics.median(denominator),
        max(rounds) - min(rounds),
        len(rounds),
    )


def machine() -> str:
    """The machine a figure was measured on, in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cores} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a fast smoke run: tiny sizes, 1 repeat")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return p


def report(path: Path | None, name: str, figures: Mapping[str, Any]) -> None:
    """Write the figures (with the machine and date) to ``path`` as JSON, when given."""
    if path is None:
        return
    record = {
        "benchmark": name,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "figures": {k: asdict(v) if isinstance(v, Stat) else v for k, v in figures.items()},
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A Markdown table, as docs/benchmarks.md shows the figures."""
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
