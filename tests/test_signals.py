from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unfreeze_hpo.errors import ConfigError
from unfreeze_hpo.signals import SpikeMonitor

FAST = settings(max_examples=150, deadline=None)
NAN, INF = math.nan, math.inf

# Written out rather than imported: a change to the documented neutral values must fail here.
NEUTRAL = {
    "spike_events": 0.0,
    "spike_loss_ratio": 1.0,
    "spike_grad_ratio": 1.0,
    "spike_new_grad_rms_ratio": 1.0,
    "spike_nonfinite": 0.0,
    "spike_amp_skipped": 0.0,
    "spike_recovery_steps": 0.0,
    "spike_recovered": 1.0,
    "spike_val_drop": 0.0,
    "spike_worst_loss_ratio": 1.0,
    "spike_worst_grad_ratio": 1.0,
    "spike_worst_new_grad_rms_ratio": 1.0,
    "spike_worst_nonfinite": 0.0,
    "spike_worst_val_drop": 0.0,
    "spike_worst_recovery_steps": 0.0,
}


@dataclass
class Driver:
    """Feeds a monitor the way a training loop does, keeping the global step and epoch."""

    monitor: SpikeMonitor
    step: int = 0
    epoch: int = 0
    seen_metrics: list[dict[str, float]] = field(default_factory=list)

    def steps(self, losses: Sequence[float], grads: Sequence[float | None] | None = None) -> None:
        for i, loss in enumerate(losses):
            self.monitor.update(self.step, loss, None if grads is None else grads[i])
            self.step += 1

    def unfreeze(self, *blocks: str) -> None:
        self.monitor.on_unfreeze(self.epoch, self.step, blocks)

    def epoch_end(self, val: float) -> None:
        self.monitor.on_epoch_end(self.epoch, val)
        self.epoch += 1

    def apply(self, op: tuple[Any, ...]) -> None:
        kind, *args = op
        if kind == "step":
            self.steps([args[0]], [args[1]])
        elif kind == "unfreeze":
            self.unfreeze(*args[0])
        else:
            self.epoch_end(args[0])
        self.seen_metrics.append(self.monitor.metrics())


def only_event(monitor: SpikeMonitor) -> Any:
    (event,) = monitor.events
    return event


# ---------------------------------------------------------------------------------------------
# Single events on constructed sequences


def test_spike_that_recovers() -> None:
    run = Driver(SpikeMonitor(baseline_steps=4, window_steps=10))
    # Only the last 4 finite losses make the baseline: the early 100s and the nan do not count.
    run.steps([100.0, 100.0, 1.1, 0.9, NAN, 1.2, 0.8])
    run.unfreeze("layer4")
    run.steps([3.0, 2.0, 0.9, 1.5])
    event = only_event(run.monitor)
    assert event.baseline_loss == pytest.approx(1.0)
    assert event.blocks == ("layer4",)
    assert (event.epoch, event.step) == (0, 7)
    assert event.max_loss_ratio == pytest.approx(3.0)
    # Window index (0-based) of the first loss <= baseline: 3.0 -> 0, 2.0 -> 1, 0.9 -> 2.
    assert event.recovery_steps == 2
    assert event.steps_seen == 4
    metrics = run.monitor.metrics()
    assert metrics["spike_loss_ratio"] == pytest.approx(3.0)
    assert metrics["spike_recovered"] == 1.0
    assert metrics["spike_recovery_steps"] == 2.0
    assert metrics["spike_nonfinite"] == 0.0


def test_no_spike_recovers_at_step_zero() -> None:
    run = Driver(SpikeMonitor(baseline_steps=3, window_steps=5))
    run.steps([1.0, 1.0, 1.0])
    run.unfreeze("b")
    run.steps([0.5, 2.0])
    assert only_event(run.monitor).recovery_steps == 0
    assert run.monitor.metrics()["spike_recovery_steps"] == 0.0


