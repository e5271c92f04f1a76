"""YAML file or text -> plain values and the line of every key, refusing unsafe YAML.

YAML is read with the YAML 1.2 core rules for scalars (``1e-3`` is a number, ``no`` is the
string "no", ``010`` is refused as ambiguous), duplicate keys are errors, and every problem
carries the file and line it came from. Nothing is constructed from a tag (``!!python/...``), and
a file is refused when it is large, deeply nested or expands (through aliases) to many values.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from unfreeze_hpo.errors import ConfigError, Problem

# A config, space or exported schedule is a few KiB; anything near these limits is not one, or is
# an alias bomb (a few lines that expand to billions of values).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 50
MAX_YAML_VALUES = 100_000


def is_file(path: Path) -> bool:
    """``path.is_file()``, False where the OS refuses the name (too long, a NUL)."""
    try:
        return path.is_file()
    except OSError:
        return False


def read_yaml_text(path: Path, field: str) -> str:
    """The text of the YAML file ``path``: UTF-8, and no larger than MAX_YAML_BYTES."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(_too_large(field, str(path), size))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            Problem(
                field,
                str(path),
                f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                "save the file as UTF-8",
                str(path),
            )
        ) from exc


def _too_large(field: str, source: str, size: int) -> Problem:
    why = f"{size:,} bytes, more than the {MAX_YAML_BYTES:,} a YAML input may have"
    return Problem(field, source, why, "give the config itself; data goes under data.root", source)


def locate(problems: Iterable[Problem], path: str | Path) -> list[Problem]:
    """Problems found after the config file ``path`` loaded (e.g. against the model), with their
    file:line."""
    _, lines = parse_yaml(read_yaml_text(Path(path), "config"), str(path))
    return [locate_problem(p, lines, str(path)) for p in problems]


def locate_problem(problem: Problem, lines: Mapping[str, int], source: str) -> Problem:
    """``problem`` with ``source:line`` of the nearest key path in ``lines`` (unless it has a
    location already)."""
    path = re.sub(r"\[\d+\]$", "", problem.field)
    while path and path not in lines:
        path = path.rpartition(".")[0]
    if not source or problem.location:
        return problem
    location = f"{source}:{lines[path]}" if path else source
    return dataclasses.replace(problem, location=location)


