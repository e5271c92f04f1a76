"""The pruning rules, as config and as pure functions: the spike rule a trial is stopped by, and
ASHA's settings. No Ray here (the search's options nest these; ``pruning`` applies them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.params import build, param
from unfreeze_hpo.signals import NEUTRAL_METRICS


@dataclass(frozen=True)
class SpikeRule:
    """Thresholds; a trial is stopped when its latest unfreeze event's window exceeds one."""

    max_loss_ratio: float = param(
        3.0, gt=1, help="max train loss / pre-event baseline in the window that stops the trial"
    )
    max_grad_ratio: float = param(
        50.0, gt=1, help="max grad norm / pre-event baseline in the window that stops the trial"
    )
    max_nonfinite: int = param(1, ge=1, help="non-finite steps in the window that stop the trial")
    require_recovery: bool = param(
        True, help="stop when the window ended without the loss recovering"
    )
    window_steps: int = param(
        20, ge=1, help="the trials' signals.window_steps; a reported spike_window_steps wins"
    )
    min_window_fraction: float = param(
        1.0, gt=0, le=1, help="share of the window to observe before a missing recovery counts"
    )
    max_val_drop: float | None = param(
        None, gt=0, help="validation drop across the event that stops the trial; none: off"
    )


def spike_verdict(result: Mapping[str, Any], rule: SpikeRule) -> str | None:
    """The prune reason for this result, or None.

    Judges the latest unfreeze event only (earlier ones were judged when they were latest).
    Missing metrics read as their neutral values, so a result without an event never prunes.
    """
    if metric_value(result, "spike_events") < 1:
        return None
    where = _where(result)
    nonfinite = metric_value(result, "spike_nonfinite")
    if nonfinite >= rule.max_nonfinite:
        plural = "" if nonfinite == 1 else "s"
        return f"{count_text(nonfinite)} non-finite step{plural} {where}"
    loss = metric_value(result, "spike_loss_ratio")
    if loss > rule.max_loss_ratio:
        return f"loss x{number_text(loss)} over baseline {where}"
    grad = metric_value(result, "spike_grad_ratio")
    if grad > rule.max_grad_ratio:
        return f"grad norm x{number_text(grad)} over baseline {where}"
    steps = _unrecovered_steps(result, rule) if rule.require_recovery else None
    if steps is not None:
        return f"loss not back under baseline within {count_text(steps)} steps {where}"
    drop = metric_value(result, "spike_val_drop")
    if rule.max_val_drop is not None and drop > rule.max_val_drop:
        return f"validation metric down {number_text(drop)} {where}"
    return None


def metric_value(result: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """A reported number; absent or not a number reads as the neutral value."""
    neutral = NEUTRAL_METRICS.get(key, -1.0) if default is None else default
    try:
        return float(result.get(key, neutral))
    except (TypeError, ValueError):
        return neutral


def _unrecovered_steps(result: Mapping[str, Any], rule: SpikeRule) -> float | None:
    """Window steps spent above the baseline, once enough of the window was seen; else None.

    While not recovered, signals report spike_recovery_steps = window steps seen so far, so a
    window still open (recovery still possible) is never judged.
    """
    if metric_value(result, "spike_recovered") > 0.5:
        return None  # recovered, or no baseline to recover to
    steps = metric_value(result, "spike_recovery_steps")
    window = metric_value(result, "spike_window_steps", float(rule.window_steps))
    # round() first: 0.3 * 20 is 6.000000000000001 and must need 6 steps, not 7.
    needed = math.ceil(round(rule.min_window_fraction * window, 9))
    return steps if steps >= needed else None


def _where(result: Mapping[str, Any]) -> str:
    block, epoch = (
        metric_value(result, "spike_event_block"),
        metric_value(result, "spike_event_epoch"),
    )
    if is_index(block) and is_index(epoch):
        return f"after unfreezing block {int(block)} at epoch {int(epoch)}"
    if is_index(epoch):
        return f"after the unfreeze at epoch {int(epoch)}"
    return "after the latest unfreeze"


def is_index(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def number_text(value: float) -> str:
    return f"{value:.3g}"


def count_text(value: float) -> str:
    return str(int(value)) if math.isfinite(value) else str(value)


def spike_rule_from_dict(values: Mapping[str, Any] | None) -> SpikeRule:
    """SpikeRule from YAML/CLI values; every problem at once as ConfigError (pruning.<field>)."""
    problems: list[Problem] = []
    rule = build(SpikeRule, values, "pruning", problems)
    if problems or rule is None:
        raise ConfigError(problems)
    return rule


@dataclass(frozen=True)
class AshaSettings:
    """ASHA's settings, checked as config (ASHA only asserts them, gone under python -O); its
    ``max_t`` is the trials' epochs."""

    grace_period: int = param(4, ge=1, help="epochs before ASHA may stop a trial")
    reduction_factor: float = param(2.0, gt=1, help="ASHA's halving rate")
    phase_grace: int = param(
        1,
        ge=0,
        help="epochs of its fine-tuning phase (from its first unfreeze event) a trial runs "
        "before a rung may stop it; until then its values count at the rungs; 0: plain ASHA",
    )
