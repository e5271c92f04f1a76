from __future__ import annotations

import json
import math
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from support import run

from unfreeze_hpo import config
from unfreeze_hpo.config import ModelConfig, OptimizerConfig, TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem
from unfreeze_hpo.params import build, check_value, coerce


def write(tmp_path: Path, text: str | bytes, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def problems(path: Path) -> dict[str, Problem]:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    by_field = {p.field: p for p in info.value.problems}
    assert len(by_field) == len(info.value.problems)
    return by_field


def meta(cls: type, name: str) -> typing.Mapping[str, Any]:
    return next(f.metadata for f in fields(cls) if f.name == name)


def hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


# ---------------------------------------------------------------------------------------------
# YAML 1.1 traps


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e-3", 0.001), ("1.0e-3", 0.001), (".5", 0.5), ("5e-1", 0.5), ('"1e-3"', 0.001)],
)
def test_exponent_and_short_floats_load_as_numbers(
    tmp_path: Path, text: str, expected: float
) -> None:
    cfg = config.load(write(tmp_path, f"optimizer:\n  lr: {text}\n"))
    assert type(cfg.optimizer.lr) is float
    assert cfg.optimizer.lr == pytest.approx(expected)


def test_untyped_model_kwargs_keep_yaml_12_numbers(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "model:\n  kwargs: {drop_rate: 1e-1, depth: 4, act: no}\n"))
    assert cfg.model.kwargs == {"drop_rate": 0.1, "depth": 4, "act": "no"}
    assert type(cfg.model.kwargs["drop_rate"]) is float


@pytest.mark.parametrize("word", ["no", "off", "No"])
def test_amp_words_are_not_booleans_and_are_refused(tmp_path: Path, word: str) -> None:
    found = problems(write(tmp_path, f"seed: 1\namp: {word}\n"))
    assert set(found) == {"amp"}
    assert found["amp"].value == word
    assert found["amp"].location.endswith(":2")
    assert "none, bf16, fp16" in found["amp"].fix


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", '"true"'])
def test_pretrained_accepts_only_true_or_false(tmp_path: Path, word: str) -> None:
    found = problems(write(tmp_path, f"model:\n  pretrained: {word}\n"))
    assert set(found) == {"model.pretrained"}
    assert "true or false" in found["model.pretrained"].message


@pytest.mark.parametrize("word", ["true", "True", "TRUE"])
def test_pretrained_true_spellings(tmp_path: Path, word: str) -> None:
    assert config.load(write(tmp_path, f"model:\n  pretrained: {word}\n")).model.pretrained is True


@pytest.mark.parametrize("text", ["010", '"010"', "-05", "00"])
def test_leading_zero_integers_are_refused_as_ambiguous(tmp_path: Path, text: str) -> None:
    found = problems(write(tmp_path, f"epochs: {text}\n"))
    assert set(found) == {"epochs"}
    assert "ambiguous" in found["epochs"].message
    assert "leading zero" in found["epochs"].fix


@pytest.mark.parametrize(("text", "expected"), [("10", 10), ("1e1", 10), ('"7"', 7)])
def test_integers_load_as_int(tmp_path: Path, text: str, expected: int) -> None:
    cfg = config.load(write(tmp_path, f"epochs: {text}\n"))
    assert cfg.epochs == expected
    assert type(cfg.epochs) is int


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("epochs: true\n", "epochs"),
        ("batch_size: false\n", "batch_size"),
        ("optimizer:\n  lr: true\n", "optimizer.lr"),
        ("strategy: {name: early_gradual, target_ratio: true}\n", "strategy.target_ratio"),
        ("strategy: {name: early_gradual, freeze_epochs: false}\n", "strategy.freeze_epochs"),
    ],
)
def test_booleans_are_refused_for_numbers(tmp_path: Path, text: str, field: str) -> None:
    found = problems(write(tmp_path, text))
    assert set(found) == {field}
    assert "boolean" in found[field].message


@pytest.mark.parametrize("text", ["2.5", "1e-3", "ten"])
def test_non_integral_values_are_refused_for_ints(tmp_path: Path, text: str) -> None:
    assert set(problems(write(tmp_path, f"epochs: {text}\n"))) == {"epochs"}


# ---------------------------------------------------------------------------------------------
# Duplicate keys


def test_duplicate_top_level_key_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nepochs: 3\nbatch_size: 4\nnum_workers: 0\nepochs: 5\n")
    found = problems(path)
    assert set(found) == {"epochs"}
    assert found["epochs"].location == f"{path}:5"
    assert "line 2" in found["epochs"].message


def test_duplicate_nested_key_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path, "epochs: 3\nmodel:\n  name: timm:resnet18\n  pretrained: false\n  name: x:y\n"
    )
    found = problems(path)
    assert set(found) == {"model.name"}
    assert found["model.name"].location == f"{path}:5"
    assert "line 3" in found["model.name"].message


