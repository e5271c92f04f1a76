"""Spike-aware pruning: a TrialScheduler stopping trials whose latest unfreeze event went unstable.

Signals inside the trial, decisions here: trials report numbers, this module says STOP and why.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.params import build
from unfreeze_hpo.registry import Registry
from unfreeze_hpo.search.rules import (
    AshaSettings,
    SpikeRule,
    count_text,
    is_index,
    metric_value,
    number_text,
    spike_verdict,
)

logger = logging.getLogger(__name__)

# Written next to Ray's experiment state (the driver staging dir, synced to the experiment dir):
# Ray 2.60 never checkpoints the scheduler itself, so this file is how reasons survive a restore.
REASONS_FILE = "prune_reasons.json"


# ---------------------------------------------------------------------------------------------
# The verdict: a pure function of one reported result


# ---------------------------------------------------------------------------------------------
# Reasons for stops made by the wrapped scheduler


def _scheduler_name(base: Any) -> str:
    return "asha" if isinstance(base, AsyncHyperBandScheduler) else type(base).__name__


def _reached_max_t(base: Any, result: Mapping[str, Any]) -> bool:
    """ASHA also says STOP when a trial reaches max_t: that is completion, not pruning."""
    if not isinstance(base, AsyncHyperBandScheduler):
        return False
    time_attr = getattr(base, "_time_attr", "training_iteration")
    now = metric_value(result, time_attr, -math.inf)
    return bool(getattr(base, "_stop_last_trials", True)) and now >= getattr(base, "_max_t", 0)


def _rung_reason(base: Any, trial: Trial, result: Mapping[str, Any]) -> str | None:
    """Why ASHA would stop this result at a rung, computed before ASHA records the value.

    Reads ASHA's private bookkeeping (Ray 2.60), so any mismatch falls back to None.
    """
    if not isinstance(base, AsyncHyperBandScheduler):
        return None
    asha: Any = base  # private attributes, untyped
    try:
        metric, sign = asha._metric, asha._metric_op
        bracket = asha._trial_info[trial.trial_id]
        now, value = result[asha._time_attr], result[metric]
        for milestone, recorded in bracket._rungs:  # deepest rung first, as ASHA walks them
            if now >= milestone and trial.trial_id in recorded and not asha._stop_last_trials:
                return None
            if now < milestone or trial.trial_id in recorded:
                continue
            cutoff = bracket.cutoff(recorded)
            if cutoff is None:
                return None
            side = "below" if sign > 0 else "above"
            return (
                f"asha: {metric} {number_text(value)} {side} the rung cutoff "
                f"{number_text(sign * cutoff)} at {_when(result)}"
            )
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return None


def _when(result: Mapping[str, Any]) -> str:
    epoch = metric_value(result, "epoch")
    if is_index(epoch):
        return f"epoch {int(epoch)}"
    return f"iteration {count_text(metric_value(result, 'training_iteration'))}"


# ---------------------------------------------------------------------------------------------
# Persistence of reasons


def read_reasons(experiment_dir: str | os.PathLike[str]) -> dict[str, str]:
    """trial_id -> prune reason saved in an experiment directory ({} when there are none)."""
    path = Path(experiment_dir) / REASONS_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("cannot read %s: %s: %s", path, type(exc).__name__, exc)
        return {}
    if not isinstance(saved, dict):
        return {}
    return {str(k): str(v) for k, v in saved.items()}


def _write_reasons(folder: str, reasons: Mapping[str, str]) -> None:
    path = Path(folder) / REASONS_FILE
    # Not *.json: Ray's restore downloads *.json/*.pkl, and a half-written temp must not travel.
    tmp = path.with_name(f".{REASONS_FILE}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dict(reasons), indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        # Losing the file must not stop the search; the reasons stay in memory.
        logger.warning("cannot save prune reasons to %s: %s: %s", path, type(exc).__name__, exc)


def _staging_dir(trial: Trial) -> str | None:
    """The experiment's driver staging dir, which Ray syncs up and restores; None for stubs."""
    storage: Any = getattr(trial, "storage", None)  # None for stub trials
    folder = getattr(storage, "experiment_driver_staging_path", None)
    return str(folder) if folder else None


