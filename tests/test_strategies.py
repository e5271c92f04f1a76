from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from unfreeze_hpo.errors import ConfigError
from unfreeze_hpo.strategies import (
    REGISTRY,
    EarlyGradual,
    Progressive,
    Strategy,
    blocks_for_ratio,
    create,
    register,
)

NAMES = sorted(REGISTRY)
FAST = settings(max_examples=60, deadline=None)
EPOCHS = range(80)

SIZES = st.lists(st.integers(1, 10**7), min_size=1, max_size=40)
METRIC = st.one_of(
    st.sampled_from([0.5, 0.6, 0.7, 0.701]),
    st.floats(allow_nan=True, allow_infinity=True),
)
HISTORY = st.lists(METRIC, max_size=60)


@st.composite
def phases_values(draw: st.DrawFn) -> list[list[int]]:
    n = draw(st.integers(1, 6))
    first = draw(st.integers(0, 10))
    gaps = draw(st.lists(st.integers(1, 15), min_size=n - 1, max_size=n - 1))
    steps = draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    epochs = itertools.accumulate([first, *gaps])
    counts = itertools.accumulate(steps)
    return [[e, c] for e, c in zip(epochs, counts, strict=True)]


STRUCTURED: dict[str, st.SearchStrategy[Any]] = {"phases": phases_values()}


def number_values(meta: typing.Mapping[str, Any], kind: type) -> st.SearchStrategy[Any]:
    ge, gt, le = meta["ge"], meta["gt"], meta["le"]
    if kind is int:
        low = ge if ge is not None else (math.floor(gt) + 1 if gt is not None else -5)
        return st.integers(int(low), int(le) if le is not None else int(low) + 20)
    low = ge if ge is not None else (gt if gt is not None else -1.0)
    high = le if le is not None else low + 1.0
    return st.floats(low, high, exclude_min=ge is None and gt is not None)


