"""The trial folder's format: its file names, the per-epoch metrics rows, and the unfreeze timeline.

``train`` writes a trial folder through this module and everything else reads it through it, so
a reader (the study recorder, the report, storage mirrors) never imports the training loop or
torch to parse a line of JSON.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint.pt"  # the latest checkpoint (model, optimizer, schedule and RNG state)
PREVIOUS = "checkpoint.prev.pt"  # the one before: resume falls back to it if the latest is damaged
METRICS = "metrics.jsonl"  # one line per epoch: {"metrics": {...}, "unfrozen": [block names]}
METRICS_CSV = "metrics.csv"  # the same metrics as a table, rewritten each epoch
LOG = "train.log"  # the trial's log lines
# What a Ray checkpoint of a trial carries to storage: the log too, kept with the weights.
CARRIED = (CHECKPOINT, METRICS, LOG)
# What a fresh run in a used folder removes.
STALE = (CHECKPOINT, PREVIOUS, METRICS, METRICS_CSV)
# The search folder's subfolder of Ray Train runs, one per multi-worker trial, named after its
# Ray trial id: <search>/train/<trial id>/checkpoint_<epoch>/ holds what CARRIED names.
RUNS = "train"

# An unfreeze event: {"epoch": e, "n_trainable": n}, and "blocks" (the block names it opened,
# input -> output) where the trial folder names them.
Event = dict[str, Any]


def append(out: Path, metrics: Mapping[str, float], unfrozen: Sequence[str]) -> None:
    """Add epoch ``metrics`` (with the names of the blocks trainable in it) to the folder."""
    with (out / METRICS).open("a") as f:
        f.write(json.dumps({"metrics": dict(metrics), "unfrozen": list(unfrozen)}) + "\n")


def rows(text: str) -> list[dict[str, Any]]:
    """The per-epoch metrics of a ``metrics.jsonl`` text, in file order; a line cut short (a
    worker killed while writing) or without an epoch is skipped."""
    out = []
    for line in _lines(text):
        metrics = line.get("metrics")
        if isinstance(metrics, dict) and isinstance(metrics.get("epoch"), int | float):
            out.append(metrics)
    return out


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of the trial folder ``out`` ([] when it has none)."""
    path = out / METRICS
    return rows(path.read_text()) if path.exists() else []


def find_rows(search_folder: Path, trial_dir: str, trial_id: str = "") -> list[dict[str, Any]]:
    """The longest per-epoch record of a trial of the search in ``search_folder``: its work
    folder's or its latest Ray checkpoint's ``metrics.jsonl`` ([] when none survives); for a
    multi-worker trial (``trial_id``), its Ray Train run's latest checkpoint's.

    The recorded ``trial_dir`` may be Ray's session staging folder (gone after a reboot) or a path
    on another machine, so the same trial folder name is also looked up under ``<search>/ray``.
    """
    dirs = (
        [Path(trial_dir), Path(search_folder) / "ray" / Path(trial_dir).name] if trial_dir else []
    )
    files = [d / "work" / METRICS for d in dirs]
    if trial_id:
        dirs.append(Path(search_folder) / RUNS / trial_id)
    files += [max(d.glob(f"checkpoint_*/{METRICS}"), default=d / "-") for d in dirs]
    return max((_read(f) for f in files), key=len, default=[])


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        return rows(path.read_text())
    except OSError:
        return []


def truncate(out: Path, epochs: int) -> None:
    """Keep the lines of epochs before ``epochs`` (a resumed run writes the rest again)."""
    path = out / METRICS
    if not path.exists():
        return
    kept = [
        line
        for line in _lines(path.read_text())
        if isinstance(epoch := line["metrics"].get("epoch"), int | float) and epoch < epochs
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in kept))


def write_csv(out: Path) -> None:
    """``metrics.csv`` from ``metrics.jsonl``: one column per metric any epoch reported."""
    table = read_rows(out)
    if not table:
        return
    columns = list(dict.fromkeys(k for r in table for k in r))
    with (out / METRICS_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


def extend_timeline(timeline: list[Event], row: Mapping[str, Any]) -> None:
    """Add the epoch ``row`` to ``timeline`` if its trainable block count grew (an unfreeze
    event); an epoch reported again (after a worker restart) adds nothing."""
    n, epoch = int(row.get("unfrozen_blocks", 0)), int(row["epoch"])
    if any(event["epoch"] == epoch for event in timeline):
        return
    if n > (timeline[-1]["n_trainable"] if timeline else 0):
        timeline.append({"epoch": epoch, "n_trainable": n})


def events(text: str) -> list[Event]:
    """The unfreeze events of a ``metrics.jsonl`` text, each with the blocks it opened; an epoch
    written twice (a resumed run writes it again) counts once."""
    out: list[Event] = []
    before: list[str] = []
    seen: set[int] = set()
    for line in sorted(_lines(text), key=lambda line: _epoch(line) or 0):
        if (epoch := _epoch(line)) is None or epoch in seen:
            continue
        seen.add(epoch)
        unfrozen = [str(name) for name in line.get("unfrozen") or []]
        n = int(line["metrics"].get("unfrozen_blocks", len(unfrozen)))
        if n > (out[-1]["n_trainable"] if out else 0):
            event: Event = {"epoch": epoch, "n_trainable": n}
            if "unfrozen" in line:  # the block names, where the line carries them
                event["blocks"] = [name for name in unfrozen if name not in before]
            out.append(event)
        before = unfrozen
    return out


def _epoch(line: Mapping[str, Any]) -> int | None:
    epoch = line["metrics"].get("epoch")
    return int(epoch) if isinstance(epoch, int | float) else None


def timeline(history: Iterable[Mapping[str, Any]]) -> list[Event]:
    """The unfreeze events a trial took, from its per-epoch rows (or results) in epoch order."""
    events: list[Event] = []
    for row in history:
        extend_timeline(events, row)
    return events


def _lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("metrics"), dict):
            out.append(parsed)
    return out