def test_every_duplicate_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nseed: 2\noptimizer:\n  lr: 0.1\n  lr: 0.2\n")
    found = problems(path)
    assert {f: p.location for f, p in found.items()} == {
        "seed": f"{path}:2",
        "optimizer.lr": f"{path}:5",
    }


def test_same_key_in_different_sections_is_not_a_duplicate(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "seed: 1\ndata:\n  seed: 2\n"))
    assert (cfg.seed, cfg.data.seed) == (1, 2)


# ---------------------------------------------------------------------------------------------
# Every problem at once, each at its line


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "epoch: 3\n"
        "batch_size: 0\n"
        "optimizer:\n"
        "  name: adamw\n"
        "  lr: -1\n"
        "strategy: {name: early_gradual, target_ratio: 2}\n",
    )
    found = problems(path)
    assert {f: p.location for f, p in found.items()} == {
        "epoch": f"{path}:1",
        "batch_size": f"{path}:2",
        "optimizer.lr": f"{path}:5",
        "strategy.target_ratio": f"{path}:6",
    }
    assert "epochs" in found["epoch"].fix
    assert found["batch_size"].value == 0
    assert found["optimizer.lr"].value == -1


def test_unknown_strategy_reported_alongside_other_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model:\n  granularity: medium\nstrategy:\n  name: early_gradul\n  freeze_epochs: 1\n",
    )
    found = problems(path)
    assert {f: p.location for f, p in found.items()} == {
        "model.granularity": f"{path}:2",
        "strategy.name": f"{path}:4",
    }
    assert "early_gradual" in found["strategy.name"].fix
    assert "fine, coarse" in found["model.granularity"].fix


def test_unknown_nested_key_suggests_close_match(tmp_path: Path) -> None:
    found = problems(write(tmp_path, "optimizer:\n  weight_decy: 0.1\n"))
    assert found["optimizer.weight_decy"].fix == "did you mean weight_decay?"
    assert found["optimizer.weight_decy"].location.endswith(":2")


def test_strategy_given_as_a_bare_name(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "strategy: full\n")).strategy.name == "full"


@pytest.mark.parametrize("text", ["strategy: [full]\n", "strategy: {freeze_epochs: 1}\n"])
def test_strategy_without_a_name_is_refused(tmp_path: Path, text: str) -> None:
    assert set(problems(write(tmp_path, text))) == {"strategy"}


def test_from_dict_does_not_consume_its_input() -> None:
    values = {"epochs": 3, "strategy": {"name": "full"}}
    config.from_dict(values)
    assert values == {"epochs": 3, "strategy": {"name": "full"}}


# ---------------------------------------------------------------------------------------------
# Syntax errors and file shapes


@pytest.mark.parametrize(
    ("text", "line"),
    [("epochs: 10\nseed: a: b\n", 2), ("epochs: 10\n\tseed: 1\n", 2), ("a: [1, 2\n", 2)],
)
def test_syntax_error_is_one_problem_at_its_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    (problem,) = info.value.problems
    assert problem.location == f"{path}:{line}"
    assert "not valid YAML" in problem.message


@pytest.mark.parametrize("text", ["", "\n", "# nothing set yet\n"])
def test_empty_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    assert config.load(write(tmp_path, text)) == TrialConfig()


