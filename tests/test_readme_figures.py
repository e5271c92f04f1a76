"""Every figure with a unit in README.md names where it comes from, and equals it there.

A figure is a number with one of the units in ``UNITS`` (times, sizes, per cents, ratios,
parameter counts, terminal columns). Machine descriptions ("2 CPU cores") and counts of things
(trials, clips, epochs) are not figures; the pretraining's clips and epochs are checked against
the code by their own test below. In a sentence that names a benchmark, every decimal number
(an accuracy, say) counts as a figure too.

The sentence, table row or code block holding a figure (a code block: with the paragraph just
above it) must name one of its sources, and that source must give the same figure:

- ``benchmarks/NAME.py``: the script exists and its section of docs/benchmarks.md has the figure;
- ``docs/measured.md``: the figure is in that page's table, in a row with its command and date;
- a constant in backticks (``RECORD_RETRY_S``, or ``module.NAME``): the package defines it once,
  at module level, with the figure's value (read from the source with ``ast``, no import);
- ``tests/test_readme.py``: the figure is in a README output that test compares with what the
  command or example really prints (the console block, or output lines it selects);
- another ``tests/test_*.py``: the quoted message holding the figure is in that test.

Nothing here trains or imports torch; it reads files only.
"""

from __future__ import annotations

import ast
import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "unfreeze_hpo"
README = (ROOT / "README.md").read_text()
MEASURED = ROOT / "docs" / "measured.md"
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
README_TEST = ROOT / "tests" / "test_readme.py"

_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
NUMBER = rf"(?<![\w.]){_NUMBER}(?:\s?[–-]\s?{_NUMBER})?"  # 1–2 is one figure
_TIME_UNIT = r"(?:ms|s|sec|seconds?|min|minutes?|h|hours?|days?)"
_SPELLED = r"(?:half an?|one|two|three|four|five|six|seven|eight|nine|ten|a few|several)"
UNITS = {
    "time": (
        rf"{NUMBER}\s?(?:h|min)\s+{_NUMBER}\s?(?:min|s)\b"  # 6 min 9 s
        rf"|{NUMBER}\s?{_TIME_UNIT}\b"
        rf"|\b{_SPELLED}\s+(?:seconds?|minutes?|hours?)\b"  # half a minute
        r"|\ban?\s+(?:minute|hour|day)\b"  # not "a second one"
    ),
    "size": rf"{NUMBER}\s?(?:[kKMGTP]i?B|bytes?)\b",
    "percent": rf"{NUMBER}\s?%",
    "ratio": rf"{NUMBER}\s?[x×](?!\w)|(?<![\w.])[x×]\s?{_NUMBER}(?!\.?\w)",  # 1.8x, x4.2
    "parameters": rf"{NUMBER}(?:\s?[KMB])?(?=\s+(?:\w+\s+)?parameters\b)",
    "columns": rf"{NUMBER}\s+columns\b",
}
FIGURE = re.compile("|".join(f"(?P<{kind}>{pattern})" for kind, pattern in UNITS.items()))
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?!\.?\w)")

