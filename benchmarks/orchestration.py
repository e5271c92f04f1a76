"""Orchestration overhead: what does unfreeze-hpo's search driver cost over a bare Ray Tune script
and over plain Optuna, when the trials themselves do (almost) nothing? N trials that each sleep
s seconds per epoch for M epochs run through three arms, with the same concurrency:

- unfreeze-hpo: ``unfreeze_hpo.search.driver.run_search`` itself (OptunaSearch over a
  define-by-run space, the spike-aware scheduler around ASHA, the StudyRecorder writing the SQLite
  study, the ProgressPrinter, a Ray checkpoint every epoch), with the real trainable
  ``run_trial``; only its ``train.run`` is swapped, inside each Ray worker, for a sleep that
  writes a tiny checkpoint;
- Ray Tune: a plain ``tune.Tuner`` whose function trainable sleeps and ``tune.report``s, the same
  OptunaSearch sampler over the same space, ASHA with the same grace period and reduction
  factor, reuse_actors, no callbacks, no checkpoints;
- Optuna: ``study.optimize(objective, n_trials=N, n_jobs=concurrency)``, in memory, with a
  successive-halving pruner and the same sampler.

    .venv/bin/python benchmarks/orchestration.py           # 12 trials x 3 epochs x 0.5 s, ~3.5 min
    .venv/bin/python benchmarks/orchestration.py --quick   # 2 trials x 1 epoch, ~30 s

The figure is wall / ideal, ideal = epochs run x s / concurrency (1.0: no overhead at all), as
median and spread over rounds, and unfreeze-hpo's over the bare Ray Tune arm's. One Ray serves
both Ray arms: ``ray.init`` is outside their walls and reported on its own. unfreeze-hpo's wall is
run_search from call to return (its checks, search.yaml and the study read at the end included);
its seconds in its driver-side callbacks are reported too. Each Ray experiment starts fresh
worker processes, and both Ray trainables import the model's library there (torch, torchvision,
pytorchvideo: seconds each) as any real trial must; everything else unfreeze-hpo's trainable does
is counted. ASHA's grace period is M, so no trial is stopped before its last epoch; epochs are
still counted per arm, and the ideal uses them. Arms interleave (a b c a b c ..., after a warm-up
round), each run in a fresh folder under a temporary directory.

Exits 0 whenever it ran; the verdict line says whether unfreeze-hpo's wall/ideal is at most the
bare Ray Tune arm's (the target).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from common import Stat, interleave, machine, parser, ratio, report, table
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from unfreeze_hpo.search import driver as search_module
from unfreeze_hpo.search.options import SearchConfig
from unfreeze_hpo.search.progress import ProgressPrinter
from unfreeze_hpo.search.recorder import StudyRecorder
from unfreeze_hpo.search.rules import AshaSettings

CONCURRENCY = 2  # trials at once; Ray gets this many CPUs, one per trial
REDUCTION_FACTOR = 2.0
METRIC, MODE = "best_val_acc", "max"
# The base config's model. A real trial imports its library (torch, torchvision, pytorchvideo) to
# build it; unfreeze-hpo's trial imports it already when it checks the name (config.from_dict),
# so the bare trainable imports it too: the workers' imports are the trial's work, not overhead.
MODEL, MODEL_LIBRARY = "pytorchvideo:resnet3d_tiny", "pytorchvideo.models"
ARMS = ("unfreeze-hpo", "ray-tune", "optuna")

# The space, in unfreeze-hpo's YAML (arm a) and as the same distributions for Ray and Optuna.
SPACE = {
    "strategy": "early_gradual",
    "strategies": {
        "early_gradual": {
            "freeze_epochs": {"type": "int", "low": 0, "high": 3},
            "blocks_per_epoch": {"type": "int", "low": 1, "high": 3},
            "target_ratio": {"type": "float", "low": 0.2, "high": 1.0},
        }
    },
    "common": {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
}


def score(lr: float, freeze_epochs: int, blocks: int, ratio_: float, epoch: int) -> float:
    """A made-up accuracy after ``epoch`` (0-based): best near lr 1e-2, 1 frozen epoch, 2 blocks
    per epoch and ratio 0.7; rising with epochs. Always finite, in (0, 1)."""
    miss = (math.log10(lr) + 2) ** 2 + 0.1 * (freeze_epochs - 1) ** 2 + 0.1 * (blocks - 2) ** 2
    miss += (ratio_ - 0.7) ** 2
    return (1 - 0.5 / (epoch + 2)) / (1 + miss)


def sampler(n_trials: int, seed: int = 0) -> optuna.samplers.TPESampler:
    """unfreeze-hpo's sampler settings (search.driver._new_tuner), given to every arm."""
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, constant_liar=True, n_startup_trials=min(8, n_trials)
    )


