"""The package's exception root and the record of one bad input (field, value, fix)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One bad input: where it is, what it was, what is wrong and how to fix it."""

    field: str
    value: Any
    message: str
    fix: str
    location: str = ""  # "file.yaml:12" when the value came from a file

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        got = repr(self.value)
        if len(got) > 200:  # a whole list or file pasted in by mistake: its start says enough
            got = got[:200] + "..."
        return f"{where}{self.field}: {self.message} (got {got}); fix: {self.fix}"


class UnfreezeHPOError(Exception):
    """Root of every error this package raises on purpose."""


class UserError(UnfreezeHPOError):
    """Bad user input: a YAML field, a range, a model name, a path or a checkpoint.

    Carries every problem found, so one run reports all of them. The CLI prints them and exits 2.
    """

    def __init__(self, problems: Problem | Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = (
            (problems,) if isinstance(problems, Problem) else tuple(problems)
        )
        assert self.problems, "a UserError needs at least one problem"
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[Any, tuple[tuple[Problem, ...]]]:
        # Rebuilt from its problems, so it survives pickling (a Ray task raising it).
        return type(self), (self.problems,)


class ConfigError(UserError):
    """A configuration value (strategy parameter, option, range) is invalid."""


class ModelError(UserError):
    """A model cannot be built or loaded as asked (unknown name, bad checkpoint)."""


class BlockError(UserError):
    """Backbone blocks cannot be discovered, or the discovered blocks are not a partition."""


class AuditError(UnfreezeHPOError):
    """The model's actual freeze state differs from the plan that was applied."""


def describe(exc: BaseException) -> str:
    """An exception as "Type: first line of its message", never an empty string."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"