def field_values(cls: type[Strategy], f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    kind = typing.get_type_hints(cls)[f.name]
    if f.metadata.get("choices"):
        return st.sampled_from(list(f.metadata["choices"]))
    if f.name in STRUCTURED:
        return STRUCTURED[f.name]
    if kind in (int, float):
        return number_values(f.metadata, kind)
    raise LookupError(f"no value generator for {cls.name}.{f.name}: add one to STRUCTURED")


def params_for(name: str) -> st.SearchStrategy[dict[str, Any]]:
    cls = REGISTRY[name]
    fields = {f.name: field_values(cls, f) for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries({}, optional=fields)


def counts(strategy: Strategy, sizes: list[int], history: list[float] = ()) -> list[int]:
    return [strategy.plan(e, history, sizes).n_trainable for e in EPOCHS]


def field_kinds() -> list[tuple[str, str, type]]:
    return [
        (name, f.name, typing.get_type_hints(REGISTRY[name])[f.name])
        for name in NAMES
        for f in dataclasses.fields(REGISTRY[name])
    ]


NUMERIC_FIELDS = [(n, f, k) for n, f, k in field_kinds() if k in (int, float)]
FLOAT_FIELDS = [(n, f) for n, f, k in NUMERIC_FIELDS if k is float]


def outside_and_inside(kind: type, bound: str, limit: float) -> tuple[Any, Any]:
    if kind is int:
        return {
            "ge": (limit - 1, limit),
            "gt": (limit, limit + 1),
            "le": (limit + 1, limit),
        }[bound]
    return {
        "ge": (math.nextafter(limit, -math.inf), limit),
        "gt": (limit, math.nextafter(limit, math.inf)),
        "le": (math.nextafter(limit, math.inf), limit),
    }[bound]


BOUNDS = [
    pytest.param(name, field, kind, bound, id=f"{name}.{field}.{bound}")
    for name, field, kind in NUMERIC_FIELDS
    for bound in ("ge", "gt", "le")
    if REGISTRY[name].__dataclass_fields__[field].metadata.get(bound) is not None
]


def problem_fields(err: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [p.field for p in err.value.problems]


# ---------------------------------------------------------------------------------------------
# Contract: every registered strategy


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_trainable_blocks_never_decrease(name: str, data: st.DataObject) -> None:
    strategy = create(name, data.draw(params_for(name)))
    sizes, history = data.draw(SIZES), data.draw(HISTORY)
    n = counts(strategy, sizes, history)
    assert n == sorted(n)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_trainable_blocks_within_target_and_model(name: str, data: st.DataObject) -> None:
    strategy = create(name, data.draw(params_for(name)))
    sizes, history = data.draw(SIZES), data.draw(HISTORY)
    target = strategy.target(sizes)
    assert 0 <= target <= len(sizes)
    for e in EPOCHS:
        assert 0 <= strategy.plan(e, history, sizes).n_trainable <= target
        assert 0 <= strategy.n_trainable(e, history[:e], sizes) <= target


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_plan_is_pure_and_resume_safe(name: str, data: st.DataObject) -> None:
    params = data.draw(params_for(name))
    strategy = create(name, params)
    sizes, history, junk = data.draw(SIZES), data.draw(HISTORY), data.draw(HISTORY)
    epoch = data.draw(st.integers(0, len(history)))
    history_before, sizes_before = list(history), list(sizes)

    expected = strategy.plan(epoch, history, sizes)

    assert strategy.plan(epoch, history[:epoch], sizes) == expected
    assert strategy.plan(epoch, history[:epoch] + junk, sizes) == expected
    assert create(name, params).plan(epoch, history, sizes) == expected
    assert strategy.plan(epoch, history, sizes) == expected
    assert history == history_before
    assert sizes == sizes_before


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_lr_scales_zero_when_frozen_and_decay_from_head(name: str, data: st.DataObject) -> None:
    strategy = create(name, data.draw(params_for(name)))
    sizes, history = data.draw(SIZES), data.draw(HISTORY)
    epoch = data.draw(st.integers(0, 80))
    mult = data.draw(st.floats(1e-3, 10))
    decay = data.draw(st.floats(0.01, 1))

    plan = strategy.plan(epoch, history, sizes, backbone_lr_mult=mult, layer_decay=decay)

    n = len(sizes)
    first = n - plan.n_trainable
    assert plan.n_blocks == n
    assert plan.trainable == tuple(range(first, n))
    for i, scale in enumerate(plan.lr_scales):
        assert plan.is_trainable(i) == (i >= first)
        if i < first:
            assert scale == 0.0
        else:
            assert scale == pytest.approx(mult * decay ** (n - 1 - i), rel=1e-12, abs=0)
            assert scale > 0


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data(), epoch=st.integers(max_value=-1))
def test_negative_epoch_is_refused(name: str, data: st.DataObject, epoch: int) -> None:
    strategy = create(name, data.draw(params_for(name)))
    with pytest.raises(ConfigError) as err:
        strategy.plan(epoch, [], data.draw(SIZES))
    assert problem_fields(err) == ["epoch"]


@pytest.mark.parametrize("name", NAMES)
def test_plan_without_blocks_is_refused(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        create(name).plan(0, [], [])
    assert problem_fields(err) == ["sizes"]


@pytest.mark.parametrize("name", NAMES)
def test_epoch_minus_one_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="epoch"):
        create(name).plan(-1, [], [1, 2, 3])


# ---------------------------------------------------------------------------------------------
# Invalid parameters


@pytest.mark.parametrize(("name", "field", "kind", "bound"), BOUNDS)
def test_value_just_outside_a_bound_is_refused(
    name: str, field: str, kind: type, bound: str
) -> None:
    limit = REGISTRY[name].__dataclass_fields__[field].metadata[bound]
    outside, inside = outside_and_inside(kind, bound, limit)

    with pytest.raises(ConfigError) as err:
        create(name, {field: outside})
    assert f"strategy.{field}" in str(err.value)
    assert problem_fields(err) == [f"strategy.{field}"]
    with pytest.raises(ConfigError, match=rf"strategy\.{field}"):
        REGISTRY[name](**{field: outside})

    assert getattr(create(name, {field: inside}), field) == inside


@pytest.mark.parametrize(("name", "field", "kind"), NUMERIC_FIELDS)
@pytest.mark.parametrize("value", [True, False, "two", None, [1]])
def test_non_numbers_refused_for_numeric_fields(
    name: str, field: str, kind: type, value: Any
) -> None:
    with pytest.raises(ConfigError) as err:
        create(name, {field: value})
    assert problem_fields(err) == [f"strategy.{field}"]


@pytest.mark.parametrize(("name", "field"), FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_non_finite_numbers_refused(name: str, field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"strategy\.{field}"):
        create(name, {field: value})


@pytest.mark.parametrize(("name", "field", "kind"), [f for f in NUMERIC_FIELDS if f[2] is int])
def test_fractional_value_refused_for_int_field(name: str, field: str, kind: type) -> None:
    with pytest.raises(ConfigError, match=rf"strategy\.{field}"):
        create(name, {field: 2.5})


@pytest.mark.parametrize(
    ("name", "typo", "meant"),
    [
        ("adaptive", "patiense", "patience"),
        ("adaptive", "min_improvment", "min_improvement"),
        ("early_gradual", "freeze_epoch", "freeze_epochs"),
        ("progressive", "unfreeze_intervall", "unfreeze_interval"),
        ("fixed", "phase", "phases"),
    ],
)
def test_unknown_parameter_suggests_the_close_one(name: str, typo: str, meant: str) -> None:
    with pytest.raises(ConfigError) as err:
        create(name, {typo: 3})
    (problem,) = err.value.problems
    assert problem.field == f"strategy.{typo}"
    assert f"did you mean {meant}?" in problem.fix


@pytest.mark.parametrize(("name", "field"), [(n, f) for n, f, _ in field_kinds()])
def test_transposed_parameter_name_suggests_the_real_one(name: str, field: str) -> None:
    typo = field[0] + field[2] + field[1] + field[3:]
    with pytest.raises(ConfigError) as err:
        create(name, {typo: 1})
    assert f"did you mean {field}?" in err.value.problems[0].fix


def test_parameter_given_to_parameterless_strategy_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        create("full", {"patience": 2})
    assert problem_fields(err) == ["strategy.patience"]
    assert "no parameters" in err.value.problems[0].fix


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("progresive", "progressive"),
        ("early-gradual", "early_gradual"),
        ("adaptiv", "adaptive"),
        ("froze", "frozen"),
    ],
)
def test_unknown_strategy_suggests_the_close_one(typo: str, meant: str) -> None:
    with pytest.raises(ConfigError) as err:
        create(typo)
    (problem,) = err.value.problems
    assert problem.field == "strategy.name"
    assert "did you mean" in problem.fix
    assert meant in problem.fix


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        create("banana")
    assert all(name in err.value.problems[0].fix for name in NAMES)


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        create(
            "adaptive",
            {
                "patience": 0,
                "min_improvement": -0.1,
                "mode": "maximize",
                "patiense": 3,
                "target_ratio": True,
            },
        )
    assert len(err.value.problems) > 1
    assert sorted(problem_fields(err)) == [
        "strategy.min_improvement",
        "strategy.mode",
        "strategy.patience",
        "strategy.patiense",
        "strategy.target_ratio",
    ]


def test_yaml_strings_are_read_as_numbers() -> None:
    raw = yaml.safe_load("patience: '2'\nmin_improvement: 5e-1\nblocks_per_step: 2.0\n")
    assert raw["min_improvement"] == "5e-1"

    strategy = create("adaptive", raw)

    assert strategy.patience == 2 and type(strategy.patience) is int
    assert strategy.min_improvement == 0.5 and type(strategy.min_improvement) is float
    assert strategy.blocks_per_step == 2 and type(strategy.blocks_per_step) is int


def test_coerced_string_is_still_bound_checked() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.patience"):
        create("adaptive", {"patience": "0"})
    with pytest.raises(ConfigError, match=r"strategy\.target_ratio"):
        create("early_gradual", {"target_ratio": "1.5"})


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.data())
def test_numeric_strings_build_the_same_strategy(name: str, data: st.DataObject) -> None:
    params = data.draw(params_for(name))
    as_text = {k: str(v) if isinstance(v, int | float) else v for k, v in params.items()}
    assert create(name, as_text) == create(name, params)


