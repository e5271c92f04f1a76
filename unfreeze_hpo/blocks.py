"""Discover a model's ordered backbone blocks and its head, and prove they partition its parameters.

A regex matcher given by the user wins; otherwise the registered adapters (``ADAPTERS``) are
tried in order: pytorchvideo MViT, pytorchvideo ``Net``, then timm's own ``group_matcher``.
Groups are formed from parameter *names* (through timm's ``group_parameters``), never from
parameter order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from unfreeze_hpo.errors import BlockError, Problem
from unfreeze_hpo.models import ModelSpec, build, classifier_name, instance_of, unwrap
from unfreeze_hpo.registry import Registry

Granularity = Literal["fine", "coarse"]
# A timm-style matcher: group name -> regex, or a list of (regex, suffix) pairs.
Matcher = Mapping[str, Any]
# What an adapter returns: named groups of parameter names (input -> output), then the head's.
Grouping = tuple[list[tuple[str, list[str]]], list[str]]


@dataclass(frozen=True)
class Block:
    """One unfreeze unit: parameter names and their element count."""

    index: int
    name: str
    params: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class Blocks:
    """The backbone blocks, ordered input -> output, and the always-trainable head."""

    blocks: tuple[Block, ...]
    head: Block
    adapter: str

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b.numel for b in self.blocks)

    @property
    def backbone_numel(self) -> int:
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.blocks)


def discover(
    model: nn.Module, granularity: Granularity = "fine", matcher: Matcher | None = None
) -> Blocks:
    """Blocks of ``model`` (unwrapped from DataParallel/DDP), validated as a partition."""
    if granularity not in ("fine", "coarse"):
        raise BlockError(
            Problem("blocks.granularity", granularity, "unknown granularity", "fine or coarse")
        )
    model = unwrap(model)
    if matcher is not None:
        return validate(model, _make_blocks(model, *_regex_groups(model, matcher), "regex"))
    for adapter in ADAPTERS.values():
        if adapter.applies(model):
            grouping = adapter.groups(model, granularity)
            return validate(model, _make_blocks(model, *grouping, adapter.name))
    raise BlockError(
        Problem(
            "blocks",
            type(model).__name__,
            "no block adapter knows this model",
            "give blocks.matcher, a timm-style regex matcher, e.g. "
            r"{stem: '^conv1', blocks: '^layers\.(\d+)'}",
        )
    )


def discover_spec(
    spec: ModelSpec, granularity: Granularity = "fine", matcher: Matcher | None = None
) -> Blocks:
    """Blocks of the model ``spec`` names, built on the meta device: no weights are allocated,
    loaded or downloaded, so this is cheap for any model size (names and sizes do not depend on
    weights, nor on the classifier's size)."""
    spec = dataclasses.replace(spec, pretrained=False, checkpoint=None, pretrained_file=None)
    with torch.device("meta"):
        model = build(spec)
    return discover(model, granularity, matcher)


def validate(model: nn.Module, blocks: Blocks) -> Blocks:
    """Check that blocks and head partition every parameter and that no block is empty."""
    names = [n for n, _ in unwrap(model).named_parameters()]
    seen: dict[str, list[str]] = {}
    for part in (*blocks.blocks, blocks.head):
        for p in part.params:
            seen.setdefault(p, []).append(part.name)
    problems = []
    unassigned = [n for n in names if n not in seen]
    if unassigned:
        problems.append(
            Problem(
                "blocks",
                _few(unassigned),
                f"{len(unassigned)} parameters belong to no block and not to the head",
                "extend the matcher so that every parameter matches",
            )
        )
    doubled = {p: owners for p, owners in seen.items() if len(owners) > 1}
    if doubled:
        shown = [f"{p} in {' and '.join(o)}" for p, o in doubled.items()]
        problems.append(
            Problem(
                "blocks",
                _few(shown),
                f"{len(doubled)} parameters are in more than one block",
                "make the matcher's patterns disjoint",
            )
        )
    unknown = [p for p in seen if p not in set(names)]
    if unknown:
        problems.append(
            Problem(
                "blocks",
                _few(unknown),
                "names that are not parameters of the model",
                "discover blocks on the model being trained",
            )
        )
    empty = [b.name for b in blocks.blocks if not b.params]
    if empty:
        problems.append(Problem("blocks", empty, "empty blocks", "drop their patterns"))
    if [b.index for b in blocks.blocks] != list(range(len(blocks.blocks))):
        problems.append(
            Problem(
                "blocks",
                [b.index for b in blocks.blocks],
                "block indices are not 0..n-1 in order",
                "report this as a bug",
            )
        )
    if not blocks.blocks:
        problems.append(
            Problem(
                "blocks",
                0,
                "the model has no backbone blocks",
                "check the matcher: every parameter fell into the head",
            )
        )
    if problems:
        raise BlockError(problems)
    return blocks


def execution_order(model: nn.Module, blocks: Blocks, *example: torch.Tensor) -> list[int]:
    """Block indices in the order a forward pass first runs their modules (head is -1).

    For ordered blocks this list is sorted and ends with the head.
    """
    model = unwrap(model)
    owner = {p: b.index for b in blocks.blocks for p in b.params}
    owner.update({p: -1 for p in blocks.head.params})
    order: list[int] = []
    handles = []
    for mod_name, module in model.named_modules():
        direct = [
            f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)
        ]
        owners = {owner[p] for p in direct}
        if not mod_name or len(owners) != 1:
            continue
        index = owners.pop()

        def hook(*_: Any, index: int = index) -> None:
            if index not in order:
                order.append(index)

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(*example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order


def _timm_applies(model: nn.Module) -> bool:
    return callable(getattr(model, "group_matcher", None))


def _timm_groups(model: nn.Module, granularity: Granularity) -> Grouping:
    try:
        matcher = model.group_matcher(coarse=granularity == "coarse")  # type: ignore[operator]
    except NotImplementedError as exc:
        raise BlockError(
            Problem(
                "blocks",
                type(model).__name__,
                "this timm model has no group_matcher",
                "give blocks.matcher, a regex matcher over its parameter names",
            )
        ) from exc
    return _split_head(model, _matched_groups(model, matcher))


def _regex_groups(model: nn.Module, matcher: Matcher) -> Grouping:
    problems = []
    for key, spec in matcher.items():
        patterns = [s[0] for s in spec] if isinstance(spec, list | tuple) else [spec]
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                problems.append(
                    Problem(
                        f"blocks.matcher.{key}",
                        pattern,
                        f"not a regular expression ({exc})",
                        "write a Python regex over parameter names",
                    )
                )
    if problems:
        raise BlockError(problems)
    patterns = [
        re.compile(s[0] if isinstance(s, list | tuple) else s)
        for spec in matcher.values()
        for s in (spec if isinstance(spec, list | tuple) else [spec])
    ]
    names = [n for n, _ in model.named_parameters()]
    unmatched = [n for n in names if not any(p.match(n) for p in patterns)]
    groups = _matched_groups(model, matcher)
    if unmatched:  # timm puts unmatched names last: they are the head
        groups = groups[:-1]
    return groups, unmatched


def _mvit_applies(model: nn.Module) -> bool:
    return instance_of(
        model, "pytorchvideo.models.vision_transformers.MultiscaleVisionTransformers"
    )


def _mvit_groups(model: nn.Module, granularity: Granularity) -> Grouping:
    return _module_groups(
        model,
        ["patch_embed", "cls_positional_encoding"],
        [f"blocks.{i}" for i in range(len(model.blocks))],  # type: ignore[arg-type]
        ["norm_embed", "head"],
    )


def _net_applies(model: nn.Module) -> bool:
    return instance_of(model, "pytorchvideo.models.net.Net")


def _net_groups(model: nn.Module, granularity: Granularity) -> Grouping:
    from pytorchvideo.models.resnet import ResStage

    stages = model.blocks
    prefixes: list[str] = []
    for i, stage in enumerate(stages[:-1]):  # type: ignore[index]
        if granularity == "fine" and isinstance(stage, ResStage):
            prefixes += [f"blocks.{i}.res_blocks.{j}" for j in range(len(stage.res_blocks))]
        else:
            prefixes.append(f"blocks.{i}")
    return _module_groups(model, [], prefixes, [f"blocks.{len(stages) - 1}"])  # type: ignore[arg-type]


def _module_groups(model: nn.Module, stem: list[str], body: list[str], head: list[str]) -> Grouping:
    """Groups from module prefixes; ``stem`` prefixes form one group before ``body``."""
    names = [n for n, _ in model.named_parameters()]

    def under(prefixes: Sequence[str]) -> list[str]:
        return [n for n in names if any(n.startswith(p + ".") for p in prefixes)]

    named = ([("stem", under(stem))] if stem else []) + [(p, under([p])) for p in body]
    return [(name, g) for name, g in named if g], under(head)


def _matched_groups(
    model: nn.Module, matcher: Matcher | Callable[..., Any]
) -> list[tuple[str, list[str]]]:
    from timm.models import group_parameters

    grouped = group_parameters(model, matcher)
    return [(_group_name(grouped[k]), list(grouped[k])) for k in sorted(grouped)]


def _split_head(model: nn.Module, groups: list[tuple[str, list[str]]]) -> Grouping:
    """timm maps names no pattern matches (classifier, neck) to its last group: the head."""
    classifier = classifier_name(model) + "."
    holders = [i for i, (_, g) in enumerate(groups) if any(n.startswith(classifier) for n in g)]
    if holders != [len(groups) - 1]:
        raise BlockError(
            Problem(
                "blocks",
                type(model).__name__,
                "the classifier is not in the last group of the model's group_matcher",
                "give blocks.matcher explicitly",
            )
        )
    return groups[:-1], groups[-1][1]


def _make_blocks(
    model: nn.Module, groups: list[tuple[str, list[str]]], head: list[str], adapter: str
) -> Blocks:
    numel = {n: p.numel() for n, p in model.named_parameters()}
    blocks = tuple(
        Block(i, name, tuple(g), sum(numel[n] for n in g)) for i, (name, g) in enumerate(groups)
    )
    return Blocks(blocks, Block(-1, "head", tuple(head), sum(numel[n] for n in head)), adapter)


def _group_name(names: Sequence[str]) -> str:
    """A readable name: per top-level module, the common module path; joined with '+'."""
    by_top: dict[str, list[str]] = {}
    for n in names:
        path = n.rpartition(".")[0] or n  # a parameter held directly by the root names itself
        by_top.setdefault(path.split(".")[0], []).append(path.replace(".", "/"))
    return "+".join(os.path.commonpath(paths).replace("/", ".") for paths in by_top.values())


def _few(items: Sequence[str], n: int = 5) -> str:
    more = f" … and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


@dataclass(frozen=True)
class Adapter:
    """How to find the blocks of one kind of model: whether it applies, and its groups."""

    name: str
    applies: Callable[[nn.Module], bool]
    groups: Callable[[nn.Module, Granularity], Grouping]  # blocks input -> output, then the head
    example: str  # a model name it applies to, for the contract tests


# Tried in registration order when no matcher is given: the first that applies names the blocks.
ADAPTERS: Registry[Adapter] = Registry("block adapter")


def register_adapter(adapter: Adapter) -> Adapter:
    """Add ``adapter`` after the registered ones (a name is registered once)."""
    return ADAPTERS.add(adapter.name, adapter)


register_adapter(
    Adapter("pytorchvideo-mvit", _mvit_applies, _mvit_groups, "pytorchvideo:mvit_tiny")
)
register_adapter(
    Adapter("pytorchvideo-net", _net_applies, _net_groups, "pytorchvideo:resnet3d_tiny")
)
register_adapter(Adapter("timm", _timm_applies, _timm_groups, "timm:vit_tiny_patch16_224"))
