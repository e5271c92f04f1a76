"""The one registry type behind every extension point: strategies, model families, block
adapters, export formats and the schedulers the spike rule wraps. A name is registered once."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """Entries by name, in registration order; ``add`` refuses a name already taken."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind  # what an entry is, for messages: "model family", "export format"

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self[name]!r})")
        self[name] = entry
        return entry
