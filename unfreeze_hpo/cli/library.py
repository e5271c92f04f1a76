"""The library's commands: ``blocks``, ``strategies``, ``models``, ``validate``, ``train``,
``check``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from unfreeze_hpo.cli.options import all_or_errors, config_arg, pairs, path_option, pct, yaml_arg
from unfreeze_hpo.errors import ConfigError, Problem


def blocks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm:<name> or pytorchvideo:<name>, e.g. timm:resnet18")
    p.add_argument("--pretrained", action="store_true", help="load the hub's pretrained weights")
    p.add_argument("--checkpoint", help="local weights (a torch state dict, weights only)")
    p.add_argument("--num-classes", type=int, help="size of the classifier")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the model builder (repeatable)",
    )
    p.add_argument(
        "--granularity",
        choices=("fine", "coarse"),
        default="fine",
        help="fine: one block per residual/transformer block; coarse: per stage",
    )
    p.add_argument(
        "--matcher",
        metavar="YAML",
        help=r"regex blocks for any model, e.g. \"{stem: '^conv1', "
        r"blocks: '^layers\.(\d+)'}\"",
    )
    p.add_argument("--strategy", help="also preview what this strategy unfreezes per epoch")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy parameter (repeatable), e.g. --set target_ratio=0.5",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs to preview (default 10)")
    p.add_argument("--backbone-lr-mult", type=float, default=1.0)
    p.add_argument("--layer-decay", type=float, default=1.0)


def cmd_blocks(args: argparse.Namespace) -> int:
    import pandas as pd

    from unfreeze_hpo import strategies
    from unfreeze_hpo.blocks import discover
    from unfreeze_hpo.models import ModelSpec, build, parse_name

    def matcher_of(text: str | None) -> Any:
        matcher = yaml_arg(text, "--matcher") if text else None
        if matcher is not None and not isinstance(matcher, dict):
            raise ConfigError(
                Problem(
                    "--matcher",
                    text,
                    "must be a mapping of group name to regex",
                    r"e.g. \"{stem: '^conv1', blocks: '^layers\.(\d+)'}\"",
                )
            )
        return matcher

    def epochs_of(epochs: int) -> int:
        if epochs < 1:
            raise ConfigError(Problem("--epochs", epochs, "must be >= 1", "e.g. --epochs 10"))
        return epochs

    strategy, _, matcher, model_kwargs, _ = all_or_errors(
        lambda: (
            strategies.create(args.strategy, pairs(args.set, "--set")) if args.strategy else None
        ),
        lambda: epochs_of(args.epochs),
        lambda: matcher_of(args.matcher),
        lambda: pairs(args.model_arg, "--model-arg"),
        lambda: parse_name(args.model),
    )
    spec = ModelSpec(
        args.model,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        kwargs=model_kwargs,
    )
    print(f"building {spec.name} ...", file=sys.stderr, flush=True)
    model = build(spec)
    blocks = discover(model, args.granularity, matcher)
    if strategy is not None and (problems := list(strategy.check_blocks(len(blocks)))):
        raise ConfigError(problems)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{spec.name}: {total:,} parameters | backbone {blocks.backbone_numel:,} in "
        f"{len(blocks)} blocks | head {blocks.head.numel:,} ({len(blocks.head.params)} tensors)"
        f" | adapter {blocks.adapter}, granularity {args.granularity}"
    )
    from_output = _cumulative_from_output(blocks.sizes)
    table = pd.DataFrame(
        {
            "index": [b.index for b in blocks.blocks],
            "block": [b.name for b in blocks.blocks],
            "params": [f"{b.numel:,}" for b in blocks.blocks],
            "share": [pct(b.numel, blocks.backbone_numel) for b in blocks.blocks],
            "unfrozen down to here": [pct(c, blocks.backbone_numel) for c in from_output],
        }
    )
    print(table.to_string(index=False))
    print(
        "(unfreezing goes from the last block backwards; the last column is the trainable "
        "share of the backbone once every block from the output down to that one is trainable)"
    )
    if strategy is not None:
        print()
        _print_preview(strategy, blocks.sizes, [b.name for b in blocks.blocks], args)
    return 0


def _print_preview(
    strategy: Any, sizes: tuple[int, ...], names: list[str], args: argparse.Namespace
) -> None:
    import pandas as pd

    flat = [0.0] * args.epochs  # adaptive: a metric that never improves (the fastest schedule)
    rows, previous = [], 0
    total = sum(sizes)
    for epoch in range(args.epochs):
        plan = strategy.plan(
            epoch, flat, sizes, backbone_lr_mult=args.backbone_lr_mult, layer_decay=args.layer_decay
        )
        new = names[len(names) - plan.n_trainable : len(names) - previous]
        rows.append(
            {
                "epoch": epoch,
                "trainable blocks": plan.n_trainable,
                "backbone trainable": pct(sum(sizes[len(sizes) - plan.n_trainable :]), total),
                "unfrozen this epoch": ", ".join(reversed(new)) if new else "-",
            }
        )
        previous = plan.n_trainable
    print(f"schedule preview: {strategy} over {args.epochs} epochs")
    if strategy.reads_history:
        print(
            f"({strategy.name} depends on the validation metric; shown for a metric that never "
            "improves, i.e. the fastest it can unfreeze)"
        )
    print(pd.DataFrame(rows).to_string(index=False))
    target = strategy.target(sizes)
    reached = next((r["epoch"] for r in rows if r["trainable blocks"] == target), None)
    print(
        f"target: {target} of {len(sizes)} blocks "
        f"({pct(sum(sizes[len(sizes) - target :]), total)} of the backbone)"
        + (f", reached at epoch {reached}" if reached is not None else ", not reached")
    )
    for note in strategy.notes(args.epochs, sizes):
        print(f"note: {note}")


def _cumulative_from_output(sizes: Sequence[int]) -> list[int]:
    out, running = [], 0
    for size in reversed(sizes):
        running += size
        out.append(running)
    return out[::-1]


def cmd_strategies(args: argparse.Namespace) -> int:
    from unfreeze_hpo.params import bounds_text
    from unfreeze_hpo.strategies import REGISTRY

    for name, cls in REGISTRY.items():
        print(f"{name}: {cls.summary}")
        defaults = cls().params()
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            default = defaults[f.name]
            bounds = bounds_text(f.metadata)
            print(
                f"    {f.name} = {default!r}{f'  ({bounds})' if bounds else ''}: "
                f"{f.metadata['help']}"
            )
    return 0


def models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("family", help="a registered model family: timm, pytorchvideo, or your own")
    p.add_argument("--filter", default="", help="only names containing this text")


def cmd_models(args: argparse.Namespace) -> int:
    from unfreeze_hpo.models import available

    for name in available(args.family):
        if args.filter in name:
            print(f"{args.family}:{name}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from unfreeze_hpo import data, models

    cfg = load_checked(args.config)
    print(
        f"{args.config}: ok — {cfg.model.name} on {cfg.data.kind} ({cfg.data.task}), "
        f"strategy {cfg.strategy}, {cfg.epochs} epochs, output {cfg.output_dir}"
    )
    prep = data.resolve(cfg.data, models.input_of(cfg.model.spec(cfg.model.num_classes or 2)))
    print("\n".join(prep.lines()))
    for warning in prep.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="task YAML or exported schedule")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--epochs", type=int, help="override epochs (e.g. to extend a resumed run)")
    weights_cache_arg(p)


def weights_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights-cache",
        metavar="PATH",
        help="folder for pretrained hub weights (default: the libraries' own caches, "
        "~/.cache/huggingface and ~/.cache/torch)",
    )


def use_weights_cache(args: argparse.Namespace) -> None:
    from unfreeze_hpo.models import hub

    if args.weights_cache:
        hub.use_cache(path_option("--weights-cache", args.weights_cache))


def cmd_train(args: argparse.Namespace) -> int:
    from unfreeze_hpo import embedded, train

    cfg = load_checked(args.config)
    changes: dict[str, Any] = {}
    if args.output_dir:
        changes["output_dir"] = path_option("--output-dir", args.output_dir)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError(Problem("--epochs", args.epochs, "must be >= 1", "e.g. --epochs 10"))
        changes["epochs"] = args.epochs
    cfg = cfg.replace(**changes)
    use_weights_cache(args)
    try:
        summary = train.run(
            cfg,
            resume=args.resume,
            weights=embedded.weights_for(cfg),
            progress=sys.stderr.isatty(),  # a bar within each epoch on a terminal only
        )
    except train.TrialFailed as exc:
        print(f"trial failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"done: {summary.epochs_run} epochs, best val acc {summary.best_val_acc:.4f} at "
        f"epoch {summary.best_epoch}; metrics and checkpoints in {summary.output_dir}"
    )
    return 0


def check_args(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--samples", type=int, default=16, help="training examples to overfit")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    weights_cache_arg(p)


def cmd_check(args: argparse.Namespace) -> int:
    from unfreeze_hpo.preflight import preflight

    cfg = load_checked(args.config)
    use_weights_cache(args)
    result = preflight(cfg, samples=args.samples, steps=args.steps)
    print(result.report())
    return 0 if result.passed else 1


def load_checked(path: str) -> Any:
    """The config at ``path``, its strategy checked against the blocks of its model."""
    from unfreeze_hpo import config, yamlfile

    cfg = config.load(path)
    n_blocks = cfg.model.n_blocks()
    if n_blocks is not None and (problems := list(cfg.strategy.check_blocks(n_blocks))):
        raise ConfigError(yamlfile.locate(problems, path))
    return cfg
