"""Search spaces: shipped files, conditional define-by-run, validation, recipes, OptunaSearch."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest

from unfreeze_hpo import strategies
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.search import recipes
from unfreeze_hpo.search.recipes import RECIPES
from unfreeze_hpo.search.space import (
    SPACES_DIR,
    SearchSpace,
    default_space,
    load_space,
    space_from_dict,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))
CARD = {
    "early_gradual.freeze_epochs",
    "early_gradual.blocks_per_epoch",
    "early_gradual.target_ratio",
    "adaptive.patience",
    "adaptive.min_improvement",
    "optimizer.lr",
    "optimizer.backbone_lr_mult",
    "optimizer.unfreeze_warmup_steps",
    "optimizer.weight_decay",
    "optimizer.layer_decay",
}
FIELD = ["fastai fine_tune", "ULMFiT", "LP-FT"]
EXPECTED_RECIPES = {
    "all.yaml": [
        "early_gradual 1/1/0.5",
        "adaptive 2/0.005",
        "gentle finetune",
        "linear probe",
        "full fine-tuning",
        *FIELD,
    ],
    "early_gradual.yaml": ["early_gradual 1/1/0.5", *FIELD],
    "adaptive.yaml": ["adaptive 2/0.005"],
    "progressive.yaml": ["gentle finetune"],
    "fixed_and_baselines.yaml": ["linear probe", "full fine-tuning"],
}


def in_range(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return value in dist.choices
    assert isinstance(
        dist, optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution
    )
    return dist.low <= value <= dist.high


# ---------------------------------------------------------------------------------------------
# Shipped files


def test_every_expected_file_is_shipped() -> None:
    assert {p.name for p in SHIPPED} == set(EXPECTED_RECIPES)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_loads_and_says_how_to_run_it(path: Path) -> None:
    space = load_space(path)
    assert space.strategies and space.source == str(path)
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#")
    assert f"unfreeze-hpo search --space search_spaces/{path.name}" in header
    assert [name for name, _ in recipes.tried(space)] == EXPECTED_RECIPES[path.name]


def test_all_covers_every_strategy_and_the_card() -> None:
    space = default_space()
    assert Path(space.source) == SPACES_DIR / "all.yaml"
    assert set(space.strategies) == set(strategies.REGISTRY)
    searchable = set(space.distributions())
    assert searchable >= CARD | {"strategy"}
    assert not CARD - searchable


# ---------------------------------------------------------------------------------------------
# define_by_run and trial_config


def check_trial(space: SearchSpace, trial: optuna.trial.Trial, fixed: dict[str, Any]) -> str:
    """The per-trial contract; returns the chosen strategy."""
    params = trial.params
    chosen = params.get("strategy", fixed.get("strategy"))
    assert chosen in space.strategies
    dists = space.distributions()
    for key in params:
        if key in ("strategy", *space.common):
            continue
        head, _, param = key.partition(".")
        assert head == chosen, f"{key} sampled on the {chosen} branch"
        assert param in strategies.REGISTRY[chosen]().params()
    for key, value in params.items():
        assert in_range(dists[key], value), (key, value)
    branch_fixed = {
        f"{chosen}.{k}": v
        for k, v in space.per_strategy.get(chosen, {}).items()
        if not isinstance(v, optuna.distributions.BaseDistribution)
    }
    assert branch_fixed.items() <= fixed.items()
    assert not set(fixed) & set(params)

    cfg = space.trial_config(TrialConfig(), {**params, **fixed})
    assert cfg.strategy.name == chosen
    strategy_values = cfg.strategy.params()
    for key, value in {**params, **branch_fixed}.items():
        head, _, field = key.partition(".")
        if head == chosen:
            expected = tuple(map(tuple, value)) if field == "phases" else value
            assert strategy_values[field] == expected, key
        elif head == "optimizer":
            assert getattr(cfg.optimizer, field) == value, key
    return str(chosen)


def test_define_by_run_is_conditional_and_builds_configs() -> None:
    space = default_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for i in range(80):
        trial = study.ask()
        fixed = space.define_by_run(trial)
        seen.add(check_trial(space, trial, fixed))
        study.tell(trial, float(i % 7))
    assert seen == set(space.strategies)
    assert study.trials[0].params.keys() >= {"strategy", *space.common}


def test_fixed_values_come_back_and_are_copies() -> None:
    space = space_from_dict(
        {
            "strategy": ["fixed"],
            "strategies": {"fixed": {"phases": [[0, 0], [3, 2]]}},
            "common": {"optimizer.layer_decay": 0.8, "epochs": 6, "schedule.kind": "constant"},
        }
    )
    trial = optuna.create_study().ask()
    fixed = space.define_by_run(trial)
    assert trial.params == {}
    assert fixed == {
        "strategy": "fixed",
        "fixed.phases": [[0, 0], [3, 2]],
        "optimizer.layer_decay": 0.8,
        "epochs": 6,
        "schedule.kind": "constant",
    }
    fixed["fixed.phases"].append([9, 9])  # Ray owns the dict it is given
    assert space.per_strategy["fixed"]["phases"] == [[0, 0], [3, 2]]
    cfg = space.trial_config(TrialConfig(), {})  # fixed values need not be in the flat dict
    assert cfg.strategy.params() == {"phases": ((0, 0), (3, 2))}
    assert (cfg.optimizer.layer_decay, cfg.epochs, cfg.schedule.kind) == (0.8, 6, "constant")


def test_define_by_run_is_deterministic_given_the_trial() -> None:
    space = default_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    first = space.define_by_run(trial)
    params = dict(trial.params)
    assert space.define_by_run(trial) == first
    assert trial.params == params


def test_multivariate_tpe_with_constant_liar() -> None:
    space = default_space()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            multivariate=True, constant_liar=True, n_startup_trials=5, seed=0
        )
    study = optuna.create_study(sampler=sampler, direction="maximize")
    pending = []
    for i in range(30):
        trial = study.ask()
        check_trial(space, trial, space.define_by_run(trial))
        pending.append(trial)
        if i % 3 == 2:  # a few trials in flight at once, as under Ray
            for t in pending:
                study.tell(t, t.params.get("optimizer.lr", 0.0))
            pending = []
    for t in pending:
        study.tell(t, 0.0)
    assert len(study.trials) == 30
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_single_strategy_space_needs_no_strategy_key() -> None:
    space = load_space(SPACES_DIR / "progressive.yaml")
    assert "strategy" not in space.distributions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    fixed = space.define_by_run(trial)
    assert "strategy" not in trial.params and fixed["strategy"] == "progressive"
    cfg = space.trial_config(TrialConfig(), trial.params)
    assert cfg.strategy.name == "progressive"
    assert cfg.strategy.params()["initial_blocks"] == trial.params["progressive.initial_blocks"]


def test_trial_config_overrides_base_and_refuses_unknown_keys() -> None:
    space = default_space()
    base = TrialConfig().replace(batch_size=8, epochs=3)
    flat = {"strategy": "adaptive", "adaptive.patience": 3, "optimizer.lr": 0.02}
    cfg = space.trial_config(base, flat)
    assert (cfg.batch_size, cfg.epochs, cfg.optimizer.lr) == (8, 3, 0.02)
    assert cfg.strategy.params()["patience"] == 3
    assert cfg.strategy.params()["min_improvement"] == 0.005  # the strategy's default

    bad = {
        **flat,
        "optimizer.lrr": 0.1,
        "early_gradual.freeze_epochs": 1,
        "adaptive.patiense": 2,
        "output_dir": "x",
        "model": "timm:resnet18",
    }
    with pytest.raises(ConfigError) as info:
        space.trial_config(base, bad)
    fields = {p.field: p for p in info.value.problems}
    assert set(fields) == set(bad) - set(flat)
    assert "did you mean optimizer.lr" in fields["optimizer.lrr"].fix
    assert "strategy is adaptive" in fields["early_gradual.freeze_epochs"].message
    assert "did you mean patience?" in fields["adaptive.patiense"].fix

    with pytest.raises(ConfigError, match="not a strategy of this space"):
        space.trial_config(base, {"strategy": "fixd"})
    with pytest.raises(ConfigError, match="missing"):
        space.trial_config(base, {"optimizer.lr": 0.1})  # several strategies: strategy needed
    with pytest.raises(ConfigError, match="patience"):
        space.trial_config(base, {"strategy": "adaptive", "adaptive.patience": 0})


def test_space_pickles() -> None:
    # Ray ships the searcher, and with it the bound define_by_run, to its own state files.
    space = default_space()
    clone = pickle.loads(pickle.dumps(space.define_by_run)).__self__
    assert clone == space


# ---------------------------------------------------------------------------------------------
# Bad spaces

BAD = """\
strategy: [early_gradual, adaptiv, progressive, fixed]
strategies:
  early_gradual:
    freeze_epoks: {type: int, low: 0, high: 3}
    target_ratio: {type: float, low: 0.2, high: 1.5}
    blocks_per_epoch: {type: float, low: 1, high: 3}
  adaptive:
    patience: {type: int, low: 0, high: 4}
  progressive:
    initial_freeze_epochs: {type: int, low: 6, high: 2}
    unfreeze_interval: {type: categorical}
  fixed:
    phases: {type: categorical, choices: [[[0, 0]], [[0, 1]]]}