# ---------------------------------------------------------------------------------------------
# early_gradual

EQUAL_16 = [1000] * 16


def test_early_gradual_defaults_on_16_equal_blocks() -> None:
    assert counts(create("early_gradual"), EQUAL_16)[:10] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert max(counts(create("early_gradual"), EQUAL_16)) == 8


def test_early_gradual_freeze_epochs_delays() -> None:
    n = counts(create("early_gradual", {"freeze_epochs": 2}), EQUAL_16)
    assert n[:11] == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8]


def test_early_gradual_blocks_per_epoch_capped_at_target() -> None:
    n = counts(create("early_gradual", {"blocks_per_epoch": 3}), EQUAL_16)
    assert n[:6] == [0, 3, 6, 8, 8, 8]


@pytest.mark.parametrize(
    ("sizes", "ratio", "expected"),
    [
        ([1, 1], 0.5, 1),
        ([40, 30, 20, 10], 0.5, 3),
        ([40, 30, 20, 10], 0.3, 2),
        ([40, 30, 20, 10], 0.31, 3),
        ([10, 10, 10, 70], 0.5, 1),
        ([10, 10, 10, 70], 1.0, 4),
    ],
)
def test_blocks_for_ratio_examples(sizes: list[int], ratio: float, expected: int) -> None:
    assert blocks_for_ratio(sizes, ratio) == expected


