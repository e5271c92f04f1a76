"""Lightning finetuning-scheduler (FTS) schedules from a trial's unfreeze events.


FTS reads an explicit schedule {phase: {params, max_transition_epoch, lr}}, phases 0..n. It
freezes the whole LightningModule, thaws phase 0 before training, and at the start of each
epoch E moves to the next phase once the current phase's max_transition_epoch <= E, adding
the new phase's parameters to the optimizer as a group at the phase's lr. Phase 0 trains at
the LR of `configure_optimizers` (FTS drops a phase-0 lr with a warning). A listed name that
is a parameter of the module is taken as is; anything else is a regex (re.match).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from unfreeze_hpo import strategies
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem, UserError
from unfreeze_hpo.results import Search
from unfreeze_hpo.yamlfile import YamlDumper

if TYPE_CHECKING:  # blocks imports torch
    from unfreeze_hpo.blocks import Blocks
# How a LightningModule that holds the model as `self.model` names its parameters.
FTS_PREFIX = "model."


def check_fts_prefix(prefix: str) -> str:
    """``prefix`` if it can start a parameter name: empty, or a module path ending in a dot."""
    if prefix and not prefix.endswith("."):
        fix = f"end it with a dot, e.g. --fts-prefix {prefix}."
        raise ConfigError(Problem("--fts-prefix", prefix, "must end with '.'", fix))
    return prefix


@dataclass(frozen=True)
class FtsPhase:
    """One FTS phase: what it thaws, from which epoch, at which LR."""

    epoch: int  # the first epoch it trains
    blocks: tuple[str, ...]  # our block names it thaws ("head" in phase 0), nearest the head first
    params: tuple[str, ...]  # their parameters, as the LightningModule names them
    max_transition_epoch: int  # the epoch the next phase starts; the last phase: the trial's epochs
    lr: float | None  # None in phase 0: FTS takes it from configure_optimizers
    block_lrs: tuple[float, ...]  # each block's own LR in the trial, in the order of ``blocks``


def unfreeze_events(
    cfg: TrialConfig, sizes: Sequence[int], recorded: Sequence[Mapping[str, Any]] = ()
) -> list[tuple[int, int]]:
    """``(epoch, n_trainable)`` at epoch 0 and at every epoch the trainable block count grows."""
    if cfg.strategy.reads_history:
        # Its events follow the metric the trial saw: only the recorded ones are known.
        counts = [(int(e["epoch"]), int(e["n_trainable"])) for e in recorded]
    else:
        # A pure function of the epoch: the plan over every epoch the exported config trains,
        # which is what `train --config` replays (for a completed trial, the recorded events).
        counts = [(e, cfg.strategy.plan(e, (), sizes).n_trainable) for e in range(cfg.epochs)]
    events: list[tuple[int, int]] = []
    for epoch, n in sorted(counts):
        if n > (events[-1][1] if events else -1):
            events.append((epoch, n))
    if not events or events[0][0] != 0:
        events.insert(0, (0, 0))  # frozen until the first event
    return events


def fts_phases(
    cfg: TrialConfig,
    blocks: Blocks,
    recorded: Sequence[Mapping[str, Any]] = (),
    prefix: str = FTS_PREFIX,
) -> list[FtsPhase]:
    """The trial's unfreeze events as FTS phases: phase 0 the head and the blocks trainable from
    epoch 0, then one phase per later event with the blocks it unfroze (see export_fts)."""
    events = unfreeze_events(cfg, blocks.sizes, recorded)
    n_blocks = len(blocks)
    if events[-1][1] > n_blocks:
        why = f"the trial unfroze {events[-1][1]} blocks; its model has {n_blocks}"
        fix = "export from the search folder the trial ran in, with its model unchanged"
        raise UserError(Problem("timeline", events[-1][1], why, fix))
    base = cfg.optimizer.lr
    scales = strategies.lr_scales(
        n_blocks, n_blocks, cfg.optimizer.backbone_lr_mult, cfg.optimizer.layer_decay
    )  # a block's scale depends on its place only, not on how many others are trainable
    phases = []
    for k, (epoch, n) in enumerate(events):
        previous = events[k - 1][1] if k else 0
        opened = [blocks.blocks[i] for i in reversed(range(n_blocks - n, n_blocks - previous))]
        names = [p for b in opened for p in b.params]
        if k == 0:
            names = [*blocks.head.params, *names]
        end = events[k + 1][0] if k + 1 < len(events) else cfg.epochs
        lrs = tuple(_round(base * scales[b.index]) for b in opened)
        phases.append(
            FtsPhase(
                epoch=epoch,
                blocks=(*(["head"] if k == 0 else []), *(b.name for b in opened)),
                params=tuple(prefix + p for p in names),
                max_transition_epoch=end,
                lr=None if k == 0 else lrs[0],  # the block nearest the head: the largest LR
                block_lrs=lrs,
            )
        )
    return phases


def _round(value: float) -> float:
    # Products like 0.03 * 0.1 print as 0.0030000000000000005; 12 digits are plenty for an LR.
    return float(f"{value:.12g}")


def _fts_header(search: Search, number: int, cfg: TrialConfig, prefix: str, out: Path) -> str:
    lr = cfg.optimizer.lr
    source = (
        f"the events this trial recorded: {cfg.strategy.name} follows its metric"
        if cfg.strategy.reads_history
        else "the strategy's plan over the trial's epochs"
    )
    paragraphs = [
        f"finetuning-scheduler (FTS) schedule of trial {number} of search {search.name!r} "
        f"({search.folder}), exported by unfreeze-hpo: model {cfg.model.name}, strategy "
        f"{cfg.strategy}, {cfg.epochs} epochs, optimizer.lr {lr}.",
        "",
        f"Use: FinetuningScheduler(ft_schedule={out.name!r}, epoch_transitions_only=True, "
        "restore_best=False) moves phase by phase at the epochs below, as the trial did (with "
        "its defaults FTS may also move earlier, on its early-stopping criteria, and restores "
        "the best checkpoint at each move). Parameter names are the model's with the prefix "
        f"{prefix!r}: hold the model as `self.model` of the LightningModule, or export with "
        f"another --fts-prefix. Return an optimizer at lr {lr} from configure_optimizers.",
        "",
        f"Mapping from the trial's unfreeze events ({source}):",
        "- phase 0: the head and the blocks trainable from epoch 0. It has no lr: FTS trains "
        "phase 0 at the LR of configure_optimizers.",
        "- each later event: one phase listing the parameters of the blocks it unfroze (exact "
        "names, which FTS takes as they are before trying them as regexes), with lr = "
        "optimizer.lr x the block's LR scale (backbone_lr_mult x layer_decay ^ blocks between "
        "it and the head). FTS gives a phase one lr: under layer decay, a phase of several "
        "blocks gets its deepest block's (the one nearest the head), and its comment lists "
        "each block's own.",
        "- max_transition_epoch: the epoch the next phase starts (FTS moves at the start of "
        "that epoch); the last phase's is the trial's epochs (epoch_transitions_only needs "
        "one; FTS raises a lower max_epochs to it).",
        "- blocks no event unfroze are in no phase: FTS keeps them frozen.",
        "Not carried: the LR schedule (lrs are peak LRs), unfreeze_warmup_steps, weight decay, "
        "frozen_norm_eval, unfrozen_norm_eval; configure those in Lightning.",
    ]
    return "".join(_comment(text) for text in paragraphs) + "\n"


def _comment(text: str, indent: str = "") -> str:
    """``text`` as YAML comment lines of at most 100 characters; a "- " item hangs indented."""
    if not text:
        return "#\n"
    hang = indent + ("  " if text.startswith("- ") else "")
    lines = textwrap.wrap(text, 98, initial_indent=indent, subsequent_indent=hang)
    return "".join(f"# {line}\n" for line in lines)


def _fts_phase_text(k: int, phase: FtsPhase) -> str:
    body: dict[str, Any] = {"params": list(phase.params)}
    body["max_transition_epoch"] = phase.max_transition_epoch
    if phase.lr is not None:
        body["lr"] = phase.lr
    text = yaml.dump({k: body}, Dumper=_FtsDumper, sort_keys=False, allow_unicode=True)
    notes = _fts_phase_notes(k, phase)
    return _comment(notes[0]) + "".join(_comment(n, "  ") for n in notes[1:]) + text


def _fts_phase_notes(k: int, phase: FtsPhase) -> list[str]:
    opened = [b for b in phase.blocks if b != "head"]
    notes = [f"phase {k}, from epoch {phase.epoch}: {', '.join(phase.blocks)}"]
    if k == 0 and opened:
        lrs = ", ".join(f"{b} {lr:g}" for b, lr in zip(opened, phase.block_lrs, strict=True))
        notes.append(f"the trial trained these blocks at: {lrs}")
    if k > 0 and len(set(phase.block_lrs)) > 1:
        lrs = ", ".join(f"{b} {lr:g}" for b, lr in zip(opened, phase.block_lrs, strict=True))
        notes.append(f"layer decay gives the blocks their own LRs: {lrs}; lr is the deepest's")
    return notes


class _FtsDumper(YamlDumper):
    """Parameter lists one name a line: FTS schedules are read and edited by people."""


_FtsDumper.add_representer(
    list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=False)
)


def fts_text(
    search: Search,
    number: int,
    cfg: TrialConfig,
    prefix: str,
    out: Path,
    phases: Sequence[FtsPhase],
) -> str:
    """The schedule file: a header on the trial and how to use it, then one block per phase."""
    header = _fts_header(search, number, cfg, prefix, out)
    return header + "".join(_fts_phase_text(i, phase) for i, phase in enumerate(phases))
