"""What every model family shares: the spec of a model, the family registry, the classifier.

A family (``timm``, ``pytorchvideo``, or one a user registers) says which architectures it
builds, how to build one returning logits for ``num_classes`` classes, and how to find the
classifier of a model it built. ``models.build`` and ``models.parse_name`` go through the
registry only, so a new family is one ``register_family`` call.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from unfreeze_hpo.data.spec import ModelInput
from unfreeze_hpo.errors import ModelError, Problem
from unfreeze_hpo.registry import Registry


def instance_of(model: nn.Module, dotted: str) -> bool:
    """``isinstance(model, <the class named dotted>)`` without importing its library: a model
    of that class was built with the library already imported, so a library never imported
    (or not installed, as on a bare GPU machine) means no."""
    module, name = dotted.rsplit(".", 1)
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(model, getattr(loaded, name))


@dataclass(frozen=True)
class ModelSpec:
    """What to build: ``name`` is ``family:arch``; ``kwargs`` go to the family's builder."""

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    pretrained_file: str | None = None  # local pretrained weights, loaded the family's way


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel wrappers."""
    while isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def call_builder(
    builder: Callable[..., nn.Module], spec: ModelSpec, *args: Any, **kwargs: Any
) -> nn.Module:
    """A family's builder called for ``spec``: an argument it refuses is a ``model.kwargs``
    problem, and a failure while fetching hub weights a ``model.pretrained`` one."""
    try:
        return builder(*args, **kwargs)
    except TypeError as exc:
        raise ModelError(
            Problem(
                "model.kwargs",
                dict(spec.kwargs),
                f"rejected by {spec.name} ({exc})",
                "remove or rename the argument the model does not take",
            )
        ) from exc
    except Exception as exc:
        if not spec.pretrained:
            raise
        raise download_error(spec, exc) from exc


def download_error(spec: ModelSpec, exc: Exception) -> ModelError:
    """The error for hub weights ``spec`` could not get: it names where they come from."""
    from unfreeze_hpo.models import hub

    family, _, arch = spec.name.partition(":")
    try:
        url = FAMILIES[family].weights_url(arch, spec) if family in FAMILIES else None
    except Exception:  # the URL only adds to the message; the download's error is the news
        url = None
    return hub.unreachable(spec.name, url, exc)


def did_you_mean(word: str, choices: Any, otherwise: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"{prefix}{c}" for c in close) + "?"
    return otherwise


@dataclass(frozen=True)
class Family:
    """A model family: the ``family`` in ``family:arch`` names."""

    name: str
    build: Callable[[str, ModelSpec], nn.Module]  # arch, spec -> a model giving class logits
    available: Callable[[], list[str]]  # every architecture it builds, sorted
    classifier: Callable[[nn.Module], str | None]  # the classifier's dotted name, if it is ours
    example: str  # a small architecture it builds, for messages and the contract tests
    example_input: tuple[int, ...]  # the shape of a batch of one for ``example``
    # The architecture to look up in ``available`` (timm allows ``name.pretrained_tag``).
    base_name: Callable[[str], str] = field(default=lambda arch: arch)
    # Architectures known without listing ``available`` (which may import a hub).
    builtin: frozenset[str] = frozenset()
    # The input a built model expects (size, frames, mean/std ...), None when the family
    # cannot say: the data then uses ImageNet / Kinetics defaults.
    input: Callable[[str, nn.Module], ModelInput | None] = field(default=lambda arch, model: None)
    # Where ``pretrained: true`` downloads the weights of an architecture from, for messages.
    weights_url: Callable[[str, ModelSpec], str | None] = field(default=lambda arch, spec: None)


FAMILIES: Registry[Family] = Registry("model family")


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (a name is registered once)."""
    return FAMILIES.add(family.name, family)


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final linear projection that produces the class logits."""
    model = unwrap(model)
    for family in FAMILIES.values():
        if (name := family.classifier(model)) is not None:
            return name
    raise ModelError(
        Problem(
            "model",
            type(model).__name__,
            "cannot find the classifier of this model",
            f"use a model of a registered family ({', '.join(FAMILIES)})",
        )
    )
