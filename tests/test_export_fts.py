"""``export --format lightning-fts``: a trial's unfreeze events as an explicit finetuning-scheduler
(FTS) schedule. The phase mapping is checked without Lightning; the written file is then run by
the real package (an optional test dependency: ``pip install -e '.[fts]'``) on the same model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from unfreeze_hpo import config, results, yamlfile
from unfreeze_hpo.blocks import Blocks, discover
from unfreeze_hpo.cli import main
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.models import ModelSpec, build
from unfreeze_hpo.results import export
from unfreeze_hpo.results import fts as fts_schedule
from unfreeze_hpo.search import inputs
from unfreeze_hpo.search.options import SearchConfig
from unfreeze_hpo.search.space import space_from_dict

State = optuna.trial.TrialState

TINY_BASE = """\
model: {name: "pytorchvideo:resnet3d_tiny"}
data: {kind: synthetic_video, train_samples: 16, val_samples: 8}
epochs: 5
optimizer: {lr: 0.03, layer_decay: 0.5}
"""
SPACE = {
    "strategy": ["early_gradual", "adaptive", "frozen"],
    "strategies": {
        "early_gradual": {
            "freeze_epochs": 1,
            "blocks_per_epoch": 2,
            "target_ratio": {"type": "float", "low": 0.2, "high": 1.0},
        },
        "adaptive": {"patience": {"type": "int", "low": 1, "high": 3}},
    },
    "common": {"optimizer.backbone_lr_mult": {"type": "float", "low": 0.05, "high": 1.0}},
}
# The blocks of resnet3d_tiny, input -> output, and the head.
B0, B1, B2, B3, B4 = ("blocks.0", *(f"blocks.{i}.res_blocks.0" for i in range(1, 5)))
HEAD = "head"
# Known FTS notices for a schedule taken as is (anything else, e.g. "a lr for phase 0 ... will be
# overridden" or a rewritten schedule, means FTS did not accept the file as written).
FTS_NOTICES = (
    "No monitor metric specified",
    "Final phase max_transition_epoch",  # the last phase's epoch raises max_epochs to it
    "currently depends upon an FTSEarlyStopping callback",  # FTS's default (not epoch-only) mode
)


@pytest.fixture(scope="module")
def blocks() -> Blocks:
    return discover(build(ModelSpec("pytorchvideo:resnet3d_tiny", num_classes=4)))


def trial(strategy: dict[str, Any], **optimizer: float) -> TrialConfig:
    values = yamlfile.parse_yaml(TINY_BASE)[0]
    values["strategy"] = strategy
    values["optimizer"].update(optimizer)
    return config.from_dict(values)


def names(blocks: Blocks, block_names: Sequence[str], prefix: str = "model.") -> tuple[str, ...]:
    by_name = {b.name: b for b in (*blocks.blocks, blocks.head)}
    return tuple(prefix + p for name in block_names for p in by_name[name].params)


def trainable_at(cfg: TrialConfig, blocks: Blocks, epoch: int, prefix: str = "model.") -> set[str]:
    """What our own training makes trainable at ``epoch``: the head and the plan's last blocks."""
    n = cfg.strategy.plan(epoch, (), blocks.sizes).n_trainable
    return set(names(blocks, [HEAD, *(b.name for b in blocks.blocks[len(blocks) - n :])], prefix))


# ---------------------------------------------------------------------------------------------
# The mapping, without Lightning

