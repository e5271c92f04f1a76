from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from unfreeze_hpo import Unfreezer, train
from unfreeze_hpo.config import from_dict
from unfreeze_hpo.errors import AuditError, ConfigError
from unfreeze_hpo.models import build

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny"},
    "data": {"kind": "synthetic_video", "train_samples": 32, "val_samples": 16},
    "strategy": {
        "name": "early_gradual",
        "freeze_epochs": 1,
        "blocks_per_epoch": 2,
        "target_ratio": 1.0,
    },
    "optimizer": {
        "lr": 0.01,
        "backbone_lr_mult": 0.5,
        "layer_decay": 0.8,
        "unfreeze_warmup_steps": 3,
    },
    "epochs": 4,
    "batch_size": 8,
}


def test_a_user_loop_gets_the_plans_and_lrs_the_trial_loop_used(tmp_path: Path) -> None:
    cfg = from_dict({**SCHEDULE, "output_dir": str(tmp_path / "trial")})
    train.run(cfg, log=lambda _: None)
    rows = [
        json.loads(line)["metrics"]
        for line in (tmp_path / "trial" / "metrics.jsonl").read_text().splitlines()
    ]

    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    model = build(cfg.model.spec(4))
    unfreezer = Unfreezer.from_schedule(path, model, steps_per_epoch=4)
    clips, labels = torch.randn(8, 3, 4, 32, 32), torch.randint(0, 4, (8,))
    for epoch, row in enumerate(rows):
        unfreezer.on_epoch_start(epoch)
        for _ in range(4):
            unfreezer.step()
            torch.nn.functional.cross_entropy(model(clips), labels).backward()
            unfreezer.optimizer.step()
            unfreezer.optimizer.zero_grad(set_to_none=True)
        status = unfreezer.on_epoch_end({"val_acc": row["val_acc"]})
        assert len(status.unfrozen) == row["unfrozen_blocks"]
        lrs = {f"lr/{name}": lr for name, lr in unfreezer.freezer.lrs().items()}
        assert lrs == pytest.approx({k: v for k, v in row.items() if k.startswith("lr/")})


def test_state_dict_round_trip_continues_the_same_schedule(tmp_path: Path) -> None:
    cfg = from_dict({**SCHEDULE, "strategy": {"name": "adaptive", "patience": 1}})
    first = Unfreezer.from_schedule(cfg, build(cfg.model.spec(4)), steps_per_epoch=2)
    for epoch, metric in enumerate([0.5, 0.5]):
        first.on_epoch_start(epoch)
        first.step()
        first.on_epoch_end({"val_acc": metric})
    second = Unfreezer.from_schedule(cfg, build(cfg.model.spec(4)), steps_per_epoch=2)
    second.load_state_dict(first.state_dict())
    assert second.on_epoch_start(2) == first.on_epoch_start(2)
    assert second.history == [0.5, 0.5] and second.global_step == first.global_step


def test_missing_metric_and_tampering_are_reported() -> None:
    cfg = from_dict(SCHEDULE)
    model = build(cfg.model.spec(4))
    unfreezer = Unfreezer.from_schedule(cfg, model, steps_per_epoch=1)
    unfreezer.on_epoch_start(0)
    with pytest.raises(ConfigError, match="val_acc"):
        unfreezer.on_epoch_end({"accuracy": 0.5})
    next(model.parameters()).requires_grad_(True)  # the stem is frozen at epoch 0
    with pytest.raises(AuditError):
        unfreezer.on_epoch_end({"val_acc": 0.5})
