"""Search quality, the headline: does unfreeze-hpo's search find a better schedule, with fewer
epochs, than the baselines a user would pick and than plain Ray Tune or plain Optuna given the same
budget? On the embedded default (examples/embedded.yaml, ``search_spaces/all.yaml``):

- three search arms, each run over ``--search-seeds`` sampler seeds with ``--budget`` trials:
  unfreeze-hpo as it ships (recipes first, the Searcher that tells TPE what happened, ASHA with
  spike pruning and phase grace, the last-3-epochs objective); plain Ray Tune (Ray's
  ``OptunaSearch`` and ``ASHAScheduler`` with their defaults, no recipes); plain Optuna (a
  ``TPESampler`` and ``SuccessiveHalvingPruner`` with their defaults, trials one after another).
  All three train the same trials (``train.run``), score them by the same objective (the mean
  val accuracy of the last 3 epochs) and sample the same space;
- for each arm and seed, the epochs it trained (all trials, pruned ones included, in the order
  they ended) until its best completed trial reached 99% of the best quality any arm found;
- the winner of each search, and the baselines (full fine-tuning at the task's LR, the linear
  probe, the field notes' early_gradual 1/1/0.5, fastai's fine_tune, LP-FT; the recipes of
  ``unfreeze_hpo/search/recipes.py`` on the task's optimizer), re-run with ``--seeds`` training
  seeds on held-out data: training seed k and fresh draws of the task (``data.seed`` 1000 + k),
  so no sample a search selected on judges it. The figure is the mean val accuracy of the last 3
  epochs. Differences are paired by seed, with a 95% t-interval.

Targets: unfreeze-hpo's winner (search seed 0) at least the best baseline; against the field
notes' default a paired 95% interval that excludes 0; unfreeze-hpo's epochs to 99% quality at
most 0.6x plain Ray Tune's in every search seed where either arm reached it (an arm that never
reached it within its budget counts as needing more epochs than the other).

    .venv/bin/python benchmarks/search_quality.py          # 3 arms x 3 seeds x 32 trials, 5 seeds
    .venv/bin/python benchmarks/search_quality.py --quick  # 3 trials, 1 seed, 2 epochs, tiny
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from common import parser, report, table
from scipy import stats

from unfreeze_hpo import config as config_module
from unfreeze_hpo import embedded, results, strategies, train, trialdir
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.results import export
from unfreeze_hpo.search import recipes
from unfreeze_hpo.search.driver import run_search
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.options import SearchConfig
from unfreeze_hpo.search.space import load_space

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "examples" / "embedded.yaml"
SPACE = ROOT / "search_spaces" / "all.yaml"
HELD_OUT_DATA_SEED = 1000
OBJECTIVE = Objective()  # every arm's: the mean val accuracy of the last 3 epochs
OURS, RAY, OPTUNA = "unfreeze-hpo", "plain Ray Tune", "plain Optuna"
# The baselines: recipes on the task's own optimizer, and full fine-tuning at the task's LR.
BASELINES = {
    "full fine-tuning (task LR)": "full fine-tuning",
    "linear probe": "linear probe",
    "field notes' early_gradual 1/1/0.5": "early_gradual 1/1/0.5",
    "fastai fine_tune": "fastai fine_tune",
    "LP-FT": "LP-FT",
}
FIELD_NOTES = "field notes' early_gradual 1/1/0.5"


@dataclass(frozen=True)
class Ended:
    """A trial of a search: when it ended, the epochs it trained, its objective if complete."""

    end: float
    epochs: int
    value: float | None  # None: pruned or failed


@dataclass
class Searched:
    arm: str
    seed: int
    trials: list[Ended]
    winner: TrialConfig
    minutes: float


def task(epochs: int, quick: bool) -> dict[str, Any]:
    """The embedded default as a dict; --quick shrinks it (no source pretraining, 64 clips)."""
    values: dict[str, Any] = yaml.safe_load(EMBEDDED.read_text(encoding="utf-8"))
    values["epochs"] = epochs
    if quick:
        values["model"]["pretrain_on_source"] = False
        values["data"].update(train_samples=64, val_samples=64)
    return values


# -- the three search arms ---------------------------------------------------------------------


def ours(values: dict[str, Any], budget: int, seed: int, folder: Path) -> Searched:
    base = folder / "base.yaml"
    base.write_text(yaml.safe_dump(values), encoding="utf-8")
    cfg = SearchConfig(
        name=f"ours-{seed}",
        storage_path=str(folder / "runs"),
        base=str(base),
        space=str(SPACE),
        num_trials=budget,
        max_concurrent=2,
        cpus_per_trial=1,
        preflight=False,
        seed=seed,
    )
    started = time.perf_counter()
    outcome = run_search(cfg, log=lambda _: None)
    minutes = (time.perf_counter() - started) / 60
    study = optuna.load_study(study_name=cfg.name, storage=cfg.study_url)
    trials = [
        Ended(
            t.datetime_complete.timestamp() if t.datetime_complete else math.inf,
            max(t.intermediate_values, default=0),
            t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
        )
        for t in study.get_trials(deepcopy=False)
    ]
    if outcome.best is None:
        raise SystemExit(f"{OURS} seed {seed} completed no trial")
    winner = export.trial_config(results.open_search(cfg.location), outcome.best.number)
    return Searched(OURS, seed, trials, winner, minutes)


def plain_ray(values: dict[str, Any], budget: int, seed: int, folder: Path) -> Searched:
    """Ray's OptunaSearch and ASHAScheduler as their docs show them, on the same trainable."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from unfreeze_hpo.search.trainable import run_trial

    space = load_space(SPACE)
    base = config_module.from_dict(values)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=base.to_dict(), space=space, objective=OBJECTIVE, threads=1
        ),
        {"cpu": 1},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE.key,
            mode="max",
            search_alg=OptunaSearch(
                space=space.define_by_run, metric=OBJECTIVE.key, mode="max", seed=seed
            ),
            scheduler=ASHAScheduler(max_t=base.epochs),
            num_samples=budget,
            max_concurrent_trials=2,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=f"ray-{seed}", storage_path=str(folder), verbose=0),
    )
    started = time.perf_counter()
    grid = tuner.fit()
    minutes = (time.perf_counter() - started) / 60
    trials, best = [], None
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        epochs = len(frame)
        value = float(frame[OBJECTIVE.key].iloc[-1]) if epochs == base.epochs else None
        trials.append(Ended(float(frame["timestamp"].max()), epochs, value))
        if value is not None and (best is None or value > best[0]):
            best = (value, result.config)
    if best is None:
        raise SystemExit(f"{RAY} seed {seed} completed no trial")
    return Searched(RAY, seed, trials, space.trial_config(base, best[1]), minutes)