def plain(value: Any) -> Any:
    """``value`` with its dicts copied and tuples made lists: what YAML writes and reads back."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def parse_yaml(text: str, source: str = "<string>") -> tuple[dict[str, Any], dict[str, int]]:
    """Parse YAML into plain values and the line of every key path (``model.name`` -> 3)."""
    value, lines = _parse(text, source)
    if value is None:
        return {}, lines
    if not isinstance(value, dict):
        raise ConfigError(
            Problem(
                "config",
                value,
                "the file must hold a mapping at the top",
                "write key: value pairs",
                f"{source}:1",
            )
        )
    return value, lines


def parse_value(text: str, source: str) -> Any:
    """One YAML value (a command-line option's), read by the same rules as a file."""
    return _parse(text, source)[0]


def _parse(text: str, source: str) -> tuple[Any, dict[str, int]]:
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(_too_large("yaml", source, len(text)))
    loader = None
    try:
        loader = Loader(text, source)
        node = loader.get_single_node()
        value = None if node is None else _construct(loader, node, "", lines, problems, source)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        reason = getattr(exc, "problem", None) or str(exc) or type(exc).__name__
        raise ConfigError(
            Problem("yaml", source, f"not valid YAML ({reason})", "fix the syntax there", where)
        ) from exc
    finally:
        if loader is not None:
            loader.dispose()
    if problems:
        raise ConfigError(problems)
    return value, lines


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars: true/false only, numbers in plain notation; it
    refuses nesting deeper than MAX_YAML_DEPTH (PyYAML's composer recurses per level)."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.depth = 0  # while composing
        self.open: set[int] = set()  # ids of the collections being constructed
        self.values_left = MAX_YAML_VALUES

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                where = f"{self.source}:{self.peek_event().start_mark.line + 1}"
                value = f"> {MAX_YAML_DEPTH} levels"
                raise ConfigError(Problem("yaml", value, "nested too deeply", "flatten it", where))
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789")
)
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def _construct(
    loader: Loader,
    node: yaml.Node,
    path: str,
    lines: dict[str, int],
    problems: list[Problem],
    source: str,
) -> Any:
    where = f"{source}:{node.start_mark.line + 1}"
    field = path or "yaml"
    _check_tag(node, field, where)
    loader.values_left -= 1
    if loader.values_left < 0:
        why = "too many values once its aliases (*name) are expanded"
        fix = "write the values out; an alias may repeat a small part of the file"
        raise ConfigError(Problem(field, f"> {MAX_YAML_VALUES:,} values", why, fix, where))
    if not isinstance(node, yaml.ScalarNode):
        if id(node) in loader.open:
            why = "a collection cannot hold an alias of itself"
            fix = "write the values out"
            raise ConfigError(Problem(field, "a recursive alias", why, fix, where))
        if len(loader.open) >= MAX_YAML_DEPTH:
            why = "nested too deeply once its aliases are expanded"
            value = f"> {MAX_YAML_DEPTH} levels"
            raise ConfigError(Problem(field, value, why, "flatten it", where))
        loader.open.add(id(node))
        try:
            return _collection(loader, node, path, lines, problems, source)
        finally:
            loader.open.discard(id(node))
    return loader.construct_object(node)


def _check_tag(node: yaml.Node, field: str, where: str) -> None:
    """Refuse tags that would construct objects (or that a plain mapping or list ignores)."""
    if node.tag.startswith("tag:yaml.org,2002:python/"):
        fix = "remove the tag: a config holds plain values, nothing is constructed from it"
        raise ConfigError(Problem(field, node.tag, "Python tags are refused", fix, where))
    if not isinstance(node, yaml.ScalarNode) and node.tag not in (
        "tag:yaml.org,2002:map",
        "tag:yaml.org,2002:seq",
    ):
        fix = "remove the tag: write a plain mapping or list"
        raise ConfigError(Problem(field, node.tag, "unsupported YAML tag", fix, where))


def _collection(
    loader: Loader,
    node: yaml.Node,
    path: str,
    lines: dict[str, int],
    problems: list[Problem],
    source: str,
) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            where = f"{source}:{key_node.start_mark.line + 1}"
            if key_node.tag == "tag:yaml.org,2002:merge":
                problems.append(
                    Problem(
                        path or "config",
                        "<<",
                        "YAML merge keys are not supported",
                        "write the keys out",
                        where,
                    )
                )
                continue
            _check_tag(key_node, path or "config", where)
            scalar = isinstance(key_node, yaml.ScalarNode)
            key = loader.construct_object(key_node) if scalar else f"a {key_node.id}"
            if not scalar or not isinstance(key, str):
                problems.append(
                    Problem(
                        path or "config",
                        key,
                        "keys must be plain names",
                        "write name: value",
                        where,
                    )
                )
                continue
            key_path = f"{path}.{key}" if path else key
            if key in out:
                problems.append(
                    Problem(
                        key_path,
                        key,
                        f"duplicate key (first at line {lines[key_path]})",
                        "keep one of them",
                        where,
                    )
                )
                continue
            lines[key_path] = key_node.start_mark.line + 1
            out[key] = _construct(loader, value_node, key_path, lines, problems, source)
        return out
    return [
        _construct(loader, n, f"{path}[{i}]", lines, problems, source)
        for i, n in enumerate(node.value)
    ]


class YamlDumper(yaml.SafeDumper):
    """Quotes every string that PyYAML's YAML 1.1 rules *or* the project's YAML 1.2 reader would
    take for a number or boolean (``1e3``), so what is written reads back the same."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # Lists of scalars on one line (phases, block names); nested structure stays in blocks.
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


for _first, _resolvers in Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        YamlDumper.add_implicit_resolver(_tag, _regexp, None if _first is None else [_first])
YamlDumper.add_representer(list, _represent_list)


def yaml_text(values: Mapping[str, Any]) -> str:
    """``values`` as the YAML this project writes (reads back the same under its YAML 1.2 rules)."""
    text: str = yaml.dump(dict(values), Dumper=YamlDumper, sort_keys=False, allow_unicode=True)
    return text


def write_yaml(
    path: Path, values: Mapping[str, Any], header: str, *, check: Check | None = None
) -> Path:
    """Write ``header`` and ``values`` as YAML through ``write_atomic``."""

    def body(f: TextIO) -> None:
        f.write(header)
        yaml.dump(dict(values), f, Dumper=YamlDumper, sort_keys=False, allow_unicode=True)

    return write_atomic(path, body, check=check)


# Called with the written temp file and the path it will replace; raises to keep the old file.
Check = Callable[[Path, Path], None]


def write_atomic(path: Path, body: Callable[[TextIO], Any], *, check: Check | None = None) -> Path:
    """Write through a temp file renamed over ``path``: a reader or a crash never sees half a
    file, and a failed write (or a failed ``check`` of the written file) leaves the previous
    file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            body(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
