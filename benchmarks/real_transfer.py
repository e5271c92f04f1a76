"""Real transfer: ImageNet EfficientNet-Lite0 fine-tuned on scikit-learn's real handwritten
digits, through the product and through a bare timm + PyTorch loop written here, side by side.

    .venv/bin/python benchmarks/real_transfer.py               # 3 seeds, ~30 min on 2 cores
    .venv/bin/python benchmarks/real_transfer.py --quick       # 1 seed, 16 px, 1 epoch, ~30 s
    .venv/bin/python benchmarks/real_transfer.py --explore --seeds 1   # gradual candidates, val

Sizes (chosen so a full run fits 30-45 min on 2 CPU cores, where one epoch of full fine-tuning
at 224 px takes ~35 s): the digits written at 32 px by ``samples.write_digits`` with
per_class 40 and splits (0.5, 0.25, 0.25), i.e. train / val / test 200 / 100 / 100 images;
4 epochs, batch 8 (100 steps); AdamW, lr 1e-3, weight decay 0.01 (none on biases and norms,
timm's rule), gradient clip 1.0, cosine LR per step to 0 without warmup; 2 threads. Every arm
runs at two preprocessings: the model's own (224 px, bicubic, crop_pct 0.875, mean/std 0.5,
timm's training augmentation) and today's 32 px square resize without augmentation
(``data: {size: 32, crop_pct: 1.0, augment: false}``).

Arms: the product's linear probe, full fine-tuning, the field notes' early_gradual(1, 1, 0.5)
and the best gradual setting ``--explore`` found on val (BEST_GRADUAL), and full fine-tuning in
a bare loop that imports nothing from unfreeze_hpo: it runs in a child process
(``real_transfer.py --bare``) that exits 1 if any unfreeze_hpo module was imported, and uses the
same weights file, split, transforms (compared with the product's: exit 1 if they differ),
optimizer (fused AdamW, as the product's), LR schedule, epochs, batch size, seeding, data order,
per-sample augmentation seeds (each sample drawn under generators seeded from numpy's
``SeedSequence([seed, epoch, index])``, as the product's loaders draw it) and threads. Each
arm's figure is the test accuracy at the epoch of best val accuracy (the product's
``test_acc_at_best``), mean and sample standard deviation over seeds 0..--seeds-1.

Exits 1 unless, at both preprocessings, the product's full fine-tuning matches the bare loop
within seed noise: |mean difference| <= 2 x the larger of the two standard deviations + 0.01.
``--quick`` (1 seed, 1 epoch, 100 images, both preprocessings at 16 px) prints the figures but
no verdict.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

VARIANT = "tf_efficientnet_lite0"  # unfreeze_hpo.samples.EFFICIENTNET_LITE0 without "timm:"
PER_CLASS, SPLITS = 40, (0.5, 0.25, 0.25)
EPOCHS, BATCH_SIZE, LR, WEIGHT_DECAY, GRAD_CLIP = 4, 8, 1e-3, 0.01, 1.0
THREADS = 2
# The preprocessings, as data-config overrides: none (the model's own), and today's 32 px.
MODEL_PREP, SQUARE_PREP = "model's (224 px, bicubic, crop 0.875, augmented)", "32 px square"
PREPROCESSING: dict[str, dict[str, Any]] = {
    MODEL_PREP: {},
    SQUARE_PREP: {"size": 32, "crop_pct": 1.0, "augment": False},
}
QUICK_SIZE = 16  # --quick: digits written at 16 px, both preprocessings at 16 px
QUICK_PREPROCESSING: dict[str, dict[str, Any]] = {
    "model's transforms at 16 px (quick)": {"size": QUICK_SIZE},
    "16 px square (quick)": {"size": QUICK_SIZE, "crop_pct": 1.0, "augment": False},
}


def early_gradual(freeze_epochs: int, blocks_per_epoch: int, target_ratio: float) -> dict[str, Any]:
    return {
        "strategy": {
            "name": "early_gradual",
            "freeze_epochs": freeze_epochs,
            "blocks_per_epoch": blocks_per_epoch,
            "target_ratio": target_ratio,
        }
    }


# What --explore compares on val (the model's preprocessing); BEST_GRADUAL is its winner
# (--explore --seeds 1: best val acc 0.710, ahead of 0.670 for (0, 4, 1.0), 0.650 for the
# field notes', 0.550 for (0, 8, 1.0) and 0.540 for (1, 4, 1.0)).
CANDIDATES = {
    f"early_gradual{args}": early_gradual(*args)
    for args in ((1, 1, 0.5), (0, 2, 1.0), (0, 4, 1.0), (1, 4, 1.0), (0, 8, 1.0))
}
BEST_GRADUAL = "early_gradual(0, 2, 1.0)"
BARE = "bare timm + torch full fine-tuning"
FULL = "full fine-tuning"
ARMS: dict[str, dict[str, Any]] = {
    "linear probe (frozen)": {"strategy": {"name": "frozen"}},
    FULL: {"strategy": {"name": "full"}},
    "early_gradual(1, 1, 0.5) (field notes)": CANDIDATES["early_gradual(1, 1, 0.5)"],
    f"best gradual: {BEST_GRADUAL}": CANDIDATES[BEST_GRADUAL],
}


# --- the bare arm: timm + torch only, run in its own process ---------------------------------


def describe(transform: Any) -> str:
    """A transform's steps in one line (as the product's ``preprocess.describe`` writes them)."""
    return " -> ".join(" ".join(repr(t).split()) for t in getattr(transform, "transforms", []))


class PerSampleSeeds(torch.utils.data.Dataset[Any]):
    """A dataset whose sample ``i`` of epoch ``epoch`` is drawn under torch's CPU generator,
    ``random`` and numpy seeded from ``(seed, epoch, i)`` (splitmix64's finaliser over the
    three in turn); the generators' states are restored after."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        import numpy as np

        state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        draw = splitmix(self.seed + GOLDEN)
        draw = splitmix((draw ^ self.epoch) + GOLDEN)
        draw = splitmix((draw ^ index) + GOLDEN) >> 32
        torch.default_generator.manual_seed(draw)
        random.seed(draw)
        np.random.seed(draw)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state[0])
            random.setstate(state[1])
            np.random.set_state(state[2])


