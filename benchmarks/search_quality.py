"""Search quality: does a search of a fixed budget find a better schedule than the defaults a user
would otherwise pick? On the embedded transfer task (examples/embedded.yaml), ``unfreeze-hpo``
searches ``search_spaces/all.yaml`` with a fixed trial budget; its best trial's config is then
re-run, side by side with the field notes' default (early_gradual 1/1/0.5), full fine-tuning and
linear probing, with several seeds on held-out data. The baselines keep the embedded default's
optimizer (AdamW, lr 3e-2, warmup) and change only the strategy, as a user trying them would.

    .venv/bin/python benchmarks/search_quality.py            # 12 trials + 4 arms x 3 seeds, ~25 min
    .venv/bin/python benchmarks/search_quality.py --quick    # 2 trials, 2 epochs, 64 clips, ~40 s

Held-out: the search selects on the task's validation split drawn with data seed 0. Every re-run
trains and validates on fresh draws of the same task (``data.seed`` 1000 + k, with training seed
k), so no sample the search saw is used to judge it. The figure is the final-epoch val accuracy
(not the best epoch, which would select on the held-out data again). Reported: each arm's mean
and spread over seeds, and the searched arm's difference to each baseline with the spread of the
per-seed differences (seeds are paired: same data and init for every arm).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import parser, report, table

from unfreeze_hpo import config as config_module
from unfreeze_hpo import results, strategies, train
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.results import export
from unfreeze_hpo.search.driver import run_search
from unfreeze_hpo.search.options import SearchConfig
from unfreeze_hpo.search.rules import AshaSettings

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "examples" / "embedded.yaml"
SPACE = ROOT / "search_spaces" / "all.yaml"
HELD_OUT_DATA_SEED = 1000

# The baselines a user would pick without a search (the field notes' default among them).
BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "field notes' default (early_gradual 1/1/0.5)": (
        "early_gradual",
        {"freeze_epochs": 1, "blocks_per_epoch": 1, "target_ratio": 0.5},
    ),
    "full fine-tuning": ("full", {}),
    "linear probe (frozen backbone)": ("frozen", {}),
}


def task(epochs: int, quick: bool) -> dict[str, Any]:
    """The embedded default as a dict; --quick shrinks it (no source pretraining, 64 clips)."""
    values: dict[str, Any] = yaml.safe_load(EMBEDDED.read_text(encoding="utf-8"))
    values["epochs"] = epochs
    if quick:
        values["model"]["pretrain_on_source"] = False
        values["data"].update(train_samples=64, val_samples=64)
    return values


def searched_config(
    values: dict[str, Any], budget: int, folder: Path, concurrency: int
) -> TrialConfig:
    """Search the task; the best trial's full config."""
    base = folder / "base.yaml"
    base.write_text(yaml.safe_dump(values), encoding="utf-8")
    epochs = int(values["epochs"])
    cfg = SearchConfig(
        name="quality",
        storage_path=str(folder / "runs"),
        base=str(base),
        space=str(SPACE),
        num_trials=budget,
        max_concurrent=concurrency,
        cpus_per_trial=2 / concurrency,
        asha=AshaSettings(grace_period=min(4, epochs)),
        preflight=False,
        seed=0,
    )
    outcome = run_search(cfg, log=lambda line: print(f"  {line}", flush=True))
    if outcome.best is None:
        raise SystemExit("the search completed no trial: nothing to compare")
    search = results.open_search(cfg.location)
    best = export.trial_config(search, outcome.best.number)
    print(f"search: best trial #{outcome.best.number}, {outcome.best.value:.3f}: {best.strategy}")
    return best


def baseline(base: TrialConfig, name: str, values: dict[str, Any]) -> TrialConfig:
    return base.replace(strategy=strategies.create(name, values))


def held_out(cfg: TrialConfig, seed: int, out: str) -> TrialConfig:
    data = dataclasses.replace(cfg.data, seed=HELD_OUT_DATA_SEED + seed)
    return cfg.replace(data=data, seed=seed, output_dir=out)


def final_val_acc(cfg: TrialConfig) -> float:
    summary = train.run(cfg, log=lambda _: None)
    return float(summary.final["val_acc"])


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=12, help="trials the search may run")
    p.add_argument("--seeds", type=int, default=3, help="re-runs of each arm on held-out data")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=2, help="trials running at once")
    args = p.parse_args()
    if args.quick:
        args.budget, args.seeds, args.epochs = 2, 1, 2
    torch.set_num_threads(2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        values = task(args.epochs, args.quick)
        best = searched_config(values, args.budget, Path(folder), args.concurrency)
        base = config_module.from_dict(values)
        arms = {"searched (best trial)": best}
        arms |= {label: baseline(base, *spec) for label, spec in BASELINES.items()}
        scores: dict[str, list[float]] = {label: [] for label in arms}
        for seed in range(args.seeds):  # arms interleaved within each seed
            for label, cfg in arms.items():
                with tempfile.TemporaryDirectory() as out:
                    scores[label].append(final_val_acc(held_out(cfg, seed, out)))
                print(f"seed {seed}  {label:46s} {scores[label][-1]:.3f}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    ours = scores["searched (best trial)"]
    rows, figures = [], {}
    for label, values in scores.items():
        mean = statistics.mean(values)
        diffs = [a - b for a, b in zip(ours, values, strict=True)]
        diff = statistics.mean(diffs)
        spread = max(diffs) - min(diffs)
        versus = "-" if values is ours else f"{diff:+.3f} ({spread:.3f})"
        rows.append([label, f"{mean:.3f}", f"{max(values) - min(values):.3f}", versus])
        figures[label] = {"mean": mean, "values": values, "searched_minus": diffs}
    header = ["arm", "mean final val acc", "spread", "searched - arm (spread)"]
    print()
    print(table(rows, header))
    print(
        f"\n{args.budget}-trial search, {args.seeds} held-out seeds x {args.epochs} epochs, "
        f"{minutes:.1f} min"
    )
    worst_gap = min(statistics.mean(figures[label]["searched_minus"]) for label in BASELINES)
    print(
        "verdict: the searched schedule "
        + ("beats every baseline" if worst_gap > 0 else "does NOT beat every baseline")
        + f" on held-out data (smallest mean gap {worst_gap:+.3f})"
    )
    report(args.json, "search_quality", {**figures, "minutes": minutes, "budget": args.budget})
    return 0


if __name__ == "__main__":
    sys.exit(main())