common:
  optimizer.lr: {type: float, low: 0, high: 0.1, log: true}
  optimizer.learning_rate: {type: float, low: 1e-3, high: 1e-1}
  strategy: early_gradual
  optimizer.weight_decay: {low: 0.0, high: 0.1}
  optimizer.name: {type: int, low: 0, high: 1}
  schedule.kind: {type: categorical, choices: [cosine, linear]}
  epochs: {type: int, low: 0, high: 12, stepp: 2}
  model: {name: timm:resnet18}
"""


def load_bad(tmp_path: Path, text: str) -> tuple[Path, dict[str, Problem]]:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    problems = info.value.problems
    return path, {p.field: p for p in problems}


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_bad_space_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    path, found = load_bad(tmp_path, BAD)
    expected = {
        # field: (line marker, words in message or fix)
        "strategy": ("strategy: [", "did you mean adaptive"),
        "strategies.adaptive": ("  adaptive:", "not in the strategy: list"),
        "strategies.early_gradual.freeze_epoks": ("freeze_epoks", "did you mean freeze_epochs"),
        "strategies.early_gradual.target_ratio.high": ("target_ratio", "<= 1"),
        "strategies.early_gradual.blocks_per_epoch": ("blocks_per_epoch", "use type: int"),
        "strategies.progressive.initial_freeze_epochs": ("initial_freeze", "`low <= high`"),
        "strategies.progressive.unfreeze_interval.choices": ("unfreeze_interval", "must be a list"),
        "strategies.fixed.phases": ("phases:", "can only be fixed"),
        "common.optimizer.lr": ("optimizer.lr:", "`low > 0` must hold for `log=True`"),
        "common.optimizer.learning_rate": ("learning_rate", "not a TrialConfig field"),
        "common.strategy": ("  strategy: early", "set by the search"),
        "common.optimizer.weight_decay.type": ("weight_decay", "needs a type"),
        "common.optimizer.name": ("optimizer.name", "use type: categorical"),
        "common.schedule.kind.choices[1]": ("schedule.kind", "use one of constant, cosine"),
        "common.epochs.stepp": ("  epochs:", "did you mean step"),
        "common.epochs.low": ("  epochs:", ">= 1"),
        "common.model": ("model:", "is a section"),
    }
    for field, (marker, words) in expected.items():
        assert field in found, f"{field} not reported; got {sorted(found)}"
        problem = found[field]
        assert problem.location == f"{path}:{line_of(BAD, marker)}", (field, problem)
        assert words in f"{problem.message} {problem.fix}", (field, problem)
    # adaptive is both misspelled in the list and configured: both are reported
    assert set(found) == set(expected)


def test_bounds_come_from_the_strategy_declaration(tmp_path: Path) -> None:
    text = (
        "strategy: adaptive\nstrategies:\n  adaptive:\n"
        "    patience: {type: int, low: 0, high: 4}\n"
        "    min_improvement: {type: float, low: -0.1, high: 0.02}\n"
        "    mode: {type: categorical, choices: [max, mean]}\n"
    )
    path, found = load_bad(tmp_path, text)
    assert found["strategies.adaptive.patience.low"].fix == "use a value >= 1"
    assert found["strategies.adaptive.min_improvement.low"].location == f"{path}:5"
    assert found["strategies.adaptive.mode.choices[1]"].value == "mean"
    assert len(found) == 3


def test_fixed_values_are_validated_by_the_strategy(tmp_path: Path) -> None:
    text = (
        "strategy: [fixed, early_gradual]\nstrategies:\n"
        "  fixed:\n    phases: [[0, 2], [3, 1]]\n"
        "  early_gradual:\n    target_ratio: 1.5\n"
        "common:\n  optimizer.lr: -1\n  amp: fp8\n"
    )
    path, found = load_bad(tmp_path, text)
    assert "must not decrease" in found["strategies.fixed.phases"].message
    assert found["strategies.fixed.phases"].location == f"{path}:4"
    assert found["strategies.early_gradual.target_ratio"].location == f"{path}:6"
    assert found["common.optimizer.lr"].message == "out of range"
    assert "use one of none, bf16, fp16" in found["common.amp"].fix
    assert len(found) == 4


def test_structural_problems() -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({}, "strategy", "missing"),
        ({"strategy": []}, "strategy", "empty"),
        ({"strategy": ["full", "full"]}, "strategy", "listed twice"),
        ({"strategy": "full", "strategies": {"full": {"x": 1}}}, "strategies.full.x", "no param"),
        ({"strategy": "full", "space": 1}, "space", "unknown key"),
        ({"strategy": "full", "common": [1]}, "common", "must be a mapping"),
        ({"strategy": "full", "common": {"epochs": "many"}}, "common.epochs", "integer"),
        (
            {"strategy": "full", "common": {"epochs": {"type": "floot", "low": 1, "high": 2}}},
            "common.epochs.type",
            "did you mean",
        ),
        (
            {"strategy": "full", "common": {"epochs": {"type": "int", "low": 1.5, "high": 3}}},
            "common.epochs.low",
            "integer",
        ),
        (
            {"strategy": "full", "common": {"seed": {"type": "int", "low": 1, "high": 9}}},
            "",
            "",
        ),
        (
            {"strategy": "full", "common": {"optimizer.lr": {"type": "float", "high": 1}}},
            "common.optimizer.lr.low",
            "missing",
        ),
        (
            {
                "strategy": "full",
                "common": {
                    "optimizer.lr": {
                        "type": "float",
                        "low": 0.1,
                        "high": 1,
                        "log": True,
                        "step": 0.1,
                    }
                },
            },
            "common.optimizer.lr",
            "`step` is not supported",
        ),
        (
            {
                "strategy": "full",
                "common": {"optimizer.lr": {"type": "float", "low": 0, "high": 1, "step": 0.3}},
            },
            "common.optimizer.lr",
            "not divisible by `step`",
        ),
        (
            {"strategy": "full", "common": {"amp": {"type": "categorical", "choices": []}}},
            "common.amp",
            "one or more elements",
        ),
    ]
    for values, field, words in cases:
        if not field:
            space_from_dict(values)  # a valid control case
            continue
        with pytest.raises(ConfigError) as info:
            space_from_dict(values)
        by_field = {p.field: p for p in info.value.problems}
        assert field in by_field, (values, by_field)
        assert words in f"{by_field[field].message} {by_field[field].fix}", by_field[field]


def test_missing_file_names_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_space(tmp_path / "nope.yaml")
    assert "all.yaml" in info.value.problems[0].fix


def test_yaml_traps_are_refused(tmp_path: Path) -> None:
    text = "strategy: full\nstrategy: frozen\n"
    _, found = load_bad(tmp_path, text)
    assert "duplicate key" in found["strategy"].message


# ---------------------------------------------------------------------------------------------
# Recipes


def test_recipes_lie_inside_the_space() -> None:
    for path in SHIPPED:
        space = load_space(path)
        dists = space.distributions()
        for name, flat in recipes.tried(space):
            assert flat["strategy"] in space.strategies, name
            for key, value in flat.items():
                if key == "strategy" and key not in dists:
                    continue
                assert in_range(dists[key], value), (path.name, name, key, value)
            space.trial_config(TrialConfig(), flat)  # every recipe builds


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.title)
def test_every_recipe_fits_every_shipped_space_it_is_meant_for(recipe: recipes.Recipe) -> None:
    assert set(recipe.spaces) <= {p.name for p in SHIPPED}, "a shipped space's name"
    for name in recipe.spaces:
        fit = recipes.fit(recipe, load_space(SPACES_DIR / name))
        assert fit.point is not None, (name, fit.notes)
        # Its optimizer fields are in the point; only "every block" may be clipped to the range.
        assert set(recipe.optimizer) <= set(fit.point), (name, fit.notes)
        assert all("clipped to" in note for note in fit.notes), (name, fit.notes)


def test_recipe_values_are_the_field_notes_and_the_fields() -> None:
    tried = dict(recipes.tried(default_space()))
    assert tried["early_gradual 1/1/0.5"] == {
        "strategy": "early_gradual",
        "early_gradual.freeze_epochs": 1,
        "early_gradual.blocks_per_epoch": 1,
        "early_gradual.target_ratio": 0.5,
        "optimizer.backbone_lr_mult": 0.1,  # "10x smaller than the head LR"
    }
    assert tried["adaptive 2/0.005"] == {
        "strategy": "adaptive",
        "adaptive.patience": 2,
        "adaptive.min_improvement": 0.005,
    }
    assert tried["gentle finetune"] == {
        "strategy": "progressive",
        "progressive.initial_blocks": 2,
        "progressive.initial_freeze_epochs": 5,
        "progressive.unfreeze_interval": 2,
    }
    assert tried["linear probe"] == {"strategy": "frozen"}
    assert tried["full fine-tuning"] == {"strategy": "full"}
    # fastai: frozen 1 epoch, then everything (the space's 3 blocks an epoch: all 5 by epoch 2).
    assert tried["fastai fine_tune"] == {
        "strategy": "early_gradual",
        "early_gradual.freeze_epochs": 1,
        "early_gradual.blocks_per_epoch": 3,
        "early_gradual.target_ratio": 1.0,
        "optimizer.layer_decay": 0.3,
    }
    assert tried["ULMFiT"]["optimizer.layer_decay"] == pytest.approx(1 / 2.6, abs=1e-4)
    assert tried["ULMFiT"]["early_gradual.blocks_per_epoch"] == 1
    assert tried["LP-FT"]["early_gradual.freeze_epochs"] == 3
    assert tried["LP-FT"]["optimizer.backbone_lr_mult"] == 0.1
    # What a trial of each one trains with: the layer decay reaches the optimizer's groups.
    cfg = default_space().trial_config(TrialConfig(), tried["ULMFiT"])
    assert cfg.optimizer.layer_decay == pytest.approx(1 / 2.6, abs=1e-4)


def test_recipes_outside_the_space_are_not_tried() -> None:
    def names(per: dict[str, Any], chosen: list[str]) -> list[str]:
        space = space_from_dict({"strategy": chosen, "strategies": per})
        return [n for n, _ in recipes.tried(space)]

    ratio = {"type": "float", "low": 0.6, "high": 1.0}
    assert names({"early_gradual": {"target_ratio": ratio}}, ["early_gradual"]) == ["ULMFiT"]
    assert names({}, ["early_gradual"]) == ["early_gradual 1/1/0.5"]  # defaults are the recipe
    assert names({"early_gradual": {"freeze_epochs": 2}}, ["early_gradual"]) == []  # fixed != 1
    slow = {"initial_blocks": 4, "initial_freeze_epochs": 15, "unfreeze_interval": 5}
    assert names({"progressive": slow}, ["progressive"]) == ["slow burn"]
    # gentle's initial_freeze_epochs 5 differs from the default 10 the space leaves in place
    assert names({}, ["progressive"]) == []
    assert names({}, ["full", "frozen"]) == ["linear probe", "full fine-tuning"]
    step = {"type": "float", "low": 0.0, "high": 0.008, "step": 0.004}
    assert names({"adaptive": {"min_improvement": step}}, ["adaptive"]) == []  # off the grid


def test_a_recipe_not_tried_as_it_is_is_in_the_log_with_the_reason() -> None:
    def lines(values: dict[str, Any]) -> list[str]:
        return recipes.log_lines(space_from_dict(values))

    late = {"early_gradual": {"freeze_epochs": {"type": "int", "low": 2, "high": 3}}}
    assert lines({"strategy": ["early_gradual"], "strategies": late})[0] == (
        "recipe 'early_gradual 1/1/0.5' not tried: "
        "early_gradual.freeze_epochs 1 is outside the space's 2..3"
    )
    fixed = {"early_gradual": {"freeze_epochs": 2}}
    assert lines({"strategy": ["early_gradual"], "strategies": fixed})[0] == (
        "recipe 'early_gradual 1/1/0.5' not tried: early_gradual.freeze_epochs 1: the space fixes 2"
    )
    gentle, slow = lines({"strategy": ["progressive"]})
    assert gentle == (
        "recipe 'gentle finetune' not tried: progressive.initial_freeze_epochs 5: the space "
        "leaves it at the strategy's default, 10"
    )
    assert slow.startswith("recipe 'slow burn' not tried: ")
    assert lines({"strategy": ["full", "frozen"]}) == []  # every recipe of theirs fits
    # An optimizer field the space has no entry for: tried without it, and said.
    (note, *_) = lines({"strategy": ["early_gradual"]})
    assert note == (
        "recipe 'early_gradual 1/1/0.5' tried with changes: optimizer.backbone_lr_mult 0.1 left "
        "out: the space neither searches nor fixes it"
    )
    for path in SHIPPED:  # every recipe of a shipped space's strategies is tried or reported
        space = load_space(path)
        tried = {title for title, _ in recipes.tried(space)}
        logged = {line.split("'")[1] for line in recipes.log_lines(space)}
        mine = {r.title for r in RECIPES if r.strategy in space.strategies}
        assert tried | logged == mine, path.name
        assert all(f.exact or f.notes for f in recipes.fits(space))


# ---------------------------------------------------------------------------------------------
# Ray's OptunaSearch, without a cluster


def test_optuna_search_starts_from_the_recipes() -> None:
    from ray.tune.search.optuna import OptunaSearch

    space = default_space()
    points = recipes.tried(space)
    searcher = OptunaSearch(
        space=space.define_by_run,
        metric="val_acc",
        mode="max",
        points_to_evaluate=[flat for _, flat in points],
        seed=0,
    )
    dists = space.distributions()
    for i, (_, flat) in enumerate(points):
        config = searcher.suggest(f"t{i}")
        assert config is not None
        assert {k: config[k] for k in flat} == flat
        for key in space.common:
            assert in_range(dists[key], config[key]), key
        cfg = space.trial_config(TrialConfig(), config)
        assert cfg.strategy.name == flat["strategy"]
        searcher.on_trial_complete(f"t{i}", {"val_acc": 0.5, "training_iteration": 1})
    after = searcher.suggest("after")  # sampled once the recipes are used up
    assert after is not None and space.trial_config(TrialConfig(), after)
