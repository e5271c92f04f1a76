"""Pretrained hub weights: the cache folder they are kept in, their download once per cache under
a file lock, and the one error that says where they come from when the hub cannot be reached.

The cache is the libraries' own: timm's ``cache_dir`` (Hugging Face hub files and URL downloads)
and ``torch.hub``'s folder (pytorchvideo's model zoo). ``use_cache(None)`` leaves their defaults.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import torch

from unfreeze_hpo import storage
from unfreeze_hpo.errors import ModelError, Problem, describe

_cache: Path | None = None  # set by use_cache; None: the libraries' default caches
LOCK = "weights.lock"  # beside the weights: one download at a time per cache folder


def use_cache(folder: str | os.PathLike[str] | None) -> None:
    """Keep this process's hub weights under ``folder`` (``timm/`` and ``torch/`` in it);
    None keeps the libraries' defaults (``~/.cache/huggingface``, ``~/.cache/torch``)."""
    global _cache
    if folder is None:
        return
    _cache = Path(folder).expanduser().resolve()
    torch.hub.set_dir(str(_cache / "torch"))


def cache() -> Path | None:
    """The folder ``use_cache`` set, if any."""
    return _cache


def timm_cache() -> str | None:
    """timm's ``cache_dir`` argument: None for its defaults."""
    return None if _cache is None else str(_cache / "timm")


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Hold the cache folder's download lock: other processes of the node (or of every node,
    with the cache on shared storage) wait, then find the files there instead of downloading
    them again."""
    from filelock import FileLock

    folder = _cache or storage.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / LOCK)):
        yield


def unreachable(name: str, url: str | None, exc: BaseException) -> ModelError:
    """The error for the hub weights of model ``name`` that could not be had from ``url``."""
    timm = name.startswith("timm:")
    local = (
        "set model.pretrained_file to a local copy"
        if timm
        else "set pretrained: false and model.checkpoint to a local copy"
    )
    return ModelError(
        Problem(
            "model.pretrained",
            True,
            f"cannot get the hub weights of {name} from {url or 'its hub'} ({describe(exc)})",
            f"where the hub is reachable, {_placing(url, timm)}, and use that cache here "
            f"(--weights-cache, on shared storage or copied); or {local}",
        )
    )


def _placing(url: str | None, timm: bool) -> str:
    """How to put the file of ``url`` where this process looks for it."""
    from huggingface_hub import constants

    if url and url.startswith(constants.ENDPOINT + "/"):
        repo = url.removeprefix(constants.ENDPOINT + "/")
        return f"run `hf download {repo} --cache-dir {timm_cache() or constants.HF_HUB_CACHE}`"
    folder = (timm and timm_cache()) or os.path.join(torch.hub.get_dir(), "checkpoints")
    file = os.path.basename(urllib.parse.urlsplit(url).path) if url else "the file"
    return f"download {file} into {folder}"
