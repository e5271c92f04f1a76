"""A search: Ray Tune runs the trials, OptunaSearch samples them, a spike-aware scheduler prunes.

The searcher keeps its state in Ray's experiment snapshot, so ``Tuner.restore`` resumes it; the
durable Optuna study (SQLite by default) is written by a driver-side callback when a trial ends,
once per Ray trial id, so it never holds a RUNNING trial and a restore never writes twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import FIFOScheduler

import unfreeze_hpo
from unfreeze_hpo import storage
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem, UnfreezeHPOError
from unfreeze_hpo.search import recipes, seeds, tasks, trackers
from unfreeze_hpo.search.inputs import check_inputs, check_storage, load_inputs, write_inputs
from unfreeze_hpo.search.options import SearchConfig
from unfreeze_hpo.search.progress import ProgressPrinter
from unfreeze_hpo.search.pruning import make_scheduler
from unfreeze_hpo.search.ray_train import DRIVER_RESOURCES, Workers, run_trial_on_workers
from unfreeze_hpo.search.recorder import StudyRecorder
from unfreeze_hpo.search.searcher import Points, Searcher
from unfreeze_hpo.search.space import SearchSpace
from unfreeze_hpo.search.trainable import run_trial
from unfreeze_hpo.train import Log


@dataclass
class SearchOutcome:
    folder: str  # an absolute local path or a URI
    study_url: str
    study_name: str
    best: optuna.trial.FrozenTrial | None
    counts: dict[str, int]
    interrupted: bool = False  # stopped (Ctrl-C) before every trial ended: run it again


def run_search(cfg: SearchConfig, log: Log = print) -> SearchOutcome:
    """Run (or resume) the search ``cfg`` describes and return where its results are."""
    base, space = load_inputs(cfg)
    problems = check_storage(cfg) or check_inputs(cfg, base, space)
    if problems := problems + trackers.problems(cfg.trackers):
        raise ConfigError(problems)
    # Storage, database and cluster are all checked before anything is written.
    if why := storage.unreachable(cfg.location):
        fix = "check the bucket exists and this machine's credentials can write to it"
        raise ConfigError(Problem("storage_path", cfg.storage_path, f"cannot use it: {why}", fix))
    if cfg.study_storage and (problem := storage.connect_problem(cfg.study_storage)):
        raise ConfigError(problem)
    _start_ray(cfg)
    # Which code the trials run: on a cluster, the copy a submitted job ships (see jobs.submit).
    package = Path(unfreeze_hpo.__file__).parent
    log(f"unfreeze-hpo {unfreeze_hpo.__version__} from {package}, Ray {ray.__version__}")
    nodes = _alive_nodes()
    if cfg.resource_check:  # trials no node can hold would wait forever
        log(check_resources(cfg, list(nodes.values())))
    if base.model.pretrained:  # once per node now, rather than every trial downloading
        _fetch_weights(cfg, base, nodes, log)
    if cfg.preflight:
        _preflight(cfg, base, log)
    try:  # what results need to rebuild a trial's full config; also proves we can write there
        write_inputs(cfg, base, space)
    except OSError as exc:  # pyarrow's errors for a missing bucket or no permission are OSErrors
        why = f"cannot write {cfg.location} ({type(exc).__name__}: {exc})"
        fix = "check the path or bucket exists and this machine's credentials can write to it"
        raise ConfigError(Problem("storage_path", cfg.storage_path, why, fix)) from exc
    if base.model.pretrain_on_source:  # once here, rather than every trial waiting on the lock
        from unfreeze_hpo.embedded import source_checkpoint

        source_checkpoint(base, log)
    trainable = _trainable(cfg, base, space)
    path = storage.join(cfg.location, "ray")
    resumed = tune.Tuner.can_restore(path)
    if resumed:  # with the callbacks (and trackers) it started with
        log(f"resuming the search in {cfg.location}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        for line in recipes.log_lines(space) if cfg.recipes else ():
            log(line)
        tuner = _new_tuner(cfg, base, space, trainable)
        if cfg.trackers:
            log(f"trackers: {', '.join(cfg.trackers)}, under {_tracker_folder(cfg)}")
    started = time.perf_counter()
    with _only_our_loggers(not resumed):
        tuner.fit()
    elapsed = time.perf_counter() - started
    result = outcome(cfg)
    ended = sum(result.counts.values())
    out_of_time = cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s
    if ended < cfg.num_trials and not out_of_time:
        log(f"search interrupted after {elapsed:.0f}s: {ended} of {cfg.num_trials} trials ended")
        return dataclasses.replace(result, interrupted=True)
    log(f"search finished in {elapsed:.0f}s")
    if cfg.reseed_top:
        return _reseed(cfg, base, space, trainable, result, log)
    return result


def _trainable(cfg: SearchConfig, base: TrialConfig, space: SearchSpace) -> Any:
    cpus, gpus = cfg.worker_resources
    shared = {
        "base": base.to_dict(),
        "space": space,
        "objective": cfg.goal,
        "checkpoint_every": cfg.checkpoint_every,
        "weights_cache": cfg.weights_cache,
    }
    if cfg.workers_per_trial > 1:  # a Ray Train run per trial, which reserves its workers
        run = tune.with_parameters(
            run_trial_on_workers,
            **shared,
            workers=Workers(cfg.workers_per_trial, cpus, gpus),
            search=cfg.location,
            checkpoints_kept=cfg.checkpoints_kept,
        )
        return tune.with_resources(run, DRIVER_RESOURCES)
    run = tune.with_parameters(run_trial, **shared, threads=max(1, int(cpus)))
    return tune.with_resources(run, {"cpu": cpus, "gpu": gpus})


def _reseed(
    cfg: SearchConfig,
    base: TrialConfig,
    space: SearchSpace,
    trainable: Any,
    result: SearchOutcome,
    log: Log,
) -> SearchOutcome:
    """Re-run the best configs with more training seeds (see ``seeds``); the outcome's best is
    then the config with the best mean over its seeds."""
    study = optuna.load_study(study_name=cfg.name, storage=cfg.study_url)
    originals = study.get_trials(deepcopy=False)
    path = storage.join(cfg.location, seeds.EXPERIMENT)
    restored = tune.Tuner.can_restore(path)
    if restored:
        log("reseed: resuming the re-runs")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        points = seeds.points(originals, cfg.mode, cfg.reseed_top, cfg.reseed_seeds, base.seed)
        if not points:
            log("reseed: no completed trial to re-run")
            return result
        configs = len(points) // cfg.reseed_seeds
        log(
            f"reseed: re-running the {configs} best config(s) with {cfg.reseed_seeds} more "
            f"training seed(s) each ({len(points)} trials, no pruning)"
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=cfg.goal.key,
                mode=cfg.mode,
                search_alg=Points(points, cfg.goal.key, cfg.mode),
                num_samples=len(points),
                max_concurrent_trials=cfg.max_concurrent,
                reuse_actors=cfg.workers_per_trial == 1,
            ),
            run_config=tune.RunConfig(
                name=seeds.EXPERIMENT,
                storage_path=cfg.location,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoints_kept),
                callbacks=[
                    CSVLoggerCallback(),
                    JsonLoggerCallback(),
                    StudyRecorder(
                        cfg.study_url,
                        seeds.study_name(cfg.name),
                        cfg.goal,
                        space,
                        FIFOScheduler(),
                        epochs=base.epochs,
                        search=cfg.location,
                    ),
                    ProgressPrinter(cfg.goal.key, len(points), None),
                ],
                verbose=0,
            ),
        )
    with _only_our_loggers(not restored):
        tuner.fit()
    summaries = seeds.seed_summary(originals, seeds.load_reruns(cfg.study_url, cfg.name), cfg.goal)
    for summary in summaries:
        log("reseed: " + seeds.line(summary, cfg.goal.key))
    if not summaries:
        return result
    winner = next(t for t in originals if t.number == summaries[0].number)
    log(f"reseed: the winner is trial {winner.number}, the best mean over its seeds")
    return dataclasses.replace(result, best=winner)


def outcome(cfg: SearchConfig) -> SearchOutcome:
    study = optuna.load_study(study_name=cfg.name, storage=cfg.study_url)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    best = study.best_trial if counts["complete"] else None  # optuna knows the direction
    return SearchOutcome(cfg.location, cfg.study_url, cfg.name, best, counts)


def _new_tuner(
    cfg: SearchConfig, base: TrialConfig, space: SearchSpace, trainable: Any
) -> tune.Tuner:
    scheduler = make_scheduler(
        cfg.scheduler,
        dataclasses.replace(cfg.pruning, window_steps=base.signals.window_steps),
        metric=cfg.goal.key,
        mode=cfg.mode,
        max_t=base.epochs,
        grace_period=min(cfg.asha.grace_period, base.epochs),
        reduction_factor=cfg.asha.reduction_factor,
        phase_grace=cfg.asha.phase_grace,
    )
    sampler = optuna.samplers.TPESampler(
        seed=cfg.seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=min(8, cfg.num_trials),
    )
    points = [point for _, point in recipes.tried(space)] if cfg.recipes else None
    searcher = Searcher(
        space=space.define_by_run,
        sampler=sampler,
        points_to_evaluate=points or None,
        seed=cfg.seed,
        # A define-by-run space refuses Tune's set_search_properties: metric and mode go here.
        metric=cfg.goal.key,
        mode=cfg.mode,
        rule=scheduler.rule,
        epochs=base.epochs,
    )
    recorder = StudyRecorder(
        cfg.study_url, cfg.name, cfg.goal, space, scheduler, epochs=base.epochs, search=cfg.location
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=cfg.goal.key,
            mode=cfg.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=cfg.num_trials,
            max_concurrent_trials=cfg.max_concurrent,
            time_budget_s=cfg.time_budget_s,
            # A multi-worker trial's Tune actor goes with the trial, and its run's workers too.
            reuse_actors=cfg.workers_per_trial == 1,
        ),
        run_config=tune.RunConfig(
            name="ray",
            storage_path=cfg.location,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.checkpoints_kept),
            callbacks=[
                # Ray's per-trial result files (the results read them); TensorBoard on request.
                CSVLoggerCallback(),
                JsonLoggerCallback(),
                recorder,
                ProgressPrinter(cfg.goal.key, cfg.num_trials, scheduler),
                *trackers.callbacks(cfg.trackers, experiment=cfg.name, folder=_tracker_folder(cfg)),
            ],
            verbose=0,
        ),
    )


def _fetch_weights(
    cfg: SearchConfig, base: TrialConfig, nodes: dict[str, dict[str, float]], log: Log
) -> None:
    """The hub weights of ``base`` into the weights cache of every node that holds a trial."""
    holders = [node for node, resources in nodes.items() if _fits(cfg, resources)]
    cache = cfg.weights_cache or "the default caches"
    if not holders:  # an autoscaler adds them later: their trials download for themselves
        log(f"weights: no node holds a trial yet; each new node downloads {base.model.name}'s")
        return
    log(f"weights: fetching {base.model.name}'s hub weights into {cache} on {len(holders)} node(s)")
    # The file does not depend on the classifier size: any will do.
    tasks.fetch_weights(base.model.spec(base.model.num_classes or 2), holders, cfg.weights_cache)


def _preflight(cfg: SearchConfig, base: TrialConfig, log: Log) -> None:
    log("preflight: overfitting 16 training samples before any trial ...")
    ran = tasks.preflight(
        base.replace(model=dataclasses.replace(base.model, pretrain_on_source=False)),
        *cfg.worker_resources,  # one worker's: the check runs in one process
        cfg.weights_cache,
    )
    log(f"preflight: ran in Ray worker pid {ran.pid} on node {ran.node_id[:12]}")
    log(ran.result.report())
    if not ran.result.passed:
        raise PreflightFailed(ran.result.report())


class PreflightFailed(UnfreezeHPOError):
    """The overfit check failed: the search does not start."""


def _tracker_folder(cfg: SearchConfig) -> Path:
    """Where the trackers write: the search folder, or for a URI a folder on this machine."""
    return storage.cache_dir() / "trackers" / cfg.name if cfg.remote else cfg.folder


@contextlib.contextmanager
def _only_our_loggers(on: bool) -> Iterator[None]:
    """Keep Ray from adding its default loggers (TensorBoard among them) to a new search, whose
    callbacks name the ones it writes. A resumed search runs with the callbacks it was saved
    with and Ray's defaults (one saved by an older version has no loggers of its own)."""
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    before = os.environ.get(key)
    if on:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if on:
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


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


