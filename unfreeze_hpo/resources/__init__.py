"""The package's data: the shipped search spaces and example trial configs.

Found with ``importlib.resources``, so an installed wheel has them as the checkout does (where
``search_spaces/`` and ``examples/`` at the top are links to these folders).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _folder(name: str) -> Path:
    # Wheels install unzipped, so the resource is a real folder that YAML loaders can open.
    return Path(str(resources.files(__name__).joinpath(name)))


SPACES = _folder("search_spaces")  # search_spaces/*.yaml: `unfreeze-hpo search --space`
EXAMPLES = _folder("examples")  # examples/*.yaml: trial configs; embedded.yaml is the default

__all__ = ["EXAMPLES", "SPACES"]
