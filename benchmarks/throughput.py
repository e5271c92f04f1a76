"""Training throughput of one trial: our loop (``train.run``) against a bare timm + PyTorch loop,
side by side on the real case (ImageNet EfficientNet-Lite0 fine-tuned on scikit-learn's digits):
train images/s, validation and checkpoint seconds apart, and host reads per training step.

    .venv/bin/python benchmarks/throughput.py              # 3 rounds, 64 px, ~1 min on 2 cores
    .venv/bin/python benchmarks/throughput.py --quick      # 1 round, 40 images at 16 px, ~15 s
    .venv/bin/python benchmarks/throughput.py --workers 0 1 --json throughput.json
    .venv/bin/python benchmarks/throughput.py --before none   # without the loop of 803c8c9

Both arms fine-tune the whole model (``strategy: full``) from the same weights file on the same
digits image folder (``samples.write_digits``: train/val/test 200/100/100 images), with the same
timm transforms (the model's, at ``--size`` px), batch ``--batch-size``, fused AdamW (lr 1e-3,
weight decay 0.01), gradient clipping at 1.0, the same amp mode, and the same number of loader
workers, each loader built once and kept. The bare arm is what a timm user writes: an
``ImageFolder`` and a ``DataLoader(shuffle=True, persistent_workers=True)``, no per-step reads;
it imports nothing from unfreeze_hpo. Each run trains ``--epochs`` epochs; the last one is
measured (the first warms the workers, the allocator and the page cache): its training steps
(images/s), its validation and its checkpoint (ours: ``checkpoint.pt``, atomically; bare: one
``torch.save`` of model and optimizer). Runs alternate ours, bare, ... (``common.interleave``).

``--before REV`` (default ``803c8c9``, the loop before its data pipeline and step were rebuilt for
accelerators: loaders rebuilt every epoch, ``loss.item()`` and the gradient norm read every step)
adds a third arm: the same job through ``train.run`` of the package as it was at that commit
(``git archive`` into a temporary folder, run in a child process with it first on the path), so
one run prints before and after side by side. It needs the checkout's git history; ``--quick``
leaves it out unless asked.

Host reads are counted over the measured epoch's training steps by a ``TorchFunctionMode`` that
sees every ``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``, ``.cpu()`` and
``.numpy()``: on CUDA only those of tensors on the GPU (device-to-host copies), on the CPU all.

``scripts/gpu_check.py`` runs the same two arms on a GPU; it imports this module, which needs
only torch, torchvision, timm and the package's pure-Python code at import.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

VARIANT = "tf_efficientnet_lite0"
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 0.01, 1.0
READS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by the host: of accelerator tensors only, when
    ``device_only``."""

    def __init__(self, device_only: bool) -> None:
        super().__init__()
        self.device_only, self.count = device_only, 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in READS:
            on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
            self.count += on_device or not (self.device_only or _optimizer_internal())
        return func(*args, **(kwargs or {}))


def _optimizer_internal() -> bool:
    """Whether the read is a torch optimizer's of its own state: a non-fused optimizer's step
    counters live on the host on every device, so on a GPU these reads are no device sync."""
    caller = sys._getframe(2).f_code.co_filename
    return f"{os.sep}torch{os.sep}optim{os.sep}" in caller