@pytest.mark.parametrize("text", ["- epochs: 3\n- seed: 1\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    found = problems(path)
    assert set(found) == {"config"}
    assert found["config"].location == f"{path}:1"


@pytest.mark.parametrize(
    "content",
    [
        b"epochs: [\n",
        b"epochs: 1\n---\nepochs: 2\n",
        pytest.param(
            b"optimizer: &o\n  lr: 0.1\nschedule:\n  <<: *o\n",
            id="merge-key",
        ),
        pytest.param(
            b"seed: !!python/name:os.system\n",
            id="unknown-tag",
        ),
        pytest.param(
            b"seed: !!int abc\n",
            id="bad-int-tag",
        ),
        pytest.param(
            b"{[a, b]: 1}\n",
            id="unhashable-key",
        ),
        pytest.param(
            b"epochs: 3\x00\n",
            id="control-character",
        ),
        pytest.param(
            b"output_dir: caf\xe9\n",
            id="not-utf8",
        ),
        pytest.param(
            b"strategy: {name: [full]}\n",
            id="strategy-name-list",
        ),
    ],
)
def test_malformed_files_raise_only_config_errors_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert all(p.location.startswith(str(path)) for p in info.value.problems)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# to_dict round trip

FULL: dict[str, Any] = {
    "model": {
        "name": "timm:resnet18",
        "pretrained": True,
        "pretrained_file": None,
        "checkpoint": "weights/start.pt",
        "pretrain_on_source": True,
        "num_classes": 7,
        "kwargs": {"drop_rate": 0.1, "depths": [1, 2], "extra": {"a": None}},
        "granularity": "coarse",
        "matcher": {"stem": "^conv1", "blocks": r"^layers\.(\d+)"},
        "grad_checkpointing": True,
    },
    "data": {
        "kind": "synthetic_image",
        "task": "source",
        "root": None,
        "train_samples": 64,
        "val_samples": 32,
        "frames": 1,
        "size": 16,
        "clip_seconds": 2.5,
        "seed": 3,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "augment": False,
        "scale": [0.5, 1.0],
        "hflip": 0.0,
        "color_jitter": 0.0,
        "auto_augment": "rand-m9-mstd0.5",
        "random_erasing": 0.25,
        "mixup": 0.2,
        "cutmix": 1.0,
    },
    "optimizer": {
        "name": "sgd",
        "lr": 0.05,
        "weight_decay": 1e-4,
        "momentum": 0.8,
        "backbone_lr_mult": 0.1,
        "layer_decay": 0.7,
        "unfreeze_warmup_steps": 10,
        "grad_clip": 0.0,
        "accumulate_steps": 4,
    },
    "schedule": {"kind": "constant", "warmup_steps": 5, "min_lr_ratio": 0.1},
    "signals": {"baseline_steps": 4, "window_steps": 6},
    "epochs": 6,
    "batch_size": 8,
    "label_smoothing": 0.1,
    "amp": "bf16",
    "device": "cpu",
    "seed": 11,
    "output_dir": "runs/full",
    "monitor": "val_loss",
    "frozen_norm_eval": False,
    "unfrozen_norm_eval": True,
    "max_nonfinite_steps": 3,
    "num_workers": 2,
    "prefetch_factor": 4,
    "provenance": {"search": "demo", "trial": 3, "timeline": [{"epoch": 1, "n_trainable": 2}]},
}

STRATEGIES = [
    {"name": "fixed", "phases": [[0, 0], [2, 1], [4, 3]]},
    {
        "name": "adaptive",
        "patience": 3,
        "min_improvement": 0.01,
        "blocks_per_step": 2,
        "target_ratio": 0.75,
        "mode": "min",
    },
]


def test_defaults_round_trip() -> None:
    cfg = TrialConfig()
    assert config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s["name"])
def test_full_config_round_trips(strategy: dict[str, Any]) -> None:
    values = {**FULL, "strategy": strategy}
    cfg = config.from_dict(values)
    assert cfg.to_dict() == values
    assert config.from_dict(cfg.to_dict()) == cfg
    assert config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s["name"])
def test_full_config_is_loaded_from_yaml(tmp_path: Path, strategy: dict[str, Any]) -> None:
    values = {**FULL, "strategy": strategy}
    path = write(tmp_path, json.dumps(values, indent=2))
    assert config.load(path) == config.from_dict(values)


def test_to_dict_is_plain_and_independent() -> None:
    cfg = config.from_dict({**FULL, "strategy": STRATEGIES[0]})
    out = cfg.to_dict()
    json.dumps(out)
    out["model"]["kwargs"]["depths"].append(3)
    out["model"]["matcher"]["stem"] = "changed"
    assert cfg.model.kwargs["depths"] == [1, 2]
    assert cfg.model.matcher == FULL["model"]["matcher"]


def test_dict_defaults_are_not_shared_between_instances() -> None:
    a, b = ModelConfig(), ModelConfig()
    a.kwargs["x"] = 1
    assert b.kwargs == {}


# ---------------------------------------------------------------------------------------------
# CLI validate


GOOD = "model:\n  name: timm:resnet18\ndata:\n  kind: synthetic_image\noutput_dir: {out}\n"


def test_validate_good_file_prints_ok_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, GOOD.format(out="runs/trial") + "strategy: full\n")
    code, out, err = run(capsys, "validate", str(path))
    assert code == 0, err
    assert "ok" in out
    assert "timm:resnet18" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.yaml"]


def test_validate_absolute_output_dir_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out" / "trial"
    path = write(tmp_path, GOOD.format(out=out_dir))
    code, _, _ = run(capsys, "validate", str(path))
    assert code == 0
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.yaml"]


def test_validate_bad_file_lists_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "epoch: 3\nbatch_size: 0\namp: no\noptimizer:\n  lr: -1\n"
        "strategy: {name: early_gradual, target_ratio: 2}\n",
    )
    code, out, err = run(capsys, "validate", str(path))
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    for field, line in [
        ("epoch", 1),
        ("batch_size", 2),
        ("amp", 3),
        ("optimizer.lr", 5),
        ("strategy.target_ratio", 6),
    ]:
        assert any(x.strip().startswith(f"{path}:{line}: {field}:") for x in lines), (field, err)
    assert "did you mean epochs?" in err