def test_spike_that_does_not_recover_within_window() -> None:
    run = Driver(SpikeMonitor(baseline_steps=3, window_steps=5))
    run.steps([1.0, 1.0, 1.0])
    run.unfreeze("b")
    run.steps([2.0, 1.5, 1.4, 1.3, 1.2])
    metrics = run.monitor.metrics()
    assert metrics["spike_recovered"] == 0.0
    assert metrics["spike_recovery_steps"] == 5.0
    # A loss under the baseline after the window closed is not a recovery.
    run.steps([0.1, 0.1])
    event = only_event(run.monitor)
    assert event.recovery_steps is None
    assert event.steps_seen == run.monitor.window_steps == 5
    assert run.monitor.metrics() == metrics


def test_not_recovered_yet_counts_steps_seen_so_far() -> None:
    run = Driver(SpikeMonitor(baseline_steps=2, window_steps=10))
    run.steps([1.0, 1.0])
    run.unfreeze("b")
    run.steps([5.0, 4.0, 3.0])
    metrics = run.monitor.metrics()
    assert (metrics["spike_recovered"], metrics["spike_recovery_steps"]) == (0.0, 3.0)


def test_nonfinite_losses_and_grad_norms_are_counted_not_averaged() -> None:
    run = Driver(SpikeMonitor(baseline_steps=2, window_steps=10))
    run.steps([1.0, 1.0], [2.0, 2.0])
    run.unfreeze("b")
    run.steps([NAN, INF, 2.0, -INF, 1.5], [1.0, 3.0, INF, None, None])
    event = only_event(run.monitor)
    assert event.nonfinite == 4  # nan loss, inf loss, inf grad norm, -inf loss
    assert event.max_loss_ratio == pytest.approx(2.0)  # 2.0 / 1.0; the infinities are skipped
    assert event.max_grad_ratio == pytest.approx(1.5)  # 3.0 / 2.0; the inf grad norm is skipped
    metrics = run.monitor.metrics()
    assert metrics["spike_nonfinite"] == 4.0
    assert metrics["spike_worst_nonfinite"] == 4.0
    assert all(math.isfinite(v) for v in metrics.values())


def test_window_of_only_nonfinite_losses_is_still_visible() -> None:
    run = Driver(SpikeMonitor(baseline_steps=2, window_steps=3))
    run.steps([1.0, 1.0])
    run.unfreeze("b")
    run.steps([NAN, NAN, NAN])
    metrics = run.monitor.metrics()
    assert metrics["spike_loss_ratio"] == 1.0  # no finite value to take a ratio of
    assert metrics["spike_nonfinite"] == 3.0
    assert (metrics["spike_recovered"], metrics["spike_recovery_steps"]) == (0.0, 3.0)


def test_huge_ratio_is_clamped_finite() -> None:
    run = Driver(SpikeMonitor(baseline_steps=1, window_steps=2))
    run.steps([1e-300], [1e-300])
    run.unfreeze("b")
    run.steps([1e300], [1e300])
    metrics = run.monitor.metrics()
    assert metrics["spike_loss_ratio"] == metrics["spike_grad_ratio"] == sys.float_info.max


def test_no_event_gives_neutral_metrics() -> None:
    monitor = SpikeMonitor()
    assert monitor.metrics() == NEUTRAL
    run = Driver(monitor)
    run.steps([1.0, NAN, 5.0], [1.0, INF, None])
    run.epoch_end(0.5)
    assert monitor.metrics() == NEUTRAL
    assert monitor.events == ()


def test_event_without_baseline_is_neutral() -> None:
    run = Driver(SpikeMonitor(baseline_steps=3, window_steps=4))
    run.unfreeze("b")
    assert run.monitor.metrics() == {**NEUTRAL, "spike_events": 1.0}
    run.steps([5.0, NAN, 7.0], [1.0, 2.0, 3.0])
    event = only_event(run.monitor)
    assert math.isnan(event.baseline_loss) and math.isnan(event.baseline_grad_norm)
    assert math.isnan(event.max_loss_ratio) and event.recovery_steps is None
    assert run.monitor.metrics() == {
        **NEUTRAL,
        "spike_events": 1.0,
        "spike_nonfinite": 1.0,  # still visible without a baseline
        "spike_worst_nonfinite": 1.0,
    }