# ---------------------------------------------------------------------------------------------
# Worker side. Ray ships these by value (they live in __main__, or the module is registered by
# value): what they use must be importable in a worker (no `common`), or shipped with them.


def _sleeping_train_run(
    cfg: Any,
    report: Callable[..., None] | None = None,
    *,
    resume: bool = False,
    log: Any = print,
    trial_id: str = "local",
    weights: Any = None,
    cpus: float | None = None,
    checkpoint_every: int = 1,
    seconds: float,
) -> None:
    """Stands in for ``unfreeze_hpo.train.run``: per epoch, sleep, then write a tiny checkpoint
    and the metrics line where the trainable expects them, and report a result shaped like a real
    epoch's (the keys the driver's scheduler and callbacks read)."""
    import json

    from unfreeze_hpo import trialdir
    from unfreeze_hpo.signals import NEUTRAL_METRICS

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = out / "metrics.jsonl"
    start = len(lines.read_text().splitlines()) if resume and lines.exists() else 0
    s = cfg.strategy
    best = -math.inf
    for epoch in range(start, cfg.epochs):
        time.sleep(seconds)
        acc = score(cfg.optimizer.lr, s.freeze_epochs, s.blocks_per_epoch, s.target_ratio, epoch)
        best = max(best, acc)
        metrics = {
            "epoch": float(epoch),
            "step": float(16 * (epoch + 1)),
            "train_loss": 1 - acc,
            "val_loss": 1 - acc,
            "val_acc": acc,
            "best_val_acc": best,
            "grad_norm": 1.0,
            "unfrozen_blocks": float(
                min(max(0, epoch - s.freeze_epochs + 1) * s.blocks_per_epoch, 5)
            ),
            "backbone_trainable_ratio": s.target_ratio,
            "spike_window_steps": 20.0,
            **NEUTRAL_METRICS,
        }
        (out / trialdir.CHECKPOINT).write_bytes(b"\0" * 1024)
        with lines.open("a") as f:
            f.write(json.dumps({"metrics": metrics}) + "\n")
        if report is not None:
            report(metrics, out / trialdir.CHECKPOINT)


def ours_trainable(seconds: float) -> Callable[..., None]:
    """unfreeze-hpo's ``run_trial`` with ``train.run`` swapped for the sleep, in the worker."""

    def run_trial(config: dict[str, Any], **kwargs: Any) -> None:
        from unfreeze_hpo import train
        from unfreeze_hpo.search import trainable

        train.run = functools.partial(_sleeping_train_run, seconds=seconds)
        trainable.run_trial(config, **kwargs)

    return run_trial


def bare_trainable(seconds: float, epochs: int) -> Callable[[dict[str, Any]], None]:
    """The bare Ray Tune function trainable: sleep and report, nothing else but the import of
    the model's library, which any real trial of MODEL pays in its worker."""

    def trainable(config: dict[str, Any]) -> None:
        importlib.import_module(MODEL_LIBRARY)
        best = -math.inf
        for epoch in range(epochs):
            time.sleep(seconds)
            acc = score(
                config["optimizer.lr"],
                config["early_gradual.freeze_epochs"],
                config["early_gradual.blocks_per_epoch"],
                config["early_gradual.target_ratio"],
                epoch,
            )
            best = max(best, acc)
            tune.report({"val_acc": acc, METRIC: best})

    return trainable


# ---------------------------------------------------------------------------------------------
# The arms


@dataclass
class Run:
    wall: float  # seconds from the arm's start to all its trials ended
    epochs: int  # epochs its trials ran, counted from what they reported
    setup: float = math.nan  # unfreeze-hpo: run_search's seconds before it built the Tuner
    callbacks: float = math.nan  # unfreeze-hpo: seconds in its driver-side Tune callbacks


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def timed(owner: type, name: str, total: list[float]) -> contextlib.AbstractContextManager[None]:
    """``owner.name`` adding its seconds to total[0] while the context lasts."""
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started

    return patched(owner, name, wrapper)


