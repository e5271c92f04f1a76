from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from unfreeze_hpo import embedded, train
from unfreeze_hpo.config import TrialConfig, from_dict
from unfreeze_hpo.errors import ConfigError

TINY: dict[str, Any] = {
    "model": {"name": "pytorchvideo:resnet3d_tiny", "pretrain_on_source": True},
    "data": {"kind": "synthetic_video", "train_samples": 32, "val_samples": 16},
    "epochs": 1,
    "batch_size": 16,
}


@pytest.fixture
def small_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[TrialConfig]:
    """A one-epoch, 32-sample source recipe in a private cache; records every pretraining run."""
    monkeypatch.setenv("UNFREEZE_HPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "SOURCE_EPOCHS", 1)
    monkeypatch.setattr(embedded, "SOURCE_SAMPLES", 32)
    runs: list[TrialConfig] = []
    real_run = train.run

    def recording_run(cfg: TrialConfig, *args: Any, **kwargs: Any) -> train.Summary:
        runs.append(cfg)
        return real_run(cfg, *args, **kwargs)

    monkeypatch.setattr(train, "run", recording_run)
    return runs


def cfg_at(tmp_path: Path, **model: Any) -> TrialConfig:
    values = {**TINY, "output_dir": str(tmp_path / "out")}
    values["model"] = {**TINY["model"], **model}
    return from_dict(values)


def test_source_weights_are_trained_once_and_reused(
    small_recipe: list[TrialConfig], tmp_path: Path
) -> None:
    cfg = cfg_at(tmp_path)
    first = embedded.source_checkpoint(cfg, log=lambda _: None)
    second = embedded.source_checkpoint(cfg.replace(seed=7), log=lambda _: None)
    assert first == second and first.is_file()
    assert len(small_recipe) == 1
    source = small_recipe[0]
    assert source.data.task == "source" and source.strategy.name == "full"
    assert source.data.train_samples == 32
    assert torch.load(first, weights_only=True).keys() >= {"blocks.0.conv.weight"}
    assert not list(first.parent.glob("tmp*")), "the work folder is removed"


def test_cache_key_follows_what_the_weights_depend_on(
    small_recipe: list[TrialConfig], tmp_path: Path
) -> None:
    base = cfg_at(tmp_path)
    assert embedded.cache_key(base) == embedded.cache_key(base.replace(seed=3, epochs=9))
    wider = cfg_at(tmp_path, kwargs={"stem_dim_out": 16})
    assert embedded.cache_key(wider) != embedded.cache_key(base)
    bigger = base.replace(data=dataclasses.replace(base.data, size=48))
    assert embedded.cache_key(bigger) != embedded.cache_key(base)


def test_parallel_trials_pretrain_once(small_recipe: list[TrialConfig], tmp_path: Path) -> None:
    cfg = cfg_at(tmp_path)
    paths: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: paths.append(embedded.source_checkpoint(cfg, log=lambda _: None))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(small_recipe) == 1
    assert paths[0] == paths[1]


def test_fine_tuning_starts_from_the_source_backbone_with_a_fresh_classifier(
    small_recipe: list[TrialConfig], tmp_path: Path
) -> None:
    cfg = cfg_at(tmp_path)
    source = torch.load(embedded.source_checkpoint(cfg, log=lambda _: None), weights_only=True)
    torch.manual_seed(123)
    trial = train.setup(cfg, log=lambda _: None, weights=embedded.weights_for(cfg))
    state = trial.model.state_dict()
    assert torch.equal(state["blocks.0.conv.weight"], source["blocks.0.conv.weight"])
    assert not torch.equal(state["blocks.5.proj.weight"], source["blocks.5.proj.weight"])


def test_pretraining_on_source_needs_synthetic_data(tmp_path: Path) -> None:
    cfg = cfg_at(tmp_path)
    real = cfg.replace(data=dataclasses.replace(cfg.data, kind="image_folder", root=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"model\.pretrain_on_source"):
        embedded.source_config(real, output_dir=str(tmp_path))


def test_bf16_trains_without_a_scaler(tmp_path: Path) -> None:
    cfg = from_dict(
        {
            **TINY,
            "model": {"name": "pytorchvideo:resnet3d_tiny"},
            "amp": "bf16",
            "strategy": {"name": "full"},
            "output_dir": str(tmp_path / "bf16"),
        }
    )
    lines: list[str] = []
    summary = train.run(cfg, log=lines.append)
    assert summary.final["skipped_total"] == 0 and summary.final["amp_skipped_total"] == 0
    assert summary.final["drift_stuck_groups"] == 0
    assert torch.isfinite(torch.tensor(summary.final["train_loss"]))


def test_the_loop_refuses_an_embedded_config_without_its_pretrained_weights(
    tmp_path: Path,
) -> None:
    cfg = cfg_at(tmp_path)
    assert cfg.model.pretrain_on_source
    with pytest.raises(ConfigError) as caught:
        train.setup(cfg, log=lambda _: None)
    (problem,) = caught.value.problems
    assert problem.field == "model.pretrain_on_source"
    assert "weights_for" in problem.fix
    plain = cfg.replace(model=dataclasses.replace(cfg.model, pretrain_on_source=False))
    assert embedded.weights_for(plain) is None  # nothing to pretrain, nothing trained
