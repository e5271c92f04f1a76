"""Trial tables as a terminal shows them: short column names, the columns that fit a width, and a
line saying what was left out. CSV and JSON keep every column under its full name."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import pandas as pd

from unfreeze_hpo.errors import ConfigError, Problem

WIDTH = 120  # what `trials` and `best` fit by default
MIN_REASON = 24  # a reason cut shorter than this says nothing
# Shown first, in this order, while they fit; the sampled hyperparameters come after "strategy".
FIRST = ("number", "state", "strategy", "value", "test_acc", "epochs")
LAST = ("reason", "final", "trainable_ratio", "worst_spike", "ray_trial_id")


def short(column: str) -> str:
    """A dotted hyperparameter's name without its strategy or ``optimizer.`` prefix."""
    return column.rsplit(".", 1)[-1]


def shortened(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` under short column names. Hyperparameters that share a short name (each
    strategy's ``target_ratio``) become one column when no row has a value for two of them, as a
    trial samples only its own strategy's; otherwise they keep their full names."""
    groups: dict[str, list[str]] = {}
    for column in frame.columns:
        groups.setdefault(short(column), []).append(column)
    out: dict[str, pd.Series] = {}
    for name, members in groups.items():
        dotted = all("." in m for m in members)
        if len(members) == 1 or (dotted and (frame[members].notna().sum(axis=1) <= 1).all()):
            merged = frame[members[0]].astype(object)
            for member in members[1:]:
                merged = merged.where(merged.notna(), frame[member].astype(object))
            out[name] = merged
        else:
            out.update({m: frame[m] for m in members})
    return pd.DataFrame(out, index=frame.index)


def choose(table: pd.DataFrame, wanted: str) -> list[str]:
    """The full names of the comma-separated ``--columns``, in order: a full name, or a short one
    (which stands for every column of that short name)."""
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    chosen: list[str] = []
    unknown = []
    for name in names:
        found = [name] if name in table.columns else [c for c in table.columns if short(c) == name]
        chosen += [c for c in found if c not in chosen]
        if not found:
            unknown.append(name)
    if unknown or not names:
        fix = "use some of " + ", ".join(dict.fromkeys(short(c) for c in table.columns))
        raise ConfigError(Problem("--columns", wanted, "not a column of the table", fix))
    return chosen


def terminal(
    table: pd.DataFrame,
    *,
    width: int = WIDTH,
    columns: Sequence[str] | None = None,
    wide: bool = False,
) -> str:
    """``table`` as aligned text: the ``columns`` asked for, or every column with ``wide``, or by
    default the columns with a value that fit ``width`` (the reason cut to the room left) and a
    line naming those left out."""
    if table.empty:
        return "(no trials)"
    if columns is not None or wide:
        return _render(_text(shortened(table[list(columns or table.columns)])))
    candidates = [c for c in table.columns if c in FIRST or table[c].notna().any()]
    cells = _text(shortened(table[candidates]))
    reason = "reason" in cells.columns and (cells["reason"] != "-").any()
    budget = width - (MIN_REASON + 1 if reason else 0)
    kept: list[str] = []
    for name in _by_priority(list(cells.columns)):
        trying = [c for c in cells.columns if c in kept or c == name]
        if name != "reason" and _line_width(cells[trying]) <= budget:
            kept.append(name)
    order = [c for c in cells.columns if c in kept or (reason and c == "reason")]
    shown = cells[order]
    if reason:
        room = width - _line_width(cells[[c for c in order if c != "reason"]]) - 1
        cut = shown["reason"].map(lambda r: _cut(r, room))
        shown = shown.assign(reason=cut.str.ljust(int(cut.str.len().max())))  # left-aligned
    text = _render(shown)
    left_out = [c for c in cells.columns if c not in order]  # empty columns hold nothing
    if left_out:
        legend = (
            f"({len(left_out)} more column(s): {', '.join(left_out)}. --wide shows every column, "
            "--columns A,B picks them, --format csv|json has them all under their full names)"
        )
        text += "\n" + "\n".join(textwrap.wrap(legend, width))
    return text


def _by_priority(columns: Sequence[str]) -> list[str]:
    first = [c for c in FIRST if c in columns]
    last = [c for c in LAST if c in columns]
    return first + [c for c in columns if c not in FIRST and c not in LAST] + last


def _render(cells: pd.DataFrame) -> str:
    return str(cells.to_string(index=False))


def _line_width(cells: pd.DataFrame) -> int:
    """The width of the widest line ``cells`` render to."""
    if not len(cells.columns):
        return 0
    return max(len(line) for line in _render(cells).splitlines())


def _text(table: pd.DataFrame) -> pd.DataFrame:
    """Every cell as the text the terminal shows: numbers to 4 significant digits, "-" for none."""
    return table.astype(object).apply(lambda column: column.map(_cell))


def _cell(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(1, room - 1)] + "…"
