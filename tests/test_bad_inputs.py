"""Every refusal of bad input, in one place, through the real command.

A refusal exits 2 with one line per problem naming the file and line (where the value came from a
file), the key, the bad value and the fix; it shows no traceback and creates nothing: no run
folder, no study.db, no search.yaml, nothing in the storage path or the working directory.

Not repeated here: resources the cluster lacks (``--gpus-per-trial 0.5`` on a CPU-only machine)
need a real Ray cluster to ask, see tests/test_search.py::
test_trials_the_cluster_cannot_hold_are_refused_before_anything_is_written.
"""

from __future__ import annotations

import hashlib
import math
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TINY_BASE, run, write

from unfreeze_hpo import config, strategies, train, yamlfile
from unfreeze_hpo.config import METRICS, SEARCH_METRICS, TEST_METRICS, TrialConfig
from unfreeze_hpo.errors import ConfigError
from unfreeze_hpo.search.space import SearchSpace, load_space, space_from_dict
from unfreeze_hpo.yamlfile import MAX_YAML_BYTES

# ---------------------------------------------------------------------------------------------
# Helpers


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` and a digest of each file's bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


def refused(capsys: pytest.CaptureFixture[str], root: Path, *argv: str) -> list[str]:
    """Run the command; assert exit 2, no traceback, nothing created under ``root`` (the working
    directory). The problem lines it printed."""
    before = tree(root)
    code, out, err = run(capsys, *argv)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert out == ""
    progress, found, problems = err.partition("error: invalid input\n")
    assert found and "error" not in progress, err  # progress: e.g. "building <model> ..."
    assert tree(root) == before
    return [line.strip() for line in problems.splitlines()]


def the_problem(lines: list[str], *words: str) -> str:
    """The one problem printed; it holds every one of ``words``."""
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: relative defaults (runs/trial, unfreeze-runs) land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_refuses(
    capsys: pytest.CaptureFixture[str], cwd: Path, text: str
) -> tuple[str, list[str]]:
    path = write(cwd / "task.yaml", text)
    return str(path), refused(capsys, cwd, "train", "--config", str(path))


def search_refuses(
    capsys: pytest.CaptureFixture[str], cwd: Path, text: str, *options: str
) -> tuple[str, list[str]]:
    path = write(cwd / "space.yaml", text)
    argv = ("search", "--space", str(path), "--storage-path", str(cwd / "runs"), *options)
    return str(path), refused(capsys, cwd, *argv)


# ---------------------------------------------------------------------------------------------
# YAML: syntax, the YAML 1.1 traps, duplicate keys


@pytest.mark.parametrize(
    ("text", "line"),
    [("epochs: 10\nseed: a: b\n", 2), ("epochs: 10\n\tseed: 1\n", 2), ("a: [1, 2\n", 2)],
)
def test_malformed_yaml_names_file_and_line(
    capsys: pytest.CaptureFixture[str], cwd: Path, text: str, line: int
) -> None:
    path, lines = train_refuses(capsys, cwd, text)
    the_problem(lines, f"{path}:{line}: yaml: not valid YAML", "fix the syntax")
    path, lines = search_refuses(capsys, cwd, text)
    the_problem(lines, f"{path}:{line}: yaml: not valid YAML", "fix the syntax")


def test_exponent_floats_are_numbers(capsys: pytest.CaptureFixture[str], cwd: Path) -> None:
    # PyYAML's YAML 1.1 reads 1e-3 as the string "1e-3"; the product reads YAML 1.2 numbers.
    path = write(cwd / "task.yaml", "optimizer:\n  lr: 1e-3\n")
    code, out, _ = run(capsys, "validate", str(path))
    assert code == 0 and ": ok" in out
    assert config.load(path).optimizer.lr == 0.001
    space = write(cwd / "space.yaml", "strategy: full\ncommon:\n  optimizer.lr: 1e-3\n")
    assert load_space(space).common["optimizer.lr"] == 0.001


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("amp: no\n", "amp", ("'no'", "use one of none, bf16, fp16")),
        ("model:\n  granularity: on\n", "model.granularity", ("'on'", "use one of fine, coarse")),
        ("model:\n  pretrained: yes\n", "model.pretrained", ("'yes'", "write true or false")),
        ("epochs: yes\n", "epochs", ("'yes'", "must be an integer")),
        ("optimizer:\n  lr: off\n", "optimizer.lr", ("'off'", "must be a number")),
    ],
)
def test_yaml_11_booleans_are_strings_refused_where_they_do_not_fit(
    capsys: pytest.CaptureFixture[str], cwd: Path, text: str, key: str, words: tuple[str, ...]
) -> None:
    path, lines = train_refuses(capsys, cwd, text)
    the_problem(lines, f"{path}:{len(text.splitlines())}: {key}: ", *words)


def test_leading_zero_is_refused_as_ambiguous(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    words = ("'010'", "leading zero is ambiguous", "without leading zeros")
    path, lines = train_refuses(capsys, cwd, "seed: 1\nepochs: 010\n")
    the_problem(lines, f"{path}:2: epochs: ", *words)
    path, lines = search_refuses(capsys, cwd, "strategy: full\ncommon:\n  epochs: 010\n")
    the_problem(lines, f"{path}:3: common.epochs: ", *words)
    argv = ("blocks", "pytorchvideo:resnet3d_tiny", "--strategy", "early_gradual")
    lines = refused(capsys, cwd, *argv, "--set", "freeze_epochs=010")
    the_problem(lines, "strategy.freeze_epochs: ", *words)


def test_duplicate_keys_name_both_lines(capsys: pytest.CaptureFixture[str], cwd: Path) -> None:
    path, lines = train_refuses(capsys, cwd, "epochs: 1\nseed: 2\nepochs: 3\n")
    the_problem(lines, f"{path}:3: epochs: duplicate key (first at line 1)", "keep one of them")
    text = "strategy: full\ncommon:\n  epochs: 2\n  seed: 1\n  epochs: 3\n"
    path, lines = search_refuses(capsys, cwd, text)
    the_problem(lines, f"{path}:5: common.epochs: duplicate key (first at line 3)")


# ---------------------------------------------------------------------------------------------
# Unknown keys and names


def test_unknown_keys_suggest_the_close_one(capsys: pytest.CaptureFixture[str], cwd: Path) -> None:
    path, lines = train_refuses(capsys, cwd, "epochs: 2\noptimizer:\n  weight_decy: 0.1\n")
    the_problem(lines, f"{path}:3: optimizer.weight_decy: unknown key", "did you mean weight_decay")
    text = "strategy: early_gradual\nstrategies:\n  early_gradual:\n    freeze_epoks: 1\n"
    path, lines = search_refuses(capsys, cwd, text)
    the_problem(
        lines, f"{path}:4: strategies.early_gradual.freeze_epoks: ", "did you mean freeze_epochs"
    )
    path, lines = search_refuses(capsys, cwd, "strategy: full\ncomon:\n  epochs: 2\n")
    the_problem(lines, f"{path}:2: comon: unknown key", "did you mean common")


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            "strategy: {name: early_gradul}\n",
            "strategy.name",
            ("unknown strategy", "did you mean early_gradual", "known: early_gradual, adaptive"),
        ),
        (
            "optimizer: {name: adamm}\n",
            "optimizer.name",
            ("unknown value", "'adamm'", "use one of adamw, adam, sgd"),
        ),
        (
            "model: {name: 'timm:resnt18'}\n",
            "model.name",
            ("unknown timm model", "did you mean timm:resnet18"),
        ),
        (
            "model: {name: 'keras:resnet18'}\n",
            "model.name",
            ("unknown model family 'keras'", "timm:<name> (e.g. timm:resnet18)"),
        ),
    ],
)
def test_unknown_names_in_a_config_list_the_choices(
    capsys: pytest.CaptureFixture[str], cwd: Path, text: str, key: str, words: tuple[str, ...]
) -> None:
    path, lines = train_refuses(capsys, cwd, text)
    the_problem(lines, f"{path}:1: {key}: ", *words)


def test_unknown_names_in_a_search_list_the_choices(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    path, lines = search_refuses(capsys, cwd, "strategy: [fixd]\n")
    the_problem(lines, f"{path}:1: strategy: unknown strategy", "did you mean fixed", "'fixd'")
    # The sampler is always Optuna's TPE; what a space chooses is each parameter's distribution.
    text = "strategy: full\ncommon:\n  optimizer.lr: {type: floot, low: 0.1, high: 1}\n"
    path, lines = search_refuses(capsys, cwd, text)
    the_problem(
        lines, f"{path}:3: common.optimizer.lr.type: unknown distribution", "did you mean float"
    )
    path, lines = search_refuses(capsys, cwd, "strategy: full\n", "--scheduler", "ashaa")
    the_problem(lines, "--scheduler: unknown value (got 'ashaa')", "use one of asha, fifo")


def test_a_metric_the_trials_never_report_is_refused_with_the_list(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    _, lines = search_refuses(capsys, cwd, "strategy: full\n", "--metric", "val_accuracy")
    problem = the_problem(
        lines, "--metric: unknown value (got 'val_accuracy')", "did you mean val_acc"
    )
    assert f"use one of {', '.join(SEARCH_METRICS)}" in problem
    assert "test_acc" not in problem  # the test split is reported, never selected on


def test_an_unknown_objective_or_a_k_below_1_is_refused(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    _, lines = search_refuses(capsys, cwd, "strategy: full\n", "--objective", "mean")
    the_problem(lines, "--objective: unknown value (got 'mean')", "last_k_mean, final, best")
    _, lines = search_refuses(capsys, cwd, "strategy: full\n", "--objective-k", "0")
    the_problem(lines, "--objective-k", "got 0")


def test_the_metric_names_are_the_ones_a_trial_reports(tmp_path: Path) -> None:
    cfg = config.from_dict(
        {
            "model": {"name": "pytorchvideo:resnet3d_tiny"},
            "data": {"train_samples": 8, "val_samples": 8, "frames": 2, "size": 16},
            "epochs": 1,
            "batch_size": 8,
            "output_dir": str(tmp_path / "trial"),
        }
    )
    reported: list[dict[str, float]] = []
    train.run(cfg, lambda metrics, _: reported.append(metrics), log=lambda _: None)
    names = {k for k in reported[0] if not k.startswith("lr/")}
    assert names == set(METRICS) - set(TEST_METRICS)  # this data has no test split


# ---------------------------------------------------------------------------------------------
# Out-of-range values


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("{type: float, low: 0.1, high: 0.01}", ("`low <= high` must hold",)),
        ("{type: float, low: 0.0, high: 0.1, log: true}", ("`low > 0` must hold for `log=True`",)),
        ("{type: float, low: 0.0001, high: 0.1, step: 0}", ("`step > 0` must hold",)),
    ],
)
def test_distribution_ranges_ray_does_not_check(
    capsys: pytest.CaptureFixture[str], cwd: Path, spec: str, words: tuple[str, ...]
) -> None:
    path, lines = search_refuses(capsys, cwd, f"strategy: full\ncommon:\n  optimizer.lr: {spec}\n")
    the_problem(lines, f"{path}:3: common.optimizer.lr: ", *words, "change low/high/log/step")


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            "strategy: full\ncommon:\n  schedule.kind: {type: categorical, choices: []}\n",
            "common.schedule.kind",
            ("one or more elements",),
        ),
        (
            "strategy: early_gradual\nstrategies:\n  early_gradual:\n    target_ratio: 1.5\n",
            "strategies.early_gradual.target_ratio",
            ("out of range (got 1.5)", "use a value > 0 and <= 1"),
        ),
        (
            "strategy: early_gradual\nstrategies:\n  early_gradual:\n"
            "    target_ratio: {type: float, low: 0.0, high: 0.5}\n",
            "strategies.early_gradual.target_ratio.low",
            ("out of range (got 0.0)", "use a value > 0 and <= 1"),
        ),
        (
            "strategy: full\ncommon:\n  epochs: 0\n",
            "common.epochs",
            ("out of range (got 0)", "use a value >= 1"),
        ),
        (
            "strategy: full\ncommon:\n  epochs: {type: int, low: -2, high: 4}\n",
            "common.epochs.low",
            ("out of range (got -2)", "use a value >= 1"),
        ),
    ],
)
def test_out_of_range_values_in_a_space(
    capsys: pytest.CaptureFixture[str], cwd: Path, text: str, key: str, words: tuple[str, ...]
) -> None:
    path, lines = search_refuses(capsys, cwd, text)
    the_problem(lines, f"{path}:{len(text.splitlines())}: {key}: ", *words)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("epochs: 0\n", "epochs", ("out of range (got 0)", "use a value >= 1")),
        (
            "strategy: {name: early_gradual, target_ratio: 0}\n",
            "strategy.target_ratio",
            ("out of range (got 0.0)", "use a value > 0 and <= 1"),
        ),
        (
            "strategy: {name: adaptive, target_ratio: 1.01}\n",
            "strategy.target_ratio",
            ("out of range (got 1.01)", "<= 1"),
        ),
        ("optimizer: {lr: -1e-3}\n", "optimizer.lr", ("out of range (got -0.001)", "> 0")),
        ("optimizer: {lr: .nan}\n", "optimizer.lr", ("must be a finite number",)),
    ],
)
def test_out_of_range_values_in_a_config(
    capsys: pytest.CaptureFixture[str], cwd: Path, text: str, key: str, words: tuple[str, ...]
) -> None:
    path, lines = train_refuses(capsys, cwd, text)
    the_problem(lines, f"{path}:1: {key}: ", *words)
    task = write(cwd / "ok.yaml", "epochs: 2\n")
    lines = refused(capsys, cwd, "train", "--config", str(task), "--epochs", "0")
    the_problem(lines, "--epochs: must be >= 1 (got 0)")


def test_block_counts_beyond_the_model_are_refused(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    # pytorchvideo:resnet3d_tiny has 5 blocks (the default model); a phase or a start asking
    # for more used to be a note at training time, "all are unfrozen".
    text = "epochs: 4\nstrategy:\n  name: fixed\n  phases: [[0, 0], [2, 9]]\n"
    path, lines = train_refuses(capsys, cwd, text)
    the_problem(
        lines,
        f"{path}:4: strategy.phases[1]: asks for 9 blocks but the model has 5 (got [2, 9])",
        "use at most 5, e.g. [2, 5]",
    )
    text = "strategy: progressive\nstrategies:\n  progressive:\n    initial_blocks: 7\n"
    path, lines = search_refuses(capsys, cwd, text)
    the_problem(
        lines,
        f"{path}:4: strategies.progressive.initial_blocks: asks for 7 blocks but the model has 5",
        "use at most 5",
    )
    argv = ("blocks", "pytorchvideo:resnet3d_tiny", "--strategy", "fixed")
    lines = refused(capsys, cwd, *argv, "--set", "phases=[[0, 6]]")
    the_problem(lines, "strategy.phases[0]: asks for 6 blocks but the model has 5")


def test_a_batch_the_workers_of_a_trial_cannot_split_is_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    base = write(cwd / "base.yaml", TINY_BASE)  # batch_size 16
    space = "strategy: full\n"
    _, lines = search_refuses(capsys, cwd, space, "--base", str(base), "--workers-per-trial", "3")
    the_problem(
        lines,
        "batch_size: is the global batch, split evenly over --workers-per-trial 3 workers (got 16)",
        "use a multiple of 3, or another --workers-per-trial",
    )


# ---------------------------------------------------------------------------------------------
# Hostile files: tags, alias bombs, size, nesting


PWNED = "pwned"  # what a constructed os.system call would create in the working directory


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f"seed: !!python/object/apply:os.system ['touch {PWNED}']\n", "seed"),
        ("seed: !!python/name:os.system\n", "seed"),
        ("model: !!python/object:argparse.Namespace {name: x}\n", "model"),
        (f"model:\n  kwargs: !!python/object/new:os.system ['touch {PWNED}']\n", "model.kwargs"),
    ],
)
def test_python_tags_are_refused_never_constructed(
    capsys: pytest.CaptureFixture[str], cwd: Path, text: str, key: str
) -> None:
    path, lines = train_refuses(capsys, cwd, text)
    the_problem(
        lines, f"{path}:{len(text.splitlines())}: {key}: Python tags are refused", "remove the tag"
    )
    path, lines = search_refuses(capsys, cwd, f"strategy: full\ncommon:\n  {text}")
    the_problem(lines, "Python tags are refused")
    assert not (cwd / PWNED).exists()


def test_other_tags_on_mappings_are_refused(capsys: pytest.CaptureFixture[str], cwd: Path) -> None:
    path, lines = train_refuses(capsys, cwd, "model: !!set {name, pretrained}\n")
    the_problem(lines, f"{path}:1: model: unsupported YAML tag", "write a plain mapping")


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": 9 levels of 9 aliases each expand to 9**9 values."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_without_expanding_it(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    # Walked, the bomb's 9**9 values take minutes of CPU; built, gigabytes. The bound is on this
    # process's CPU time (12x what the refusal takes here), which other processes do not slow.
    started = time.process_time()
    tracemalloc.start()
    try:
        path, lines = train_refuses(capsys, cwd, alias_bomb())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - started < 10
    assert peak < 100 * 2**20
    the_problem(lines, f"{path}:", "too many values once its aliases (*name) are expanded")


def test_a_recursive_alias_is_refused(capsys: pytest.CaptureFixture[str], cwd: Path) -> None:
    path, lines = train_refuses(capsys, cwd, "epochs: 2\nmodel:\n  kwargs: &k {again: *k}\n")
    the_problem(lines, f"{path}:3: model.kwargs.again: a collection cannot hold an alias of itself")


def test_deep_nesting_is_refused(capsys: pytest.CaptureFixture[str], cwd: Path) -> None:
    # PyYAML's composer recurses per level: 5000 levels used to be a RecursionError.
    path, lines = train_refuses(capsys, cwd, "epochs: " + "[" * 5000 + "]" * 5000 + "\n")
    the_problem(lines, f"{path}:1: yaml: nested too deeply", "flatten it")


def test_a_huge_file_is_refused_before_it_is_read(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    text = "epochs: 2\n" + "# padding\n" * (MAX_YAML_BYTES // 10 + 1)
    path, lines = train_refuses(capsys, cwd, text)
    the_problem(lines, f"{path}: config: ", f"more than the {MAX_YAML_BYTES:,} a YAML input")
    path, lines = search_refuses(capsys, cwd, "strategy: full\n" + text[10:])
    the_problem(lines, f"{path}: space: ", "more than the")


# ---------------------------------------------------------------------------------------------
# Names and paths


@pytest.mark.parametrize(
    "name", ["../../etc", "a/b", "..", ".", ".hidden", "/abs", "-rf", "two words", "", "x" * 129]
)
def test_search_names_must_be_plain_folder_names(
    capsys: pytest.CaptureFixture[str], cwd: Path, name: str
) -> None:
    lines = refused(capsys, cwd, "search", f"--name={name}", "--storage-path", str(cwd / "runs"))
    the_problem(lines, f"--name: not a plain folder name (got {name!r})", "e.g. demo-2")


def test_nul_characters_in_names_and_paths_are_refused(
    capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    nul = "contains a NUL character"
    lines = refused(capsys, cwd, "search", "--name", "a\0b", "--storage-path", "runs")
    the_problem(lines, f"--name: {nul} (got 'a\\x00b')", "remove it")
    lines = refused(capsys, cwd, "search", "--storage-path", "ru\0ns")
    the_problem(lines, f"--storage-path: {nul}")
    task = write(cwd / "task.yaml", "epochs: 1\n")
    lines = refused(capsys, cwd, "train", "--config", str(task), "--output-dir", "out\0put")
    the_problem(lines, f"--output-dir: {nul}")
    lines = refused(capsys, cwd, "train", "--config", "task\0.yaml")
    the_problem(lines, "config: no such file")
    lines = refused(capsys, cwd, "export", "runs/demo", "--out", "best\0.yaml")
    the_problem(lines, f"--out: {nul}")
    for command in ("trials", "best", "export", "report"):
        extra = ("--out", "best.yaml") if command == "export" else ()
        lines = refused(capsys, cwd, command, "runs/de\0mo", *extra)
        the_problem(lines, f"SEARCH: {nul}")


def test_an_over_long_path_is_no_such_file(capsys: pytest.CaptureFixture[str], cwd: Path) -> None:
    lines = refused(capsys, cwd, "train", "--config", "x" * 300 + ".yaml")
    the_problem(lines, "config: no such file")
    lines = refused(capsys, cwd, "search", "--space", "x" * 300 + ".yaml", "--storage-path", "r")
    the_problem(lines, "space: no such file")


# ---------------------------------------------------------------------------------------------
# Property-based: any document is a config or space, or a ConfigError; never another exception

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    # Words the product gives meaning to, and names the OS refuses.
    st.sampled_from(
        [
            *("1e-3", "010", "no", "on", ".inf", "max", "cosine", "fixed", "float", "categorical"),
            *("timm:resnet18", "pytorchvideo:resnet3d_tiny", "image_folder", "video_csv"),
            *("", "/", "~", "a\0b", "x" * 300, "x/" * 200),
        ]
    ),
)
NAMES = [*strategies.REGISTRY, "nope"]
PARAMS = sorted({f for cls in strategies.REGISTRY.values() for f in cls().params()})
FIELDS = [
    "epochs",
    "seed",
    "amp",
    "output_dir",
    "strategy",
    "model",
    "model.kwargs",
    "optimizer.lr",
    "optimizer.name",
    "schedule.kind",
    "data.root",
    "faults.inject",
    "optimizer..lr",
]


def keys(known: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(known), st.text(max_size=8))


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(keys(FIELDS), inner, max_size=3)
        ),
        max_leaves=8,
    )


NUMBERS = st.one_of(st.integers(-5, 100), st.floats(-1, 100), SCALARS)
DISTRIBUTIONS = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["float", "int", "categorical", "floot"]), SCALARS)},
    optional={
        "low": NUMBERS,
        "high": NUMBERS,
        "log": st.one_of(st.booleans(), SCALARS),
        "step": NUMBERS,
        "choices": st.one_of(st.lists(nested(SCALARS), max_size=4), nested(SCALARS)),
        "stepp": SCALARS,
    },
)
SPECS = st.one_of(DISTRIBUTIONS, nested(SCALARS))
SPACES = st.fixed_dictionaries(
    {},
    optional={
        "strategy": st.one_of(
            st.sampled_from(NAMES), st.lists(st.one_of(st.sampled_from(NAMES), SCALARS), max_size=3)
        ),
        "strategies": st.one_of(
            st.dictionaries(
                keys(NAMES), st.dictionaries(keys(PARAMS), SPECS, max_size=3), max_size=3
            ),
            nested(SCALARS),
        ),
        "common": st.one_of(st.dictionaries(keys(FIELDS), SPECS, max_size=4), nested(SCALARS)),
        "extra": nested(SCALARS),
    },
)
PATHS = st.sampled_from(["", "/", "~", "missing", "x" * 300, "a\0b", "~nobody/x"])
# Each section's fields, with values that reach its checks (a real data kind with a root ...).
SECTIONS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "model": {
        "name": st.sampled_from(["timm:resnet18", "pytorchvideo:resnet3d_tiny", "timm:x", "x"]),
        "checkpoint": PATHS,
        "kwargs": nested(SCALARS),
        "granularity": st.sampled_from(["fine", "coarse"]),
        "matcher": nested(SCALARS),
    },
    "data": {
        "kind": st.sampled_from(["synthetic_video", "image_folder", "video_folder", "video_csv"]),
        "root": PATHS,
        "train_samples": NUMBERS,
        "frames": NUMBERS,
        "task": SCALARS,
    },
    "optimizer": {"name": st.sampled_from(["sgd", "adamw"]), "lr": NUMBERS, "momentum": NUMBERS},
    "faults": {"log": PATHS, "inject": st.lists(nested(SCALARS), max_size=2)},
}
TRIALS = st.fixed_dictionaries(
    {},
    optional={
        **{
            section: st.one_of(
                st.fixed_dictionaries(
                    {}, optional={k: st.one_of(v, SCALARS) for k, v in fields.items()}
                ),
                nested(SCALARS),
            )
            for section, fields in SECTIONS.items()
        },
        "strategy": st.one_of(
            st.sampled_from(NAMES),
            st.fixed_dictionaries(
                {"name": st.one_of(st.sampled_from(NAMES), SCALARS)},
                optional={p: nested(SCALARS) for p in PARAMS},
            ),
            nested(SCALARS),
        ),
        "epochs": SCALARS,
        "amp": SCALARS,
        "provenance": nested(SCALARS),
        "unknown": SCALARS,
    },
)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def built_both_ways(doc: dict[str, Any], build: Any) -> list[Any]:
    """``build(values, lines)`` of ``doc`` as given, then as a file gives it (dumped and read by
    the product's loader); a ConfigError is an answer too, with a message and a fix."""
    out = []
    for from_file in (False, True):
        try:
            if from_file:
                values, lines = yamlfile.parse_yaml(yaml.safe_dump(doc), "doc.yaml")
            else:
                values, lines = doc, {}
            out.append(build(values, lines))
        except ConfigError as exc:
            assert all(p.message and p.fix for p in exc.problems), exc.problems
    return out


@PROPERTY
@given(doc=SPACES)
def test_any_space_document_is_a_space_or_a_config_error(doc: dict[str, Any]) -> None:
    for space in built_both_ways(
        doc, lambda values, lines: space_from_dict(values, lines=lines, source="doc.yaml")
    ):
        assert isinstance(space, SearchSpace)
        for dist in space.distributions().values():
            for number in (getattr(dist, "low", 0.0), getattr(dist, "high", 0.0)):
                assert math.isfinite(number)


@PROPERTY
@given(doc=TRIALS)
def test_any_trial_document_is_a_config_or_a_config_error(doc: dict[str, Any]) -> None:
    for cfg in built_both_ways(
        doc, lambda values, lines: config.from_dict(values, lines=lines, source="doc.yaml")
    ):
        assert isinstance(cfg, TrialConfig)


# ---------------------------------------------------------------------------------------------
# A resumed search with another space (a real search first: Ray, last in the module)

FIRST_SPACE = """\
strategy: early_gradual
strategies:
  early_gradual:
    freeze_epochs: 0
    target_ratio: {type: float, low: 0.2, high: 0.7}
common:
  optimizer.lr: 3e-2
"""
CHANGED_SPACE = """\
strategy: early_gradual
strategies:
  early_gradual:
    freeze_epochs: 0
    target_ratio: {type: float, low: 0.2, high: 0.9}
common:
  optimizer.weight_decay: 0.01
"""


def test_a_resumed_search_refuses_a_changed_space(
    ray_session: None, capsys: pytest.CaptureFixture[str], cwd: Path
) -> None:
    base = write(cwd / "base.yaml", TINY_BASE.replace("epochs: 4", "epochs: 1"))
    first = write(cwd / "first.yaml", FIRST_SPACE)
    changed = write(cwd / "changed.yaml", CHANGED_SPACE)
    argv = (
        *("search", "--name", "resumed", "--storage-path", "runs", "--base", str(base)),
        *("--num-trials", "1", "--max-concurrent", "1", "--scheduler", "fifo"),
        *("--no-preflight", "--no-recipes"),
    )
    code, out, err = run(capsys, *argv, "--space", str(first))
    assert code == 0, out + err
    assert (cwd / "runs" / "resumed" / "study.db").is_file()
    lines = refused(capsys, cwd, *argv, "--space", str(changed))
    assert len(lines) == 3, lines
    ratio, added, dropped = lines
    assert ratio.startswith(
        f"{changed}:{line_of(CHANGED_SPACE, 'target_ratio')}: "
        "strategies.early_gradual.target_ratio: changed from "
        "{'type': 'float', 'low': 0.2, 'high': 0.7}, the value search 'resumed' started with"
    ), ratio
    assert "resume with the space recorded in" in ratio and "give --name a new search" in ratio
    assert f"{changed}:7: common.optimizer.weight_decay: not in the space" in added
    assert "common.optimizer.lr: missing, but the space search 'resumed'" in dropped
    assert "started with has 0.03" in dropped