# ---------------------------------------------------------------------------------------------
# The scheduler


class SpikeAwareScheduler(TrialScheduler):
    """Wraps another TrialScheduler (ASHA by default, or FIFO); STOP with a reason when
    spike_verdict says so, otherwise defers to the wrapped scheduler for every callback.

    ``reasons`` maps trial_id -> why it was stopped early: spike verdicts, and early stops of
    the wrapped scheduler (not ASHA's stop at max_t, which is completion).
    """

    def __init__(
        self,
        rule: SpikeRule | None = None,
        base: TrialScheduler | None = None,
        *,
        metric: str | None = None,
        mode: str | None = None,
        phase_grace: int = 0,
    ) -> None:
        super().__init__()
        self.rule = rule if rule is not None else SpikeRule()
        # Epochs of its fine-tuning phase (phase_epochs) a trial runs before the wrapped
        # scheduler may stop it: no rung judges a schedule whose backbone is still frozen.
        self.phase_grace = phase_grace
        self.reasons: dict[str, str] = {}
        self._mode: str | None = None
        self._loaded_from: str | None = None
        if base is None:
            self._base: Any = AsyncHyperBandScheduler(metric=metric, mode=mode)
        else:
            self._base = base
            given = metric is not None or mode is not None
            if given and not self.set_search_properties(metric, mode):
                raise ValueError(
                    f"{type(base).__name__} already has a metric or mode; give them once"
                )

    @property
    def base(self) -> TrialScheduler:
        return self._base

    # -- search properties ---------------------------------------------------------------------

    @property
    def metric(self) -> str | None:
        return self._base.metric

    @property
    def mode(self) -> str | None:
        base_mode = getattr(self._base, "_mode", None)
        return base_mode if base_mode is not None else self._mode

    @property
    def supports_buffered_results(self) -> bool:
        return bool(self._base.supports_buffered_results)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # make_scheduler sets metric/mode and search.py passes the same to TuneConfig; Ray's
        # schedulers call any second value a conflict, the same value twice is not one.
        if metric is not None and metric == self.metric:
            metric = None
        if mode is not None and mode == self.mode:
            mode = None
        if not self._base.set_search_properties(metric, mode, **spec):
            return False
        if mode is not None:
            self._mode = mode
        return True

    # -- trial callbacks -----------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        # On a restore, Ray syncs the experiment files down and then adds every trial here.
        self._load(trial)
        self._base.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._base.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        reason = spike_verdict(result, self.rule)
        if reason is not None:
            # The wrapped scheduler does not see this result: the trial is already decided,
            # and it still gets on_trial_complete with the final result.
            self._record(trial, reason)
            return str(TrialScheduler.STOP)
        peeked = _rung_reason(self._base, trial, result)
        decision = self._base.on_trial_result(tune_controller, trial, result)
        # Before its phase grace a trial's value is recorded at the rung (it sets the cutoff the
        # others meet, as in plain ASHA), but a STOP for it is not given: it is judged at the
        # next rung it reaches in its phase.
        early = metric_value(result, "phase_epochs", math.inf) < self.phase_grace
        if early and decision == TrialScheduler.STOP and not _reached_max_t(self._base, result):
            return str(TrialScheduler.CONTINUE)
        if decision == TrialScheduler.STOP and not _reached_max_t(self._base, result):
            fallback = f"{_scheduler_name(self._base)}: early stopped at {_when(result)}"
            self._record(trial, peeked or fallback)
        return str(decision)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self._base.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._base.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        return self._base.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return f"{self._base.debug_string()}\nSpike-aware pruning: {len(self.reasons)} stopped."

    # -- checkpointing -------------------------------------------------------------------------

    def save(self, checkpoint_path: str) -> None:
        """Pickle the whole scheduler state (wrapped scheduler and reasons included)."""
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__dict__, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as inp:
            self.__dict__.update(pickle.load(inp))

    # -- reasons -------------------------------------------------------------------------------

    def _record(self, trial: Trial, reason: str) -> None:
        self._load(trial)
        if trial.trial_id in self.reasons:
            return  # the first reason stands (a stopped trial can still send a final result)
        self.reasons[trial.trial_id] = reason
        logger.info("trial %s stopped: %s", trial.trial_id, reason)
        folder = _staging_dir(trial)
        if folder is not None:
            _write_reasons(folder, self.reasons)

    def _load(self, trial: Trial) -> None:
        """Merge reasons saved by an earlier run of this experiment, once per experiment dir."""
        folder = _staging_dir(trial)
        if folder is None or folder == self._loaded_from:
            return
        self._loaded_from = folder
        for trial_id, reason in read_reasons(folder).items():
            self.reasons.setdefault(trial_id, reason)