GOLDEN, MASK = 0x9E3779B97F4A7C15, 2**64 - 1


def splitmix(x: int) -> int:
    """splitmix64's finaliser on a 64-bit integer."""
    x &= MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def bare_run(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the whole model the way a timm user writes it; test accuracy at best val."""
    import timm
    from timm.data import create_transform, resolve_model_data_config
    from timm.optim import param_groups_weight_decay
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    started = time.perf_counter()
    seed, epochs, batch_size = job["seed"], job["epochs"], job["batch_size"]
    random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = timm.create_model(
        VARIANT,
        pretrained=True,
        num_classes=job["num_classes"],
        pretrained_cfg_overlay={"file": job["weights"]},
    )
    data_cfg = resolve_model_data_config(model)
    if job["size"] is not None:  # the 32 px baseline: the same timm calls at another size
        data_cfg = {**data_cfg, "input_size": (3, job["size"], job["size"])}
    if job["crop_pct"] is not None:
        data_cfg["crop_pct"] = job["crop_pct"]
    train_tf = create_transform(**data_cfg, is_training=job["augment"])
    eval_tf = create_transform(**data_cfg, is_training=False)
    root = Path(job["root"])
    train_set = PerSampleSeeds(ImageFolder(str(root / "train"), train_tf), seed)
    val_set, test_set = (ImageFolder(str(root / s), eval_tf) for s in ("val", "test"))
    model.to(device)

    steps = epochs * math.ceil(len(train_set) / batch_size)
    groups = param_groups_weight_decay(model, job["weight_decay"])
    optimizer = torch.optim.AdamW(groups, lr=job["lr"], fused=True)

    def cosine(step: int) -> float:  # the LR factor of each step, set before it
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)

    def accuracy(dataset: Any) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs, labels in DataLoader(dataset, batch_size=batch_size):
                logits = model(inputs.to(device))
                correct += int((logits.argmax(1) == labels.to(device)).sum())
        return correct / len(dataset)

    best_val, test_at_best, history = -1.0, math.nan, []
    for epoch in range(epochs):
        model.train()
        # Shuffled by a generator seeded per epoch, as the product's loop does (same order).
        order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        train_set.epoch = epoch
        for inputs, labels in DataLoader(train_set, batch_size, shuffle=True, generator=order):
            inputs, labels = inputs.to(device), labels.to(device)
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), job["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        val, test = accuracy(val_set), accuracy(test_set)
        history.append({"epoch": epoch, "val_acc": val, "test_acc": test})
        if val > best_val:
            best_val, test_at_best = val, test
    return {
        "test_acc_at_best": test_at_best,
        "best_val_acc": best_val,
        "history": history,
        "seconds": time.perf_counter() - started,
        "train_transform": describe(train_tf),
        "eval_transform": describe(eval_tf),
    }


def bare_main(jobs_file: str, out_file: str) -> int:
    jobs = json.loads(Path(jobs_file).read_text(encoding="utf-8"))
    torch.set_num_threads(jobs[0]["threads"])
    results = [bare_run(job) for job in jobs]
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "unfreeze_hpo")
    if leaked:
        print(
            f"the bare arm imported unfreeze_hpo ({', '.join(leaked[:5])}): it must not",
            file=sys.stderr,
        )
        return 1
    Path(out_file).write_text(json.dumps(results), encoding="utf-8")
    return 0


def bare(jobs: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Run the bare arm's jobs in a child process that imports nothing from unfreeze_hpo."""
    jobs_file, out_file = folder / "bare-jobs.json", folder / "bare-results.json"
    jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
    out_file.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, __file__, "--bare", str(jobs_file), str(out_file)])
    if done.returncode != 0:
        raise SystemExit(f"the bare arm failed (exit {done.returncode})")
    results: list[dict[str, Any]] = json.loads(out_file.read_text(encoding="utf-8"))
    return results