BENCHMARK = re.compile(r"benchmarks/(\w+)\.py")
CONSTANT = re.compile(r"`((?:\w+\.)*[A-Z][A-Z0-9_]{2,})`")
OTHER_TEST = re.compile(r"tests/(test_\w+)\.py")
SENTENCE_END = re.compile(r"(?<=[.!?])(?<!e\.g\.)(?<!i\.e\.)\s+(?=[A-Z*`(\[])")
SECONDS = {"ms": 1e-3, "s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600}
SECONDS |= {"hour": 3600, "day": 86400}


def normal(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Unit:
    """A sentence, a table row or a fenced code block of the README."""

    start: int  # offsets into the README text
    end: int
    kind: str  # "prose", "row" or "code"
    language: str = ""  # a code block's
    context: str = ""  # a code block's: the paragraph just above it


@dataclass(frozen=True)
class Figure:
    text: str  # whitespace normalised
    kind: str
    start: int
    unit: Unit


def units(text: str) -> Iterator[Unit]:
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    paragraph: list[int] = []  # line indexes of the prose paragraph being read
    last_paragraph = ""

    def flush() -> Iterator[Unit]:
        nonlocal last_paragraph
        if paragraph:
            start, end = offsets[paragraph[0]], offsets[paragraph[-1] + 1]
            last_paragraph = text[start:end]
            cut = start
            for boundary in SENTENCE_END.finditer(text, start, end):
                yield Unit(cut, boundary.start(), "prose")
                cut = boundary.end()
            yield Unit(cut, end, "prose")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            yield from flush()
            language, j = line[3:].strip(), i + 1
            while not lines[j].startswith("```"):
                j += 1
            yield Unit(offsets[i + 1], offsets[j], "code", language, last_paragraph)
            last_paragraph, i = "", j + 1
            continue
        if not line.strip() or line.startswith(("#", "|", "- ")):
            yield from flush()
        if line.startswith(("#", "|")):
            last_paragraph = ""
        if line.startswith("|"):
            yield Unit(offsets[i], offsets[i + 1], "row")
        elif line.strip() and not line.startswith("#"):
            paragraph.append(i)
        i += 1
    yield from flush()


def figures(text: str) -> Iterator[Figure]:
    for unit in units(text):
        found = [
            Figure(normal(m.group()), m.lastgroup or "", m.start(), unit)
            for m in FIGURE.finditer(text, unit.start, unit.end)
        ]
        yield from found
        if unit.kind != "code" and BENCHMARK.search(text, unit.start, unit.end):
            taken = [(f.start, f.start + len(f.text)) for f in found]
            for m in DECIMAL.finditer(text, unit.start, unit.end):
                if not any(a <= m.start() < b for a, b in taken):
                    yield Figure(m.group(), "decimal", m.start(), unit)


# ---------------------------------------------------------------------------------------------
# The sources


def measured_rows() -> list[dict[str, str]]:
    """docs/measured.md's table, one dict per row, keyed by the header's cells."""
    rows = [line for line in MEASURED.read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    header, _rule, *body = cells
    assert header[:4] == ["README figure", "measured", "command", "machine"], header
    return [dict(zip(header, row, strict=True)) for row in body]


@functools.cache
def benchmark_sections() -> dict[str, str]:
    """Each benchmark script named in docs/benchmarks.md -> the text of the sections naming it."""
    sections = re.split(r"^## ", BENCHMARKS_DOC.read_text(), flags=re.M)[1:]  # not the preamble
    found: dict[str, str] = {}
    for section in sections:
        for name in set(BENCHMARK.findall(section)):
            found[name] = found.get(name, "") + normal(section)
    return found


@functools.cache
def constant(name: str) -> object:
    """The value of module-level constant ``NAME`` or ``module.NAME`` in the package source."""
    *qualifier, bare = name.split(".")
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.parent.name if path.name == "__init__.py" else path.stem
        if qualifier and qualifier[-1] != module:
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            if any(isinstance(t, ast.Name) and t.id == bare for t in targets):
                assert node.value is not None
                hits.append((path, ast.literal_eval(node.value)))
    assert len(hits) == 1, f"`{name}` is defined {len(hits)} times in the package: {hits}"
    return hits[0][1]


def value(figure: Figure) -> float:
    """The figure as one number, in seconds for a time; NaN for a range or a spelled-out time."""
    parts = re.findall(rf"({_NUMBER})\s?([a-z]*)", figure.text)
    if not parts or "–" in figure.text:
        return math.nan
    if figure.kind != "time":
        return float(parts[0][0].replace(",", ""))
    total = 0.0
    for number, unit in parts:
        scale = SECONDS.get(unit) or SECONDS.get(unit.removesuffix("s"))
        if scale is None:
            return math.nan
        total += float(number.replace(",", "")) * scale
    return total


@functools.cache
def checked_outputs(text: str) -> frozenset[str]:
    """The README's output lines that tests/test_readme.py compares with what gets printed."""
    source = README_TEST.read_text()
    prefixes = tuple(re.findall(r'startswith\("([^"]+)"\)', source))
    out = []
    for unit in units(text):
        if unit.kind != "code" or "tests/test_readme.py" not in unit.context:
            continue
        block = text[unit.start : unit.end]
        if unit.language == "console" and 'fenced("console")' in source:
            out += block.splitlines()
        elif not unit.language:
            out += [line for line in block.splitlines() if line.startswith(prefixes)]
    return frozenset(out)


def why_unsourced(figure: Figure, text: str) -> str | None:
    """None if a source named next to ``figure`` gives the same figure; else what is wrong."""
    unit = figure.unit
    named = text[unit.start : unit.end]
    if unit.kind == "code":
        # A code block's figures are output; only a test that compares them can source them.
        line = text[text.rfind("\n", 0, figure.start) + 1 : text.find("\n", figure.start)]
        if "tests/test_readme.py" in unit.context and line in checked_outputs(text):
            return None
        return "is in a code block that tests/test_readme.py does not compare with real output"
    failures = []
    for name in BENCHMARK.findall(named):
        if not (ROOT / "benchmarks" / f"{name}.py").exists():
            failures.append(f"benchmarks/{name}.py does not exist")
            continue
        section = benchmark_sections().get(name)
        if section is None:
            failures.append(f"docs/benchmarks.md has no results for benchmarks/{name}.py")
        elif re.search(rf"(?<![\w.]){re.escape(figure.text)}(?!\d)", section):
            return None
        else:
            failures.append(f"docs/benchmarks.md's results for benchmarks/{name}.py do not have it")
    if "docs/measured.md" in named:
        if any(figure.text in {f.text for f in row_figures(row)} for row in measured_rows()):
            return None
        failures.append("docs/measured.md's table has no row with it")
    for name in CONSTANT.findall(named):
        got = constant(name)
        if isinstance(got, int | float) and math.isclose(value(figure), got):
            return None
        failures.append(f"`{name}` is {got!r} in the code")
    if "tests/test_readme.py" in named:
        if any(figure.text in normal(line) for line in checked_outputs(text)):
            return None
        failures.append("no README output that tests/test_readme.py checks has it")
    for name in OTHER_TEST.findall(named):
        if name == "test_readme":
            continue
        quoted = [m for m in re.finditer(r'"([^"]*)"', named)]
        start = figure.start - unit.start
        quote = next((m.group(1) for m in quoted if m.start() < start < m.end()), None)
        if quote is None:
            failures.append(f"it is not in a quoted message to find in tests/{name}.py")
        elif normal(quote) in normal((ROOT / "tests" / f"{name}.py").read_text()):
            return None
        else:
            failures.append(f'tests/{name}.py has no "{normal(quote)}"')
    if not failures:
        return "names no source (a benchmark, docs/measured.md, a constant or a test) beside it"
    return "; ".join(failures)


def row_figures(row: dict[str, str]) -> list[Figure]:
    cell = row["README figure"]
    return [
        Figure(normal(m.group()), m.lastgroup or "", 0, Unit(0, 0, "row"))
        for m in FIGURE.finditer(cell)
    ]


def problems(text: str) -> list[str]:
    out = []
    for figure in figures(text):
        why = why_unsourced(figure, text)
        if why:
            line = text.count("\n", 0, figure.start) + 1
            out.append(f"README.md:{line}: {figure.text!r} {why}")
    return out


# ---------------------------------------------------------------------------------------------
# The tests


def test_every_readme_figure_names_its_source_and_equals_it() -> None:
    found = list(figures(README))
    assert len(found) >= 20, [f.text for f in found]  # the extraction itself still works
    assert not problems(README), "\n".join(problems(README))


def test_every_measured_figure_has_its_command_and_is_still_in_the_readme() -> None:
    readme = normal(README)
    for row in measured_rows():
        assert row_figures(row), f"docs/measured.md: {row['README figure']!r} is not a figure"
        assert re.search(r"`[^`]+`", row["command"]), f"docs/measured.md: no command in {row}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]), row
        assert row["machine"] and row["how"], row
        for figure in row_figures(row):
            assert figure.text in readme, f"docs/measured.md: {figure.text!r} not in README.md"


def test_pretraining_figures_are_the_embedded_defaults() -> None:
    text = normal(README)
    source = re.search(r"pretrained once on a synthetic \*source\* task[^)]*\)", text)
    assert source, "README.md no longer describes the source pretraining"
    sizes = re.search(r"([\d,]+) clips, (\d+) epochs", source.group())
    assert sizes, f"no 'N clips, N epochs' in {source.group()!r}"
    clips, epochs = sizes.groups()
    assert int(clips.replace(",", "")) == constant("embedded.SOURCE_SAMPLES")
    assert int(epochs) == constant("embedded.SOURCE_EPOCHS")
    embedded = yaml.safe_load((ROOT / "examples" / "embedded.yaml").read_text())
    assert embedded["model"]["pretrain_on_source"] is True
    target = re.search(r"\*target\* task \([^)]*?([\d,]+) clips\)", text)
    assert target, "README.md no longer gives the target task's size"
    assert int(target.group(1).replace(",", "")) == embedded["data"]["train_samples"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("in about 3 minutes on 2 CPU cores", ["3 minutes"]),
        ("took 6 min 9 s and 11 min\n53 s", ["6 min 9 s", "11 min 53 s"]),
        ("adds half a minute", ["half a minute"]),
        ("about 5 GB, 1–2 minutes, 37 MB", ["5 GB", "1–2 minutes", "37 MB"]),
        ("(51.3% of it) and 0% here", ["51.3%", "0%"]),
        ('"loss x4.2 over baseline", 1.8x faster', ["x4.2", "1.8x"]),
        ("(0.36 M backbone parameters), 36,310,762 parameters", ["0.36 M", "36,310,762"]),
        ("fit 120 columns", ["120 columns"]),
        # not figures: versions, addresses, model names, shapes, flags, counts, f-strings
        ("Python ≥ 3.11 on 127.0.0.1:8080, fp16, x3d_xs, mvit_base_16x4, 4×32×32", []),
        ("--time-budget-s 7200, 32 trials, 12 epochs, s3://b, {ratio:.0%}", []),
    ],
)
def test_the_figure_pattern(text: str, expected: list[str]) -> None:
    assert [normal(m.group()) for m in FIGURE.finditer(text)] == expected


def test_an_unsourced_or_drifted_figure_fails_naming_its_line() -> None:
    line = README.count("\n", 0, README.index("in 6 min 9 s")) + 1
    drifted = README.replace("in 6 min 9 s", "in about 3 minutes", 1)
    assert any(p.startswith(f"README.md:{line}: '3 minutes'") for p in problems(drifted))
    added = README.replace("## Quickstart\n", "## Quickstart\n\nIt takes 2 s.\n", 1)
    line = added.count("\n", 0, added.index("It takes 2 s.")) + 1
    (problem,) = problems(added)
    assert problem.startswith(f"README.md:{line}: '2 s' names no source"), problem
    retry = README.replace("after 5 min (`RECORD_RETRY_S`)", "after 10 min (`RECORD_RETRY_S`)")
    assert any("`RECORD_RETRY_S` is 300.0 in the code" in p for p in problems(retry))
    bench = README.replace("stays at 0.508", "stays at 0.5", 1)
    assert any("'0.5'" in p and "embedded_transfer" in p for p in problems(bench))
    unchecked = README.replace("\nepoch 0: opened", "\ntotal: 98%\nepoch 0: opened", 1)
    assert any(
        "'98%' is in a code block that tests/test_readme.py does not" in p
        for p in problems(unchecked)
    )