def run_ours(folder: Path, n: int, epochs: int, seconds: float) -> Run:
    """run_search with the sleeping trainable, its ProgressPrinter's lines kept off the screen."""
    base, space = folder / "base.yaml", folder / "space.yaml"
    values = {"model": {"name": MODEL, "pretrain_on_source": False}, "epochs": epochs}
    base.write_text(yaml.safe_dump(values), encoding="utf-8")
    space.write_text(yaml.safe_dump(SPACE), encoding="utf-8")
    cfg = SearchConfig(
        name="ours",
        storage_path=str(folder / "runs"),
        base=str(base),
        space=str(space),
        num_trials=n,
        max_concurrent=CONCURRENCY,
        cpus_per_trial=1.0,
        metric=METRIC,
        mode=MODE,
        # Nothing stopped before its last epoch.
        asha=AshaSettings(grace_period=epochs, reduction_factor=REDUCTION_FACTOR),
        recipes=False,  # the other arms have no recipes either
        preflight=False,
    )
    tuner_at: list[float] = []
    real_new_tuner = search_module._new_tuner

    def new_tuner(*args: Any, **kwargs: Any) -> Any:
        tuner_at.append(time.perf_counter())
        return real_new_tuner(*args, **kwargs)

    callbacks = [0.0]
    hooks = ("setup", "on_trial_start", "on_trial_result", "on_trial_complete", "on_step_end")
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(search_module, "run_trial", ours_trainable(seconds)))
        stack.enter_context(patched(search_module, "_new_tuner", new_tuner))
        for owner in (StudyRecorder, ProgressPrinter):
            for hook in hooks:
                if hook in vars(owner):
                    stack.enter_context(timed(owner, hook, callbacks))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        started = time.perf_counter()
        result = search_module.run_search(cfg, log=lambda _: None)
        wall = time.perf_counter() - started
    study = optuna.load_study(study_name=result.study_name, storage=result.study_url)
    trials = study.get_trials(deepcopy=False)
    if len(trials) != n or result.counts["fail"]:
        raise RuntimeError(f"unfreeze-hpo arm: {result.counts} for {n} trials")
    epochs_run = sum(len(t.intermediate_values) for t in trials)
    return Run(wall, epochs_run, tuner_at[0] - started, callbacks[0])


def run_bare(folder: Path, n: int, epochs: int, seconds: float) -> Run:
    space = {
        "strategy": "early_gradual",
        "early_gradual.freeze_epochs": tune.randint(0, 4),
        "early_gradual.blocks_per_epoch": tune.randint(1, 4),
        "early_gradual.target_ratio": tune.uniform(0.2, 1.0),
        "optimizer.lr": tune.loguniform(1e-3, 1e-1),
    }
    started = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(bare_trainable(seconds, epochs), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=OptunaSearch(sampler=sampler(n), seed=0),
            scheduler=ASHAScheduler(
                max_t=epochs, grace_period=epochs, reduction_factor=REDUCTION_FACTOR
            ),
            num_samples=n,
            max_concurrent_trials=CONCURRENCY,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name="bare", storage_path=str(folder / "runs"), verbose=0),
    )
    results = tuner.fit()
    wall = time.perf_counter() - started
    if len(results) != n or results.errors:
        raise RuntimeError(f"ray-tune arm: {len(results)} results, errors {results.errors}")
    return Run(wall, sum(int(r.metrics["training_iteration"]) for r in results))


def run_optuna(n: int, epochs: int, seconds: float) -> Run:
    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("optimizer.lr", 1e-3, 1e-1, log=True)
        freeze = trial.suggest_int("early_gradual.freeze_epochs", 0, 3)
        blocks = trial.suggest_int("early_gradual.blocks_per_epoch", 1, 3)
        ratio_ = trial.suggest_float("early_gradual.target_ratio", 0.2, 1.0)
        best = -math.inf
        for epoch in range(epochs):
            time.sleep(seconds)
            best = max(best, score(lr, freeze, blocks, ratio_, epoch))
            trial.report(best, epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    started = time.perf_counter()
    study = optuna.create_study(
        direction="maximize",
        sampler=sampler(n),
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=epochs, reduction_factor=int(REDUCTION_FACTOR)
        ),
    )
    study.optimize(objective, n_trials=n, n_jobs=CONCURRENCY)
    wall = time.perf_counter() - started
    trials = study.get_trials(deepcopy=False)
    return Run(wall, sum(len(t.intermediate_values) for t in trials))


# ---------------------------------------------------------------------------------------------


