"""Does the embedded default make freezing matter? Fine-tune the source-pretrained backbone on the
synthetic target task with a frozen backbone, gentle unfreezing, fast unfreezing at a high LR,
and from scratch, over several seeds, and compare held-out accuracy.

    .venv/bin/python benchmarks/embedded_transfer.py           # 3 seeds x 6 arms, ~8 min, 2 cores
    .venv/bin/python benchmarks/embedded_transfer.py --quick   # 1 seed, 3 epochs, 64 clips

Exits 1 unless gradual unfreezing beats both the frozen backbone and unfreezing everything at a
too-high LR by at least --margin (mean best val accuracy): the three must end clearly apart.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from common import parser, report

from unfreeze_hpo import embedded, train
from unfreeze_hpo.config import from_dict

BASE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny", "pretrain_on_source": True},
    "optimizer": {"lr": 3e-2, "weight_decay": 0.01},
    "batch_size": 32,
}
GRADUAL = {"name": "early_gradual", "freeze_epochs": 1, "target_ratio": 1.0}
ARMS: dict[str, dict[str, Any]] = {
    "frozen (linear probe), lr 3e-2": {"strategy": {"name": "frozen"}},
    "gradual (2 blocks/epoch), lr 3e-2": {
        "strategy": {**GRADUAL, "blocks_per_epoch": 2},
        "optimizer": {"unfreeze_warmup_steps": 10},
    },
    "all at once, too hot: lr 1e-1": {"strategy": {"name": "full"}, "optimizer": {"lr": 1e-1}},
    "slow (1 block/epoch), lr 3e-2": {"strategy": {**GRADUAL, "blocks_per_epoch": 1}},
    "all at once, lr 1e-2": {"strategy": {"name": "full"}, "optimizer": {"lr": 1e-2}},
    "from scratch (no pretraining), lr 1e-2": {
        "strategy": {"name": "full"},
        "model": {"pretrain_on_source": False},
        "optimizer": {"lr": 1e-2},
    },
}


def config(arm: dict[str, Any], seed: int, epochs: int, out: str) -> Any:
    values = {**BASE, **arm, "seed": seed, "epochs": epochs, "output_dir": out}
    for section in ("model", "optimizer"):
        values[section] = {**BASE[section], **arm.get(section, {})}
    return from_dict(values)


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--margin", type=float, default=0.1)
    args = p.parse_args()
    if args.quick:  # 1 seed, 3 epochs, a 1-epoch source pretraining in a private cache; no verdict
        args.seeds, args.epochs = 1, 3
        os.environ["UNFREEZE_HPO_CACHE"] = tempfile.mkdtemp(prefix="unfreeze-hpo-quick-")
        embedded.SOURCE_EPOCHS, embedded.SOURCE_SAMPLES = 1, 64
        BASE["data"] = {"train_samples": 64, "val_samples": 64}
    torch.set_num_threads(2)
    scores: dict[str, list[float]] = {name: [] for name in ARMS}
    started = time.perf_counter()
    for seed in range(args.seeds):  # arms interleaved within each seed
        for name, arm in ARMS.items():
            with tempfile.TemporaryDirectory() as out:
                cfg = config(arm, seed, args.epochs, out)
                summary = train.run(cfg, log=lambda _: None, weights=embedded.weights_for(cfg))
            scores[name].append(summary.best_val_acc)
            print(f"seed {seed} {name:42s} best val acc {summary.best_val_acc:.3f}", flush=True)
    print(f"\n{args.seeds} seeds x {args.epochs} epochs, {time.perf_counter() - started:.0f}s")
    means = {name: statistics.mean(v) for name, v in scores.items()}
    for name, values in scores.items():
        spread = max(values) - min(values)
        print(f"{name:42s} mean {means[name]:.3f}  spread {spread:.3f}")
    frozen, gradual, hot = (means[n] for n in list(ARMS)[:3])
    print(f"gradual - frozen: {gradual - frozen:+.3f}   gradual - too hot: {gradual - hot:+.3f}")
    figures = {name: {"mean": means[name], "values": v} for name, v in scores.items()}
    report(args.json, "embedded_transfer", figures)
    if args.quick:
        return 0
    ok = gradual - frozen >= args.margin and gradual - hot >= args.margin
    print("verdict:", "freezing matters on the embedded default" if ok else "NOT SHOWN")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
