"""The package's layers, read from its imports (those inside functions included).

- Only ``unfreeze_hpo.search`` and ``unfreeze_hpo.cluster`` import Ray; reading results does not
  pull it in.
- The library core (blocks, strategies, freezing, signals, the Unfreezer) reaches no YAML,
  pandas or Ray, through any of the modules it imports; ``Unfreezer.from_schedule``, which reads
  an exported YAML file, is the one exception.
- The training loop (``unfreeze_hpo.train``) reaches neither Ray nor pandas.
- No two modules import each other, directly or through others.

An import under ``if TYPE_CHECKING:`` is not run, so it is not counted. An edge goes to the module
named (``from unfreeze_hpo.models import base`` -> ``unfreeze_hpo.models.base``), not to the
packages above it that Python initialises on the way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "unfreeze_hpo"
RAY_FREE_READERS = ("unfreeze_hpo.results",)
CORE = (
    "unfreeze_hpo.blocks",
    "unfreeze_hpo.strategies",
    "unfreeze_hpo.freezing",
    "unfreeze_hpo.signals",
    "unfreeze_hpo.unfreezer",
)
CORE_MAY_NOT_REACH = ("yaml", "pandas", "ray")
EXEMPT = frozenset({("unfreeze_hpo.unfreezer", "Unfreezer.from_schedule")})  # reads YAML


@dataclass(frozen=True)
class Import:
    target: str  # a module of the package, or a third-party top-level name
    where: str  # the function (Class.method) it is inside, "" at module level
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str:
    """``name`` if it is a module of the package, else the nearest package module above it."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text())
    found: list[Import] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub, where)
                continue
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, f"{where}.{child.name}" if where else child.name)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(target_of(alias.name), where, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0 and child.module, f"{module}:{child.lineno}: relative"
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    target = full if full in MODULES else child.module
                    found.append(Import(target_of(target), where, child.lineno))
            else:
                visit(child, where)

    visit(tree, "")
    return found


def target_of(name: str) -> str:
    return resolve(name) if name.startswith("unfreeze_hpo") else name.split(".")[0]


GRAPH = {m: imports_of(m) for m in MODULES}


def reach(start: str, *, exempt: frozenset[tuple[str, str]] = frozenset()) -> Iterator[list[str]]:
    """Every import chain from ``start``: [start, ..., a module or third-party name]."""
    seen: set[str] = set()
    stack = [[start]]
    while stack:
        chain = stack.pop()
        for imp in GRAPH.get(chain[-1], []):
            if any(chain[-1] == m and imp.where.startswith(w) for m, w in exempt):
                continue
            path = [*chain, imp.target]
            yield path
            if imp.target in MODULES and imp.target not in seen:
                seen.add(imp.target)
                stack.append(path)


def test_the_import_graph_is_read() -> None:
    # The reader sees imports at module level, in functions, and the package's own modules.
    assert Import("ray", "", 0).target in {i.target for i in GRAPH["unfreeze_hpo.search.driver"]}
    inside = [i for i in GRAPH["unfreeze_hpo.unfreezer"] if i.where == "Unfreezer.from_schedule"]
    assert [i.target for i in inside] == ["unfreeze_hpo.config"]
    assert len(MODULES) > 40


def test_only_the_search_and_cluster_packages_import_ray() -> None:
    offenders = [
        f"{m}:{i.line}"
        for m, found in GRAPH.items()
        for i in found
        if i.target == "ray" and not m.startswith(("unfreeze_hpo.search.", "unfreeze_hpo.cluster."))
    ]
    assert offenders == []


@pytest.mark.parametrize("reader", RAY_FREE_READERS)
def test_reading_results_never_imports_ray(reader: str) -> None:
    modules = [m for m in MODULES if m == reader or m.startswith(reader + ".")]
    chains = [" -> ".join(c) for m in modules for c in reach(m) if c[-1] == "ray"]
    assert chains == []


def test_the_training_loop_reaches_no_ray_or_pandas() -> None:
    # train.run is the one loop, in a Ray trial and in `unfreeze-hpo train` alike.
    modules = [
        m for m in MODULES if m == "unfreeze_hpo.train" or m.startswith("unfreeze_hpo.train.")
    ]
    assert len(modules) > 4
    chains = [" -> ".join(c) for m in modules for c in reach(m) if c[-1] in ("ray", "pandas")]
    assert chains == []


@pytest.mark.parametrize("core", CORE)
def test_the_library_core_reaches_no_yaml_pandas_or_ray(core: str) -> None:
    modules = [m for m in MODULES if m == core or m.startswith(core + ".")]
    assert modules, core
    chains = [
        " -> ".join(chain)
        for m in modules
        for chain in reach(m, exempt=EXEMPT)
        if chain[-1] in CORE_MAY_NOT_REACH
    ]
    assert chains == []


def test_no_module_imports_itself_through_others() -> None:
    cycles = sorted(" -> ".join(chain) for m in MODULES for chain in reach(m) if chain[-1] == m)
    assert cycles == []