# --- the product's arms ----------------------------------------------------------------------


def config(
    setup: dict[str, Any], arm: dict[str, Any], prep: dict[str, Any], seed: int, out: str
) -> Any:
    from unfreeze_hpo.config import from_dict

    values = {
        "model": {"name": f"timm:{VARIANT}", "pretrained_file": setup["weights"]},
        "data": {"kind": "image_folder", "root": setup["root"], **prep},
        "optimizer": {
            "name": "adamw",
            "lr": setup["lr"],
            "weight_decay": setup["weight_decay"],
            "grad_clip": setup["grad_clip"],
        },
        "schedule": {"kind": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.0},
        "epochs": setup["epochs"],
        "batch_size": setup["batch_size"],
        "seed": seed,
        "output_dir": out,
        **arm,
    }
    return from_dict(values)


def product_run(
    setup: dict[str, Any], arm: dict[str, Any], prep: dict[str, Any], seed: int
) -> dict[str, Any]:
    from unfreeze_hpo import train

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = train.run(config(setup, arm, prep, seed, out), log=lambda _: None)
    return {
        "test_acc_at_best": float(summary.final["test_acc_at_best"]),
        "best_val_acc": summary.best_val_acc,
        "seconds": time.perf_counter() - started,
    }


def product_transforms(setup: dict[str, Any], prep: dict[str, Any]) -> tuple[str, str]:
    """The product's train and eval transforms for a preprocessing, as one line each."""
    from unfreeze_hpo import train
    from unfreeze_hpo.data.preprocess import describe as product_describe

    with tempfile.TemporaryDirectory() as out:
        trial = train.setup(config(setup, ARMS[FULL], prep, 0, out), log=lambda _: None)
    resolved = trial.datasets.preprocessing
    assert resolved is not None
    return product_describe(resolved.train), product_describe(resolved.eval)


# --- the run ---------------------------------------------------------------------------------


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def explore(setup: dict[str, Any], prep: dict[str, Any], seeds: int) -> int:
    """The gradual candidates on val only (the test split is not looked at)."""
    vals: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for seed in range(seeds):
        for name, arm in CANDIDATES.items():
            result = product_run(setup, arm, prep, seed)
            vals[name].append(result["best_val_acc"])
            print(
                f"seed {seed} {name:44s} best val acc {result['best_val_acc']:.3f} "
                f"({result['seconds']:.0f}s)",
                flush=True,
            )
    for name, values in sorted(vals.items(), key=lambda kv: -statistics.mean(kv[1])):
        mean, std = spread(values)
        print(f"{name:44s} best val acc {mean:.3f} ± {std:.3f}")
    return 0


