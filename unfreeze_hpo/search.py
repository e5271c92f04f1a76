"""A search: Ray Tune runs the trials, OptunaSearch samples them, a spike-aware scheduler prunes.

The searcher keeps its state in Ray's experiment snapshot, so ``Tuner.restore`` resumes it; the
durable Optuna study (SQLite by default) is written by a driver-side callback when a trial ends,
once per Ray trial id, so it never holds a RUNNING trial and a restore never writes twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from unfreeze_hpo import __version__, resources, storage, trialdir
from unfreeze_hpo import config as config_module
from unfreeze_hpo.config import SearchConfig, TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem, UnfreezeHPOError, describe
from unfreeze_hpo.pruning import SpikeRule, make_scheduler
from unfreeze_hpo.results import changed_space, write_inputs
from unfreeze_hpo.space import SearchSpace, default_space, load_space
from unfreeze_hpo.train import Log
from unfreeze_hpo.trainable import run_trial


@dataclass
class SearchOutcome:
    folder: str  # an absolute local path or a URI
    study_url: str
    study_name: str
    best: optuna.trial.FrozenTrial | None
    counts: dict[str, int]
    interrupted: bool = False  # stopped (Ctrl-C) before every trial ended: run it again


def load_inputs(cfg: SearchConfig) -> tuple[TrialConfig, SearchSpace]:
    """The base trial config and the search space, every problem reported at once."""
    problems: list[Problem] = []
    base = space = None
    try:
        base = config_module.load(cfg.base or resources.EXAMPLES / "embedded.yaml")
    except ConfigError as exc:
        problems += exc.problems
    try:
        space = load_space(cfg.space) if cfg.space else default_space()
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    assert base is not None and space is not None
    return _absolute_paths(base), space


def check_inputs(cfg: SearchConfig | None, base: TrialConfig, space: SearchSpace) -> list[Problem]:
    """What ``search`` and ``submit`` check once the files load: the space names no more blocks
    than the base model has, and (with ``cfg``, whose storage must be readable) a resumed search
    keeps the space it started with."""
    problems = []
    if (count := base.model.n_blocks()) is not None:
        problems += space.check_blocks(count)
    if cfg is not None:
        problems += changed_space(cfg, space)
    return problems


def check_storage(cfg: SearchConfig) -> list[Problem]:
    """Where the search writes: a storage_path pyarrow opens, a study database that works."""
    problems = [p for p in [storage.check_location(cfg.storage_path, "storage_path")] if p]
    if cfg.study_storage:
        problems += [p for p in [storage.check_study_storage(cfg.study_storage)] if p]
    elif cfg.remote:
        problems.append(
            Problem(
                "study_storage",
                None,
                f"storage_path {cfg.storage_path} is a URI, and the default SQLite study needs a "
                "local or NFS file",
                "pass --study-storage postgresql://USER@HOST:5432/DB (a database the driver "
                "reaches), or sqlite:////shared/nfs/study.db",
            )
        )
    return problems


def run_search(cfg: SearchConfig, log: Log = print) -> SearchOutcome:
    """Run (or resume) the search ``cfg`` describes and return where its results are."""
    base, space = load_inputs(cfg)
    if problems := check_storage(cfg) or check_inputs(cfg, base, space):
        raise ConfigError(problems)
    # Storage, database and cluster are all checked before anything is written.
    if why := storage.unreachable(cfg.location):
        fix = "check the bucket exists and this machine's credentials can write to it"
        raise ConfigError(Problem("storage_path", cfg.storage_path, f"cannot use it: {why}", fix))
    if cfg.study_storage and (problem := storage.connect_problem(cfg.study_storage)):
        raise ConfigError(problem)
    if cfg.preflight:
        _preflight(base, log)
    _start_ray(cfg)
    # Which code the trials run: on a cluster, the copy a submitted job ships (see jobs.submit).
    log(f"unfreeze-hpo {__version__} from {Path(__file__).parent}, Ray {ray.__version__}")
    if cfg.resource_check:  # trials no node can hold would wait forever
        log(check_resources(cfg, _alive_nodes()))
    try:  # what results need to rebuild a trial's full config; also proves we can write there
        write_inputs(cfg, base, space)
    except OSError as exc:  # pyarrow's errors for a missing bucket or no permission are OSErrors
        why = f"cannot write {cfg.location} ({type(exc).__name__}: {exc})"
        fix = "check the path or bucket exists and this machine's credentials can write to it"
        raise ConfigError(Problem("storage_path", cfg.storage_path, why, fix)) from exc
    if base.model.pretrain_on_source:  # once here, rather than every trial waiting on the lock
        from unfreeze_hpo.embedded import source_checkpoint

        source_checkpoint(base, log)
    base_values = base.to_dict()
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base_values,
            space=space,
            metric=cfg.metric,
            threads=max(1, int(cfg.cpus_per_trial)),
        ),
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial},
    )
    path = storage.join(cfg.location, "ray")
    if tune.Tuner.can_restore(path):
        log(f"resuming the search in {cfg.location}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(cfg, base, space, trainable)
    started = time.perf_counter()
    tuner.fit()
    elapsed = time.perf_counter() - started
    result = outcome(cfg)
    ended = sum(result.counts.values())
    out_of_time = cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s
    if ended < cfg.num_trials and not out_of_time:
        log(f"search interrupted after {elapsed:.0f}s: {ended} of {cfg.num_trials} trials ended")
        return dataclasses.replace(result, interrupted=True)
    log(f"search finished in {elapsed:.0f}s")
    return result


def outcome(cfg: SearchConfig) -> SearchOutcome:
    study = optuna.load_study(study_name=cfg.name, storage=cfg.study_url)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    best = study.best_trial if counts["complete"] else None  # optuna knows the direction
    return SearchOutcome(cfg.location, cfg.study_url, cfg.name, best, counts)


def _new_tuner(
    cfg: SearchConfig, base: TrialConfig, space: SearchSpace, trainable: Any
) -> tune.Tuner:
    sampler = optuna.samplers.TPESampler(
        seed=cfg.seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=min(8, cfg.num_trials),
    )
    recipes = [flat for _, flat in space.recipes()] if cfg.recipes else None
    searcher = OptunaSearch(
        space=space.define_by_run,
        sampler=sampler,
        points_to_evaluate=recipes or None,
        seed=cfg.seed,
        # A define-by-run space refuses Tune's set_search_properties: metric and mode go here.
        metric=cfg.metric,
        mode=cfg.mode,
    )
    scheduler = make_scheduler(
        cfg.scheduler,
        SpikeRule(
            max_loss_ratio=cfg.prune_loss_ratio,
            max_grad_ratio=cfg.prune_grad_ratio,
            max_nonfinite=cfg.prune_nonfinite,
            require_recovery=cfg.prune_unrecovered,
            window_steps=base.signals.window_steps,
        ),
        metric=cfg.metric,
        mode=cfg.mode,
        max_t=base.epochs,
        grace_period=min(cfg.grace_period, base.epochs),
        reduction_factor=cfg.reduction_factor,
    )
    recorder = StudyRecorder(
        cfg.study_url, cfg.name, cfg.metric, cfg.mode, space, scheduler, epochs=base.epochs
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=cfg.num_trials,
            max_concurrent_trials=cfg.max_concurrent,
            time_budget_s=cfg.time_budget_s,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="ray",
            storage_path=cfg.location,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[recorder, ProgressPrinter(cfg.metric, cfg.num_trials, scheduler)],
            verbose=0,
        ),
    )


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
        metric: str,
        mode: str,
        space: SearchSpace,
        scheduler: Any,
        *,
        epochs: int = 0,
        retry_s: float | None = None,
    ) -> None:
        self.url, self.name, self.metric, self.mode = url, name, metric, mode
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
        for trial in trials:
            if trial.trial_id in self._active:
                continue
            if trial.status == "ERROR":
                self._waiting.setdefault(
                    trial.trial_id, (trial, optuna.trial.TrialState.FAIL, error_reason(trial))
                )
            elif trial.status == "TERMINATED":
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
        history = checkpointed_history(trial)
        curve = {
            **_curve_of(history, self.metric),
            **(self.curves.get(trial.trial_id) or _curve_from(trial, self.metric)),
        }
        timeline = trialdir.timeline(history) if history else self.timelines.get(trial.trial_id, [])
        last = self.last.get(trial.trial_id) or dict(getattr(trial, "last_result", {}) or {})
        value = None
        if state != optuna.trial.TrialState.FAIL and curve:
            values = list(curve.values())
            value = max(values) if self.mode == "max" else min(values)
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
        started = getattr(meta, "start_time", None)
        ended = self._ended_at.get(trial.trial_id) or getattr(meta, "last_result_time", None)
        end = datetime.datetime.fromtimestamp(ended or time.time())
        return (datetime.datetime.fromtimestamp(started) if started else None), end


class ProgressPrinter(tune.Callback):
    """One line when a trial starts or ends, and a compact table of running trials each minute."""

    def __init__(self, metric: str, total: int, scheduler: Any, every_s: float = 60.0) -> None:
        self.metric, self.total, self.every_s = metric, total, every_s
        self.scheduler = scheduler
        self.ended = 0
        self.latest: dict[str, dict[str, Any]] = {}
        self.next_table = time.monotonic() + every_s

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        print(f"[search] start  {trial.trial_id}  {_describe(trial.config)}", flush=True)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
    ) -> None:
        self.latest[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        reason = getattr(self.scheduler, "reasons", {}).get(trial.trial_id)
        self._ended(trial, "pruned" if reason else "done", f": {reason}" if reason else "")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, "FAILED", f": {error_reason(trial)}")

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if time.monotonic() < self.next_table:
            return
        self.next_table = time.monotonic() + self.every_s
        running = [t for t in trials if t.status == "RUNNING"]
        print(
            f"[search] {self.ended}/{self.total} trials ended, {len(running)} running", flush=True
        )
        for t in running:
            r = self.latest.get(t.trial_id, {})
            print(
                f"           {t.trial_id}  epoch {int(r.get('epoch', -1)) + 1:>3}  "
                f"{self.metric} {r.get(self.metric, float('nan')):.3f}  trainable "
                f"{100 * r.get('backbone_trainable_ratio', 0):.0f}%  spike "
                f"x{r.get('spike_worst_loss_ratio', 1):.2f}",
                flush=True,
            )

    def _ended(self, trial: Any, how: str, why: str) -> None:
        self.ended += 1
        r = self.latest.get(trial.trial_id, {})
        epochs = int(r.get("epoch", -1)) + 1
        print(
            f"[search] {how:6s} {trial.trial_id}  {self.metric} "
            f"{r.get(self.metric, float('nan')):.3f} after {epochs} epochs  "
            f"({self.ended}/{self.total}){why}",
            flush=True,
        )


def _describe(config: Mapping[str, Any]) -> str:
    def short(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in sorted(config.items()))


def _database_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, optuna.exceptions.StorageInternalError)


DATABASE_ERRORS = _database_errors()


def checkpointed_history(trial: Any) -> list[dict[str, Any]]:
    """The per-epoch metrics in the trial's latest Ray checkpoint, oldest first ([] if none).

    Read through the checkpoint's own filesystem, so object storage works as a local folder does;
    an unreadable file is an empty history, never an error in Tune's event loop.
    """
    checkpoint = getattr(trial, "checkpoint", None)
    if checkpoint is None:
        return []
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{trialdir.METRICS}") as f:
            text = f.read().decode()
    except Exception:
        return []
    return sorted(trialdir.rows(text), key=lambda r: r["epoch"])


def _curve_of(history: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """Iteration -> metric for checkpointed epochs (Ray's iteration is the epoch count)."""
    return {
        int(row["epoch"]) + 1: float(row[metric])
        for row in history
        if isinstance(row.get(metric), int | float) and math.isfinite(row[metric])
    }


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


def _preflight(base: TrialConfig, log: Log) -> None:
    from unfreeze_hpo.preflight import preflight

    log("preflight: overfitting 16 training samples before any trial ...")
    result = preflight(
        base.replace(model=dataclasses.replace(base.model, pretrain_on_source=False)),
        log=lambda _: None,
    )
    log(result.report())
    if not result.passed:
        raise PreflightFailed(result.report())


class PreflightFailed(UnfreezeHPOError):
    """The overfit check failed: the search does not start."""


def _start_ray(cfg: SearchConfig) -> None:
    # Ray's own progress output and snapshot warnings would drown the search's lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


def _alive_nodes() -> list[dict[str, float]]:
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_resources(cfg: SearchConfig, nodes: list[dict[str, float]]) -> str:
    """How many trials the cluster's ``nodes`` (Ray resource dicts) fit at once, as a line to
    print; a ConfigError when no node fits one, since such trials would wait forever."""
    need = {"CPU": cfg.cpus_per_trial, "GPU": cfg.gpus_per_trial}
    fits = [
        math.floor(min(node.get(k, 0.0) / v for k, v in need.items() if v > 0) + 1e-9)
        for node in nodes
    ]
    total = {k: sum(node.get(k, 0.0) for node in nodes) for k in need}
    have = f"{len(nodes)} node(s) with {total['CPU']:g} CPUs and {total['GPU']:g} GPUs in all"
    if not any(fits):
        per_node = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
        most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        field = "gpus_per_trial" if cfg.gpus_per_trial > most_gpus else "cpus_per_trial"
        value = getattr(cfg, field)
        why = (
            f"no node of the cluster fits one trial ({cfg.cpus_per_trial:g} CPU, "
            f"{cfg.gpus_per_trial:g} GPU): {have} ({per_node})"
        )
        fix = (
            "lower --cpus-per-trial / --gpus-per-trial, connect to a cluster with such nodes "
            "(--address), or pass --no-resource-check if an autoscaler adds them on demand"
        )
        raise ConfigError(Problem(field, value, why, fix))
    at_once = sum(fits)
    line = f"cluster: {have}; {at_once} trial(s) fit at once"
    if at_once < cfg.max_concurrent:
        line += f" (fewer than --max-concurrent {cfg.max_concurrent})"
    return line


def _absolute_paths(base: TrialConfig) -> TrialConfig:
    """Trials run in other working directories: make the paths in the base config absolute."""
    data = base.data
    if data.root:
        data = dataclasses.replace(data, root=str(Path(data.root).resolve()))
    model = base.model
    if model.checkpoint:
        model = dataclasses.replace(model, checkpoint=str(Path(model.checkpoint).resolve()))
    return base.replace(data=data, model=model)
