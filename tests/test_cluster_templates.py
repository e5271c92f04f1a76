"""Lint of the cluster templates in cluster/: the safe defaults every template must keep.

Not a mock cluster: each template is parsed (YAML with ``yaml.safe_load``, the sbatch script as
text) and checked for the properties cluster/README.md promises. Each check is a function that
returns its problems, and the mutation tests below show that each one fails on a broken copy.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
LAUNCHERS = ("aws.yaml", "gcp.yaml")
KUBERAY = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}
SBATCH = "slurm.sbatch"
DOCKERFILE = "Dockerfile"
README = "README.md"
VERSION = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]["version"]
WHEEL = f"unfreeze_hpo-{VERSION}-py3-none-any.whl"  # what `make wheel` writes to dist/
LAUNCHER_KEYS = (
    "cluster_name",
    "provider",
    "available_node_types",
    "head_node_type",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
SHARED_PREFIXES = ("/shared/", "/mnt/", "/nfs/", "s3://", "gs://")
ENV_REF = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
SEARCH = re.compile(r"unfreeze-hpo\s+search\b(?P<args>[^\n'`]*)")
DASHBOARD_HOST = re.compile(r"--dashboard-host[= ]+[\"']?([^\s\"']+)")

Problems = list[str]


# ---------------------------------------------------------------------------------------------
# helpers


def logical_lines(text: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def option(args: str, name: str) -> str | None:
    match = re.search(rf"{name}[= ]+[\"']?([^\s\"']+)", args)
    return match.group(1) if match else None


def containers(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster_spec.get("headGroupSpec") or {})]
    groups += [
        (f"worker group {g.get('groupName')}", g)
        for g in cluster_spec.get("workerGroupSpecs") or []
    ]
    for where, group in groups:
        for container in group.get("template", {}).get("spec", {}).get("containers") or []:
            yield where, container


def env_value(container: dict[str, Any], name: str) -> Any:
    return next((e.get("value") for e in container.get("env") or [] if e.get("name") == name), None)


# ---------------------------------------------------------------------------------------------
# checks shared by every template


def check_no_wildcard_bind(text: str) -> Problems:
    problems = [
        f"binds 0.0.0.0 (line {text[: m.start()].count(chr(10)) + 1})"
        for m in re.finditer(r"0\.0\.0\.0", text)
    ]
    for host in DASHBOARD_HOST.findall(text):
        if host != "127.0.0.1":
            problems.append(f"--dashboard-host={host}, want 127.0.0.1")
    return problems


def check_search_commands(texts: list[str], *, required: bool = True) -> Problems:
    """Every `unfreeze-hpo search` uses shared storage and PostgreSQL with no literal password."""
    problems: Problems = []
    commands = [m.group("args") for text in texts for m in SEARCH.finditer(text)]
    if required and not commands:
        problems.append("no `unfreeze-hpo search` command")
    for args in commands:
        storage = option(args, "--storage-path")
        if storage is None:
            problems.append(f"search without --storage-path: {args.strip()}")
        elif not storage.startswith(SHARED_PREFIXES):
            problems.append(f"--storage-path {storage} is not on shared storage {SHARED_PREFIXES}")
        study = option(args, "--study-storage")
        if study is None:
            problems.append(f"search without --study-storage: {args.strip()}")
            continue
        if not re.match(r"postgresql(\+\w+)?://", study):
            problems.append(f"--study-storage {study} is not PostgreSQL")
            continue
        password = urlsplit(study).password
        if password is not None and not ENV_REF.fullmatch(password):
            problems.append(f"--study-storage {study} has a literal password")
    return problems


# ---------------------------------------------------------------------------------------------
# per-kind checks


def check_launcher(text: str) -> Problems:
    doc = yaml.safe_load(text)
    problems = [f"missing top-level key {k}" for k in LAUNCHER_KEYS if k not in doc]
    if problems:
        return problems
    if doc["head_node_type"] not in doc["available_node_types"]:
        problems.append(f"head_node_type {doc['head_node_type']} is not a node type")
    workers = {k: v for k, v in doc["available_node_types"].items() if k != doc["head_node_type"]}
    if not workers:
        problems.append("no worker node type")
    for name, node_type in workers.items():
        if not (node_type.get("resources") or {}).get("GPU", 0) >= 1:
            problems.append(f"worker node type {name} requests no GPU")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in doc[key] if "ray start" in c]
        if not starts:
            problems.append(f"{key} has no `ray start`")
        for command in starts:
            if not re.search(r"(^|[\s;])RAY_AUTH_MODE=token\b", command):
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
            is_head = "--head" in command
            if is_head != (key == "head_start_ray_commands"):
                problems.append(f"{key}: --head on the wrong node kind")
            if is_head and "--dashboard-host=127.0.0.1" not in command:
                problems.append(f"{key}: head start without --dashboard-host=127.0.0.1")
    return problems


def check_launcher_schema(text: str) -> Problems:
    """Ray's own schema for cluster launcher configs (read from the installed package)."""
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None
    schema = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    errors = jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load(text))
    return [f"schema: {e.message} at {list(e.path)}" for e in errors]


