"""The study recorder: every ended Ray trial written into the durable Optuna study, once.

The study (SQLite by default) is written by this driver-side callback when a trial ends, once per
Ray trial id, so it never holds a RUNNING trial and a restored search never writes twice.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray import tune

from unfreeze_hpo import storage, trialdir
from unfreeze_hpo.errors import UnfreezeHPOError, describe
from unfreeze_hpo.search import ray_train
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.space import SearchSpace


class StudyUnavailable(UnfreezeHPOError):
    """Ended trials could not be written to the study: its database stayed unreachable."""


# How long the end of a search waits for an unreachable study database before it stops; the
# trials it could not record are recorded by the next run of the same command.
RECORD_RETRY_S = 300.0


_QUICK_S = 2.0  # the wait when a trial ends, before the write is deferred


class StudyRecorder(tune.Callback):
    """Writes each ended Ray trial into the durable Optuna study exactly once.

    A database that is locked or down does not stop the search: the write is retried, deferred
    while trials go on, and retried again at the end, where every ended trial the study lacks
    (this run's or an earlier run's) is written. If the database is still unreachable then, the
    search stops with ``StudyUnavailable``; running the same command again records the rest.
    """

    def __init__(
        self,
        url: str,
        name: str,
        objective: Objective,
        space: SearchSpace,
        scheduler: Any,
        *,
        epochs: int = 0,
        retry_s: float | None = None,
        search: str | None = None,
    ) -> None:
        self.url, self.name, self.objective = url, name, objective
        self.search = search  # the search folder: multi-worker trials' checkpoints are there
        self.metric, self.mode = objective.key, objective.mode  # what the trials report
        self.space, self.scheduler, self.epochs = space, scheduler, epochs
        self.retry_s = RECORD_RETRY_S if retry_s is None else retry_s
        self.curves: dict[str, dict[int, float]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.timelines: dict[str, list[dict[str, int]]] = {}
        # Opened once per driver (an engine per trial cost ~0.2 s in Tune's event loop), and the
        # Ray trial ids it holds read once: never pickled into the experiment snapshot.
        self._opened: optuna.Study | None = None
        self._recorded: set[str] = set()
        self._waiting: dict[str, tuple[Any, optuna.trial.TrialState, str | None]] = {}
        self._ended_at: dict[str, float] = {}  # unix time each trial of this driver ended
        self._next_try = 0.0
        self._active: set[str] = set()  # trials that ran in this driver

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_opened"], state["_recorded"], state["_waiting"] = None, set(), {}
        state["_active"], state["_ended_at"] = set(), {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_waiting", {})  # a snapshot from before these fields
        self.__dict__.setdefault("_active", set())
        self.__dict__.setdefault("_ended_at", {})
        self.__dict__.setdefault("_next_try", 0.0)
        self.__dict__.setdefault("epochs", 0)
        self.__dict__.setdefault("retry_s", RECORD_RETRY_S)
        self.__dict__.setdefault("search", None)
        # A snapshot from before the objective: its study's value was the reported metric.
        self.__dict__.setdefault("objective", Objective(self.metric, "final", mode=self.mode))

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        with contextlib.suppress(*DATABASE_ERRORS):  # trials are recorded once it is back
            self._study()  # create it before the first trial, so readers find it

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._active.add(trial.trial_id)

    on_trial_restore = on_trial_recover = on_trial_start

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
    ) -> None:
        self._active.add(trial.trial_id)
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            self.curves.setdefault(trial.trial_id, {})[int(result["training_iteration"])] = value
        self.last[trial.trial_id] = dict(result)
        if "unfrozen_blocks" in result:
            trialdir.extend_timeline(self.timelines.setdefault(trial.trial_id, []), result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, *self._verdict(trial))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, optuna.trial.TrialState.FAIL, error_reason(trial))

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._waiting and time.monotonic() >= self._next_try:
            self._flush(patience_s=0.0)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Trials that ended in an earlier run of the search but are missing from the study (its
        # database was down then). A trial that ran here and ended without on_trial_complete or
        # on_trial_error was stopped by an interrupt: its snapshot resumes it, so not recorded.
        # So was a TERMINATED one that never started anywhere (an interrupt stops a trial whose
        # worker is still coming up: Ray marks it TERMINATED after its last snapshot said PENDING).
        for trial in trials:
            if trial.trial_id in self._active:
                continue
            if trial.status == "ERROR":
                self._waiting.setdefault(
                    trial.trial_id, (trial, optuna.trial.TrialState.FAIL, error_reason(trial))
                )
            elif trial.status == "TERMINATED" and not _never_started(trial):
                self._waiting.setdefault(trial.trial_id, (trial, *self._verdict(trial)))
        self._flush(patience_s=self.retry_s)
        if self._waiting:
            raise StudyUnavailable(
                f"{len(self._waiting)} ended trial(s) are not in the study: its database "
                f"{storage.redact(self.url)} stayed unreachable for {self.retry_s:.0f}s. Run the "
                "same command again once it is back: the search resumes and records them."
            )

    def _verdict(self, trial: Any) -> tuple[optuna.trial.TrialState, str | None]:
        """How a trial Ray ended without an error ends in the study."""
        reason = getattr(self.scheduler, "reasons", {}).get(trial.trial_id)
        iterations = int((getattr(trial, "last_result", None) or {}).get("training_iteration", 0))
        if reason is None and 0 < iterations < self.epochs:
            reason = f"stopped after epoch {iterations} of {self.epochs}"
        state = optuna.trial.TrialState.PRUNED if reason else optuna.trial.TrialState.COMPLETE
        return state, reason

    def _end(self, trial: Any, state: optuna.trial.TrialState, reason: str | None) -> None:
        self._ended_at.setdefault(trial.trial_id, time.time())
        self._waiting[trial.trial_id] = (trial, state, reason)
        self._flush(patience_s=_QUICK_S)

    def _flush(self, patience_s: float) -> None:
        """Write the waiting trials; on a database error retry with backoff for ``patience_s``,
        then leave them waiting for a later try."""
        deadline, pause = time.monotonic() + patience_s, 0.5
        while self._waiting:
            trial_id = next(iter(self._waiting))
            try:
                self._record(*self._waiting[trial_id])
            except DATABASE_ERRORS as exc:
                self._opened = None  # reconnect next time
                if time.monotonic() + pause > deadline:
                    if not self._next_try:
                        print(
                            f"[search] warning: cannot write {len(self._waiting)} ended "
                            f"trial(s) to the study yet ({storage.database_error(exc)}); "
                            "retrying while the search goes on",
                            flush=True,
                        )
                    self._next_try = time.monotonic() + 10.0
                    return
                time.sleep(pause)
                pause = min(2 * pause, 10.0)
                continue
            del self._waiting[trial_id]
        self._next_try = 0.0

    def _study(self) -> optuna.Study:
        if self._opened is None:
            direction = (
                optuna.study.StudyDirection.MAXIMIZE
                if self.mode == "max"
                else optuna.study.StudyDirection.MINIMIZE
            )
            # A locked SQLite file must not hold Tune's event loop for sqlite3's default 5 s a
            # statement: fail fast, and let _flush retry while the trials go on.
            engine = {"connect_args": {"timeout": 1.0}} if self.url.startswith("sqlite") else {}
            self._opened = optuna.create_study(
                storage=optuna.storages.RDBStorage(self.url, engine_kwargs=engine),
                study_name=self.name,
                direction=direction,
                load_if_exists=True,
            )
            if self._opened.metric_names is None:  # what Optuna's tools call "Objective 0"
                with warnings.catch_warnings():  # set_metric_names is marked experimental
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self._opened.set_metric_names([self.metric])
            if "objective" not in self._opened.user_attrs:  # which objective the values are
                self._opened.set_user_attr("objective", self.objective.to_dict())
            self._recorded = {
                str(t.user_attrs.get("ray_trial_id"))
                for t in self._opened.get_trials(deepcopy=False)
            }
        return self._opened

    def _record(self, trial: Any, state: optuna.trial.TrialState, reason: str | None) -> None:
        study = self._study()
        if trial.trial_id in self._recorded:
            return  # already written before a driver restart
        # The latest checkpoint carries every epoch's metrics: after a driver restart it is the
        # only record of the epochs reported before the kill (the in-memory curve starts later).
        text = checkpointed_text(trial, self.search)
        history = sorted(trialdir.rows(text), key=lambda r: r["epoch"]) if text else []
        curve = {
            **self.objective.curve(history),
            **(self.curves.get(trial.trial_id) or _curve_from(trial, self.metric)),
        }
        # With the blocks each event opened, as the trial folder names them.
        timeline = trialdir.events(text) if history else self.timelines.get(trial.trial_id, [])
        last = self.last.get(trial.trial_id) or dict(getattr(trial, "last_result", {}) or {})
        # The objective as it stood at the trial's last epoch: the trial's score.
        value = curve[max(curve)] if state != optuna.trial.TrialState.FAIL and curve else None
        if state == optuna.trial.TrialState.COMPLETE and value is None:
            state, reason = optuna.trial.TrialState.FAIL, reason or "no finite metric reported"
        distributions = self.space.distributions()
        params = {k: v for k, v in trial.config.items() if k in distributions}
        attrs = {
            "ray_trial_id": trial.trial_id,
            "status": state.name.lower(),
            "reason": reason or "",
            "config": {k: v for k, v in trial.config.items()},
            "final": {
                k: v
                for k, v in last.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            },
            # Ray's durable trial folder under storage_path (local_path is a session temp dir).
            "trial_dir": str(getattr(trial, "path", "") or getattr(trial, "local_path", "") or ""),
            "timeline": timeline,
            "node_id": str(last.get("node_id") or ""),  # the Ray node the trial ran on
            "node_ip": str(last.get("node_ip") or ""),
            # Ray's count of failed attempts: workers that died and were retried.
            "restarts": int(getattr(getattr(trial, "run_metadata", None), "num_failures", 0)),
        }
        record = optuna.trial.create_trial(
            state=state,
            value=value if state != optuna.trial.TrialState.FAIL else None,
            params=params,
            distributions={k: distributions[k] for k in params},
            user_attrs=attrs,
            intermediate_values=curve if state != optuna.trial.TrialState.FAIL else {},
        )
        # The trial's own span, not the moment it is written (Optuna's timeline and durations).
        start, end = self._span(trial)
        record.datetime_start, record.datetime_complete = start or end, end
        study.add_trial(record)
        self._recorded.add(trial.trial_id)

    def _span(self, trial: Any) -> tuple[datetime.datetime | None, datetime.datetime]:
        """When Ray first ran the trial, and when it ended (its last result, for a trial that
        ended in an earlier run of the driver), as Optuna's naive local times."""
        meta = getattr(trial, "run_metadata", None)
        started = _moment(getattr(meta, "start_time", None))
        ended = _moment(self._ended_at.get(trial.trial_id)) or _moment(
            getattr(meta, "last_result_time", None)
        )
        return started, ended or datetime.datetime.fromtimestamp(time.time())