def main() -> int:
    from common import parser, report, table

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--per-class", type=int, default=PER_CLASS)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--explore", action="store_true", help="rank the gradual candidates on val")
    args = p.parse_args()
    preps, side = PREPROCESSING, 32
    if args.quick:  # 1 seed, 1 epoch, 100 images, everything at 16 px; no verdict
        args.seeds, args.epochs, args.per_class = 1, 1, 10
        preps, side = QUICK_PREPROCESSING, QUICK_SIZE
    torch.set_num_threads(args.threads)
    from unfreeze_hpo import samples

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="real-transfer-") as tmp:
        folder = Path(tmp)
        weights = samples.write_efficientnet_lite0(folder / "lite0.pth")
        root = samples.write_digits(
            folder / "digits", size=side, per_class=args.per_class, splits=SPLITS
        )
        counts = {s: sum(1 for _ in (root / s).glob("*/*.png")) for s in ("train", "val", "test")}
        setup = {
            "weights": str(weights),
            "root": str(root),
            "num_classes": 10,
            "epochs": args.epochs,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": GRAD_CLIP,
            "threads": args.threads,
        }
        print(
            f"digits {counts}, {args.epochs} epochs, batch {BATCH_SIZE}, AdamW lr {LR:g} "
            f"wd {WEIGHT_DECAY:g}, {args.threads} threads",
            flush=True,
        )
        if args.explore:
            return explore(setup, PREPROCESSING[MODEL_PREP], args.seeds)
        names = [*ARMS, BARE]
        scores: dict[str, dict[str, list[dict[str, Any]]]] = {
            prep: {name: [] for name in names} for prep in preps
        }
        for seed in range(args.seeds):  # arms interleaved within each seed
            jobs = [
                {
                    **setup,
                    "seed": seed,
                    "size": prep.get("size"),
                    "crop_pct": prep.get("crop_pct"),
                    "augment": prep.get("augment", True),
                }
                for prep in preps.values()
            ]
            for (label, prep), result in zip(preps.items(), bare(jobs, folder), strict=True):
                mine = (result.pop("train_transform"), result.pop("eval_transform"))
                if seed == 0:  # the bare loop's transforms must be the product's
                    theirs = product_transforms(setup, prep)
                    for split, a, b in zip(("train", "eval"), mine, theirs, strict=True):
                        print(f"{label}, {split}:\n  bare:    {a}\n  product: {b}")
                        if a != b:
                            print("the bare arm's transforms differ from the product's")
                            return 1
                scores[label][BARE].append(result)
                print(f"seed {seed} {label} | {BARE:40s} {line(result)}", flush=True)
                for name, arm in ARMS.items():
                    result = product_run(setup, arm, prep, seed)
                    scores[label][name].append(result)
                    print(f"seed {seed} {label} | {name:40s} {line(result)}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"\n{args.seeds} seeds x {args.epochs} epochs, {elapsed:.0f}s\n")
    figures: dict[str, Any] = {}
    rows = []
    for label, arms in scores.items():
        figures[label] = {}
        for name, results in arms.items():
            values = [r["test_acc_at_best"] for r in results]
            mean, std = spread(values)
            figures[label][name] = {
                "mean": mean,
                "std": std,
                "values": values,
                "best_val": [r["best_val_acc"] for r in results],
                "seconds": [r["seconds"] for r in results],
            }
            seconds = statistics.mean(r["seconds"] for r in results)
            rows.append([label, name, f"{mean:.3f} ± {std:.3f}", f"{seconds:.0f}"])
    print(table(rows, ["preprocessing", "arm", "test acc (mean ± std)", "s/run"]))
    ok = True
    for label, arms in figures.items():
        product, plain = arms[FULL], arms[BARE]
        diff = product["mean"] - plain["mean"]
        allowed = 2 * max(product["std"], plain["std"]) + 0.01
        same = sum(a == b for a, b in zip(product["values"], plain["values"], strict=True))
        figures[label]["full_minus_bare"] = {"mean": diff, "allowed": allowed, "same": same}
        print(
            f"{label}: product full - bare full {diff:+.3f} (allowed ±{allowed:.3f}); "
            f"identical in {same}/{len(product['values'])} seeds"
        )
        ok = ok and abs(diff) <= allowed
    figures["settings"] = {
        **{k: v for k, v in setup.items() if k not in ("weights", "root")},
        "digits": {"size": side, "per_class": args.per_class, "splits": SPLITS, **counts},
        "seeds": args.seeds,
        "seconds": elapsed,
    }
    report(args.json, "real_transfer", figures)
    if args.quick:
        return 0
    print("verdict:", "the product's full fine-tuning matches the bare loop" if ok else "MISMATCH")
    return 0 if ok else 1


def line(result: dict[str, Any]) -> str:
    return (
        f"test acc {result['test_acc_at_best']:.3f} (best val {result['best_val_acc']:.3f}) "
        f"{result['seconds']:.0f}s"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        sys.exit(bare_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
