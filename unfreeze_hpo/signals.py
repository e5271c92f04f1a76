"""Unfreeze-spike signals: measure how training reacts when backbone blocks are unfrozen.

This module only measures (loss / grad-norm spikes, non-finite steps, recovery, validation drop)
and reports flat, always-finite numbers; whether to stop a trial is decided elsewhere.

The grad-norm ratio compares like with like: in an event's window it is the gradient norm of
the parameters that were trainable before the event over their own baseline, not the norm of a
larger set (the head plus a million newly unfrozen weights) over the head's. The newly unfrozen
blocks' gradient is its own signal: their per-parameter RMS over that of the previously
trainable parameters. fp16 overflows the GradScaler skips are counted apart, not as non-finite.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from unfreeze_hpo.errors import ConfigError, Problem

# Ratios and differences of finite floats can overflow (a loss of 1e10 over a baseline of 1e-300);
# they are clamped to the largest finite float so a metric never becomes inf.
_BIG = sys.float_info.max

# metrics() before any event. Every value must be finite: a nan reaching Optuna leaves the trial
# stuck. "Nothing happened" reads as ratio 1.0 (no bigger than the baseline), recovered 1.0, and 0
# for counts, steps and drops.
NEUTRAL_METRICS: dict[str, float] = {
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


@dataclass(frozen=True)
class SpikeEvent:
    """One unfreeze event, as measured so far.

    The event's *window* is the next ``window_steps`` calls to ``SpikeMonitor.update`` after
    ``on_unfreeze``; the first of them (window index 0) is the step at ``step``.
    """

    epoch: int  # epoch whose plan grew
    step: int  # global step of the first step run with the new plan
    blocks: tuple[str, ...]  # names of the newly unfrozen blocks
    baseline_loss: float  # mean of the last finite losses before the event (nan if none)
    baseline_grad_norm: float  # mean of the last finite grad norms before the event (nan if none)
    # Max over the window of value / baseline, finite values only; nan while nothing was measured
    # or when the baseline is missing or not > 0 (a ratio to it would mean nothing). The grad
    # ratio's value is the norm of the parameters trainable before the event, where the step
    # measured it apart (else the whole norm).
    max_loss_ratio: float = math.nan
    max_grad_ratio: float = math.nan
    nonfinite: int = 0  # window steps whose loss or grad norm was nan/inf
    prior_params: int = 0  # trainable parameters before the event
    new_params: int = 0  # trainable parameters the event added
    # Max over the window of the newly unfrozen parameters' gradient RMS over the previously
    # trainable ones' (nan while not measured).
    max_new_grad_rms_ratio: float = math.nan
    amp_skipped: int = 0  # window steps the fp16 GradScaler skipped on an overflow
    # Window index (0-based) of the first finite loss <= baseline_loss, i.e. the number of window
    # steps spent above the baseline before it. None: not recovered (yet), or no baseline.
    recovery_steps: int | None = None
    steps_seen: int = 0  # window steps observed so far (<= window_steps)
    val_before: float | None = None  # validation metric at the end of the epoch before the event
    val_after: float | None = None  # validation metric at the end of the event epoch

    def val_drop(self, higher_is_better: bool) -> float | None:
        """How much the validation metric got worse across the event (positive = worse).

        None while either value is unknown or not finite.
        """
        if self.val_before is None or self.val_after is None:
            return None
        if not (math.isfinite(self.val_before) and math.isfinite(self.val_after)):
            return None
        drop = self.val_before - self.val_after
        return _clamp(drop if higher_is_better else -drop)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _clamp(value: float) -> float:
    return max(-_BIG, min(_BIG, value))


def _mean(values: Iterable[float]) -> float:
    """Mean of finite values, nan if there are none; divides first so the sum cannot overflow."""
    finite = list(values)
    if not finite:
        return math.nan
    return math.fsum(v / len(finite) for v in finite)


def _running_max_ratio(current: float, value: float | None, baseline: float) -> float:
    """``current`` updated with ``value / baseline``; unchanged when that ratio is undefined."""
    if not (_finite(value) and math.isfinite(baseline) and baseline > 0):
        return current
    assert value is not None
    ratio = _clamp(value / baseline)
    return ratio if math.isnan(current) else max(current, ratio)


def advance(
    event: SpikeEvent,
    loss: float,
    grad_norm: float | None,
    new_norm: float | None = None,
    overflow: bool = False,
) -> SpikeEvent:
    """The event after one more window step (the caller checks that the window is still open).

    ``grad_norm``: of the parameters trainable before the event; ``new_norm``: of those it
    unfroze; ``overflow``: the step was an fp16 overflow the GradScaler skipped (counted, not
    measured)."""
    if overflow:
        return dataclasses.replace(
            event, amp_skipped=event.amp_skipped + 1, steps_seen=event.steps_seen + 1
        )
    bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
    recovery = event.recovery_steps
    if (
        recovery is None
        and math.isfinite(event.baseline_loss)
        and math.isfinite(loss)
        and loss <= event.baseline_loss
    ):
        recovery = event.steps_seen
    return dataclasses.replace(
        event,
        max_loss_ratio=_running_max_ratio(event.max_loss_ratio, loss, event.baseline_loss),
        max_grad_ratio=_running_max_ratio(
            event.max_grad_ratio, grad_norm, event.baseline_grad_norm
        ),
        nonfinite=event.nonfinite + int(bad),
        recovery_steps=recovery,
        steps_seen=event.steps_seen + 1,
        max_new_grad_rms_ratio=_running_max_ratio(
            event.max_new_grad_rms_ratio,
            _rms(new_norm, event.new_params),
            _rms(grad_norm, event.prior_params),
        ),
    )


def _rms(norm: float | None, count: int) -> float:
    """The per-parameter RMS of a gradient of ``count`` entries and this norm (nan if unknown)."""
    if norm is None or count < 1 or not math.isfinite(norm):
        return math.nan
    return norm / math.sqrt(count)


# ---------------------------------------------------------------------------------------------
# Per-event metric values: every one finite, neutral when there is nothing to measure


def _ratio_metric(ratio: float) -> float:
    # Neutral 1.0 = "no bigger than the baseline": no event, no baseline or no finite value yet.
    return ratio if math.isfinite(ratio) else 1.0


def _recovery_metric(event: SpikeEvent) -> tuple[float, float]:
    """(recovery_steps, recovered) as reported for one event."""
    if event.recovery_steps is not None:
        return float(event.recovery_steps), 1.0
    if math.isnan(event.baseline_loss):
        # Nothing to recover to: neutral, so a missing baseline never looks like instability.
        return 0.0, 1.0
    # Not recovered (yet): at least every step seen so far was spent above the baseline.
    return float(event.steps_seen), 0.0


# ---------------------------------------------------------------------------------------------
# The monitor


def _check_steps(name: str, value: Any) -> Problem | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return Problem(f"signals.{name}", value, "must be an integer >= 1", "e.g. 20")
    return None


def _encode(value: float | None) -> float | str | None:
    # Strict JSON has no nan/inf: those travel as the strings float() reads back.
    if value is None or math.isfinite(value):
        return value
    return repr(value)


def _decode(value: float | str | None) -> float | None:
    return None if value is None else float(value)


class SpikeMonitor:
    """Measures every unfreeze event from the train losses and grad norms of each step.

    Call ``on_unfreeze`` when the plan grows (before the first step with the new plan),
    ``update`` after every optimizer step (skipped non-finite ones included) and
    ``on_epoch_end`` after each validation. Memory is bounded: the last ``baseline_steps``
    finite losses and grad norms, plus one ``SpikeEvent`` of running aggregates per event.

    ``metrics()`` values are always finite. Neutral values, used when there is nothing to
    measure: ratio 1.0 (no event, no baseline, or no finite value in the window yet); counts 0;
    recovery_steps 0.0 and recovered 1.0 when the event has no loss baseline; recovery_steps =
    steps_seen and recovered 0.0 while not recovered; val_drop 0.0 while unknown or non-finite.
    """

    def __init__(
        self, baseline_steps: int = 20, window_steps: int = 20, higher_is_better: bool = True
    ) -> None:
        self._configure(baseline_steps, window_steps, higher_is_better)

    def _configure(self, baseline_steps: int, window_steps: int, higher_is_better: bool) -> None:
        """Validate the settings and start with no history and no events."""
        problems = [
            p
            for p in (
                _check_steps("baseline_steps", baseline_steps),
                _check_steps("window_steps", window_steps),
            )
            if p is not None
        ]
        if problems:
            raise ConfigError(problems)
        self.baseline_steps = baseline_steps
        self.window_steps = window_steps
        self.higher_is_better = higher_is_better
        # Finite values only: a baseline is "the last N finite values", however many bad steps
        # came between them.
        self._losses: deque[float] = deque(maxlen=baseline_steps)
        self._grad_norms: deque[float] = deque(maxlen=baseline_steps)
        self._events: list[SpikeEvent] = []
        self._last_val: float | None = None

    # -- recording -----------------------------------------------------------------------------

    def on_unfreeze(
        self,
        epoch: int,
        step: int,
        blocks: Sequence[str],
        *,
        prior_params: int = 0,
        new_params: int = 0,
    ) -> None:
        """Start an event; its baseline comes from the steps recorded before this call.

        ``prior_params`` / ``new_params``: trainable parameters before the event and added by
        it, for the newly unfrozen blocks' gradient RMS (0: not measured)."""
        self._events.append(
            SpikeEvent(
                epoch=epoch,
                step=step,
                blocks=tuple(blocks),
                baseline_loss=_mean(self._losses),
                baseline_grad_norm=_mean(self._grad_norms),
                val_before=self._last_val,
                prior_params=prior_params,
                new_params=new_params,
            )
        )

    def in_window(self, step: int) -> bool:
        """Whether the latest event's window covers global step ``step`` (counted from the
        event's first step; the caller's step numbering, as given to ``on_unfreeze``)."""
        return bool(self._events) and 0 <= step - self._events[-1].step < self.window_steps

    def update(
        self,
        step: int,
        loss: float,
        grad_norm: float | None,
        *,
        prior_norm: float | None = None,
        new_norm: float | None = None,
        overflow: bool = False,
    ) -> None:
        """Record one optimizer step; ``grad_norm`` is None when unknown (not counted as bad).

        ``prior_norm`` / ``new_norm``: within an event's window, the gradient norm of the
        parameters trainable before the latest event and of those it unfroze (the event ratio
        then uses ``prior_norm``; the baseline for later events keeps ``grad_norm``).
        ``overflow``: an fp16 overflow the GradScaler skipped: counted in the window, neither
        non-finite nor part of a baseline.

        ``step`` is the caller's global step, kept for its bookkeeping only: the window is the
        count of ``update`` calls, so an off-by-one in the caller's numbering cannot shift it.
        """
        loss = float(loss)
        grad = None if grad_norm is None else float(grad_norm)
        like = grad if prior_norm is None else float(prior_norm)
        new = None if new_norm is None else float(new_norm)
        # Several windows can be open at once (an event before the previous window closed).
        self._events = [
            advance(e, loss, like, new, overflow) if e.steps_seen < self.window_steps else e
            for e in self._events
        ]
        if overflow:
            return
        if math.isfinite(loss):
            self._losses.append(loss)
        if grad is not None and math.isfinite(grad):
            self._grad_norms.append(grad)

    def on_epoch_end(self, epoch: int, val_metric: float) -> None:
        """Fill ``val_after`` of this epoch's events; remember the value for the next event."""
        val = float(val_metric)
        self._events = [
            dataclasses.replace(e, val_after=val) if e.epoch == epoch else e for e in self._events
        ]
        self._last_val = val

    # -- reading -------------------------------------------------------------------------------

    @property
    def events(self) -> tuple[SpikeEvent, ...]:
        return tuple(self._events)

    def metrics(self) -> dict[str, float]:
        """Flat metrics (all finite): the latest event's, then the worst over all events."""
        if not self._events:
            return dict(NEUTRAL_METRICS)
        latest = self._events[-1]
        recovery, recovered = _recovery_metric(latest)
        drops = [
            d for d in (e.val_drop(self.higher_is_better) for e in self._events) if d is not None
        ]
        latest_drop = latest.val_drop(self.higher_is_better)
        return {
            "spike_events": float(len(self._events)),
            "spike_loss_ratio": _ratio_metric(latest.max_loss_ratio),
            "spike_grad_ratio": _ratio_metric(latest.max_grad_ratio),
            "spike_new_grad_rms_ratio": _ratio_metric(latest.max_new_grad_rms_ratio),
            "spike_nonfinite": float(latest.nonfinite),
            "spike_amp_skipped": float(latest.amp_skipped),
            "spike_recovery_steps": recovery,
            "spike_recovered": recovered,
            "spike_val_drop": 0.0 if latest_drop is None else latest_drop,
            "spike_worst_loss_ratio": max(_ratio_metric(e.max_loss_ratio) for e in self._events),
            "spike_worst_grad_ratio": max(_ratio_metric(e.max_grad_ratio) for e in self._events),
            "spike_worst_new_grad_rms_ratio": max(
                _ratio_metric(e.max_new_grad_rms_ratio) for e in self._events
            ),
            "spike_worst_nonfinite": float(max(e.nonfinite for e in self._events)),
            "spike_worst_val_drop": max(drops, default=0.0),
            "spike_worst_recovery_steps": max(_recovery_metric(e)[0] for e in self._events),
        }

    # -- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume; strict JSON (nan/inf encoded as strings)."""
        return {
            "baseline_steps": self.baseline_steps,
            "window_steps": self.window_steps,
            "higher_is_better": self.higher_is_better,
            "losses": list(self._losses),
            "grad_norms": list(self._grad_norms),
            "last_val": _encode(self._last_val),
            "events": [_event_state(e) for e in self._events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``, settings included: the saved run's settings win."""
        self._configure(state["baseline_steps"], state["window_steps"], state["higher_is_better"])
        self._losses.extend(float(v) for v in state["losses"])
        self._grad_norms.extend(float(v) for v in state["grad_norms"])
        self._last_val = _decode(state["last_val"])
        self._events = [_event_from_state(s) for s in state["events"]]


def _event_state(event: SpikeEvent) -> dict[str, Any]:
    state = dataclasses.asdict(event)
    state["blocks"] = list(event.blocks)
    for name in _FLOAT_FIELDS:
        state[name] = _encode(state[name])
    return state


def _event_from_state(state: dict[str, Any]) -> SpikeEvent:
    values = dict(state)
    values["blocks"] = tuple(state["blocks"])
    for name in _FLOAT_FIELDS:
        if name in state:  # a checkpoint from before a field existed keeps its default
            values[name] = _decode(state[name])
    return SpikeEvent(**values)


_FLOAT_FIELDS = (
    "baseline_loss",
    "baseline_grad_norm",
    "max_loss_ratio",
    "max_grad_ratio",
    "max_new_grad_rms_ratio",
    "val_before",
    "val_after",
)