# (epoch, blocks, max_transition_epoch, lr); lr = 0.03 x 0.1 (backbone_lr_mult) x 0.5 (layer
# decay) per block between the block and the head.
MAPPINGS = {
    "early_gradual": (
        {"name": "early_gradual", "freeze_epochs": 1, "blocks_per_epoch": 2, "target_ratio": 1.0},
        [
            (0, [HEAD], 1, None),
            (1, [B4, B3], 2, 0.003),  # two blocks: the deepest's lr (B3's own is 0.0015)
            (2, [B2, B1], 3, 0.00075),
            (3, [B0], 5, 0.0001875),  # the last phase ends with the trial's 5 epochs
        ],
    ),
    "early_gradual_partial": (  # B4 alone passes half the backbone: B0..B3 never train
        {"name": "early_gradual", "freeze_epochs": 0, "target_ratio": 0.5},
        [(0, [HEAD, B4], 5, None)],
    ),
    "progressive": (
        {
            "name": "progressive",
            "initial_blocks": 2,
            "initial_freeze_epochs": 2,
            "unfreeze_interval": 1,
        },
        [
            (0, [HEAD, B4, B3], 2, None),
            (2, [B2], 3, 0.00075),
            (3, [B1], 4, 0.000375),
            (4, [B0], 5, 0.0001875),
        ],
    ),
    "full": ({"name": "full"}, [(0, [HEAD, B4, B3, B2, B1, B0], 5, None)]),
    "frozen": ({"name": "frozen"}, [(0, [HEAD], 5, None)]),
}


@pytest.mark.parametrize("case", MAPPINGS)
def test_phases_follow_the_strategys_unfreeze_events(blocks: Blocks, case: str) -> None:
    strategy, expected = MAPPINGS[case]
    cfg = trial(strategy, backbone_lr_mult=0.1)
    phases = fts_schedule.fts_phases(cfg, blocks)
    got = [(p.epoch, list(p.blocks), p.max_transition_epoch, p.lr) for p in phases]
    assert got == [(e, b, m, pytest.approx(lr) if lr else lr) for e, b, m, lr in expected]
    for phase in phases:
        assert phase.params == names(blocks, phase.blocks)
    every = [p for phase in phases for p in phase.params]
    assert len(every) == len(set(every)), "FTS needs disjoint phases"
    # Everything our training ever trains, and nothing else (FTS keeps unlisted ones frozen).
    assert set(every) == trainable_at(cfg, blocks, cfg.epochs - 1)


def test_a_phase_of_blocks_with_different_lrs_takes_the_deepests(blocks: Blocks) -> None:
    strategy = MAPPINGS["early_gradual"][0]
    phase = fts_schedule.fts_phases(trial(strategy, backbone_lr_mult=0.1), blocks)[1]
    assert phase.block_lrs == pytest.approx((0.003, 0.0015))  # B4 (nearest the head), B3
    assert phase.lr == phase.block_lrs[0]
    no_decay = fts_schedule.fts_phases(
        trial(strategy, backbone_lr_mult=0.1, layer_decay=1.0), blocks
    )
    assert no_decay[1].block_lrs == pytest.approx((0.003, 0.003))


def test_adaptive_takes_the_recorded_events_others_their_plan(blocks: Blocks) -> None:
    adaptive = trial({"name": "adaptive", "patience": 2})
    recorded = [{"epoch": 2, "n_trainable": 1}, {"epoch": 4, "n_trainable": 2}]
    phases = fts_schedule.fts_phases(adaptive, blocks, recorded, prefix="")
    assert [(p.epoch, p.blocks, p.max_transition_epoch) for p in phases] == [
        (0, (HEAD,), 2),
        (2, (B4,), 4),
        (4, (B3,), 5),
    ]
    assert phases[1].params == names(blocks, [B4], prefix="")
    assert [p.blocks for p in fts_schedule.fts_phases(adaptive, blocks)] == [(HEAD,)]  # no plateau
    # A deterministic strategy is its plan: a recorded timeline (e.g. of a pruned trial) is not
    # what `train --config` replays, so it is not what the FTS schedule follows either.
    gradual = trial(MAPPINGS["early_gradual"][0])
    assert fts_schedule.fts_phases(gradual, blocks, recorded) == fts_schedule.fts_phases(
        gradual, blocks
    )


# ---------------------------------------------------------------------------------------------
# The command, on a search built by hand (the study as StudyRecorder writes it)