def check_kuberay(text: str, kind: str) -> Problems:
    doc = yaml.safe_load(text)
    problems: Problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')}, want ray.io/v1")
    if doc.get("kind") != kind:
        problems.append(f"kind {doc.get('kind')}, want {kind}")
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec
    if not isinstance(cluster, dict):
        return [*problems, "no cluster spec (spec.rayClusterSpec for a RayJob)"]
    if kind == "RayJob":
        if "unfreeze-hpo search" not in str(spec.get("entrypoint")):
            problems.append("entrypoint does not run `unfreeze-hpo search`")
        # K8sJobMode/HTTPMode submit over the pod network: no route to a 127.0.0.1 job server.
        if spec.get("submissionMode") != "SidecarMode":
            problems.append("a RayJob with dashboard-host 127.0.0.1 needs SidecarMode")
    head = cluster.get("headGroupSpec") or {}
    if (head.get("rayStartParams") or {}).get("dashboard-host") != "127.0.0.1":
        problems.append('headGroupSpec.rayStartParams lacks dashboard-host: "127.0.0.1"')
    auth_by_operator = (cluster.get("authOptions") or {}).get("mode") == "token"
    found = list(containers(cluster))
    if not found:
        problems.append("no containers")
    for where, container in found:
        if not auth_by_operator and env_value(container, "RAY_AUTH_MODE") != "token":
            problems.append(f"{where}: container {container.get('name')} lacks RAY_AUTH_MODE=token")
    gpu_groups = [
        g
        for g in cluster.get("workerGroupSpecs") or []
        for c in g.get("template", {}).get("spec", {}).get("containers") or []
        if int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
    ]
    if not gpu_groups:
        problems.append("no worker group with an nvidia.com/gpu limit")
    return problems


def check_sbatch(text: str) -> Problems:
    problems: Problems = []
    lines = [ln.strip() for ln in logical_lines(text) if not ln.strip().startswith("#")]
    exported = any(re.match(r"export RAY_AUTH_MODE=token\b", ln) for ln in lines)
    starts = [ln for ln in lines if "ray start" in ln]
    heads = [ln for ln in starts if "--head" in ln]
    workers = [ln for ln in starts if "--head" not in ln and "--address" in ln]
    if len(heads) != 1:
        problems.append(f"{len(heads)} head `ray start` lines, want 1")
    if not workers:
        problems.append("no worker `ray start --address`")
    for ln in starts:
        if not ln.startswith("srun "):
            problems.append(f"`ray start` not launched with srun: {ln}")
        if not (exported or "RAY_AUTH_MODE=token" in ln):
            problems.append(f"`ray start` without RAY_AUTH_MODE=token: {ln}")
    for ln in heads:
        if "--dashboard-host=127.0.0.1" not in ln:
            problems.append("head start without --dashboard-host=127.0.0.1")
    code = "\n".join(lines)
    if not re.search(r"--address[= ]+auto\b", "\n".join(m.group(0) for m in SEARCH.finditer(code))):
        problems.append("the search does not use --address auto")
    stops = [ln for ln in lines if re.search(r"\bray stop\b", ln)]
    if not any(ln.startswith("srun ") for ln in stops):
        problems.append("no `srun ... ray stop` across the allocation")
    # `ray stop` must run after the search: directly, or through the function that holds it.
    searches = [m.end() for m in SEARCH.finditer(code)]
    if searches:
        after = code[searches[-1] :]
        funcs = re.findall(r"(\w+)\(\)\s*\{[^}]*\bray stop\b", text)
        if not re.search(r"\bray stop\b", after) and not any(
            re.search(rf"^\s*{f}\s*$", after, re.M) for f in funcs
        ):
            problems.append("`ray stop` is not called after the search")
    return problems