def test_grad_norm_spike_without_loss_spike() -> None:
    run = Driver(SpikeMonitor(baseline_steps=3, window_steps=5))
    run.steps([1.0] * 3, [2.0] * 3)
    run.unfreeze("b")
    run.steps([1.0] * 3, [2.0, 10.0, 4.0])
    metrics = run.monitor.metrics()
    assert metrics["spike_grad_ratio"] == pytest.approx(5.0)
    assert metrics["spike_worst_grad_ratio"] == pytest.approx(5.0)
    assert metrics["spike_loss_ratio"] == 1.0
    assert metrics["spike_recovered"] == 1.0 and metrics["spike_recovery_steps"] == 0.0


@pytest.mark.parametrize(
    ("higher_is_better", "before", "after", "drop"),
    [
        (True, 0.8, 0.7, 0.1),
        (True, 0.7, 0.8, -0.1),
        (False, 0.5, 0.6, 0.1),
        (False, 0.6, 0.5, -0.1),
    ],
)
def test_val_drop_across_event_epoch(
    higher_is_better: bool, before: float, after: float, drop: float
) -> None:
    run = Driver(SpikeMonitor(baseline_steps=2, window_steps=4, higher_is_better=higher_is_better))
    run.steps([1.0, 1.0])
    run.epoch_end(0.123)  # older values are not the event's val_before
    run.steps([1.0, 1.0])
    run.epoch_end(before)
    run.unfreeze("b")
    run.steps([1.0])
    assert run.monitor.metrics()["spike_val_drop"] == 0.0  # val_after not known yet
    run.epoch_end(after)
    event = only_event(run.monitor)
    assert (event.epoch, event.val_before, event.val_after) == (2, before, after)
    metrics = run.monitor.metrics()
    assert metrics["spike_val_drop"] == pytest.approx(drop)
    assert metrics["spike_worst_val_drop"] == pytest.approx(drop)
    run.epoch_end(0.0)  # later epochs do not touch the event
    assert only_event(run.monitor).val_after == after


def test_nonfinite_val_gives_neutral_drop() -> None:
    run = Driver(SpikeMonitor(baseline_steps=1, window_steps=1))
    run.steps([1.0])
    run.epoch_end(0.9)
    run.unfreeze("b")
    run.steps([NAN])
    run.epoch_end(NAN)
    assert run.monitor.metrics()["spike_val_drop"] == 0.0


def test_latest_follows_second_event_worst_follows_first() -> None:
    run = Driver(SpikeMonitor(baseline_steps=2, window_steps=3))
    run.steps([1.0, 1.0], [1.0, 1.0])
    run.epoch_end(0.9)
    run.unfreeze("layer4")
    run.steps([4.0, NAN, 3.0], [6.0, 1.0, 1.0])  # never back to 1.0
    run.epoch_end(0.6)
    run.steps([1.0, 1.0], [1.0, 1.0])
    run.epoch_end(0.7)
    run.unfreeze("layer3")
    run.steps([1.5, 0.9, 1.0], [2.0, 1.0, 1.0])
    run.epoch_end(0.68)
    first, second = run.monitor.events
    assert (first.blocks, second.blocks) == (("layer4",), ("layer3",))
    metrics = run.monitor.metrics()
    assert metrics["spike_events"] == 2.0
    assert metrics["spike_loss_ratio"] == pytest.approx(1.5)
    assert metrics["spike_grad_ratio"] == pytest.approx(2.0)
    assert metrics["spike_nonfinite"] == 0.0
    assert (metrics["spike_recovered"], metrics["spike_recovery_steps"]) == (1.0, 1.0)
    assert metrics["spike_val_drop"] == pytest.approx(0.02)
    assert metrics["spike_worst_loss_ratio"] == pytest.approx(4.0)
    assert metrics["spike_worst_grad_ratio"] == pytest.approx(6.0)
    assert metrics["spike_worst_nonfinite"] == 1.0
    assert metrics["spike_worst_recovery_steps"] == 3.0
    assert metrics["spike_worst_val_drop"] == pytest.approx(0.3)


def test_overlapping_windows_update_both_and_stop_after_window() -> None:
    run = Driver(SpikeMonitor(baseline_steps=3, window_steps=5))
    run.steps([1.0, 1.0, 1.0])
    run.unfreeze("a")
    run.steps([2.0, 2.0, 2.0])
    run.unfreeze("b")  # a's window is still open: 3 of 5 steps seen
    run.steps([2.0, 2.0, 18.0, 2.0])
    a, b = run.monitor.events
    assert a.steps_seen == 5  # saw the first two steps after b started, then stopped
    assert a.max_loss_ratio == pytest.approx(2.0)  # the 18.0 came after a's window closed
    assert b.baseline_loss == pytest.approx(2.0)  # b's baseline includes a's window
    assert b.steps_seen == 4
    assert b.max_loss_ratio == pytest.approx(9.0)
    assert b.recovery_steps == 0


