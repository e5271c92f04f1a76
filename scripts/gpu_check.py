"""The GPU check: a trial of the real case on CUDA, in bf16 and fp16, beside a bare timm loop.

CI never runs this. It needs only torch, torchvision, timm and unfreeze_hpo's pure-Python code
(no Ray, Optuna, pytorchvideo or PyAV), so it runs on a lent GPU machine with nothing installed.
The data and weights are prepared here first (the `real` extra), into a folder that travels:

    .venv/bin/python scripts/gpu_check.py --prepare .gpu_check          # here, once
    python scripts/gpu_check.py --data .gpu_check --quick               # on the GPU (sized: < 60 s)
    python scripts/gpu_check.py --data .gpu_check --out gpu_check.md    # on the GPU (< 4 min)
    .venv/bin/python scripts/gpu_check.py --data .gpu_check --quick --dry-run   # the script
                                                                        # itself, on CPU at 16 px

Arms, each a fine-tuning of ImageNet EfficientNet-Lite0 on the real digits (train/val/test
897/450/450 images) at the model's preprocessing (224 px), batch 64, the last of 2 epochs
measured (``benchmarks/throughput.py`` runs them): ours in bf16 and in fp16 (skipped steps
counted), the bare timm loop in bf16, and, in full mode, both with ``channels_last``. Then two of
our bf16 trials share the GPU as two processes at once. The table gives train images/s, ours /
bare, validation and checkpoint seconds, host reads per training step (device-to-host only), peak
GPU memory per trial and the fp16 skips; it is printed and written to ``--out``.

Last, the data-parallel arm: a trial on 2 ranks sharing the one GPU over gloo (NCCL takes one
GPU per rank), an early_gradual schedule across two unfreeze events on a model without
BatchNorm (``data_parallel.VIT``), against the same trial in one process with the same global
batch. The loop's audits fail the 2-rank run unless every step all-reduces exactly the trainable
parameters and the replicas are identical after every epoch; the table adds the largest relative
difference of the losses, accuracy and gradient norm between the two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import data_parallel  # noqa: E402
import throughput  # noqa: E402
import torch  # noqa: E402

DRY_RUN = {"device": "cpu", "size": 16, "batch_size": 8, "workers": 1}


def job(data: Path, dry_run: bool, **changes: Any) -> dict[str, Any]:
    return {
        "root": str(data / "digits"),
        "weights": str(data / "lite0.pth"),
        "device": "cuda",
        "amp": "bf16",
        "workers": max(0, min(8, (os.cpu_count() or 1) // 2 - 1)),
        "size": None,  # the model's own preprocessing
        "batch_size": 64,
        "epochs": 2,
        "channels_last": False,
        **(DRY_RUN if dry_run else {}),
        **changes,
    }


def single(args: argparse.Namespace) -> int:
    """One of our trials (the two-process arm runs two of these at once)."""
    figures = throughput.ours(job(args.data, args.dry_run))
    Path(args.single).write_text(json.dumps(figures))
    return 0


def two_processes(data: Path, dry_run: bool) -> list[dict[str, float]]:
    """Two of our bf16 trials at once, each its own process on the one GPU."""
    with tempfile.TemporaryDirectory() as folder:
        outs = [Path(folder) / f"trial{i}.json" for i in range(2)]
        argv = [sys.executable, __file__, "--data", str(data), *["--dry-run"] * dry_run]
        argv.append("--single")
        procs = [subprocess.Popen([*argv, str(out)]) for out in outs]
        if any(p.wait() for p in procs):
            raise RuntimeError("a trial of the two-process arm failed (its output is above)")
        return [json.loads(out.read_text()) for out in outs]


def row(name: str, f: dict[str, float], bare: float | None = None) -> list[str]:
    share = f"{f['images_per_s'] / bare:.3f}" if bare else ""
    skipped = f"{f['amp_skipped']:.0f}" if "amp_skipped" in f else ""
    return [
        name,
        f"{f['images_per_s']:.0f}",
        share,
        f"{f['val_s']:.2f}",
        f"{f['checkpoint_s']:.2f}",
        f"{f['reads_per_step']:.3f}",
        f"{f.get('peak_memory_mb', float('nan')):.0f}",
        skipped,
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", type=Path, help="write the digits and weights here, then stop")
    p.add_argument("--data", type=Path, help="the folder --prepare wrote")
    p.add_argument("--quick", action="store_true", help="bf16, fp16, bare, two processes: < 60 s")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.md")
    p.add_argument("--per-class", type=int, help="--prepare: digits per class (default all)")
    p.add_argument("--dry-run", action="store_true", help="check the script itself on CPU")
    p.add_argument("--single", help=argparse.SUPPRESS)  # internal: one trial, figures to a file
    args = p.parse_args()
    if args.prepare:
        throughput.prepare(args.prepare, per_class=args.per_class)
        print(f"prepared {args.prepare}: digits/ and lite0.pth")
        return 0
    if args.data is None or not (args.data / "lite0.pth").is_file():
        print("give --data, the folder `--prepare` wrote (digits/ and lite0.pth)", file=sys.stderr)
        return 2
    if not (torch.cuda.is_available() or args.dry_run):
        print("no CUDA device here: this check runs on a GPU machine", file=sys.stderr)
        return 2
    if args.single:
        return single(args)
    started = time.perf_counter()
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    arms: dict[str, dict[str, Any]] = {
        "ours bf16": {},
        "bare bf16": {},
        "ours fp16": {"amp": "fp16"},
    }
    if not args.quick:
        arms["ours bf16 channels_last"] = {"channels_last": True}
        arms["bare bf16 channels_last"] = {"channels_last": True}
    results: dict[str, dict[str, float]] = {}
    for label, changes in arms.items():
        run = throughput.bare if label.startswith("bare") else throughput.ours
        if not args.dry_run:
            torch.cuda.reset_peak_memory_stats()
        results[label] = run(job(args.data, args.dry_run, **changes))
        print(f"{label}: {results[label]['images_per_s']:.0f} images/s", flush=True)
    pair = two_processes(args.data, args.dry_run)
    # Two ranks on the one device (the dry run: on the CPU, a quarter of the samples).
    ranks = {**data_parallel.VIT, "device": "cpu" if args.dry_run else "cuda"}
    if args.dry_run:
        ranks["data"] = {**ranks["data"], "train_samples": 32, "val_samples": 16}
    agreed = data_parallel.agreement(ranks)
    bare = results["bare bf16"]["images_per_s"]
    rows = [
        row(label, f, None if label.startswith("bare") else bare) for label, f in results.items()
    ]
    rows += [row(f"ours bf16, 2 processes: trial {i}", f) for i, f in enumerate(pair)]
    header = [
        "arm",
        "train images/s",
        "ours/bare",
        "val s",
        "checkpoint s",
        "host reads/step",
        "peak MiB",
        "fp16 skipped",
    ]
    shape = job(args.data, args.dry_run)
    lines = [
        f"GPU check, {name}, torch {torch.__version__}: {throughput.VARIANT} on the digits at "
        f"{shape['size'] or 224} px, batch {shape['batch_size']}, {shape['workers']} loader "
        "workers, last of 2 epochs",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        f"two processes together: {sum(f['images_per_s'] for f in pair):.0f} images/s",
        "",
        f"data-parallel, 2 ranks on one device over gloo, {agreed['events']:.0f} unfreeze events: "
        "audits passed (all-reduce covers the trainable parameters, replicas identical); "
        "largest relative difference from one process: "
        + ", ".join(f"{key} {agreed[key]:.1e}" for key in data_parallel.AGREED),
        f"{time.perf_counter() - started:.0f} s in all",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