def plain_optuna(values: dict[str, Any], budget: int, seed: int, folder: Path) -> Searched:
    """Optuna's TPESampler and SuccessiveHalvingPruner with their defaults, trials in turn."""
    space = load_space(SPACE)
    base = config_module.from_dict(values)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(),
    )
    configs: dict[int, TrialConfig] = {}

    def objective(trial: optuna.Trial) -> float:
        fixed = space.define_by_run(trial)
        out = folder / f"optuna-{seed}-{trial.number}"
        cfg = space.trial_config(base, {**trial.params, **fixed}).replace(output_dir=str(out))
        configs[trial.number] = cfg
        history: list[float] = []

        def report_epoch(metrics: dict[str, float], _: Any) -> None:
            history.append(metrics["val_acc"])
            trial.report(OBJECTIVE.value(history), len(history))
            if trial.should_prune():
                raise optuna.TrialPruned()

        train.run(cfg, report_epoch, log=lambda _: None, weights=embedded.weights_for(cfg))
        return OBJECTIVE.value(history)

    torch.set_num_threads(2)
    started = time.perf_counter()
    study.optimize(objective, n_trials=budget)
    minutes = (time.perf_counter() - started) / 60
    trials = [
        Ended(
            t.datetime_complete.timestamp() if t.datetime_complete else math.inf,
            len(t.intermediate_values),
            t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
        )
        for t in study.get_trials(deepcopy=False)
    ]
    return Searched(OPTUNA, seed, trials, configs[study.best_trial.number], minutes)


def epochs_to(trials: Sequence[Ended], target: float) -> float:
    """The epochs a search trained, in the order its trials ended, until a completed trial
    reached ``target`` (inf if none did)."""
    spent = 0
    for t in sorted(trials, key=lambda t: t.end):
        spent += t.epochs
        if t.value is not None and t.value >= target:
            return float(spent)
    return math.inf