def check_launcher_install(text: str) -> Problems:
    """Every node installs the wheel `make wheel` builds, carried there by file_mounts."""
    doc = yaml.safe_load(text)
    if "git+" in text:
        return ["installs unfreeze-hpo from a git URL, not from the wheel this checkout builds"]
    remote = [r for r, local in (doc.get("file_mounts") or {}).items() if local == f"dist/{WHEEL}"]
    if not remote:
        return [f"file_mounts does not carry dist/{WHEEL} (built by `make wheel`)"]
    if not any(f"pip install {remote[0]}" in c for c in doc.get("setup_commands") or []):
        return [f"setup_commands do not pip install {remote[0]}"]
    return []


def ray_pin(text: str) -> str | None:
    found = re.search(r"ray\[[^\]]*\]==([0-9.]+)", text)
    return found.group(1) if found else None


def check_kuberay_image(text: str) -> Problems:
    """The containers run the image cluster/Dockerfile builds, tagged with this version."""
    problems = []
    for line in text.splitlines():
        if re.match(r"\s*image:", line):
            image = line.split("image:", 1)[1].split("#", 1)[0].strip()
            if not image.endswith(f":{VERSION}") or "cluster/Dockerfile" not in line:
                problems.append(f"image {image} is not the cluster/Dockerfile build of {VERSION}")
    return problems


def check_dockerfile(text: str, ray_version: str | None) -> Problems:
    problems = []
    base = re.search(r"^FROM\s+rayproject/ray:([0-9.]+)-py3\d+-gpu\s*$", text, re.M)
    if not base:
        problems.append("FROM is not one of Ray's GPU images (rayproject/ray:X-py3NN-gpu)")
    elif base.group(1) != ray_version:
        problems.append(f"FROM Ray {base.group(1)}, the launchers pin Ray {ray_version}")
    if not re.search(rf"^COPY\s+dist/{re.escape(WHEEL)}\s", text, re.M):
        problems.append(f"does not COPY dist/{WHEEL} (built by `make wheel`)")
    if not re.search(rf"^RUN\s+pip install\b.*{re.escape(WHEEL)}", text, re.M):
        problems.append(f"does not pip install {WHEEL}")
    return problems


# ---------------------------------------------------------------------------------------------
# the templates as they are


def read(name: str) -> str:
    return (CLUSTER / name).read_text()


def lint(name: str, text: str) -> Problems:
    problems = check_no_wildcard_bind(text)
    if name in LAUNCHERS:
        problems += check_launcher(text) + check_launcher_schema(text)
        problems += check_launcher_install(text)
        problems += check_search_commands(list(strings(yaml.safe_load(text))), required=False)
    elif name in KUBERAY:
        problems += check_kuberay(text, KUBERAY[name]) + check_kuberay_image(text)
        doc = yaml.safe_load(text)
        problems += check_search_commands(list(strings(doc)), required=KUBERAY[name] == "RayJob")
    elif name == DOCKERFILE:
        return check_dockerfile(text, ray_pin(read(LAUNCHERS[0])))
    elif name == SBATCH:
        problems += check_sbatch(text)
        code = [ln for ln in logical_lines(text) if not ln.lstrip().startswith("#")]
        problems += check_search_commands(code)
    else:
        raise AssertionError(name)
    return problems


TEMPLATES = (*LAUNCHERS, *KUBERAY, SBATCH, DOCKERFILE)


def test_every_template_is_linted() -> None:
    present = {
        p.name
        for p in CLUSTER.iterdir()
        if p.suffix in (".yaml", ".yml", ".sbatch") or p.name == DOCKERFILE
    }
    assert present == set(TEMPLATES)


def test_the_launchers_pin_one_ray_version() -> None:
    assert len({ray_pin(read(name)) for name in LAUNCHERS}) == 1


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_keeps_safe_defaults(name: str) -> None:
    assert lint(name, read(name)) == []


def test_readme_has_a_section_per_template_and_safe_search_commands() -> None:
    text = read(README)
    for name in TEMPLATES:
        assert f"`{name}`" in text, f"README has no section naming {name}"
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert check_search_commands([ln for b in blocks for ln in logical_lines(b)]) == []


# ---------------------------------------------------------------------------------------------
# each check fails on a broken copy


Mutation = tuple[str, Callable[[str], str], str]