@pytest.fixture(scope="module")
def search_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SearchConfig(name="fts", storage_path=str(tmp_path_factory.mktemp("runs")))
    base = config.from_dict(yamlfile.parse_yaml(TINY_BASE)[0])
    space = space_from_dict(SPACE)
    inputs.write_inputs(cfg, base, space)
    study = optuna.create_study(storage=cfg.study_url, study_name=cfg.name, direction="maximize")
    gradual = {"strategy": "early_gradual", "early_gradual.target_ratio": 1.0}
    gradual_events = [(1, 2), (2, 4), (3, 5)]
    add_trial(study, space, gradual, 0.9, gradual_events)  # 0: the best
    add_trial(study, space, {"strategy": "adaptive", "adaptive.patience": 2}, 0.5, [(2, 1), (4, 2)])
    add_trial(study, space, {"strategy": "frozen"}, 0.4, [])
    return cfg.folder


def add_trial(
    study: optuna.Study,
    space: Any,
    params: dict[str, Any],
    value: float,
    events: list[tuple[int, int]],
) -> None:
    params = {**params, "optimizer.backbone_lr_mult": 0.1}
    distributions = space.distributions()
    study.add_trial(
        optuna.trial.create_trial(
            state=State.COMPLETE,
            value=value,
            params=params,
            distributions={k: distributions[k] for k in params},
            user_attrs={
                "ray_trial_id": f"t{len(study.trials)}",
                "status": "complete",
                "reason": "",
                "config": params,
                "final": {"best_val_acc": value, "epoch": 4},
                "trial_dir": "",
                "timeline": [{"epoch": e, "n_trainable": n} for e, n in events],
            },
        )
    )