def _alive_nodes() -> dict[str, dict[str, float]]:
    """Ray node id -> its resources, for the nodes alive now."""
    return {node["NodeID"]: dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")}


def _fits(cfg: SearchConfig, node: dict[str, float]) -> int:
    """How many workers of a trial (for one-worker trials: trials) the node holds at once."""
    cpus, gpus = cfg.worker_resources
    need = {"CPU": cpus, "GPU": gpus}
    return math.floor(min(node.get(k, 0.0) / v for k, v in need.items() if v > 0) + 1e-9)


def check_resources(cfg: SearchConfig, nodes: list[dict[str, float]]) -> str:
    """How many trials the cluster's ``nodes`` (Ray resource dicts) fit at once, as a line to
    print; a ConfigError when the cluster cannot hold one trial (with ``--workers-per-trial``
    N, N workers across its nodes), since such trials would wait forever."""
    cpus, gpus = cfg.worker_resources
    fits = [_fits(cfg, node) for node in nodes]
    total = {k: sum(node.get(k, 0.0) for node in nodes) for k in ("CPU", "GPU")}
    have = f"{len(nodes)} node(s) with {total['CPU']:g} CPUs and {total['GPU']:g} GPUs in all"
    per_node = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
    workers = cfg.workers_per_trial
    unit = "trial" if workers == 1 else "worker of a trial"
    if not any(fits):
        most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        kind = "gpus" if gpus > most_gpus else "cpus"
        given = getattr(cfg, f"{kind}_per_worker") is not None
        field = f"{kind}_per_worker" if given else f"{kind}_per_trial"
        why = (
            f"no node of the cluster fits one {unit} ({cpus:g} CPU, {gpus:g} GPU): {have} "
            f"({per_node})"
        )
        fix = (
            "lower --cpus-per-trial / --gpus-per-trial (--cpus-per-worker / --gpus-per-worker), "
            "connect to a cluster with such nodes (--address), or pass --no-resource-check if "
            "an autoscaler adds them on demand"
        )
        raise ConfigError(Problem(field, getattr(cfg, field), why, fix))
    if sum(fits) < workers:
        why = (
            f"the cluster holds {sum(fits)} workers of {cpus:g} CPU and {gpus:g} GPU at once, "
            f"fewer than one trial's {workers}: {have} ({per_node})"
        )
        fix = (
            f"use --workers-per-trial {sum(fits)} or fewer, give each worker less "
            "(--cpus-per-worker, --gpus-per-worker), or pass --no-resource-check if an "
            "autoscaler adds nodes on demand"
        )
        raise ConfigError(Problem("workers_per_trial", workers, why, fix))
    at_once = sum(fits) // workers
    line = f"cluster: {have}; {at_once} trial(s) fit at once"
    if workers > 1:
        line += f" ({workers} workers of {cpus:g} CPU and {gpus:g} GPU each)"
    if at_once < cfg.max_concurrent:
        line += f" (fewer than --max-concurrent {cfg.max_concurrent})"
    return line
