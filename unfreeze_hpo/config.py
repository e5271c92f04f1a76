"""Task/trial YAML -> frozen dataclasses, with every problem reported at once.

The file is read by ``yamlfile`` (YAML 1.2 scalars, no duplicate keys or tags, size limits);
every problem carries the file and line it came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unfreeze_hpo import data, faults, signals, strategies
from unfreeze_hpo.data import DataConfig
from unfreeze_hpo.errors import ConfigError, Problem, UserError
from unfreeze_hpo.faults import FaultsConfig
from unfreeze_hpo.lr import ScheduleConfig
from unfreeze_hpo.models import ModelSpec, parse_name
from unfreeze_hpo.params import build, param
from unfreeze_hpo.strategies import Strategy
from unfreeze_hpo.yamlfile import is_file, locate_problem, parse_yaml, plain, read_yaml_text

# Reported only when the data has a test split: measured on data the search does not choose on.
TEST_METRICS = ("test_acc", "test_loss", "test_acc_at_best")
# What a trial reports every epoch (train.run; besides lr/<group>): the names --metric may take.
METRICS = (
    "best_val_acc",
    "val_acc",
    "val_loss",
    "val_samples",
    *TEST_METRICS,
    "train_loss",
    "grad_norm",
    "grad_norm_max",
    "skipped_steps",
    "skipped_total",
    "amp_skipped_steps",
    "amp_skipped_total",
    "peak_memory_mb",
    "trainable_params",
    "frozen_params",
    "trainable_ratio",
    "backbone_trainable_ratio",
    "unfrozen_blocks",
    "drift_min_trainable",
    "drift_stuck_groups",
    "drift_moved_frozen_groups",
    "spike_event_epoch",
    "spike_event_block",
    "spike_window_steps",
    "phase_epochs",
    *signals.NEUTRAL_METRICS,
    "epoch",
    "step",
    "epoch_seconds",
)
# What a search may select on: never the test split, which it reports but does not choose on.
SEARCH_METRICS = tuple(m for m in METRICS if m not in TEST_METRICS)


@dataclass(frozen=True)
class ModelConfig:
    name: str = param("pytorchvideo:resnet3d_tiny", help="timm:<name> or pytorchvideo:<name>")
    pretrained: bool = param(False, help="load the hub's pretrained weights (needs network)")
    pretrained_file: str | None = param(
        None, help="timm: local pretrained weights, loaded as timm loads hub weights"
    )
    checkpoint: str | None = param(None, help="local weights: a torch state dict file")
    pretrain_on_source: bool = param(
        False, help="pretrain on the synthetic source task first (cached on disk)"
    )
    num_classes: int | None = param(None, ge=1, help="classifier size; default: the data's")
    kwargs: dict[str, Any] = param({}, help="keyword arguments for the model builder")
    granularity: str = param("fine", choices=("fine", "coarse"), help="block granularity")
    matcher: dict[str, Any] | None = param(None, help="timm-style regex blocks for any model")
    grad_checkpointing: bool = param(
        False, help="recompute activations in backward to save memory (timm models)"
    )

    def spec(self, num_classes: int) -> ModelSpec:
        return ModelSpec(
            self.name,
            self.pretrained,
            self.checkpoint,
            num_classes,
            self.kwargs,
            pretrained_file=self.pretrained_file,
        )

    def n_blocks(self) -> int | None:
        """How many blocks the model has (built on the meta device: cheap), or None when they
        cannot be found here; training reports why in full."""
        from unfreeze_hpo.blocks import discover_spec

        spec = self.spec(self.num_classes or 2)
        try:
            return len(discover_spec(spec, self.granularity, self.matcher))  # type: ignore[arg-type]
        except Exception:  # a courtesy check: what it cannot build, the trial reports
            return None


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = param("adamw", choices=("adamw", "adam", "sgd"), help="torch optimizer")
    lr: float = param(1e-3, gt=0, help="the head's peak learning rate")
    weight_decay: float = param(0.0, ge=0, help="decoupled for adamw")
    momentum: float = param(0.9, ge=0, le=1, help="sgd only")
    backbone_lr_mult: float = param(1.0, gt=0, help="LR of the block next to the head / head LR")
    layer_decay: float = param(1.0, gt=0, le=1, help="LR factor per block further from the head")
    unfreeze_warmup_steps: int = param(0, ge=0, help="linear LR warmup after a block unfreezes")
    grad_clip: float = param(1.0, ge=0, help="max gradient norm; 0 disables clipping")
    accumulate_steps: int = param(
        1, ge=1, help="batches per optimizer step (gradient accumulation); steps count these"
    )

    def kwargs(self) -> dict[str, Any]:
        extra = {"momentum": self.momentum} if self.name == "sgd" else {}
        return {"weight_decay": self.weight_decay, **extra}


@dataclass(frozen=True)
class SignalsConfig:
    baseline_steps: int = param(20, ge=1, help="steps before an unfreeze event for the baseline")
    window_steps: int = param(20, ge=1, help="steps after an unfreeze event that are watched")


def _default_strategy() -> Strategy:
    return strategies.create("early_gradual")


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; ``to_dict`` gives back the YAML form."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    strategy: Strategy = field(default_factory=_default_strategy)
    epochs: int = param(12, ge=1, help="training epochs")
    batch_size: int = param(32, ge=1, help="samples per step")
    label_smoothing: float = param(0.0, ge=0, le=1, help="cross-entropy label smoothing")
    amp: str = param("none", choices=("none", "bf16", "fp16"), help="mixed precision")
    device: str = param("auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when present")
    seed: int = param(0, ge=0, help="seeds model init, data order and dropout")
    output_dir: str = param("runs/trial", help="metrics and checkpoints go here")
    monitor: str = param(
        "val_acc",
        choices=("val_acc", "val_loss"),
        help="metric history the adaptive strategy watches",
    )
    frozen_norm_eval: bool = param(True, help="keep BatchNorm of frozen blocks in eval mode")
    unfrozen_norm_eval: bool = param(
        False,
        help="keep BatchNorm of unfrozen backbone blocks in eval mode too: they keep the "
        "pretrained running statistics, and an unfreeze event does not switch them to the "
        "noisy statistics of a small batch",
    )
    max_nonfinite_steps: int = param(
        20, ge=1, help="consecutive non-finite steps before the trial fails as diverged"
    )
    num_workers: int | None = param(
        None, ge=0, help="DataLoader worker processes; default: the trial's CPUs minus one"
    )
    prefetch_factor: int = param(2, ge=1, help="batches each loader worker prepares ahead")
    faults: FaultsConfig = field(default_factory=FaultsConfig)  # reliability tests only
    provenance: dict[str, Any] | None = param(
        None,
        help="where an exported schedule came from (search, trial, metrics, timeline); "
        "a record only, never read by training",
    )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in out.items():
            if dataclasses.is_dataclass(value) and not isinstance(value, Strategy):
                out[key] = plain(dataclasses.asdict(value))  # type: ignore[arg-type]
        out["strategy"] = {"name": self.strategy.name, **plain(self.strategy.params())}
        if not self.faults.inject:
            del out["faults"]  # a test-only block: absent from every real config
        return out

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)


def load(path: str | Path) -> TrialConfig:
    """Read and validate a trial YAML file; ConfigError lists every problem with file:line."""
    path = Path(path)
    if not is_file(path):
        raise ConfigError(
            Problem("config", str(path), "no such file", "give the path of a YAML file")
        )
    values, lines = parse_yaml(read_yaml_text(path, "config"), str(path))
    return from_dict(values, lines=lines, source=str(path))


def from_dict(
    values: Mapping[str, Any],
    *,
    lines: Mapping[str, int] | None = None,
    source: str = "",
) -> TrialConfig:
    """Build a TrialConfig from plain values (YAML, a Ray trial's flat dict made nested …)."""
    problems: list[Problem] = []
    values = dict(values)
    raw_strategy = values.pop("strategy", {"name": "early_gradual"})
    strategy = _strategy(raw_strategy, problems)
    cfg = build(TrialConfig, values, "", problems)
    if cfg is not None:
        problems += faults.check(cfg.faults)
        problems += _pair_checks(cfg)
    problems += _cheap_checks(values)
    if problems:
        raise ConfigError([locate_problem(p, lines or {}, source) for p in problems])
    assert cfg is not None and strategy is not None
    return dataclasses.replace(cfg, strategy=strategy)


def _pair_checks(cfg: TrialConfig) -> list[Problem]:
    """Rules about two fields together."""
    problems = []
    if (cfg.data.mixup or cfg.data.cutmix) and cfg.batch_size % 2:
        problems.append(
            Problem(
                "batch_size",
                cfg.batch_size,
                "mixup/cutmix pair each sample with another: the batch must be even",
                f"use batch_size {cfg.batch_size + 1}",
            )
        )
    if cfg.model.pretrained_file is not None and cfg.model.pretrained:
        problems.append(
            Problem(
                "model.pretrained",
                True,
                "and model.pretrained_file both give pretrained weights",
                "keep one: pretrained_file for a local file, pretrained for the hub",
            )
        )
    return problems


def _cheap_checks(values: Mapping[str, Any]) -> list[Problem]:
    """Checks that need no training: data paths and the model name, run even when other
    sections have problems, so one run reports everything."""
    problems: list[Problem] = []
    data_cfg = build(DataConfig, values.get("data"), "data", [])
    if data_cfg is not None:
        problems += data.check(data_cfg)
    model = values.get("model")
    name = model.get("name") if isinstance(model, Mapping) else None
    if isinstance(name, str):
        try:
            parse_name(name)
        except UserError as exc:
            problems += exc.problems
    return problems


def _strategy(raw: Any, problems: list[Problem]) -> Strategy | None:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        problems.append(
            Problem(
                "strategy",
                raw,
                "must be a mapping with a name",
                "e.g. strategy: {name: early_gradual, freeze_epochs: 1}",
            )
        )
        return None
    params = {k: v for k, v in raw.items() if k != "name"}
    try:
        return strategies.create(raw["name"], params)
    except UserError as exc:
        problems += exc.problems
        return None