# ---------------------------------------------------------------------------------------------
# Properties over random sequences

VALUE = st.one_of(
    st.floats(0.01, 10.0),
    st.sampled_from([NAN, INF, -INF, 0.0, 1e-300, 1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
)
OP = st.one_of(
    st.tuples(st.just("step"), VALUE, st.one_of(st.none(), VALUE)),
    st.tuples(st.just("step"), VALUE, st.one_of(st.none(), VALUE)),
    st.tuples(st.just("unfreeze"), st.lists(st.sampled_from(["l1", "l2", "l3"]), max_size=2)),
    st.tuples(st.just("epoch"), VALUE),
)
MONITOR_ARGS = st.tuples(st.integers(1, 6), st.integers(1, 6), st.booleans())


@FAST
@given(MONITOR_ARGS, st.lists(OP, max_size=60))
def test_metrics_always_finite_with_exact_keys(args: tuple[int, int, bool], ops: list[Any]) -> None:
    run = Driver(SpikeMonitor(*args))
    for op in ops:
        run.apply(op)
    for metrics in run.seen_metrics:
        assert metrics.keys() == NEUTRAL.keys()
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    for event in run.monitor.events:
        assert 0 <= event.steps_seen <= run.monitor.window_steps
        assert event.nonfinite <= event.steps_seen


@FAST
@given(MONITOR_ARGS, st.lists(OP, max_size=60), st.data())
def test_resume_from_state_dict_is_exact(
    args: tuple[int, int, bool], ops: list[Any], data: st.DataObject
) -> None:
    split = data.draw(st.integers(0, len(ops)))
    whole = Driver(SpikeMonitor(*args))
    for op in ops:
        whole.apply(op)

    resumed = Driver(SpikeMonitor(*args))
    for op in ops[:split]:
        resumed.apply(op)
    # Strict JSON: nan/inf must not leak into the state.
    state = json.loads(json.dumps(resumed.monitor.state_dict(), allow_nan=False))
    resumed.monitor = SpikeMonitor()  # a fresh one with other settings: the state's settings win
    resumed.monitor.load_state_dict(state)
    for op in ops[split:]:
        resumed.apply(op)

    assert repr(resumed.monitor.events) == repr(whole.monitor.events)  # repr: nan == nan
    assert resumed.seen_metrics == whole.seen_metrics
    assert resumed.monitor.state_dict() == whole.monitor.state_dict()


def test_memory_is_bounded() -> None:
    run = Driver(SpikeMonitor(baseline_steps=7, window_steps=5))
    for i in range(10):
        run.unfreeze(f"block{i}")
        run.steps([1.0 + (j % 3) for j in range(1000)], [2.0] * 1000)
    monitor = run.monitor
    assert len(monitor._losses) <= 7 and len(monitor._grad_norms) <= 7
    assert len(monitor.events) == 10
    assert all(e.steps_seen == 5 for e in monitor.events)
    assert len(json.dumps(monitor.state_dict())) < 10_000


# ---------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        ({"baseline_steps": 0}, ["signals.baseline_steps"]),
        ({"window_steps": -1}, ["signals.window_steps"]),
        ({"baseline_steps": True}, ["signals.baseline_steps"]),
        ({"window_steps": 2.5}, ["signals.window_steps"]),
        (
            {"baseline_steps": 0, "window_steps": 0},
            ["signals.baseline_steps", "signals.window_steps"],
        ),
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict[str, Any], fields: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        SpikeMonitor(**kwargs)
    assert [p.field for p in info.value.problems] == fields
    assert all(f in str(info.value) for f in fields)


def test_load_state_dict_validates_settings() -> None:
    state = SpikeMonitor().state_dict()
    state["window_steps"] = 0
    with pytest.raises(ConfigError, match=r"signals\.window_steps"):
        SpikeMonitor().load_state_dict(state)
