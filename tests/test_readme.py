from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from support import require_real

from unfreeze_hpo.cli import main

README = (Path(__file__).parents[1] / "README.md").read_text()


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_library_examples_run_and_print_what_the_readme_shows(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parents[1])  # examples name files from the repo root
    examples = [example for example in fenced("python") if "samples." not in example]
    assert len(examples) == 2
    for example in examples:
        exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    shown = [line for line in README.splitlines() if line.startswith("epoch ")]
    assert len(shown) == 3 and all(line in printed for line in shown)
    shown = [line for line in README.splitlines() if line.startswith("[params] epoch")]
    assert shown and shown[0] in printed


@pytest.mark.slow
def test_quickstart_console_output_matches(capsys: pytest.CaptureFixture[str]) -> None:
    (session,) = fenced("console")
    command, *expected = session.strip().splitlines()
    argv = shlex.split(command.removeprefix("$ "))
    assert argv[0] == "unfreeze-hpo"
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out.splitlines()
    for line in expected:
        if line.strip() != "...":
            assert line in out


def test_examples_are_valid_configs() -> None:
    from unfreeze_hpo.config import load
    from unfreeze_hpo.errors import ConfigError

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        try:
            load(path)
        except ConfigError as exc:  # real-data examples point at folders the user provides
            assert {p.field for p in exc.problems} == {"data.root"}, path


def test_the_real_samples_example_writes_what_its_config_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    require_real()
    (example,) = [example for example in fenced("python") if "samples." in example]
    (config,) = [block for block in fenced("yaml") if block.startswith("# digits.yaml")]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    (tmp_path / "digits.yaml").write_text(config)
    assert main(["validate", "digits.yaml"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["test", "train", "val"]
