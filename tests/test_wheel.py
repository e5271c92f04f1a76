"""The package as users install it: a wheel, installed outside the checkout, carries the shipped
search spaces and examples (the defaults of ``unfreeze-hpo search``) and finds them there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout (no dependencies), installed with --target."""
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)]
    subprocess.run(build, check=True, timeout=300, cwd=wheels)
    (wheel,) = wheels.glob("unfreeze_hpo-*.whl")
    # The file the cluster templates carry to their nodes and install (`make wheel` builds it).
    for template in ("aws.yaml", "gcp.yaml", "Dockerfile"):
        assert f"dist/{wheel.name}" in (ROOT / "cluster" / template).read_text(), template
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def run_outside(target: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """A Python of this environment (its torch, Ray, ...) that imports unfreeze_hpo from
    ``target``, started in ``cwd`` (outside the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_installed_wheel_finds_and_validates_its_spaces_and_examples(
    installed: Path, tmp_path: Path
) -> None:
    code = textwrap.dedent(
        """
        import contextlib, io, json, unfreeze_hpo
        from unfreeze_hpo import config, resources
        from unfreeze_hpo.cli import main
        from unfreeze_hpo.search.space import default_space
        space = default_space()
        base = config.load(resources.EXAMPLES / "embedded.yaml")
        validated = {}
        for path in sorted(resources.EXAMPLES.glob("*.yaml")):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                validated[path.name] = (main(["validate", str(path)]), err.getvalue())
        print(json.dumps({
            "package": unfreeze_hpo.__file__,
            "spaces": sorted(p.name for p in resources.SPACES.glob("*.yaml")),
            "examples": str(resources.EXAMPLES),
            "space": space.source,
            "strategies": list(space.strategies),
            "model": base.model.name,
            "validated": validated,
        }))
        """
    )
    done = run_outside(installed, tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("package", "examples", "space"):  # inside the install, not the checkout
        assert Path(found[key]).is_relative_to(installed), (key, found[key])
    assert found["spaces"] == sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert sorted(found["validated"]) == sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
    assert len(found["strategies"]) >= 4 and found["model"] == "pytorchvideo:resnet3d_tiny"
    for name, (code, err) in found["validated"].items():
        if name.endswith("_folder.yaml"):  # real data the user provides
            assert code == 2 and "data.root: no such directory" in err, (name, err)
        else:
            assert code == 0, (name, err)


@pytest.mark.full
def test_a_search_runs_from_the_installed_wheel_on_its_defaults(
    installed: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(
        "model: {name: 'pytorchvideo:resnet3d_tiny', pretrain_on_source: false}\n"
        "data: {kind: synthetic_video, train_samples: 32, val_samples: 16}\n"
        "epochs: 2\nbatch_size: 16\n"
    )
    argv = ["-m", "unfreeze_hpo.cli", "search", "--name", "wheel", "--num-trials", "2"]
    argv += ["--base", str(base), "--no-preflight", "--no-recipes", "--scheduler", "fifo"]
    done = run_outside(installed, tmp_path, *argv)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "best trial #" in done.stdout
    record = (tmp_path / "unfreeze-runs" / "wheel" / "search.yaml").read_text()
    assert str(installed / "unfreeze_hpo" / "resources" / "search_spaces" / "all.yaml") in record