@FAST
@given(sizes=SIZES, ratio=st.floats(0, 1, exclude_min=True))
def test_blocks_for_ratio_includes_the_block_that_reaches_it(
    sizes: list[int], ratio: float
) -> None:
    k = blocks_for_ratio(sizes, ratio)
    total = sum(sizes)

    def share(n: int) -> Fraction:
        return Fraction(sum(sizes[len(sizes) - n :]), total)

    assert 1 <= k <= len(sizes)
    assert share(k - 1) < Fraction(ratio)
    assert share(k) >= Fraction(ratio) * (1 - Fraction(1, 10**9))


@FAST
@given(sizes=SIZES, ratio=st.floats(0, 1, exclude_min=True))
def test_early_gradual_stops_at_blocks_for_ratio(sizes: list[int], ratio: float) -> None:
    strategy = create("early_gradual", {"target_ratio": ratio})
    assert strategy.target(sizes) == blocks_for_ratio(sizes, ratio)
    assert counts(strategy, sizes)[-1] == blocks_for_ratio(sizes, ratio)


@FAST
@given(sizes=SIZES)
def test_early_gradual_ratio_one_unfreezes_everything(sizes: list[int]) -> None:
    strategy = create("early_gradual", {"target_ratio": 1.0})
    assert counts(strategy, sizes)[-1] == len(sizes)


def test_early_gradual_notes_example() -> None:
    strategy = create("early_gradual")
    (note,) = strategy.notes(8, EQUAL_16)
    assert "epoch 8" in note
    assert strategy.notes(9, EQUAL_16) == []


@FAST
@given(data=st.data(), sizes=SIZES, epochs=st.integers(1, 79))
def test_early_gradual_notes_warn_iff_target_not_reached_in_time(
    data: st.DataObject, sizes: list[int], epochs: int
) -> None:
    strategy = create("early_gradual", data.draw(params_for("early_gradual")))
    assert isinstance(strategy, EarlyGradual)
    reached = counts(strategy, sizes).index(strategy.target(sizes))
    assert bool(strategy.notes(epochs, sizes)) == (reached >= epochs)


# ---------------------------------------------------------------------------------------------
# adaptive

EQUAL_8 = [100] * 8


def test_adaptive_unfreezes_after_a_plateau_of_patience_epochs() -> None:
    history = [0.5, 0.6, 0.7, 0.702, 0.703, 0.8, 0.8, 0.8, 0.8]
    n = counts(create("adaptive"), EQUAL_8, history)
    assert n[:10] == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("history", "min_improvement", "expected"),
    [
        ([0.5, 0.504, 0.504], 0.005, 1),
        ([0.5, 0.504, 0.508], 0.005, 0),
        ([0.5, 0.5049, 0.5098], 0.005, 0),
        ([0.5, 0.504, 0.508, 0.512, 0.516], 0.005, 0),
        ([0.5, 0.504, 0.508], 0.0, 0),
        ([0.5, 0.5, 0.5], 0.0, 1),
    ],
)
def test_adaptive_small_changes_are_no_improvement(
    history: list[float], min_improvement: float, expected: int
) -> None:
    strategy = create("adaptive", {"min_improvement": min_improvement})
    assert strategy.plan(len(history), history, EQUAL_8).n_trainable == expected


@FAST
@given(
    start=st.floats(0, 100),
    drops=st.lists(st.floats(0.01, 1), min_size=1, max_size=60),
    patience=st.integers(1, 5),
)
def test_adaptive_mode_decides_the_direction(
    start: float, drops: list[float], patience: int
) -> None:
    loss = list(itertools.accumulate(drops, lambda a, b: a - b, initial=start))
    as_min = create("adaptive", {"mode": "min", "patience": patience})
    as_max = create("adaptive", {"mode": "max", "patience": patience})
    sizes = [1] * 100
    assert as_min.plan(len(loss), loss, sizes).n_trainable == 0
    assert as_max.plan(len(loss), loss, sizes).n_trainable == (len(loss) - 1) // patience


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([0.5, math.nan, math.nan], 1),
        ([math.nan, math.nan], 1),
        ([0.5, math.nan, 0.6, math.nan, math.nan], 1),
        ([0.5, math.nan, 0.6, math.nan], 0),
    ],
)
def test_adaptive_nan_epoch_is_no_improvement(history: list[float], expected: int) -> None:
    strategy = create("adaptive")
    assert strategy.plan(len(history), history, EQUAL_8).n_trainable == expected


