"""Record, once, the learning curves that benchmarks/pruning_replay.py replays: real trials of the
embedded default task (examples/embedded.yaml: pytorchvideo:resnet3d_tiny pretrained on the
synthetic source task, fine-tuned 12 epochs on the synthetic target task), with configs sampled
from the project's own space (search_spaces/all.yaml), each run with ``train.run`` directly (no
Ray) and every epoch's full metrics dict kept: what Tune's schedulers and the spike rule would
have read, val_acc, best_val_acc and val_loss included.

    .venv/bin/python benchmarks/record_curves.py    # 64 trials, 2 workers x 1 thread: ~20 min
    .venv/bin/python benchmarks/record_curves.py --quick   # 5 trials x 2 epochs, to a temp file

Choices (also written into the file's header, under "settings"):

- Cohorts, in this order in the file:
  - 40 trials of the space. Optuna's RandomSampler (seed 0) over ``SearchSpace.define_by_run``,
    so every config is a point of the space. A third of them (positions drawn with the same
    seed) are *aggressive*: their strategy and LR are enqueued from the space's hot corner
    (lr 0.03..0.1, backbone_lr_mult 0.5..1, no unfreeze warmup, fast unfreezing: early_gradual
    3 blocks/epoch after 0-1 frozen epochs, progressive from 1 or 3 blocks with one more every
    epoch, adaptive with patience 1 and 2 blocks a step, or full); the rest of their parameters
    are sampled. Cohorts "space" and "aggressive".
  - 8 *stress* trials past the space's bounds: the hot corner at lr 0.1..0.5 with gradient
    clipping off (``optimizer.grad_clip`` 0), fast-unfreezing strategies only. Inside all.yaml no
    trial diverged and only two spiked above x3, so these make sure the replay sees spikes.
  - 4 *diverge* trials: the same with SGD (momentum 0.9) at lr 5..50, a misconfigured LR; some
    go non-finite and fail as "diverged", as no AdamW trial of this task did.
  - 12 *late* unfreezers inside the space: progressive, its initial blocks held for 4..8
    epochs (``LATE_FREEZE_EPOCHS``), the rest sampled. Their first unfreeze event comes at or
    after the search's first ASHA rung (grace 4): the schedules a rung counted in plain epochs
    judges before they fine-tune at all. Cohort "late".
  Every trial keeps the base seed 0, as in a search. Each cohort has its own seeded generator and
  comes after the others, so adding one keeps the trials already recorded.
- The task is the embedded default unchanged (512 training clips: 16 steps an epoch, which the
  signals' 20-step window is sized for; 12 epochs). Measured first on the shared 2-core machine:
  a 12-epoch trial takes ~5 s alone on a quiet machine and 30-70 s on one thread while other
  jobs load the cores (a 2-thread trial took 3 min then), so 2 worker processes of 1 thread each
  record 52 trials in ~18 min (recorded 2026-11-21: 775 s for 48 trials, 45 s for the last 4,
  and ~4 min before that for 9 trials of a first run that was stopped and resumed).
- A trial that raises ``train.TrialFailed`` (diverged, oom, runtime_error) is kept with the epochs
  it reported and the failure; as in ``trainable.run_trial``, an epoch whose best_val_acc is not
  finite fails the trial ("nonfinite_metric") before it is reported.

The file (compact JSON, ~310 kB): a header (format, date, machine, wall_seconds summed over the
runs that wrote it, trial_seconds, settings) and ``trials`` in plan order, each with ``index``,
``cohort`` (space, aggressive, stress, diverge), ``params`` (the flat dict, as OptunaSearch gives
it to a trial), ``status`` ("completed" or "failed"), ``failure`` (null, or reason, detail,
epoch, step), ``seconds`` and ``metrics``: every reported key -> its values per epoch (null where
an epoch did not report it). Non-finite numbers are the strings "nan", "inf", "-inf" (strict JSON
has none).

Progress is appended to ``<out>.partial.jsonl`` as trials end; a run started again with the same
task reuses every trial of the partial file and of an existing ``--out`` file whose params match
the plan at its index, and records only the rest. The partial file is removed at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import random
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from common import machine, parser, report

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "embedded.yaml"
SPACE = ROOT / "search_spaces" / "all.yaml"
OUT = ROOT / "benchmarks" / "data" / "curves.json"
# 2: the spike signals compare like with like, fp16 overflows are counted apart, phase_epochs
FORMAT = 2
STRATA = ("space", "aggressive", "late")  # the cohorts inside all.yaml
# Epochs before a late unfreezer's first event: at or after the search's first ASHA rung (grace
# 4), all inside all.yaml's progressive.initial_freeze_epochs (0..8).
LATE_FREEZE_EPOCHS = (4, 8)

# The hot corner of all.yaml: fast unfreezing at a high LR, every value inside the space.
AGGRESSIVE_STRATEGIES: tuple[dict[str, Any], ...] = (
    {
        "strategy": "early_gradual",
        "early_gradual.freeze_epochs": (0, 1),
        "early_gradual.blocks_per_epoch": 3,
        "early_gradual.target_ratio": 1.0,
    },
    {
        "strategy": "progressive",
        "progressive.initial_blocks": (1, 3),
        "progressive.initial_freeze_epochs": (0, 1),
        "progressive.unfreeze_interval": 1,
    },
    {
        "strategy": "adaptive",
        "adaptive.patience": 1,
        "adaptive.min_improvement": 0.02,
        "adaptive.blocks_per_step": 2,
    },
    {"strategy": "full"},
)


def aggressive_params(rng: random.Random) -> dict[str, Any]:
    """Fixed values for one aggressive trial (the sampler draws the rest)."""
    chosen = rng.choice(AGGRESSIVE_STRATEGIES)
    params = {k: rng.choice(v) if isinstance(v, tuple) else v for k, v in chosen.items()}
    params["optimizer.lr"] = math.exp(rng.uniform(math.log(0.03), math.log(0.1)))
    params["optimizer.backbone_lr_mult"] = rng.uniform(0.5, 1.0)
    params["optimizer.unfreeze_warmup_steps"] = 0
    return params


def stress_params(rng: random.Random) -> dict[str, Any]:
    """One stress trial: the hot corner pushed past all.yaml's bounds (lr 0.1..0.5, no gradient
    clipping), fast-unfreezing strategies only (full has no unfreeze event to judge)."""
    chosen = rng.choice(AGGRESSIVE_STRATEGIES[:3])
    params = {k: rng.choice(v) if isinstance(v, tuple) else v for k, v in chosen.items()}
    params["optimizer.lr"] = math.exp(rng.uniform(math.log(0.1), math.log(0.5)))
    params["optimizer.backbone_lr_mult"] = rng.uniform(0.5, 1.0)
    params["optimizer.unfreeze_warmup_steps"] = 0
    params["optimizer.weight_decay"] = 0.01
    params["optimizer.grad_clip"] = 0.0  # 0 disables clipping
    return params


def diverge_params(rng: random.Random) -> dict[str, Any]:
    """One divergence trial: SGD (momentum 0.9) at lr 5..50 without clipping, fast unfreezing;
    far outside the space, a misconfigured LR that makes some trials go non-finite."""
    params = stress_params(rng)
    params["optimizer.lr"] = math.exp(rng.uniform(math.log(5.0), math.log(50.0)))
    params["optimizer.name"] = "sgd"
    return params


def sample(
    trials: int, seed: int, share: float, stress: int = 0, diverge: int = 0, late: int = 0
) -> list[tuple[str, dict[str, Any]]]:
    """(cohort, flat params) for every trial, in order; a pure function of the arguments.

    Cohorts: "space" (sampled) and "aggressive" (the space's hot corner), then ``stress`` trials
    past the space's bounds, then ``diverge`` trials, then ``late`` unfreezers of the space;
    each cohort draws from its own seeded generator and comes after the others, so adding one
    keeps the trials already planned."""
    from unfreeze_hpo.search.space import load_space

    space = load_space(SPACE)
    rng = random.Random(seed)
    hot = set(rng.sample(range(trials), round(share * trials)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for i in range(trials):
        if i in hot:
            study.enqueue_trial(aggressive_params(rng))
        trial = study.ask()
        fixed = space.define_by_run(trial)
        out.append(("aggressive" if i in hot else "space", {**trial.params, **fixed}))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # never used again
    stress_rng, diverge_rng = random.Random(seed + 1), random.Random(seed + 2)
    out += [("stress", stress_params(stress_rng)) for _ in range(stress)]
    out += [("diverge", diverge_params(diverge_rng)) for _ in range(diverge)]
    late_rng = random.Random(seed + 3)
    late_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + 3))
    for _ in range(late):
        # progressive from its initial blocks, held LATE_FREEZE_EPOCHS epochs; the rest sampled
        freeze = late_rng.randint(*LATE_FREEZE_EPOCHS)
        late_study.enqueue_trial(
            {"strategy": "progressive", "progressive.initial_freeze_epochs": freeze}
        )
        trial = late_study.ask()
        fixed = space.define_by_run(trial)
        out.append(("late", {**trial.params, **fixed}))
        late_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return out


def _number(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else repr(value)  # "nan", "inf", "-inf"


def run_one(
    index: int, params: dict[str, Any], epochs: int, train_samples: int, threads: int
) -> dict[str, Any]:
    """Train one trial in this (worker) process; its record for the file."""
    import dataclasses

    import torch

    from unfreeze_hpo import config as config_module
    from unfreeze_hpo import embedded, train
    from unfreeze_hpo.search.space import load_space

    torch.set_num_threads(threads)
    base = config_module.load(BASE)
    base = base.replace(
        epochs=epochs, data=dataclasses.replace(base.data, train_samples=train_samples)
    )
    rows: list[dict[str, float]] = []
    failure = None
    started = time.perf_counter()

    def on_epoch(metrics: dict[str, float], _checkpoint: Path | None) -> None:
        if not math.isfinite(metrics["best_val_acc"]):  # trainable.run_trial does the same
            raise train.TrialFailed(
                "nonfinite_metric",
                f"best_val_acc is {metrics['best_val_acc']}",
                int(metrics["epoch"]),
                int(metrics["step"]),
            )
        rows.append(dict(metrics))

    with tempfile.TemporaryDirectory() as out:
        cfg = load_space(SPACE).trial_config(base, params).replace(output_dir=out)
        try:
            train.run(cfg, on_epoch, log=lambda _: None, weights=embedded.weights_for(cfg))
        except train.TrialFailed as exc:
            failure = {
                "reason": exc.reason,
                "detail": exc.detail,
                "epoch": exc.epoch,
                "step": exc.step,
            }
    return {
        "index": index,
        "params": params,
        "status": "failed" if failure else "completed",
        "failure": failure,
        "seconds": round(time.perf_counter() - started, 2),
        "metrics": {
            key: [_number(row[key]) if key in row else None for row in rows]
            for key in dict.fromkeys(k for row in rows for k in row)
        },
    }


def task_of(args: Any) -> dict[str, Any]:
    """What a recorded trial depends on besides its params (a resume must match it)."""
    return {
        "format": FORMAT,
        "base": str(BASE.relative_to(ROOT)),
        "space": str(SPACE.relative_to(ROOT)),
        "epochs": args.epochs,
        "train_samples": args.train_samples,
        "threads_per_worker": args.threads,
    }


def settings_of(args: Any) -> dict[str, Any]:
    return {
        **task_of(args),
        "trials": args.trials + args.stress + args.diverge + args.late,
        "space_trials": args.trials,
        "stress_trials": args.stress,
        "diverge_trials": args.diverge,
        "late_trials": args.late,
        "late_freeze_epochs": list(LATE_FREEZE_EPOCHS),
        "seed": args.seed,
        "sampler": "optuna RandomSampler(seed) over SearchSpace.define_by_run",
        "aggressive_share": args.aggressive,
        "steps_per_epoch": math.ceil(args.train_samples / 32),
        "workers": args.workers,
        "metric": "best_val_acc",
        "mode": "max",
    }


def _matches(record: Mapping[str, Any], plan: list[tuple[str, dict[str, Any]]]) -> bool:
    i = record["index"]
    return i < len(plan) and json.loads(json.dumps(plan[i][1])) == record["params"]


def load_partial(
    path: Path, task: Mapping[str, Any], plan: list[tuple[str, dict[str, Any]]]
) -> dict[int, dict[str, Any]]:
    """Trials an interrupted run already recorded: same task, same params at the same index."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or json.loads(lines[0]) != {"task": dict(task)}:
        return {}
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut off by the interruption
        if _matches(record, plan):
            done[record["index"]] = record
    return done


def load_recorded(
    path: Path, task: Mapping[str, Any], plan: list[tuple[str, dict[str, Any]]]
) -> tuple[dict[int, dict[str, Any]], float]:
    """Trials of an earlier file that the plan keeps (a plan that adds a cohort), and the wall
    seconds that file took; nothing when the task differs."""
    if not path.is_file():
        return {}, 0.0
    data = json.loads(path.read_text(encoding="utf-8"))
    if {k: data["settings"].get(k) for k in task} != dict(task):
        return {}, 0.0
    done = {t["index"]: t for t in data["trials"] if _matches(t, plan)}
    return done, float(data.get("wall_seconds", 0)) if done else 0.0


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40, help="trials sampled from the space")
    p.add_argument("--stress", type=int, default=8, help="stress trials past the space's bounds")
    p.add_argument("--diverge", type=int, default=4, help="trials at a diverging SGD LR")
    p.add_argument("--late", type=int, default=12, help="progressive trials unfreezing late")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aggressive", type=float, default=1 / 3, help="share of hot-corner trials")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--workers", type=int, default=2, help="trials trained at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.quick:  # never over the committed data unless asked to
        args.trials, args.stress, args.diverge, args.late, args.epochs = 2, 1, 1, 1, 2
        if args.out == OUT:
            args.out = Path(tempfile.gettempdir()) / "curves-quick.json"
    settings = settings_of(args)
    started = time.perf_counter()

    from unfreeze_hpo import config as config_module
    from unfreeze_hpo.embedded import source_checkpoint

    source_checkpoint(config_module.load(BASE), print)  # built (or found) once, before workers
    plan = sample(args.trials, args.seed, args.aggressive, args.stress, args.diverge, args.late)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial.jsonl")
    done, earlier = load_recorded(args.out, task_of(args), plan)
    done.update(load_partial(partial, task_of(args), plan))
    lines = [json.dumps({"task": task_of(args)})]
    lines += [json.dumps(r, separators=(",", ":")) for _, r in sorted(done.items())]
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(plan)} trials ({len(done)} already recorded), {args.workers} workers", flush=True)
    context = multiprocessing.get_context("spawn")
    with (
        concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool,
        partial.open("a", encoding="utf-8") as log,
    ):
        futures = {
            pool.submit(run_one, i, params, args.epochs, args.train_samples, args.threads): i
            # stress trials first: their outcome is the least predictable (any order gives the
            # same records; the file keeps the plan's order)
            for i, (_, params) in sorted(enumerate(plan), key=lambda x: x[1][0] in STRATA)
            if i not in done
        }
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            done[record["index"]] = record
            log.write(json.dumps(record, separators=(",", ":")) + "\n")
            log.flush()
            acc = record["metrics"].get("best_val_acc", [None])[-1]
            print(
                f"[{len(done)}/{len(plan)}] trial {record['index']:>2} {record['status']:9s} "
                f"{len(record['metrics'].get('epoch', []))} epochs, best_val_acc {acc}, "
                f"{record['seconds']:.0f}s  {record['failure'] or ''}",
                flush=True,
            )
    trials = []
    for i, (cohort, _) in enumerate(plan):
        trials.append({**done[i], "index": i, "cohort": cohort})
    wall = time.perf_counter() - started + earlier
    header = {
        "format": FORMAT,
        "generated_by": "benchmarks/record_curves.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "wall_seconds": round(wall),  # summed over the runs that wrote this file
        "trial_seconds": round(sum(t["seconds"] for t in trials)),
        "settings": settings,
        "note": "non-finite numbers are the strings 'nan', 'inf', '-inf'",
    }
    args.out.write_text(
        json.dumps({**header, "trials": trials}, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    partial.unlink()
    failed = sum(t["status"] == "failed" for t in trials)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e3:.0f} kB): {len(trials)} trials, {failed} failed")
    print(f"{wall:.0f}s on {machine()}")
    report(args.json, "record_curves", {**settings, "wall_seconds": wall, "failed": failed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