def start_ray() -> float:
    """One local Ray for both Ray arms, set up as unfreeze-hpo's _start_ray does; its seconds."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if __name__ != "__main__":  # imported: the worker-side functions must travel by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = time.perf_counter()
    ray.init(
        num_cpus=CONCURRENCY, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    return time.perf_counter() - started


def measure(
    n: int, epochs: int, seconds: float, repeats: int, warmup: int, root: Path
) -> tuple[dict[str, list[float]], dict[str, list[Run]]]:
    """wall / ideal of each arm, rounds interleaved, and each kept round's Run."""
    runs: dict[str, list[Run]] = {a: [] for a in ARMS}
    folders = iter(range(10**6))

    def arm(name: str, run: Callable[[Path], Run]) -> Callable[[], float]:
        def call() -> float:
            folder = root / f"{name}-{next(folders)}"  # fresh for every run
            folder.mkdir()
            got = run(folder)
            shutil.rmtree(folder, ignore_errors=True)
            runs[name].append(got)
            print(f"  {name:13s} {got.wall:6.2f} s, {got.epochs} epochs", flush=True)
            return got.wall / (got.epochs * seconds / CONCURRENCY)

        return call

    arms: Mapping[str, Callable[[], float]] = {
        "unfreeze-hpo": arm("unfreeze-hpo", lambda f: run_ours(f, n, epochs, seconds)),
        "ray-tune": arm("ray-tune", lambda f: run_bare(f, n, epochs, seconds)),
        "optuna": arm("optuna", lambda f: run_optuna(n, epochs, seconds)),
    }
    over_ideal = interleave(arms, repeats, warmup)
    return over_ideal, {a: runs[a][warmup:] for a in ARMS}


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12, help="N trials per arm")
    p.add_argument("--epochs", type=int, default=3, help="M epochs (reports) per trial")
    p.add_argument("--sleep", type=float, default=0.5, help="s seconds slept per epoch")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds kept")
    args = p.parse_args()
    warmup = 1
    if args.quick:
        args.trials, args.epochs, args.sleep, args.repeats, warmup = 2, 1, 0.05, 1, 0
    n, m, s = args.trials, args.epochs, args.sleep
    # pytorchvideo's import, in the driver when run_search checks the base config's model name
    warnings.filterwarnings(
        "ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning
    )
    print(machine())
    print(
        f"{n} trials x {m} epochs x {s:g} s, {CONCURRENCY} at once: ideal "
        f"{n * m * s / CONCURRENCY:.2f} s; {args.repeats} round(s) after {warmup} warm-up",
        flush=True,
    )
    started = time.perf_counter()
    init_s = start_ray()
    print(f"ray.init {init_s:.2f} s (outside every arm's wall)", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="orchestration-") as tmp:
            over, runs = measure(n, m, s, args.repeats, warmup, Path(tmp))
    finally:
        ray.shutdown()
    stats = {a: Stat.of(over[a]) for a in ARMS}
    walls = {a: Stat.of([r.wall for r in runs[a]]) for a in ARMS}
    epochs_run = {a: [r.epochs for r in runs[a]] for a in ARMS}
    ours_vs_bare = ratio(over["unfreeze-hpo"], over["ray-tune"])
    bare_vs_optuna = ratio(over["ray-tune"], over["optuna"])
    setup = Stat.of([r.setup for r in runs["unfreeze-hpo"]])
    callbacks = Stat.of([r.callbacks for r in runs["unfreeze-hpo"]])
    rows = [
        [
            a,
            f"{walls[a].median:.2f} s",
            f"{stats[a].median:.2f}",
            f"{stats[a].spread:.2f}",
            "/".join(str(e) for e in epochs_run[a]),
        ]
        for a in ARMS
    ]
    print()
    print(table(rows, ["arm", "wall (median)", "wall / ideal", "spread", "epochs run"]))
    print(f"\nunfreeze-hpo / Ray Tune (wall/ideal): {ours_vs_bare}")
    print(f"Ray Tune / Optuna (wall/ideal): {bare_vs_optuna}")
    print(
        f"unfreeze-hpo: run_search before the Tuner {setup.median:.2f} s; in its driver "
        f"callbacks (StudyRecorder, ProgressPrinter) {callbacks.median:.2f} s a run, "
        f"{1000 * callbacks.median / n:.0f} ms a trial (medians)"
    )
    print(f"total {time.perf_counter() - started:.0f} s")
    ok = ours_vs_bare.median <= 1.0
    print(
        "verdict:",
        "unfreeze-hpo's driver costs no more than bare Ray Tune (target met)"
        if ok
        else f"unfreeze-hpo is {ours_vs_bare.median:.2f}x bare Ray Tune's wall/ideal (target <= 1)",
    )
    figures: dict[str, Any] = {
        "quick": args.quick,
        "trials": n,
        "epochs": m,
        "sleep_s": s,
        "concurrency": CONCURRENCY,
        "ray_init_s": init_s,
        **{f"{a} wall/ideal": stats[a] for a in ARMS},
        **{f"{a} wall_s": walls[a] for a in ARMS},
        **{f"{a} epochs_run": epochs_run[a] for a in ARMS},
        "unfreeze-hpo / ray-tune": ours_vs_bare,
        "ray-tune / optuna": bare_vs_optuna,
        "unfreeze-hpo setup_s": setup,
        "unfreeze-hpo callbacks_s": callbacks,
        "target_met": ok,
    }
    report(args.json, "orchestration", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