@FAST
@given(
    sizes=SIZES,
    ratio=st.floats(0, 1, exclude_min=True),
    patience=st.integers(1, 3),
    step=st.integers(1, 4),
)
def test_adaptive_never_passes_target_ratio(
    sizes: list[int], ratio: float, patience: int, step: int
) -> None:
    strategy = create(
        "adaptive", {"target_ratio": ratio, "patience": patience, "blocks_per_step": step}
    )
    flat = [0.5] * (patience * len(sizes) + 1)
    n = [strategy.plan(e, flat, sizes).n_trainable for e in range(len(flat) + 1)]
    assert max(n) == blocks_for_ratio(sizes, ratio)


# ---------------------------------------------------------------------------------------------
# progressive


def test_progressive_gazelle_schedule() -> None:
    strategy = create(
        "progressive", {"initial_blocks": 2, "initial_freeze_epochs": 10, "unfreeze_interval": 3}
    )
    n = counts(strategy, [1] * 12)
    assert n[:10] == [2] * 10
    assert n[10:13] == [3] * 3
    assert n[13:16] == [4] * 3
    assert n[16] == 5
    assert n.index(12) == 37
    assert isinstance(strategy, Progressive)
    assert strategy.last_unfreeze_epoch(12) == 37


@FAST
@given(sizes=SIZES, initial=st.integers(-5, 0))
def test_progressive_non_positive_initial_blocks_unfreezes_all(
    sizes: list[int], initial: int
) -> None:
    strategy = create("progressive", {"initial_blocks": initial})
    assert counts(strategy, sizes) == [len(sizes)] * len(EPOCHS)


@FAST
@given(data=st.data(), n_blocks=st.integers(1, 40))
def test_progressive_last_unfreeze_epoch_is_first_all_trainable(
    data: st.DataObject, n_blocks: int
) -> None:
    strategy = create("progressive", data.draw(params_for("progressive")))
    assert isinstance(strategy, Progressive)
    last = strategy.last_unfreeze_epoch(n_blocks)
    sizes = [1] * n_blocks
    assert strategy.plan(last, [], sizes).n_trainable == n_blocks
    assert last == 0 or strategy.plan(last - 1, [], sizes).n_trainable < n_blocks


@FAST
@given(data=st.data(), sizes=SIZES, epochs=st.integers(1, 1000))
def test_progressive_notes_warn_iff_last_unfreeze_not_in_time(
    data: st.DataObject, sizes: list[int], epochs: int
) -> None:
    strategy = create("progressive", data.draw(params_for("progressive")))
    assert isinstance(strategy, Progressive)
    late = strategy.last_unfreeze_epoch(len(sizes)) >= epochs
    assert bool(strategy.notes(epochs, sizes)) == late


# ---------------------------------------------------------------------------------------------
# fixed

PHASES = [[0, 0], [3, 2], [5, 4]]


def test_fixed_phases_give_their_counts() -> None:
    assert counts(create("fixed", {"phases": PHASES}), [1] * 6)[:8] == [0, 0, 0, 2, 2, 4, 4, 4]


def test_fixed_is_frozen_before_the_first_phase() -> None:
    assert counts(create("fixed", {"phases": [[2, 1]]}), [1] * 6)[:4] == [0, 0, 1, 1]


def test_fixed_accepts_epoch_blocks_dicts() -> None:
    as_dicts = [{"epoch": e, "blocks": b} for e, b in PHASES]
    assert create("fixed", {"phases": as_dicts}) == create("fixed", {"phases": PHASES})