MUTATIONS: list[Mutation] = [
    # (template, edit, a word of the expected problem)
    ("aws.yaml", lambda t: t.replace("127.0.0.1", "0.0.0.0"), "0.0.0.0"),
    ("gcp.yaml", lambda t: t.replace("--dashboard-host=127.0.0.1", ""), "dashboard-host"),
    (
        "aws.yaml",
        lambda t: t.replace("RAY_AUTH_MODE=token ray start --address", "ray start --address"),
        "RAY_AUTH_MODE",
    ),
    ("gcp.yaml", lambda t: t.replace('"GPU": 1', '"GPU": 0'), "GPU"),
    ("aws.yaml", lambda t: t.replace("head_node_type:", "head_type:"), "head_node_type"),
    ("aws.yaml", lambda t: t.replace("\nmax_workers: 4", "\nmax_worker: 4"), "schema"),
    ("kuberay-raycluster.yaml", lambda t: t.replace('"127.0.0.1"', '"0.0.0.0"'), "0.0.0.0"),
    (
        "kuberay-raycluster.yaml",
        lambda t: t.replace('dashboard-host: "127.0.0.1"', ""),
        "dashboard-host",
    ),
    (
        "kuberay-raycluster.yaml",
        lambda t: t.replace("value: token", "value: disabled", 1),
        "RAY_AUTH_MODE",
    ),
    ("kuberay-raycluster.yaml", lambda t: t.replace("nvidia.com/gpu: ", "cpu-extra: "), "gpu"),
    (
        "kuberay-raycluster.yaml",
        lambda t: t.replace("apiVersion: ray.io/v1", "apiVersion: ray.io/v1alpha1"),
        "apiVersion",
    ),
    ("kuberay-rayjob.yaml", lambda t: t.replace("kind: RayJob", "kind: RayCluster"), "kind"),
    (
        "kuberay-rayjob.yaml",
        lambda t: t.replace("/shared/unfreeze-runs", "unfreeze-runs"),
        "shared",
    ),
    ("kuberay-rayjob.yaml", lambda t: t.replace("unfreeze@", "unfreeze:hunter2@"), "password"),
    (
        "kuberay-rayjob.yaml",
        lambda t: t.replace("postgresql://", "sqlite:///"),
        "PostgreSQL",
    ),
    ("kuberay-rayjob.yaml", lambda t: t.replace("SidecarMode", "K8sJobMode"), "SidecarMode"),
    (
        "slurm.sbatch",
        lambda t: t.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        "0.0.0.0",
    ),
    (
        "slurm.sbatch",
        lambda t: t.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
        "RAY_AUTH_MODE",
    ),
    (
        "slurm.sbatch",
        lambda t: t.replace('    srun --nodes=1 --ntasks=1 -w "$node" \\\n', "    "),
        "srun",
    ),
    (
        "slurm.sbatch",
        lambda t: t.replace("--storage-path /shared/unfreeze-runs", "--storage-path ./runs"),
        "shared",
    ),
    ("slurm.sbatch", lambda t: t.replace("unfreeze@", "unfreeze:s3cret@"), "password"),
    ("slurm.sbatch", lambda t: t.replace("\nstop_ray\n", "\n"), "after the search"),
    ("slurm.sbatch", lambda t: t.replace("ray stop --force", "true"), "ray stop"),
    ("aws.yaml", lambda t: t.replace(f'"dist/{WHEEL}"', '"dist/other.whl"'), "make wheel"),
    (
        "gcp.yaml",
        lambda t: t.replace(f"  - pip install /tmp/unfreeze-hpo/{WHEEL}", "  - echo skipped"),
        "pip install",
    ),
    (
        "kuberay-rayjob.yaml",
        lambda t: t.replace(f"unfreeze-hpo:{VERSION}", "unfreeze-hpo:latest", 1),
        "cluster/Dockerfile",
    ),
    ("Dockerfile", lambda t: t.replace("ray:2.60.0-", "ray:2.50.0-"), "launchers pin"),
    ("Dockerfile", lambda t: t.replace(f"COPY dist/{WHEEL}", "COPY dist/x.whl"), "COPY"),
]


@pytest.mark.parametrize(("name", "edit", "expected"), MUTATIONS)
def test_lint_catches_a_broken_template(
    name: str, edit: Callable[[str], str], expected: str
) -> None:
    original = read(name)
    broken = edit(original)
    assert broken != original, "the mutation no longer applies: update it with the template"
    problems = lint(name, broken)
    assert any(expected.lower() in p.lower() for p in problems), problems


def test_password_reference_by_env_var_is_accepted() -> None:
    url = "postgresql://unfreeze:${UNFREEZE_HPO_DB_PASSWORD}@db:5432/optuna"
    args = f"unfreeze-hpo search --storage-path s3://bucket/runs --study-storage {url}"
    assert check_search_commands([args]) == []