def _never_started(trial: Any) -> bool:
    return getattr(getattr(trial, "run_metadata", None), "start_time", None) is None


def _moment(timestamp: Any) -> datetime.datetime | None:
    """A POSIX timestamp as Optuna's naive local time; None for Ray's "never" (its metadata
    starts ``last_result_time`` at -inf, which a trial stopped before its first result keeps)."""
    if not isinstance(timestamp, int | float) or not math.isfinite(timestamp) or timestamp <= 0:
        return None
    return datetime.datetime.fromtimestamp(timestamp)


def _database_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, optuna.exceptions.StorageInternalError)


DATABASE_ERRORS = _database_errors()


def checkpointed_history(trial: Any, search: str | None = None) -> list[dict[str, Any]]:
    """The per-epoch metrics in the trial's latest Ray checkpoint, oldest first ([] if none)."""
    return sorted(trialdir.rows(checkpointed_text(trial, search)), key=lambda r: r["epoch"])


def checkpointed_text(trial: Any, search: str | None = None) -> str:
    """The ``metrics.jsonl`` of the trial's latest Ray checkpoint ("" if none): its Tune
    checkpoint's, or for a multi-worker trial (which has none) that of the latest checkpoint
    of its Ray Train run, found under ``search``, the search folder (``ray_train``).

    Read through the checkpoint's own filesystem, so object storage works as a local folder does;
    an unreadable file is an empty history, never an error in Tune's event loop.
    """
    checkpoint = getattr(trial, "checkpoint", None)
    try:
        if checkpoint is not None:
            path = f"{checkpoint.path}/{trialdir.METRICS}"
            with checkpoint.filesystem.open_input_stream(path) as f:
                return str(f.read().decode())
        if search is not None and (latest := ray_train.latest_checkpoint(search, trial.trial_id)):
            return storage.read_text(storage.join(latest, trialdir.METRICS)) or ""
    except Exception:
        return ""
    return ""


def _curve_from(trial: Any, metric: str) -> dict[int, float]:
    last = getattr(trial, "last_result", None) or {}
    value = last.get(metric)
    if isinstance(value, int | float) and math.isfinite(value):
        return {int(last.get("training_iteration", 1)): float(value)}
    return {}


def error_reason(trial: Any) -> str:
    """The exception that ended a trial, as "Type: message" (never an empty string)."""
    try:
        error = trial.get_pickled_error()
    except Exception:  # an unreadable error file must not stop the search
        error = None
    cause = getattr(error, "cause", None) or error  # RayTaskError wraps the trial's exception
    if cause is not None:
        return describe(cause)
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1]  # a traceback ends with the exception line
    return "the trial raised an error (no error file was written)"
