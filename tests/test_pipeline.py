"""The accelerator pipeline of a trial: loaders built once with seeded per-sample randomness,
a step that reads nothing back, bounded memory, gradient accumulation, activation
checkpointing, checkpoints by policy and the progress bar."""

from __future__ import annotations

import copy
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from unfreeze_hpo import train, trialdir
from unfreeze_hpo.config import TrialConfig, from_dict
from unfreeze_hpo.data import loading
from unfreeze_hpo.errors import ConfigError
from unfreeze_hpo.train import checkpoints, drift, loop, step

pytestmark = pytest.mark.usefixtures("one_thread")

# A ViT without BatchNorm, small enough for CPU: batches split into micro-batches give the
# same gradients, so accumulation can be compared with one large batch.
TINY_VIT = {
    "name": "timm:vit_tiny_patch16_224",
    "kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
}
SYNTHETIC_IMAGES = {"kind": "synthetic_image", "train_samples": 32, "val_samples": 16, "size": 32}


def quiet(line: str) -> None:
    pass


def rows(out: Path) -> list[dict[str, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["metrics"] for line in lines if line.strip()]


def textured_folder(root: Path, n: int = 6) -> Path:
    """Two classes of 48-px noise images: random crops and flips change every pixel."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def image_cfg(tmp_path: Path, out: str, **changes: Any) -> TrialConfig:
    values: dict[str, Any] = {
        "model": {"name": "timm:test_resnet"},
        "data": {"kind": "image_folder", "root": str(tmp_path / "images"), "size": 32},
        "epochs": 3,
        "batch_size": 4,
        "strategy": {"name": "early_gradual", "freeze_epochs": 1, "target_ratio": 1.0},
        "output_dir": str(tmp_path / out),
        **changes,
    }
    return from_dict(values)


def synthetic_cfg(tmp_path: Path, **changes: Any) -> TrialConfig:
    """A small run on synthetic images: the tiny ViT, 1 epoch of 4 steps, no loader workers."""
    values: dict[str, Any] = {
        "data": SYNTHETIC_IMAGES,
        "model": TINY_VIT,
        "epochs": 1,
        "batch_size": 8,
        "num_workers": 0,
        "output_dir": str(tmp_path / "t"),
        **changes,
    }
    return from_dict(values)


# --- 1. loaders: built once, each sample a function of (seed, epoch, index) ----------------


def epoch_batches(cfg: TrialConfig, epoch: int) -> list[torch.Tensor]:
    trial = train.setup(cfg, quiet)
    try:
        return [inputs for inputs, _ in loading.batches(trial.loaders.train, epoch)]
    finally:
        trial.loaders.close()


def test_an_epoch_of_augmented_batches_is_the_same_with_or_without_workers(
    tmp_path: Path,
) -> None:
    textured_folder(tmp_path / "images")
    alone = epoch_batches(image_cfg(tmp_path, "a", num_workers=0), epoch=1)
    workers = epoch_batches(image_cfg(tmp_path, "b", num_workers=2), epoch=1)
    assert len(alone) == len(workers) == 3
    assert all(torch.equal(a, b) for a, b in zip(alone, workers, strict=True))
    # Another epoch draws other crops and another order.
    other = epoch_batches(image_cfg(tmp_path, "c", num_workers=0), epoch=2)
    assert not torch.equal(torch.cat(alone), torch.cat(other))


def test_a_loader_without_workers_leaves_the_training_processs_random_states_alone(
    tmp_path: Path,
) -> None:
    # Each sample is drawn under its own seeds; the training process's streams go on as if the
    # batches had not been drawn (its dropout, mixup and init draw from them).
    textured_folder(tmp_path / "images")
    trial = train.setup(image_cfg(tmp_path, "a", num_workers=0), quiet)
    try:
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        expected = torch.rand(3), random.random(), np.random.rand()
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        assert len(list(loading.batches(trial.loaders.train, 1))) == 3
        assert torch.equal(torch.rand(3), expected[0])
        assert (random.random(), np.random.rand()) == expected[1:]
    finally:
        trial.loaders.close()


def test_a_run_resumed_with_loader_workers_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    textured_folder(tmp_path / "images")
    whole = image_cfg(tmp_path, "whole", num_workers=2)
    train.run(whole, log=quiet)
    part = image_cfg(tmp_path, "part", num_workers=2)

    def interrupt(metrics: dict[str, float], path: Path | None) -> None:
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(part, interrupt, log=quiet)
    train.run(part, resume=True, log=quiet)
    volatile = ("epoch_seconds", "peak_memory_mb")
    expected = [
        {k: v for k, v in r.items() if k not in volatile} for r in rows(Path(whole.output_dir))
    ]
    resumed = [
        {k: v for k, v in r.items() if k not in volatile} for r in rows(Path(part.output_dir))
    ]
    assert resumed == expected
    a = torch.load(Path(whole.output_dir) / trialdir.CHECKPOINT, weights_only=True)["model"]
    b = torch.load(Path(part.output_dir) / trialdir.CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loaders_are_built_once_and_workers_default_to_the_trials_cpus_minus_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    original = loading.loader

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs["workers"])
        return original(*args, **kwargs)

    monkeypatch.setattr(loading, "loader", counting)
    cfg = synthetic_cfg(tmp_path, model={"name": "timm:test_resnet"}, epochs=2, num_workers=None)
    train.run(cfg, log=quiet, cpus=2)
    assert built == [1, 1]  # train and val, once for the whole trial, 2 CPUs - 1
    assert loading.default_workers(1) == 0 and loading.default_workers(8) == 7
    assert loading.default_workers() == max(0, loading.available_cpus() - 1)


def test_a_loader_for_cuda_pins_memory_and_keeps_its_workers_with_their_prefetch() -> None:
    # Built, not iterated: no GPU is needed to see the options a CUDA trial's loader gets.
    data = torch.utils.data.TensorDataset(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long))

    def build(device: str, workers: int) -> Any:
        return loading.loader(
            data,
            batch_size=4,
            seed=0,
            shuffle=True,
            workers=workers,
            device=torch.device(device),
            prefetch_factor=3,
        )

    cuda = build("cuda", 2)
    assert (cuda.pin_memory, cuda.persistent_workers, cuda.prefetch_factor) == (True, True, 3)
    cpu = build("cpu", 2)
    assert (cpu.pin_memory, cpu.persistent_workers) == (False, True)
    alone = build("cuda", 0)  # no workers: nothing to keep or prefetch
    assert (alone.pin_memory, alone.persistent_workers, alone.prefetch_factor) == (
        True,
        False,
        None,
    )


# --- 2. a step without host syncs ------------------------------------------------------------

# Every way a tensor's value reaches Python. (``.to("cpu")`` is one too on an accelerator; on
# the CPU these tests run on it cannot be told from the step's own ``.to(device)``.)
READS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += getattr(func, "__name__", "") in READS
        return func(*args, **(kwargs or {}))


def test_the_host_read_counter_sees_every_kind_of_read() -> None:
    t = torch.ones(3)
    with HostReads() as reads:
        t.sum().item()
        float(t.sum())
        int(t.sum())
        bool(t.sum() > 0)
        t.tolist()
        t.cpu()
        t.numpy()
        if t.sum() > 0:
            pass
    assert reads.count == 8


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_a_training_epoch_reads_from_the_device_once_per_read_every_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: str
) -> None:
    if amp == "fp16":
        from support import cpu_fp16_autocast

        if not cpu_fp16_autocast():
            pytest.skip("this torch has no fp16 autocast on CPU")
    monkeypatch.setattr(step, "READ_EVERY", 8)
    per_epoch: list[tuple[int, int]] = []
    original = loop._train_epoch

    def counted(trial: train.Trial, *args: Any, **kwargs: Any) -> dict[str, float]:
        steps_before = args[1].step
        with HostReads() as reads:
            result = original(trial, *args, **kwargs)
        per_epoch.append((reads.count, args[1].step - steps_before))
        return result

    monkeypatch.setattr(loop, "_train_epoch", counted)
    data = {**SYNTHETIC_IMAGES, "train_samples": 64}
    cfg = synthetic_cfg(
        tmp_path,
        data=data,
        model={"name": "timm:test_resnet"},
        epochs=2,
        batch_size=4,
        amp=amp,
        num_workers=1,
    )
    train.run(cfg, log=quiet)
    for count, steps in per_epoch:
        assert steps == 16
        # 16 steps read in 2 batches of 8; the rest is the epoch's order (one tolist of the
        # sampler's permutation) and, in the first epoch, the loader seeding its workers.
        assert count <= math.ceil(steps / 8) + 2, per_epoch


def test_a_skipped_step_leaves_the_fused_optimizer_untouched_on_the_device(
    tmp_path: Path,
) -> None:
    cfg = synthetic_cfg(tmp_path)
    trial = train.setup(cfg, quiet)
    trial.unfreezer.on_epoch_start(0)
    assert trial.optimizer.defaults.get("fused") is True
    params = [p for p in trial.model.parameters() if p.requires_grad]
    inputs, labels = next(loading.batches(trial.loaders.train, 0))
    train.train_step(trial, inputs, labels, params)  # one real step: optimizer state exists
    state = copy.deepcopy(trial.optimizer.state_dict())
    weights = copy.deepcopy(trial.model.state_dict())
    outcome = train.train_step(trial, torch.full_like(inputs, math.nan), labels, params)
    assert outcome.read()[2] == "nonfinite_loss"
    assert all(torch.equal(weights[k], v) for k, v in trial.model.state_dict().items())
    after = trial.optimizer.state_dict()["state"]
    for key, saved in state["state"].items():
        assert all(torch.equal(saved[n], after[key][n]) for n in saved)


# --- 3. bounded memory -----------------------------------------------------------------------


def test_the_drift_probe_copies_only_trainable_parameters_to_the_host_in_their_dtype(
    tmp_path: Path,
) -> None:
    cfg = synthetic_cfg(tmp_path)
    trial = train.setup(cfg, quiet)
    trial.model.to(torch.bfloat16)
    trial.unfreezer.on_epoch_start(0)
    plan = trial.unfreezer.plan
    assert plan is not None
    shot = drift.snapshot(trial.model, trial.blocks, plan)
    n_blocks = len(trial.blocks)
    trainable = {i for i in range(n_blocks) if plan.is_trainable(i)} | {n_blocks}
    assert set(shot.copies) == {
        i for i in trainable if (*trial.blocks.blocks, trial.blocks.head)[i].params
    }
    assert all(
        t.dtype == torch.bfloat16 and t.device.type == "cpu"
        for copies in shot.copies.values()
        for t in copies
    )
    frozen = set(shot.fingerprints)
    assert frozen and not frozen & set(shot.copies)
    assert all(f.shape[1] == 2 for f in shot.fingerprints.values())


def test_peak_memory_is_each_epochs_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = loop._train_epoch

    def heavy_first_epoch(trial: train.Trial, *args: Any, **kwargs: Any) -> dict[str, float]:
        if args[2] == 0:
            ballast = torch.ones(64 * 2**20)  # 256 MiB, touched
            del ballast
        return original(trial, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", heavy_first_epoch)
    cfg = synthetic_cfg(tmp_path, epochs=2)
    train.run(cfg, log=quiet)
    first, second = (r["peak_memory_mb"] for r in rows(tmp_path / "t"))
    assert second > 0
    assert first - second > 200, (first, second)


def test_gradient_accumulation_equals_one_larger_batch_with_steps_counted_as_optimizer_steps(
    tmp_path: Path,
) -> None:
    common: dict[str, Any] = {
        "epochs": 2,
        "strategy": {"name": "early_gradual", "freeze_epochs": 1, "target_ratio": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
    }
    big = synthetic_cfg(tmp_path, output_dir=str(tmp_path / "big"), **common)
    small = synthetic_cfg(
        tmp_path,
        batch_size=4,
        optimizer={"accumulate_steps": 2},
        output_dir=str(tmp_path / "small"),
        **common,
    )
    train.run(big, log=quiet)
    train.run(small, log=quiet)
    for a, b in zip(rows(tmp_path / "big"), rows(tmp_path / "small"), strict=True):
        assert a["step"] == b["step"] == 4 * (a["epoch"] + 1)
        assert {k: v for k, v in a.items() if k.startswith("lr/")} == {
            k: v for k, v in b.items() if k.startswith("lr/")
        }
        for key in ("train_loss", "val_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_grad_checkpointing_trains_what_is_trainable_behind_frozen_blocks(tmp_path: Path) -> None:
    plain = synthetic_cfg(tmp_path, epochs=2, output_dir=str(tmp_path / "a"))
    saving = synthetic_cfg(
        tmp_path,
        epochs=2,
        model={**TINY_VIT, "grad_checkpointing": True},
        output_dir=str(tmp_path / "b"),
    )
    trial = train.setup(saving, quiet)
    assert trial.model.grad_checkpointing
    train.run(plain, log=quiet)
    train.run(saving, log=quiet)
    for a, b in zip(rows(tmp_path / "a"), rows(tmp_path / "b"), strict=True):
        assert b["drift_stuck_groups"] == 0 and b["drift_moved_frozen_groups"] == 0
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["unfrozen_blocks"] == a["unfrozen_blocks"]


def test_grad_checkpointing_on_a_model_without_it_is_one_clear_error(tmp_path: Path) -> None:
    cfg = from_dict(
        {
            "model": {"name": "pytorchvideo:resnet3d_tiny", "grad_checkpointing": True},
            "output_dir": str(tmp_path / "t"),
        }
    )
    with pytest.raises(ConfigError) as caught:
        train.setup(cfg, quiet)
    (problem,) = caught.value.problems
    assert problem.field == "model.grad_checkpointing"
    assert "set_grad_checkpointing" in problem.message and "timm" in problem.fix


# --- 4. checkpoints by policy; progress ------------------------------------------------------


def test_checkpoint_every_n_epochs_and_always_the_last(tmp_path: Path) -> None:
    cfg = synthetic_cfg(tmp_path, model={"name": "timm:test_resnet"}, epochs=5, batch_size=16)
    seen: list[tuple[int, int | None]] = []

    def report(metrics: dict[str, float], path: Path | None) -> None:
        saved = None if path is None else torch.load(path, weights_only=True)["loop"]["epoch"]
        seen.append((int(metrics["epoch"]), saved))

    train.run(cfg, report, log=quiet, checkpoint_every=2)
    assert seen == [(0, None), (1, 2), (2, None), (3, 4), (4, 5)]
    with pytest.raises(ConfigError, match="--checkpoint-every"):
        train.run(cfg, log=quiet, checkpoint_every=0)


def test_checkpoints_never_make_a_name_in_the_trial_folder_disappear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Tune copies a trial's folder while it runs: a file listed, then renamed away before
    it is copied, fails the experiment snapshot. Every rename into the folder keeps every name
    there, and no temporary file ever shows in it."""
    cfg = synthetic_cfg(tmp_path, model={"name": "timm:test_resnet"}, epochs=3)
    out = Path(cfg.output_dir)
    seen: list[tuple[set[str], set[str]]] = []
    original = os.replace

    def replace(src: Any, dst: Any) -> None:
        before = set(os.listdir(out)) if out.exists() else set()
        original(src, dst)
        seen.append((before, set(os.listdir(out))))

    monkeypatch.setattr(checkpoints.os, "replace", replace)
    train.run(cfg, log=quiet)
    assert len(seen) == 5  # the first epoch's file; then the previous and the latest, twice
    for before, after in seen:
        assert before <= after, before - after
        assert not [name for name in after if name.endswith(".tmp")], after
    assert {trialdir.CHECKPOINT, trialdir.PREVIOUS} <= seen[-1][1]


def test_progress_bar_within_an_epoch_only_when_asked(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = synthetic_cfg(tmp_path, model={"name": "timm:test_resnet"})
    train.run(cfg, log=quiet, progress=True)
    err = capfd.readouterr().err
    assert "epoch 0 step 4/4" in err and "img/s" in err and "loss" in err
    train.run(cfg, log=quiet)
    assert capfd.readouterr().err == ""