class Clock:
    """Seconds of the blocks it times, the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds = time.perf_counter() - start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def prepare(folder: Path, per_class: int | None = 40) -> dict[str, str]:
    """The digits image folder (``per_class`` images of each digit, None: all 1,797) and the
    weights file (needs the `real` extra)."""
    from unfreeze_hpo import samples

    root = samples.write_digits(
        folder / "digits", size=32, per_class=per_class, splits=(0.5, 0.25, 0.25)
    )
    weights = samples.write_efficientnet_lite0(folder / "lite0.pth")
    return {"root": str(root), "weights": str(weights)}


def ours(job: dict[str, Any]) -> dict[str, float]:
    """One ``train.run`` of the job; the last epoch's figures."""
    from unfreeze_hpo import train, trialdir
    from unfreeze_hpo.config import from_dict

    device = torch.device(job["device"])
    last = job["epochs"] - 1
    figures: dict[str, float] = {}
    hooks = _hooks(train)
    original = [getattr(module, name) for module, name in hooks]

    def train_epoch(trial: Any, monitor: Any, state: Any, epoch: int, **kw: Any) -> Any:
        steps, clock = state.step, Clock(device)
        with clock.timing(), HostReads(device.type != "cpu") as reads:
            out = original[0](trial, monitor, state, epoch, **kw)
        if epoch == last:
            figures["train_s"] = clock.seconds
            figures["images"] = len(trial.datasets.train)
            figures["reads_per_step"] = reads.count / (state.step - steps)
        return out

    def evaluate(trial: Any, split: str = "val") -> Any:
        clock = Clock(device)
        with clock.timing():
            out = original[1](trial, split)
        if split == "val" and len(trial.unfreezer.history) == last:  # before its epoch ends
            figures["val_s"] = clock.seconds
        return out

    def save(trial: Any, monitor: Any, state: Any, out: Path) -> Path:
        clock = Clock(device)
        with clock.timing():
            path = original[2](trial, monitor, state, out)
        figures["checkpoint_s"] = clock.seconds  # the last epoch's is the one kept
        return path

    def setup(*args: Any, **kwargs: Any) -> Any:
        trial = original[3](*args, **kwargs)
        if job["channels_last"]:
            trial.model.to(memory_format=torch.channels_last)
        return trial

    size = {"size": job["size"]} if job["size"] else {}
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict(
            {
                "model": {"name": f"timm:{VARIANT}", "pretrained_file": job["weights"]},
                "data": {"kind": "image_folder", "root": job["root"], **size},
                "optimizer": {"lr": LR, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP},
                "strategy": {"name": "full"},
                "epochs": job["epochs"],
                "batch_size": job["batch_size"],
                "amp": job["amp"],
                "device": job["device"],
                "num_workers": job["workers"],
                "output_dir": out,
            }
        )
        for (module, name), hook in zip(hooks, (train_epoch, evaluate, save, setup), strict=True):
            setattr(module, name, hook)
        try:
            train.run(cfg, log=lambda _: None)
            final = trialdir.read_rows(Path(out))[-1]
            figures["peak_memory_mb"] = final.get("peak_memory_mb", float("nan"))
            figures["amp_skipped"] = final["amp_skipped_total"]
        finally:
            for (module, name), function in zip(hooks, original, strict=True):
                setattr(module, name, function)
    figures["images_per_s"] = figures["images"] / figures["train_s"]
    return figures


def _hooks(train: Any) -> list[tuple[Any, str]]:
    """Where ``train.run`` looks up its epoch, validation, checkpoint and setup functions: the
    package's loop (the ``train.py`` module of the ``--before`` commit held them all)."""
    loop = getattr(train, "loop", None)
    if loop is None:
        return [(train, name) for name in ("_train_epoch", "evaluate", "_save_checkpoint", "setup")]
    saver = (train.checkpoints, "save")
    return [(loop, "_train_epoch"), (loop, "evaluate"), saver, (loop, "setup")]