@pytest.mark.parametrize(
    ("phases", "messages"),
    [
        ([[3, 1], [1, 2]], ["epochs must increase"]),
        ([[2, 1], [2, 2]], ["epochs must increase"]),
        ([[0, 2], [3, 1]], ["n_blocks must not decrease"]),
        ([[3, 2], [1, 1]], ["epochs must increase", "n_blocks must not decrease"]),
    ],
)
def test_fixed_rejects_unordered_phases(phases: list[list[int]], messages: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        create("fixed", {"phases": phases})
    assert [p.message for p in err.value.problems] == messages
    assert all(f == "strategy.phases" for f in problem_fields(err))


@pytest.mark.parametrize(
    "phases",
    [[], None, [[0]], [[0, 1, 2]], [["0", 1]], [[-1, 2]], [[0, True]], [{"epoch": 0}], "ab"],
)
def test_fixed_rejects_malformed_phases(phases: Any) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.phases"):
        create("fixed", {"phases": phases})


@pytest.mark.parametrize("phases", [5, 2.5, True])
def test_fixed_rejects_scalar_phases(phases: Any) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.phases"):
        create("fixed", {"phases": phases})


def test_fixed_notes_report_late_phases_and_too_many_blocks() -> None:
    strategy = create("fixed", {"phases": [[0, 0], [3, 2], [20, 8]]})
    notes = strategy.notes(10, [1] * 6)
    assert len(notes) == 2
    assert any("8" in n and "6" in n for n in notes)
    assert any("20" in n for n in notes)


def test_fixed_notes_silent_when_everything_fits() -> None:
    assert create("fixed", {"phases": PHASES}).notes(10, [1] * 6) == []


def test_fixed_phase_at_the_epoch_count_never_runs() -> None:
    strategy = create("fixed", {"phases": [[0, 1], [10, 2]]})
    assert len(strategy.notes(10, [1] * 6)) == 1
    assert strategy.notes(11, [1] * 6) == []


# ---------------------------------------------------------------------------------------------
# full and frozen


@FAST
@given(sizes=SIZES, history=HISTORY)
def test_full_trains_every_block_every_epoch(sizes: list[int], history: list[float]) -> None:
    assert counts(create("full"), sizes, history) == [len(sizes)] * len(EPOCHS)


@FAST
@given(sizes=SIZES, history=HISTORY)
def test_frozen_trains_no_block_ever(sizes: list[int], history: list[float]) -> None:
    strategy = create("frozen")
    assert counts(strategy, sizes, history) == [0] * len(EPOCHS)
    assert all(s == 0.0 for s in strategy.plan(5, history, sizes).lr_scales)


# ---------------------------------------------------------------------------------------------
# registry


def test_registering_a_taken_name_is_refused() -> None:
    before = dict(REGISTRY)
    summary = REGISTRY["full"].summary

    @dataclass(frozen=True)
    class Impostor(Strategy):
        def n_trainable(self, epoch: int, history: Any, sizes: Any) -> int:
            return 0

    with pytest.raises(ValueError, match="full"):
        register("full", "impostor")(Impostor)
    assert before == REGISTRY
    assert REGISTRY["full"].summary == summary


def test_yaml_exponent_strings_for_integer_fields() -> None:
    strategy = create("early_gradual", {"freeze_epochs": "1e1"})
    assert strategy.freeze_epochs == 10 and isinstance(strategy.freeze_epochs, int)
    with pytest.raises(ConfigError, match=r"strategy\.freeze_epochs"):
        create("early_gradual", {"freeze_epochs": "2.5"})


# ---------------------------------------------------------------------------------------------
# Where a schedule's fine-tuning phase starts (the rung schedulers' clock)

SIX = [10] * 6


@pytest.mark.parametrize(
    ("name", "params", "first_event", "start"),
    [
        ("full", {}, None, 0),  # no event ever: judged from epoch 0 as what it is
        ("frozen", {}, None, 0),
        ("fixed", {"phases": [[0, 3]]}, None, 0),  # a fixed plan from epoch 0
        ("fixed", {"phases": [[0, 1], [4, 3]]}, None, 4),
        ("early_gradual", {"freeze_epochs": 3}, None, 3),
        ("early_gradual", {"freeze_epochs": 0, "blocks_per_epoch": 2}, None, 1),
        ("progressive", {"initial_freeze_epochs": 5}, None, 5),
        ("progressive", {"initial_freeze_epochs": 30}, None, 30),  # past any run's epochs
        ("adaptive", {}, None, 4),  # no event yet: twice its patience (2)
        ("adaptive", {"patience": 3}, None, 6),
        ("adaptive", {}, 2, 2),  # its first event, when it comes before that
        ("adaptive", {}, 9, 4),
    ],
)
def test_phase_start(
    name: str, params: dict[str, Any], first_event: int | None, start: int
) -> None:
    assert create(name, params).phase_start(SIX, first_event) == start