# ---------------------------------------------------------------------------------------------
# Construction from config values


def _asha(
    *, metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: float
) -> TrialScheduler:
    problems: list[Problem] = []
    values = {"grace_period": grace_period, "reduction_factor": reduction_factor}
    asha = build(AshaSettings, values, "pruning", problems)
    if not isinstance(max_t, int) or isinstance(max_t, bool) or max_t < 1:
        problems.append(Problem("pruning.max_t", max_t, "must be an integer >= 1", "e.g. 10"))
    elif _greater(grace_period, max_t):
        problems.append(
            Problem("pruning.grace_period", grace_period, f"exceeds max_t ({max_t})", "lower it")
        )
    if problems or asha is None:
        raise ConfigError(problems)
    return AsyncHyperBandScheduler(
        time_attr="training_iteration",
        metric=metric,
        mode=mode,
        max_t=max_t,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


def _fifo(*, metric: str, mode: str, **_: Any) -> TrialScheduler:
    return FIFOScheduler()


# The schedulers the spike rule wraps (``--scheduler NAME``): a factory taking the search's metric
# and mode and ASHA's settings (a scheduler without rungs ignores them), raising ConfigError.
SchedulerFactory = Callable[..., TrialScheduler]
SCHEDULERS: Registry[SchedulerFactory] = Registry("scheduler")


def register_scheduler(name: str, factory: SchedulerFactory) -> SchedulerFactory:
    """Add a scheduler the spike rule can wrap (a name is registered once)."""
    return SCHEDULERS.add(name, factory)


register_scheduler("asha", _asha)
register_scheduler("fifo", _fifo)


def make_scheduler(
    kind: str,
    rule: SpikeRule | None,
    *,
    metric: str,
    mode: str,
    max_t: int,
    grace_period: int,
    reduction_factor: float,
    phase_grace: int = 1,
) -> SpikeAwareScheduler:
    """The spike-aware scheduler over the registered scheduler ``kind`` (ASHA: rungs in
    training iterations = epochs; no rung stops a trial before its ``phase_grace``).

    ``rule`` None uses SpikeRule's defaults. Bad values raise ConfigError (``pruning.<field>``).
    """
    problems: list[Problem] = []
    if kind not in SCHEDULERS:
        close = difflib.get_close_matches(str(kind).lower(), list(SCHEDULERS), n=1)
        fix = f"did you mean {close[0]}?" if close else f"use one of {', '.join(SCHEDULERS)}"
        problems.append(Problem("pruning.scheduler", kind, "unknown scheduler", fix))
    if mode not in ("min", "max"):
        problems.append(Problem("mode", mode, "unknown mode", "use max or min"))
    base = None
    if not problems:  # a factory may assert on what was refused above (ASHA does)
        try:
            base = SCHEDULERS[kind](
                metric=metric,
                mode=mode,
                max_t=max_t,
                grace_period=grace_period,
                reduction_factor=reduction_factor,
            )
        except ConfigError as exc:
            problems += exc.problems
    integer = isinstance(phase_grace, int) and not isinstance(phase_grace, bool)
    if not integer or phase_grace < 0:
        problems.append(
            Problem("pruning.phase_grace", phase_grace, "must be an integer >= 0", "e.g. 1")
        )
    if problems or base is None:
        raise ConfigError(problems)
    scheduler = SpikeAwareScheduler(rule, base, phase_grace=phase_grace)
    if scheduler.metric is None:  # a base without a metric of its own (FIFO): the rule's
        scheduler.set_search_properties(metric, mode)
    return scheduler


def _greater(a: Any, b: Any) -> bool:
    """a > b for numbers (or numeric strings); False when either is not one."""
    try:
        return float(a) > float(b)
    except (TypeError, ValueError):
        return False