def bare(job: dict[str, Any]) -> dict[str, float]:
    """The same fine-tuning written with timm and torch only; the last epoch's figures."""
    import timm
    from timm.data import create_transform, resolve_model_data_config
    from timm.optim import param_groups_weight_decay
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    device = torch.device(job["device"])
    torch.manual_seed(0)
    model = timm.create_model(
        VARIANT, pretrained=True, num_classes=10, pretrained_cfg_overlay={"file": job["weights"]}
    )
    data_cfg = resolve_model_data_config(model)
    if job["size"]:
        data_cfg = {**data_cfg, "input_size": (3, job["size"], job["size"])}
    root = Path(job["root"])
    train_set = ImageFolder(str(root / "train"), create_transform(**data_cfg, is_training=True))
    val_set = ImageFolder(str(root / "val"), create_transform(**data_cfg, is_training=False))
    workers, cuda = job["workers"], device.type == "cuda"
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": cuda}
    if workers:
        options["persistent_workers"] = True
    train_loader = DataLoader(train_set, job["batch_size"], shuffle=True, **options)
    val_loader = DataLoader(val_set, job["batch_size"], **options)
    model.to(device)
    memory = torch.channels_last if job["channels_last"] else torch.contiguous_format
    model.to(memory_format=memory)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, WEIGHT_DECAY), lr=LR, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=job["amp"] == "fp16")
    figures: dict[str, float] = {}

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    with tempfile.TemporaryDirectory() as out:
        for _ in range(job["epochs"]):
            model.train()
            clock, steps = Clock(device), 0
            with clock.timing(), HostReads(device.type != "cpu") as reads:
                for inputs, labels in train_loader:
                    inputs = inputs.to(device, non_blocking=True, memory_format=memory)
                    labels = labels.to(device, non_blocking=True)
                    with autocast():
                        logits = model(inputs)
                    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    steps += 1
            figures.update(train_s=clock.seconds, reads_per_step=reads.count / steps)
            model.eval()
            with clock.timing(), torch.no_grad():
                correct = torch.zeros((), device=device, dtype=torch.int64)
                for inputs, labels in val_loader:
                    with autocast():
                        logits = model(inputs.to(device, non_blocking=True, memory_format=memory))
                    correct += (logits.argmax(1) == labels.to(device)).sum()
                correct.item()
            figures["val_s"] = clock.seconds
            with clock.timing():
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                torch.save(state, Path(out) / "checkpoint.pt")
            figures["checkpoint_s"] = clock.seconds
    if cuda:
        figures["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    figures["images_per_s"] = len(train_set) / figures["train_s"]
    return figures


def before(job: dict[str, Any]) -> dict[str, float]:
    """``ours`` with the package as it was at ``job["before"]`` (extracted to
    ``job["before_root"]``), in a child process; the last epoch's figures."""
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([job["before_root"], here])}
    child = subprocess.run(
        [sys.executable, __file__, "--arm-job", json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
    )
    if child.returncode:
        raise RuntimeError(f"the {job['before']} arm failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.splitlines()[-1])


def extract(rev: str, folder: Path) -> str:
    """The package at ``rev`` of this checkout, unpacked under ``folder``; its root."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "unfreeze_hpo"], capture_output=True, check=False
    )
    if archive.returncode:
        raise SystemExit(
            f"--before {rev}: git archive failed ({archive.stderr.decode().strip()}); "
            "run from a git checkout that has the commit, or pass --before none"
        )
    folder.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder)


ARMS: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {
    "ours": ours,
    "bare": bare,
    "before": before,
}


def measure(
    job: dict[str, Any], repeats: int
) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[float]]]:
    """Each arm's figures per round, and its images/s per round, the arms alternating (the
    ``before`` arm only when the job names a commit)."""
    from common import interleave

    names = [name for name in ARMS if name != "before" or job.get("before")]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}

    def arm(name: str) -> Callable[[], float]:
        def call() -> float:
            results[name].append(ARMS[name](job))
            return results[name][-1]["images_per_s"]

        return call

    rates = interleave({name: arm(name) for name in names}, repeats, warmup=0)
    return results, rates


def main() -> int:
    from common import machine, parser, ratio, report, table

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="loader workers, each")
    p.add_argument("--size", type=int, default=64, help="image side the model sees (px)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2, help="per run; the last is measured")
    p.add_argument("--repeats", type=int, default=3, help="rounds of ours, bare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--before",
        default=None,
        help="commit whose train.run is a third arm (default 803c8c9, --quick none); none: no arm",
    )
    p.add_argument("--arm-job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm_job:  # the child of the before arm
        torch.set_num_threads(args.threads)
        print(json.dumps(ours(json.loads(args.arm_job))))
        return 0
    if args.before is None:
        args.before = "none" if args.quick else "803c8c9"
    args.before = None if args.before == "none" else args.before
    per_class = 40
    if args.quick:  # one epoch of 40 training images at 16 px
        args.size, args.repeats, args.batch_size, args.epochs, per_class = 16, 1, 8, 1, 8
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(machine())
    started = time.perf_counter()
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as folder:
        data = prepare(Path(folder), per_class)
        if args.before:
            data["before"] = args.before
            data["before_root"] = extract(args.before, Path(folder) / "before")
        for workers in args.workers:
            job = {
                **data,
                "device": device,
                "amp": "none",
                "workers": workers,
                "size": args.size,
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "channels_last": False,
            }
            results, rates = measure(job, args.repeats)
            share = ratio(rates["ours"], rates["bare"])
            for name in results:
                kept = results[name]
                med = {k: statistics.median(r[k] for r in kept) for k in kept[0]}
                figures[f"workers={workers} {name}"] = med
                rows.append(
                    [
                        workers,
                        name if name != "before" else f"ours at {args.before}",
                        f"{med['images_per_s']:.1f}",
                        f"{med['val_s']:.2f}",
                        f"{med['checkpoint_s']:.2f}",
                        f"{med['reads_per_step']:.3f}",
                    ]
                )
            figures[f"workers={workers} ours/bare"] = {
                "median": share.median,
                "spread": share.spread,
            }
            rows.append([workers, "ours / bare", f"{share}", "", "", ""])
            if args.before:
                gain = ratio(rates["ours"], rates["before"])
                figures[f"workers={workers} ours/before"] = {
                    "median": gain.median,
                    "spread": gain.spread,
                }
                rows.append([workers, f"ours / ours at {args.before}", f"{gain}", "", "", ""])
    header = ["workers", "arm", "train images/s", "val s", "checkpoint s", "host reads/step"]
    print(
        f"{VARIANT}, digits at {args.size} px, batch {args.batch_size}, {device}, "
        f"{args.repeats} round(s), last of {args.epochs} epochs measured"
    )
    print(table(rows, header))
    print(f"{time.perf_counter() - started:.0f}s")
    report(args.json, "throughput", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