def seed_ratio(ours: float, plain: float) -> float:
    """Ours over plain epochs to the target; 0 when only ours reached it, inf when only plain
    did, NaN when neither did (the seed says nothing)."""
    if math.isinf(ours) and math.isinf(plain):
        return math.nan
    if math.isinf(plain):
        return 0.0
    return ours / plain


# -- held-out re-runs --------------------------------------------------------------------------


def baseline(base: TrialConfig, title: str) -> TrialConfig:
    """A recipe on the task's optimizer; "every block" is the model's block count."""
    (recipe,) = [r for r in recipes.RECIPES if r.title == title]
    n_blocks = base.model.n_blocks() or 1
    params = {k: n_blocks if v == recipes.ALL else v for k, v in recipe.params.items()}
    optimizer = dataclasses.replace(
        base.optimizer, **{k.removeprefix("optimizer."): v for k, v in recipe.optimizer.items()}
    )
    return base.replace(strategy=strategies.create(recipe.strategy, params), optimizer=optimizer)


def held_out_score(cfg: TrialConfig, seed: int) -> float:
    """The objective of ``cfg`` trained with seed ``seed`` on fresh draws of the task."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        data = dataclasses.replace(cfg.data, seed=HELD_OUT_DATA_SEED + seed)
        run = cfg.replace(data=data, seed=seed, output_dir=out)
        train.run(run, log=lambda _: None, weights=embedded.weights_for(run))
        return OBJECTIVE.value([r["val_acc"] for r in trialdir.read_rows(Path(out))])


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of a - b and its 95% t-interval (NaN bounds for fewer than 2 pairs)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=32, help="trials each search may run")
    p.add_argument("--search-seeds", type=int, default=3, help="sampler seeds of each arm")
    p.add_argument("--seeds", type=int, default=5, help="held-out training seeds of each winner")
    p.add_argument("--epochs", type=int, default=12)
    args = p.parse_args()
    if args.quick:
        args.budget, args.search_seeds, args.seeds, args.epochs = 3, 1, 1, 2
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    values = task(args.epochs, args.quick)
    base = config_module.from_dict(values)
    if base.model.pretrain_on_source:  # once, before any search: every arm's trials load it
        embedded.source_checkpoint(base, log=lambda line: print(f"  {line}", flush=True))
    arms: dict[str, Callable[[dict[str, Any], int, int, Path], Searched]] = {
        OURS: ours,
        RAY: plain_ray,
        OPTUNA: plain_optuna,
    }
    searches: list[Searched] = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.search_seeds):  # arms interleaved within each seed
            for arm, search in arms.items():
                done = search(values, args.budget, seed, Path(folder))
                best = max((t.value for t in done.trials if t.value is not None), default=0.0)
                epochs = sum(t.epochs for t in done.trials)
                print(
                    f"search {arm:15s} seed {seed}: best {best:.3f}, {epochs} epochs, "
                    f"{done.minutes:.1f} min; winner {done.winner.strategy}",
                    flush=True,
                )
                searches.append(done)
    best_any = max(t.value for s in searches for t in s.trials if t.value is not None)
    target = 0.99 * best_any
    to_quality = {
        arm: [epochs_to(s.trials, target) for s in searches if s.arm == arm] for arm in arms
    }

    # Held-out: each search's winner and each baseline, every seed, two runs at a time.
    candidates = {f"{s.arm} winner (search seed {s.seed})": s.winner for s in searches}
    candidates |= {label: baseline(base, title) for label, title in BASELINES.items()}
    jobs = [(label, seed) for seed in range(args.seeds) for label in candidates]
    runs, seeds = [candidates[label] for label, _ in jobs], [seed for _, seed in jobs]
    if args.quick:  # a few seconds of runs: not worth two fresh processes
        scores = list(map(held_out_score, runs, seeds))
    else:  # fresh processes (not forks of one that runs Ray), one torch thread each
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
            scores = list(pool.map(held_out_score, runs, seeds))
    held: dict[str, list[float]] = {label: [] for label in candidates}
    for (label, _), score in zip(jobs, scores, strict=True):
        held[label].append(score)
    minutes = (time.perf_counter() - started) / 60

    headline = f"{OURS} winner (search seed 0)"
    rows = []
    for label, got in held.items():
        if label == headline:
            versus = "-"
        else:
            diff, low, high = paired(held[headline], got)
            versus = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
        strategy = re.sub(
            r"\d+\.\d{4,}", lambda m: f"{float(m[0]):.3g}", str(candidates[label].strategy)
        )
        rows.append(
            [label, str(strategy), f"{statistics.fmean(got):.3f}", f"{spread(got):.3f}", versus]
        )
    print()
    print(
        table(
            rows,
            ["arm", "strategy", "held-out mean", "sd over seeds", f"{headline} - arm [95% CI]"],
        )
    )

    rows = []
    for arm in arms:
        winners = [statistics.fmean(v) for k, v in held.items() if k.startswith(f"{arm} winner")]
        finite = [e for e in to_quality[arm] if math.isfinite(e)]
        mean_epochs = (
            statistics.fmean(to_quality[arm]) if len(finite) == len(to_quality[arm]) else math.inf
        )
        rows.append(
            [
                arm,
                ", ".join(f"{e:.0f}" for e in to_quality[arm]),
                f"{mean_epochs:.1f}",
                f"{statistics.fmean(winners):.3f}",
                f"{statistics.fmean(s.minutes for s in searches if s.arm == arm):.1f}",
            ]
        )
    print()
    print(
        f"quality target: 99% of the best objective any search found ({best_any:.3f}): {target:.3f}"
    )
    print(
        table(
            rows,
            [
                "search",
                "epochs to target, per seed",
                "mean",
                "winners' held-out mean",
                "min per search",
            ],
        )
    )

    # Ours over plain Ray Tune's epochs to the target, per seed where either reached it: an arm
    # that never reached it within its budget needs more epochs than any (ratio 0 or inf).
    ratios = [seed_ratio(a, b) for a, b in zip(to_quality[OURS], to_quality[RAY], strict=True)]
    counted = [r for r in ratios if not math.isnan(r)]
    # The same for the quality each plain arm itself reached: ours' epochs to 99% of its best.
    matched: dict[str, list[tuple[float, float]]] = {}
    for plain in (RAY, OPTUNA):
        for ours_s, plain_s in zip(
            [s for s in searches if s.arm == OURS],
            [s for s in searches if s.arm == plain],
            strict=True,
        ):
            own = 0.99 * max((t.value for t in plain_s.trials if t.value is not None), default=0)
            pair = (epochs_to(ours_s.trials, own), epochs_to(plain_s.trials, own))
            matched.setdefault(plain, []).append(pair)
    print()
    for plain, pairs in matched.items():
        shown = ", ".join(f"{a:.0f} vs {b:.0f}" for a, b in pairs)
        each = ", ".join(f"{seed_ratio(a, b):.2f}" for a, b in pairs)
        print(f"epochs to 99% of {plain}'s own best, {OURS} vs {plain}: {shown} (ratios {each})")

    best_baseline = max(BASELINES, key=lambda label: statistics.fmean(held[label]))
    ours_mean = statistics.fmean(held[headline])
    _, low, high = paired(held[headline], held[FIELD_NOTES])
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    verdicts = {
        f"winner >= the best baseline ({best_baseline})": ours_mean
        >= statistics.fmean(held[best_baseline]),
        "winners' mean over the search seeds >= the best baseline": statistics.fmean(
            statistics.fmean(v) for k, v in held.items() if k.startswith(f"{OURS} winner")
        )
        >= statistics.fmean(held[best_baseline]),
        "paired 95% CI against the field notes' default excludes 0": low > 0 or high < 0,
        f"epochs to 99% quality <= 0.6x plain Ray Tune's in every seed either reached it "
        f"(per seed {shown})": bool(counted) and all(r <= 0.6 for r in counted),
    }
    print()
    for what, met in verdicts.items():
        print(f"{'MET' if met else 'NOT MET'}: {what}")
    print(
        f"\n{args.search_seeds} search seeds x 3 arms x {args.budget} trials, {args.seeds} "
        f"held-out seeds x {len(candidates)} arms, {args.epochs} epochs: {minutes:.1f} min"
    )
    report(
        args.json,
        "search_quality",
        {
            "held_out": held,
            "strategies": {label: str(cfg.strategy) for label, cfg in candidates.items()},
            "epochs_to_target": to_quality,
            "target": target,
            "ratio_to_plain_ray": ratios,
            "epochs_to_plain_best": matched,
            "trials": {
                f"{s.arm} seed {s.seed}": [[t.end, t.epochs, t.value] for t in s.trials]
                for s in searches
            },
            "verdicts": verdicts,
            "minutes": minutes,
            "budget": args.budget,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
