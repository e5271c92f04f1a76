"""Trial tables in a terminal: short names, the columns that fit, and what was left out."""

from __future__ import annotations

import pandas as pd
import pytest

from unfreeze_hpo.errors import ConfigError
from unfreeze_hpo.results import listing, tables

REASON = (
    "loss x4.20 over baseline after unfreezing block 3 at epoch 2 " + "(window of 20 steps) " * 3
)


def table(rows: int = 4) -> pd.DataFrame:
    """Shaped as listing.trials_table builds it: two strategies, each with its own target_ratio
    (a trial samples only its strategy's), then the tail."""
    adaptive = [i % 2 == 1 for i in range(rows)]
    return pd.DataFrame(
        {
            "number": pd.array(range(rows), dtype="Int64"),
            "state": ["pruned"] * rows,
            "strategy": ["adaptive" if a else "early_gradual" for a in adaptive],
            "early_gradual.target_ratio": [None if a else 0.5 for a in adaptive],
            "adaptive.target_ratio": [0.9 if a else None for a in adaptive],
            "progressive.initial_blocks": [None] * rows,  # no trial of this strategy here
            "optimizer.backbone_lr_mult": [0.123456] * rows,
            "optimizer.unfreeze_warmup_steps": [8] * rows,
            "value": [0.75] * rows,
            "final": [0.7] * rows,
            "epochs": pd.array([4] * rows, dtype="Int64"),
            "trainable_ratio": [0.5] * rows,
            "worst_spike": [4.2] * rows,
            "reason": [REASON] * rows,
            "ray_trial_id": ["0badf00d_00001"] * rows,
        }
    )


def test_parameters_lose_their_prefix_and_each_strategy_s_own_share_a_column() -> None:
    shown = tables.shortened(table())
    assert list(shown.columns[:5]) == [
        "number",
        "state",
        "strategy",
        "target_ratio",
        "initial_blocks",
    ]
    assert list(shown["target_ratio"]) == [0.5, 0.9, 0.5, 0.9]  # each row its strategy's
    assert "backbone_lr_mult" in shown.columns


def test_same_named_parameters_both_set_in_a_row_keep_their_full_names() -> None:
    both = table().assign(**{"adaptive.target_ratio": 0.9})
    shown = tables.shortened(both)
    assert "early_gradual.target_ratio" in shown.columns and "adaptive.target_ratio" in shown
    assert "target_ratio" not in shown.columns


@pytest.mark.parametrize("width", [60, 90, 120])
def test_the_default_table_fits_the_width_and_names_what_it_left_out(width: int) -> None:
    lines = tables.terminal(table(), width=width).splitlines()
    assert max(len(line) for line in lines) <= width
    header = lines[0].split()
    assert header[:2] == ["number", "state"] and header[-1] == "reason"
    assert "initial_blocks" not in "\n".join(lines)  # no value in these rows: not even named
    assert lines[1].rstrip().endswith("…")  # the reason is cut to the room left, never wraps
    legend = " ".join(lines[5:])
    left_out = legend.split(": ", 1)[1].split(".", 1)[0].split(", ")
    assert "ray_trial_id" in left_out and not set(left_out) & set(header)
    with_values = set(tables.shortened(table()).columns) - {"initial_blocks"}
    assert set(header) | set(left_out) == with_values


def test_a_wide_enough_terminal_shows_every_column_with_a_value() -> None:
    text = tables.terminal(table(), width=400)
    assert REASON.strip() in text and "ray_trial_id" in text
    assert "more column(s)" not in text and "initial_blocks" not in text


def test_wide_shows_every_column_and_columns_shows_the_chosen_ones() -> None:
    wide = tables.terminal(table(), wide=True)
    assert REASON.strip() in wide and "ray_trial_id" in wide and "initial_blocks" in wide
    assert "more column(s)" not in wide
    chosen = listing.render(table(), columns="number, target_ratio,reason")
    assert chosen.splitlines()[0].split() == ["number", "target_ratio", "reason"]
    assert REASON.strip() in chosen


def test_csv_and_json_keep_the_full_names_and_every_column() -> None:
    csv = listing.render(table(), "csv")
    assert csv.splitlines()[0].split(",") == list(table().columns)
    picked = listing.render(table(), "json", columns="number,target_ratio")
    assert picked.count('"early_gradual.target_ratio": 0.5') == 2
    assert picked.count('"adaptive.target_ratio": 0.9') == 2


def test_an_unknown_column_is_refused_naming_the_option_and_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        listing.render(table(), columns="number,nope")
    (problem,) = caught.value.problems
    assert problem.field == "--columns" and problem.value == "number,nope"
    assert "backbone_lr_mult" in problem.fix and "target_ratio" in problem.fix


def test_no_rows_says_so() -> None:
    assert tables.terminal(table(0)) == "(no trials)"