def run_export(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_writes_an_fts_schedule_of_the_best_trial(
    tmp_path: Path, search_folder: Path, blocks: Blocks, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "fts.yaml"
    argv = [str(search_folder), "--format", "lightning-fts", "--out", str(out_file)]
    code, out, err = run_export(capsys, *argv)
    assert code == 0, err
    assert f"wrote {out_file}: trial 0 (complete), strategy early_gradual, 4" in out
    assert "epoch_transitions_only=True" in out
    text = out_file.read_text()
    assert "# Mapping from the trial's unfreeze events" in text
    assert "lr is the deepest's" in text  # phase 1's two blocks have their own LRs
    schedule = yaml.safe_load(text)  # FTS reads it with a SafeLoader too
    assert list(schedule) == [0, 1, 2, 3]
    assert schedule[0] == {"params": list(names(blocks, [HEAD])), "max_transition_epoch": 1}
    assert schedule[1]["params"] == list(names(blocks, [B4, B3]))
    assert (schedule[1]["max_transition_epoch"], schedule[1]["lr"]) == (2, 0.003)
    assert [schedule[k]["max_transition_epoch"] for k in (2, 3)] == [3, 5]

    code, out, err = run_export(capsys, *argv, "--trial", "1", "--fts-prefix", "")
    assert code == 0, err
    schedule = yaml.safe_load(out_file.read_text())  # adaptive: its recorded events
    assert [(s["params"], s["max_transition_epoch"]) for s in schedule.values()] == [
        (list(names(blocks, [HEAD], "")), 2),
        (list(names(blocks, [B4], "")), 4),
        (list(names(blocks, [B3], "")), 5),
    ]
    code, out, err = run_export(capsys, *argv, "--trial", "2")
    assert code == 0, err
    assert yaml.safe_load(out_file.read_text()) == {
        0: {"params": list(names(blocks, [HEAD])), "max_transition_epoch": 5}
    }


def test_export_refuses_bad_format_options_at_once(
    tmp_path: Path, search_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "fts.yaml"
    folder = str(search_folder)
    code, out, err = run_export(capsys, folder, "--out", str(out_file), "--format", "fts")
    assert code == 2 and "--format: unknown export format" in err and "lightning-fts" in err
    code, out, err = run_export(capsys, folder, "--out", str(out_file), "--fts-prefix", "model.")
    assert code == 2 and "--fts-prefix" in err and "only for lightning-fts" in err
    argv = [folder, "--out", str(out_file), "--format", "lightning-fts", "--fts-prefix", "net"]
    code, out, err = run_export(capsys, *argv)
    assert code == 2 and "must end with '.'" in err and "--fts-prefix net." in err
    assert "Traceback" not in out + err
    assert not out_file.exists()


# ---------------------------------------------------------------------------------------------
# The real finetuning-scheduler runs the exported file


@pytest.mark.parametrize("mode", ["epoch_transitions", "fts_defaults"])
def test_finetuning_scheduler_runs_the_schedule_as_the_trial_unfroze(
    tmp_path: Path,
    search_folder: Path,
    blocks: Blocks,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
    mode: str,
) -> None:
    pytest.importorskip("finetuning_scheduler")
    import lightning.pytorch as pl
    from finetuning_scheduler import FinetuningScheduler

    schedule = tmp_path / "fts.yaml"
    code, _, err = run_export(
        capsys, str(search_folder), "--format", "lightning-fts", "--out", str(schedule)
    )
    assert code == 0, err
    search = results.open_search(search_folder)
    cfg = export.trial_config(search, 0)
    phases = fts_schedule.fts_phases(cfg, blocks)

    torch.manual_seed(0)
    module = _wrapper(
        build(ModelSpec("pytorchvideo:resnet3d_tiny", num_classes=4)), cfg.optimizer.lr
    )
    clips = torch.utils.data.TensorDataset(torch.randn(8, 3, 4, 32, 32), torch.randint(0, 4, (8,)))
    loader = torch.utils.data.DataLoader(clips, batch_size=4)
    # Epoch-only transitions replay the trial exactly; FTS's defaults may move earlier (on its
    # early stopping) and restore checkpoints, but must accept the file all the same.
    options = {"epoch_transitions_only": True, "restore_best": False}
    fts = FinetuningScheduler(
        ft_schedule=str(schedule), **(options if mode != "fts_defaults" else {})
    )
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        callbacks=[fts],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,  # FTS adds its own checkpoint callback even so
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader, loader)
    notices = [str(w.message) for w in caught if "finetuning_scheduler" in w.filename]
    assert all(any(n in m for n in FTS_NOTICES) for m in notices), notices
    assert any("Final phase max_transition_epoch" in m for m in notices), "warnings not seen"

    final = {n for n, p in module.named_parameters() if p.requires_grad}
    assert final == trainable_at(cfg, blocks, cfg.epochs - 1)
    if mode == "fts_defaults":
        return
    assert module.seen.keys() == set(range(cfg.epochs))
    for epoch, (trainable, lrs) in module.seen.items():
        assert trainable == trainable_at(cfg, blocks, epoch), epoch
        started = [p for p in phases if p.epoch <= epoch]  # one optimizer group per phase
        assert lrs == pytest.approx([cfg.optimizer.lr, *(p.lr for p in started[1:])]), epoch


def _wrapper(model: torch.nn.Module, lr: float) -> Any:
    """The model as ``self.model`` of a LightningModule (Lightning is imported only here: it is
    an optional dependency), recording each epoch's trainable names and group LRs."""
    import lightning.pytorch as pl
    from torch.nn import functional

    class Wrapper(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.seen: dict[int, tuple[set[str], list[float]]] = {}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)  # type: ignore[no-any-return]

        def training_step(self, batch: Sequence[torch.Tensor], index: int) -> torch.Tensor:
            if index == 0:  # after FTS has moved to this epoch's phase
                trainable = {n for n, p in self.named_parameters() if p.requires_grad}
                groups = self.trainer.optimizers[0].param_groups
                self.seen[self.current_epoch] = (trainable, [g["lr"] for g in groups])
            x, y = batch
            return functional.cross_entropy(self(x), y)

        def validation_step(self, batch: Sequence[torch.Tensor], index: int) -> None:
            x, y = batch
            self.log("val_loss", functional.cross_entropy(self(x), y))  # FTS monitors it

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # Phase 0's LR, as the exported header asks; FTS has thawed phase 0 by now.
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    return Wrapper()
