"""Data-parallel trials on this machine: training samples/s of one trial on 1 worker against 2
workers (DDP over gloo, each a process of its own), and what the re-wrap at an unfreeze event
costs against an epoch.

    .venv/bin/python benchmarks/data_parallel.py           # the real case, 3 rounds, ~4 min
    .venv/bin/python benchmarks/data_parallel.py --quick   # mvit_tiny on synthetic clips, ~1 min

The job is the real case of the other benchmarks: ImageNet EfficientNet-Lite0 fine-tuned on
scikit-learn's digits (200 training images at 64 px, global batch 16, fused AdamW), through
``train.run`` in every arm; the 2-worker arm runs it on two ranks started by
torch.multiprocessing (what a Ray Train worker group runs, without Ray's start-up), each rank
with half of each batch. The arms, interleaved over ``--rounds`` rounds after a warm-up round:

- 1 worker, 2 threads: the whole machine to one process (a one-worker trial given 2 CPUs);
- 2 workers, 1 thread each: the whole machine to a 2-worker trial;
- 1 worker, 1 thread: half the machine, for scale.

Training samples/s is taken over every epoch but the first (which warms the allocator): the
training steps alone, timed on rank 0 around the loop's epoch function (validation and
checkpoints apart). The re-wrap is measured in a 2-worker run of an early_gradual schedule with
an unfreeze event every epoch: the seconds DDP's wrapping took at each event (the loop reports
them, ``ddp_wrap_seconds``) over the seconds of that epoch's training steps.

On 2 CPU cores there is nothing to gain: the two ranks share the cores one process would use,
and each step adds an all-reduce of the trainable gradients over loopback. The figure says what
the data-parallel path costs where it cannot help; on GPUs each worker brings its own device.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import Stat, parser, report, table
from throughput import prepare

# Arm -> (workers, threads per worker).
ARMS = {
    "1 worker, 2 threads": (1, 2),
    "2 workers, 1 thread each": (2, 1),
    "1 worker, 1 thread": (1, 1),
}


def job_config(args: Any, folder: Path, strategy: dict[str, Any]) -> dict[str, Any]:
    if args.quick:
        return {
            "model": {"name": "pytorchvideo:mvit_tiny", "pretrain_on_source": False},
            "data": {"kind": "synthetic_video", "train_samples": 32, "val_samples": 16},
            "epochs": 2,
            "batch_size": 8,
            "num_workers": 0,
            "strategy": strategy,
        }
    files = prepare(folder)
    return {
        "model": {"name": "timm:tf_efficientnet_lite0", "pretrained_file": files["weights"]},
        "data": {"kind": "image_folder", "root": files["root"], "size": 64},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0},
        "epochs": args.epochs,
        "batch_size": 16,
        "num_workers": 0,
        "strategy": strategy,
    }


def _rank(rank: int, world: int, threads: int, store: str, values: dict[str, Any]) -> None:
    """One rank of a run: train ``values``; rank 0 writes each epoch's train seconds and row."""
    from unfreeze_hpo import config, train
    from unfreeze_hpo.train import loop
    from unfreeze_hpo.train.replicas import Ranks

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    seconds: list[float] = []
    epoch = loop._train_epoch

    def timed(*a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        out = epoch(*a, **kw)
        seconds.append(time.perf_counter() - started)
        return out

    loop._train_epoch = timed  # type: ignore[assignment]
    out = Path(values.pop("output_dir"))
    cfg = config.from_dict({**values, "output_dir": str(out / f"rank{rank}")})
    rows: list[dict[str, float]] = []
    train.run(
        cfg,
        lambda metrics, _: rows.append(metrics),
        log=lambda _: None,
        checkpoint_every=cfg.epochs,
        ranks=Ranks.current(),
    )
    if rank == 0:
        (out / "run.json").write_text(json.dumps({"seconds": seconds, "rows": rows}))
    if world > 1:
        dist.destroy_process_group()


# A job without BatchNorm (timm's ViT-Ti, random weights, at 64 px on synthetic images) over two
# unfreeze events: 2 ranks with half of each batch compute what one process computes, so their
# losses agree to rounding (``agreement``; the GPU check runs it on CUDA).
VIT: dict[str, Any] = {
    "model": {
        "name": "timm:vit_tiny_patch16_224",
        "pretrained": False,
        "pretrain_on_source": False,
        "kwargs": {"img_size": 64},
    },
    "data": {"kind": "synthetic_image", "size": 64, "train_samples": 128, "val_samples": 64},
    "epochs": 3,
    "batch_size": 16,
    "num_workers": 0,
    "strategy": {"name": "early_gradual", "freeze_epochs": 1, "blocks_per_epoch": 4},
    "schedule": {"kind": "constant"},
}
AGREED = ("train_loss", "val_loss", "val_acc", "grad_norm")


def agreement(values: dict[str, Any]) -> dict[str, float]:
    """The largest relative difference, over the epochs, between 2 ranks and 1 process training
    ``values`` (each key of ``AGREED``), and the 2-rank run's unfreeze events. The loop's own
    audits (every step all-reduces exactly the trainable parameters, the replicas are identical
    after every epoch) fail the 2-rank run if they do not hold."""
    two, one = run(2, 1, values)["rows"], run(1, 1, values)["rows"]
    out = {
        key: max(
            abs(a[key] - b[key]) / max(abs(b[key]), 1e-12) for a, b in zip(two, one, strict=True)
        )
        for key in AGREED
    }
    out["events"] = float(two[-1]["ddp_wraps"] - 1)
    return out


def run(workers: int, threads: int, values: dict[str, Any]) -> dict[str, Any]:
    """One run in fresh processes: rank 0's per-epoch train seconds and metrics rows."""
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "store")
        job = {**values, "output_dir": folder}
        mp.spawn(_rank, args=(workers, threads, store, job), nprocs=workers)
        return json.loads((Path(folder) / "run.json").read_text())


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    rounds = 1 if args.quick else args.rounds
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        full = job_config(args, Path(folder), {"name": "full"})
        samples = _train_samples(full)
        per_s: dict[str, list[float]] = {name: [] for name in ARMS}
        for round_ in range(rounds + (0 if args.quick else 1)):  # a warm-up round first
            for name, (workers, threads) in ARMS.items():
                seconds = run(workers, threads, full)["seconds"][1:]
                if round_ > 0 or args.quick:
                    per_s[name].append(samples / statistics.fmean(seconds))
        blocks = {"name": "early_gradual", "freeze_epochs": 1, "blocks_per_epoch": 1}
        gradual = run(2, 1, {**job_config(args, Path(folder), blocks), "epochs": 3})
    stats = {name: Stat.of(values) for name, values in per_s.items()}
    one, two = stats["1 worker, 2 threads"], stats["2 workers, 1 thread each"]
    rows = gradual["rows"]
    # Each epoch after the first opens a block: the wrap seconds it added, over its steps'.
    wraps = [b["ddp_wrap_seconds"] - a["ddp_wrap_seconds"] for a, b in itertools.pairwise(rows)]
    shares = [w / s for w, s in zip(wraps, gradual["seconds"][1:], strict=True)]
    print(table([[name, str(s)] for name, s in stats.items()], ["arm", "train samples/s"]))
    print(f"\n2 workers / 1 worker (2 threads): {two.median / one.median:.3f}")
    print(
        "re-wrap at an unfreeze event: "
        + ", ".join(
            f"{w * 1000:.1f} ms ({100 * s:.2f}% of its epoch's steps)"
            for w, s in zip(wraps, shares, strict=True)
        )
    )
    print(f"{time.perf_counter() - started:.0f}s")
    report(
        args.json,
        "data_parallel",
        {
            **stats,
            "ratio_2_workers_to_1": two.median / one.median,
            "rewrap_seconds": wraps,
            "rewrap_share_of_epoch": shares,
        },
    )
    return 0


def _train_samples(values: dict[str, Any]) -> int:
    """Training samples per epoch (the digits folder's train split, or the synthetic count)."""
    data = values["data"]
    if data["kind"] == "image_folder":
        return sum(1 for p in (Path(data["root"]) / "train").rglob("*") if p.is_file())
    return int(data["train_samples"])


if __name__ == "__main__":
    sys.exit(main())
