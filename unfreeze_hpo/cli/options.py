"""What several commands share: argument helpers, and every problem of a command line at once."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from unfreeze_hpo.errors import ConfigError, Problem, UserError


def no_args(p: argparse.ArgumentParser) -> None:
    pass


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="task/trial YAML file")


def search_folder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("search", metavar="SEARCH", help="a search folder: <storage_path>/<name>")
    p.add_argument("--study-storage", help="the study's URL when the search did not use SQLite")


def all_or_errors(*steps: Callable[[], Any]) -> list[Any]:
    """Run every step; raise one ConfigError with the problems of all the steps that failed."""
    results: list[Any] = []
    problems: list[Problem] = []
    for step in steps:
        try:
            results.append(step())
        except UserError as exc:
            problems += exc.problems
            results.append(None)
    if problems:
        raise ConfigError(problems)
    return results


def yaml_arg(text: str, option: str) -> Any:
    """An option's value read as YAML by the rules of the config files (010 is not 8)."""
    from unfreeze_hpo import yamlfile

    try:
        return yamlfile.parse_value(text, option)
    except ConfigError as exc:
        shell = "quote the value for the shell and check its brackets"
        raise ConfigError(
            dataclasses.replace(
                p,
                field=option,
                value=text,
                fix=shell if p.message.startswith("not valid YAML") else p.fix,
                location="",
            )
            for p in exc.problems
        ) from exc


def path_option(option: str, path: str) -> str:
    if "\0" in path:  # the OS refuses it; say so before anything is written
        raise ConfigError(Problem(option, path, "contains a NUL character", "remove it"))
    return path


def pairs(items: Sequence[str], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(Problem(option, item, "expected KEY=VALUE", f"e.g. {option} a=1"))
        elif key in out:
            problems.append(Problem(option, item, f"{key} given twice", "give it once"))
        else:
            try:
                out[key] = yaml_arg(value, option)
            except ConfigError as exc:
                problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return out


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"