def test_validate_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "epochs: 10\nseed: a: b\n")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2
    assert f"{path}:2" in err
    assert "Traceback" not in err


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"
    code, out, err = run(capsys, "validate", str(path))
    assert code == 2
    assert out == ""
    assert str(path) in err
    assert not path.exists()


def test_validate_image_folder_needs_an_existing_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "no_such_dir"
    path = write(
        tmp_path, f"model:\n  name: timm:resnet18\ndata:\n  kind: image_folder\n  root: {root}\n"
    )
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2
    assert "data.root" in err
    assert str(root) in err
    assert "Traceback" not in err
    assert not root.exists()


# ---------------------------------------------------------------------------------------------
# params: coerce, check_value, build


@pytest.mark.parametrize("name", ["checkpoint", "num_classes", "matcher"])
def test_optional_fields_accept_null(name: str) -> None:
    assert coerce(f"model.{name}", None, hint(ModelConfig, name)) == (None, None)


def test_optional_int_still_checks_its_type() -> None:
    _, problem = coerce("model.num_classes", "010", hint(ModelConfig, "num_classes"))
    assert problem is not None and "ambiguous" in problem.message
    assert coerce("model.num_classes", "5", hint(ModelConfig, "num_classes")) == (5, None)


@pytest.mark.parametrize(("name", "value"), [("kwargs", 3), ("kwargs", None), ("matcher", "x")])
def test_mapping_fields_refuse_non_mappings(name: str, value: Any) -> None:
    _, problem = coerce(f"model.{name}", value, hint(ModelConfig, name))
    assert problem is not None
    assert problem.field == f"model.{name}"
    assert "mapping" in problem.message


def test_mapping_field_copies_its_value() -> None:
    given = {"a": 1}
    value, problem = coerce("model.kwargs", given, hint(ModelConfig, "kwargs"))
    assert (value, problem) == ({"a": 1}, None)
    assert value is not given


def test_choices_refuse_unknown_value_and_list_them() -> None:
    problem = check_value("device", "gpu", meta(TrialConfig, "device"))
    assert problem is not None
    assert problem.value == "gpu"
    assert "auto, cpu, cuda" in problem.fix
    assert check_value("device", "cuda", meta(TrialConfig, "device")) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    ("cls", "name"),
    [(OptimizerConfig, "lr"), (OptimizerConfig, "momentum"), (OptimizerConfig, "grad_clip")],
)
def test_non_finite_floats_are_refused(cls: type, name: str, value: float) -> None:
    problem = check_value(name, value, meta(cls, name))
    assert problem is not None
    assert "finite" in problem.message


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        ("lr", 0.0, False),
        ("lr", 1e-9, True),
        ("momentum", 1.0, True),
        ("momentum", 1.0000001, False),
        ("weight_decay", 0.0, True),
        ("weight_decay", -1e-9, False),
    ],
)
def test_bounds_are_inclusive_or_exclusive_as_declared(name: str, value: float, ok: bool) -> None:
    assert (check_value(name, value, meta(OptimizerConfig, name)) is None) is ok


@pytest.mark.parametrize(("value", "expected"), [("1e-3", 0.001), (" 2 ", 2.0), (3, 3.0)])
def test_coerce_float_from_strings_and_ints(value: Any, expected: float) -> None:
    coerced, problem = coerce("lr", value, float)
    assert problem is None
    assert type(coerced) is float and coerced == expected


@pytest.mark.parametrize("value", [True, "abc", None, [1]])
def test_coerce_float_refuses_non_numbers(value: Any) -> None:
    assert coerce("lr", value, float)[1] is not None


def test_coerce_str_refuses_numbers_and_null() -> None:
    assert coerce("output_dir", 3, str)[1] is not None
    assert coerce("output_dir", None, str)[1] is not None


def test_build_reports_every_problem_and_returns_none() -> None:
    found: list[Problem] = []
    assert (
        build(OptimizerConfig, {"lr": 0, "nam": "sgd", "momentum": 2}, "optimizer", found) is None
    )
    assert {p.field for p in found} == {"optimizer.lr", "optimizer.nam", "optimizer.momentum"}
    assert next(p for p in found if p.field == "optimizer.nam").fix == "did you mean name?"


def test_build_fills_defaults_and_coerces() -> None:
    found: list[Problem] = []
    built = build(OptimizerConfig, {"lr": "2e-4", "unfreeze_warmup_steps": "5"}, "opt", found)
    assert found == []
    assert built == OptimizerConfig(lr=2e-4, unfreeze_warmup_steps=5)
