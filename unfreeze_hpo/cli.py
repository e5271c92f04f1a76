"""The ``unfreeze-hpo`` command: a thin command table over the library.

User errors print one line per problem (field, value, fix) and exit 2 without a traceback;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unfreeze_hpo.errors import ConfigError, Problem, UnfreezeHPOError, UserError

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    # pytorchvideo calls torch.jit.script at import; the warning is noise for a CLI user.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except UserError as exc:
        if args.debug:
            raise
        print("error: invalid input", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UnfreezeHPOError as exc:
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc or '(no message)'}", file=sys.stderr)
        print("  run again with --debug for the traceback", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unfreeze-hpo",
        description="Hyperparameter search for gradual backbone unfreezing.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
        add_args(p)
        p.set_defaults(run=func)
    return parser


# ---------------------------------------------------------------------------------------------
# blocks


def _blocks_args(p: argparse.ArgumentParser) -> None:
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
        matcher = _yaml_arg(text, "--matcher") if text else None
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

    strategy, _, matcher, model_kwargs, _ = _all_or_errors(
        lambda: (
            strategies.create(args.strategy, _pairs(args.set, "--set")) if args.strategy else None
        ),
        lambda: epochs_of(args.epochs),
        lambda: matcher_of(args.matcher),
        lambda: _pairs(args.model_arg, "--model-arg"),
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
            "share": [_pct(b.numel, blocks.backbone_numel) for b in blocks.blocks],
            "unfrozen down to here": [_pct(c, blocks.backbone_numel) for c in from_output],
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
                "backbone trainable": _pct(sum(sizes[len(sizes) - plan.n_trainable :]), total),
                "unfrozen this epoch": ", ".join(reversed(new)) if new else "-",
            }
        )
        previous = plan.n_trainable
    print(f"schedule preview: {strategy} over {args.epochs} epochs")
    if strategy.name == "adaptive":
        print(
            "(adaptive depends on the validation metric; shown for a metric that never "
            "improves, i.e. the fastest it can unfreeze)"
        )
    print(pd.DataFrame(rows).to_string(index=False))
    target = strategy.target(sizes)
    reached = next((r["epoch"] for r in rows if r["trainable blocks"] == target), None)
    print(
        f"target: {target} of {len(sizes)} blocks "
        f"({_pct(sum(sizes[len(sizes) - target :]), total)} of the backbone)"
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


# ---------------------------------------------------------------------------------------------
# strategies, models


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


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


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("family", choices=("timm", "pytorchvideo"))
    p.add_argument("--filter", default="", help="only names containing this text")


def cmd_models(args: argparse.Namespace) -> int:
    from unfreeze_hpo.models import available

    for name in available(args.family):
        if args.filter in name:
            print(f"{args.family}:{name}")
    return 0


# ---------------------------------------------------------------------------------------------
# validate, train, check


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="task/trial YAML file")


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load_checked(args.config)
    print(
        f"{args.config}: ok — {cfg.model.name} on {cfg.data.kind} ({cfg.data.task}), "
        f"strategy {cfg.strategy}, {cfg.epochs} epochs, output {cfg.output_dir}"
    )
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="task YAML or exported schedule")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--epochs", type=int, help="override epochs (e.g. to extend a resumed run)")


def cmd_train(args: argparse.Namespace) -> int:
    from unfreeze_hpo import train

    cfg = _load_checked(args.config)
    changes: dict[str, Any] = {}
    if args.output_dir:
        changes["output_dir"] = _path_option("--output-dir", args.output_dir)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError(Problem("--epochs", args.epochs, "must be >= 1", "e.g. --epochs 10"))
        changes["epochs"] = args.epochs
    cfg = cfg.replace(**changes)
    try:
        summary = train.run(cfg, resume=args.resume)
    except train.TrialFailed as exc:
        print(f"trial failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"done: {summary.epochs_run} epochs, best val acc {summary.best_val_acc:.4f} at "
        f"epoch {summary.best_epoch}; metrics and checkpoints in {summary.output_dir}"
    )
    return 0


def _check_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--samples", type=int, default=16, help="training examples to overfit")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")


def cmd_check(args: argparse.Namespace) -> int:
    from unfreeze_hpo.preflight import preflight

    cfg = _load_checked(args.config)
    result = preflight(cfg, samples=args.samples, steps=args.steps)
    print(result.report())
    return 0 if result.passed else 1


def _load_checked(path: str) -> Any:
    """The config at ``path``, its strategy checked against the blocks of its model."""
    from unfreeze_hpo import config, yamlfile

    cfg = config.load(path)
    n_blocks = cfg.model.n_blocks()
    if n_blocks is not None and (problems := list(cfg.strategy.check_blocks(n_blocks))):
        raise ConfigError(yamlfile.locate(problems, path))
    return cfg


# ---------------------------------------------------------------------------------------------
# search


def _search_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from unfreeze_hpo.config import SearchConfig

    # One option per SearchConfig field, so the command and the library cannot drift apart.
    for f in dataclasses.fields(SearchConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is True:
            p.add_argument(
                f"--no-{f.name.replace('_', '-')}",
                dest=f.name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=f"turn off: {f.metadata['help']}",
            )
        elif f.default is False:
            p.add_argument(
                flag,
                dest=f.name,
                action="store_true",
                default=argparse.SUPPRESS,
                help=f.metadata["help"],
            )
        else:
            shown = "" if f.default is None else f" (default: {f.default})"
            p.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']}{shown}"
            )


def _search_values(args: argparse.Namespace) -> dict[str, Any]:
    """The SearchConfig fields given on the command line (options left out are not there)."""
    from unfreeze_hpo.config import SearchConfig

    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SearchConfig)
        if hasattr(args, f.name)
    }


def cmd_search(args: argparse.Namespace) -> int:
    from unfreeze_hpo.config import SearchConfig, as_option
    from unfreeze_hpo.params import build
    from unfreeze_hpo.search import (
        PreflightFailed,
        check_inputs,
        check_storage,
        load_inputs,
        run_search,
    )
    from unfreeze_hpo.storage import redact

    values = _search_values(args)
    problems: list[Problem] = []
    cfg = build(SearchConfig, values, "search", problems)
    problems = [as_option(p) for p in problems]
    inputs = None
    try:  # the space and base files too, so one run reports every problem
        inputs = load_inputs(SearchConfig(space=values.get("space"), base=values.get("base")))
    except ConfigError as exc:
        problems += exc.problems
    storage_problems = [as_option(p) for p in check_storage(cfg)] if cfg is not None else []
    problems += storage_problems
    if inputs is not None:  # a resumed search samples its first space: read where storage is
        problems += check_inputs(None if storage_problems else cfg, *inputs)
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    try:
        result = run_search(cfg)
    except ConfigError as exc:  # e.g. storage_path cannot be written: name the option
        raise ConfigError([as_option(p) for p in exc.problems]) from exc
    except PreflightFailed:
        print(
            "the search did not start: fix what the preflight reports, or pass --no-preflight",
            file=sys.stderr,
        )
        return 1
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    print(f"\ntrials: {counts or 'none ended'}")
    if result.interrupted:
        print(
            "interrupted: the search state is saved; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    if result.best is None:
        print("no trial completed")
        return 1
    print(f"best trial #{result.best.number}: {cfg.metric} {result.best.value:.4f}")
    for key, value in sorted(result.best.params.items()):
        print(f"    {key} = {value:.4g}" if isinstance(value, float) else f"    {key} = {value}")
    shown = redact(result.study_url)
    print(f"results: {result.folder} (study {result.study_name!r} in {shown})")
    return 0


# ---------------------------------------------------------------------------------------------
# submit, job (a search as a Ray Job on a cluster)


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the cluster's Jobs server, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS, "
        "$RAY_ADDRESS, else http://127.0.0.1:8265 through an SSH tunnel or port-forward)",
    )


def _submit_args(p: argparse.ArgumentParser) -> None:
    _address_arg(p)
    p.add_argument(
        "--working-dir",
        default=".",
        help="uploaded as the job's working dir; relative --space/--base paths are inside it "
        "(default: the current folder; .venv, .git, checkpoints and unfreeze-runs are left out)",
    )
    p.add_argument("--job-id", help="the job's id (default: unfreeze-hpo-NAME-DATE-TIME)")
    p.add_argument(
        "--follow", action="store_true", help="print the job's logs until it ends, then its exit"
    )
    _search_args(p, skip=("address",))


def cmd_submit(args: argparse.Namespace) -> int:
    from unfreeze_hpo import jobs

    values = _search_values(args)  # submit has no --address of the search: the job's is auto
    submission = jobs.prepare(values, args.working_dir, debug=args.debug)
    for note in submission.notes:
        print(f"note: {note}")
    job_id = jobs.submit(submission, address=args.address, submission_id=args.job_id)
    where = f" --address {args.address}" if args.address else ""
    print(f"submitted job {job_id}: {submission.entrypoint}")
    print(f"results: {submission.cfg.location}")
    if not args.follow:
        print(f"follow it:  unfreeze-hpo job logs {job_id} --follow{where}")
        print(f"stop it:    unfreeze-hpo job stop {job_id}{where}")
        return 0
    state = jobs.logs(job_id, address=args.address, follow=True)
    print(f"job {job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


JOB_ACTIONS = ("status", "logs", "stop", "list")


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=JOB_ACTIONS, help="what to do with the job")
    p.add_argument("job_id", nargs="?", metavar="JOB", help="the id `submit` printed")
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    _address_arg(p)


def cmd_job(args: argparse.Namespace) -> int:
    import pandas as pd

    from unfreeze_hpo import jobs

    if args.action == "list":
        rows = jobs.searches(address=args.address)
        print(pd.DataFrame(rows).to_string(index=False) if rows else "no search jobs")
        return 0
    if not args.job_id:
        fix = "pass the id `unfreeze-hpo submit` printed, or see them with `unfreeze-hpo job list`"
        raise UserError(Problem("JOB", None, f"`job {args.action}` needs a job id", fix))
    if args.action == "status":
        info = jobs.status(args.job_id, address=args.address)
        print(
            f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else "")
        )
        results = (info.metadata or {}).get("results")
        if results:
            print(f"results: {results}")
        return 0
    if args.action == "logs":
        state = jobs.logs(args.job_id, address=args.address, follow=args.follow)
        if args.follow:
            print(f"job {args.job_id}: {state}")
        return 0
    state = jobs.stop(args.job_id, address=args.address)
    print(f"job {args.job_id}: {state}")
    return 0


# ---------------------------------------------------------------------------------------------
# trials, best, export (read a search; no Ray needed)


def _search_folder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("search", metavar="SEARCH", help="a search folder: <storage_path>/<name>")
    p.add_argument("--study-storage", help="the study's URL when the search did not use SQLite")


def _trials_args(p: argparse.ArgumentParser) -> None:
    _search_folder_args(p)
    p.add_argument("--state", help="only trials in this state: complete, pruned, failed, running")
    p.add_argument("--strategy", help="only trials of this strategy")
    p.add_argument("--sort", metavar="COLUMN", help="sort by this column (default: number)")
    p.add_argument("--desc", action="store_true", help="sort in descending order")
    _table_args(p)


def _table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format", default="table", help="table (default: fits 120 columns), csv or json"
    )
    p.add_argument("--columns", metavar="A,B,...", help="these columns only (full or short names)")
    p.add_argument("--wide", action="store_true", help="every column, however wide the table")


def cmd_trials(args: argparse.Namespace) -> int:
    from unfreeze_hpo import results

    search = results.open_search(args.search, study_storage=args.study_storage)
    _, table = _all_or_errors(
        lambda: results.check_format(args.format),
        lambda: results.select(
            search,
            results.trials_table(search),
            state=args.state,
            strategy=args.strategy,
            sort=args.sort,
            descending=args.desc,
        ),
    )
    if args.format == "table":
        print(
            f"search {search.name}: {len(table)} trials; value: the best {search.metric} over "
            "the epochs, final: at the last epoch"
        )
    print(results.render(table, args.format, columns=args.columns, wide=args.wide))
    return 0


def _best_args(p: argparse.ArgumentParser) -> None:
    _search_folder_args(p)
    p.add_argument("--top", type=int, default=1, help="how many trials (default 1)")
    p.add_argument("--by", metavar="strategy", help="'strategy': the top trials of each strategy")
    _table_args(p)


def cmd_best(args: argparse.Namespace) -> int:
    from unfreeze_hpo import results

    def by_of(by: str | None) -> str | None:
        if by not in (None, "strategy"):
            raise ConfigError(Problem("--by", by, "unknown grouping", "use --by strategy"))
        return by

    _all_or_errors(
        lambda: by_of(args.by),
        lambda: results.check_top(args.top),
        lambda: results.check_format(args.format),
    )
    search = results.open_search(args.search, study_storage=args.study_storage)
    table = results.best_trials(search, args.top, by_strategy=args.by == "strategy")
    # Hyperparameters of the branches not shown are empty columns: leave them out.
    table = table.drop(columns=[c for c in table.columns if table[c].isna().all()])
    order = "highest" if search.mode == "max" else "lowest"
    if args.format == "table":
        print(f"search {search.name}: best completed trials by {search.metric} ({order} first)")
    print(results.render(table, args.format, columns=args.columns, wide=args.wide))
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    _search_folder_args(p)
    p.add_argument("--trial", type=int, help="trial number (default: the best completed trial)")
    p.add_argument("--out", required=True, help="the schedule YAML to write, e.g. schedule.yaml")
    p.add_argument(
        "--allow-incomplete", action="store_true", help="also export a pruned or failed trial"
    )
    p.add_argument(
        "--format",
        default="unfreeze-hpo",
        help="unfreeze-hpo (default): a trial YAML that `unfreeze-hpo train --config` replays; "
        "lightning-fts: an explicit schedule for Lightning's finetuning-scheduler",
    )
    p.add_argument(
        "--fts-prefix",
        help="lightning-fts: what the LightningModule puts before the model's parameter names "
        "(default 'model.', the model held as self.model; '' for none)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from unfreeze_hpo import config, export, results

    def prefix_of(prefix: str | None) -> str | None:
        if prefix is not None and args.format != "lightning-fts":
            fix = "drop it, or add --format lightning-fts"
            raise ConfigError(Problem("--fts-prefix", prefix, "only for lightning-fts", fix))
        return None if prefix is None else export.check_fts_prefix(prefix)

    _all_or_errors(
        lambda: export.check_export_format(args.format),
        lambda: prefix_of(args.fts_prefix),
        lambda: _path_option("--out", args.out),
    )
    search = results.open_search(args.search, study_storage=args.study_storage)
    if args.format == "lightning-fts":
        prefix = export.FTS_PREFIX if args.fts_prefix is None else args.fts_prefix
        fts = export.export_fts(
            search,
            Path(args.out),
            args.trial,
            allow_incomplete=args.allow_incomplete,
            prefix=prefix,
        )
        record = fts.trial.provenance or {}
        phases = "; ".join(
            f"{i}: from epoch {p.epoch}, {', '.join(p.blocks)}"
            + (f" at lr {p.lr:g}" if p.lr is not None else "")
            for i, p in enumerate(fts.phases)
        )
        print(
            f"wrote {fts.path}: trial {record.get('trial')} ({record.get('state')}), strategy "
            f"{fts.trial.strategy.name}, {len(fts.phases)} finetuning-scheduler phases ({phases})"
        )
        print(
            f"use it: FinetuningScheduler(ft_schedule={str(fts.path)!r}, "
            "epoch_transitions_only=True, restore_best=False); parameter names start with "
            f"{prefix!r}"
        )
        return 0
    out = export.export_schedule(
        search, Path(args.out), args.trial, allow_incomplete=args.allow_incomplete
    )
    cfg = config.load(out)
    record = cfg.provenance or {}
    value = record.get("value")
    reached = f"{search.metric} {value:.4f}" if isinstance(value, float) else "no metric"
    events = ", ".join(
        f"epoch {e['epoch']} -> {e['n_trainable']} trainable" for e in record.get("timeline", [])
    )
    print(
        f"wrote {out}: trial {record.get('trial')} ({record.get('state')}), strategy "
        f"{cfg.strategy}, {reached}; unfreeze events: {events or 'none'}"
    )
    print(f"replay it: unfreeze-hpo train --config {shlex.quote(str(out))}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    _search_folder_args(p)
    p.add_argument("--out", help="folder for the PNGs and index.html (default: SEARCH/report)")
    p.add_argument("--top", type=int, default=5, help="best trials in the trainable-ratio plot")


def cmd_report(args: argparse.Namespace) -> int:
    from unfreeze_hpo.report import build_report
    from unfreeze_hpo.results import local_folder

    if args.out:
        _path_option("--out", args.out)
    page = build_report(
        local_folder(args.search),
        Path(args.out) if args.out else None,
        study_storage=args.study_storage,
        top=args.top,
    )
    print(f"report: {page} (PNGs beside it)")
    return 0


def _dashboard_args(p: argparse.ArgumentParser) -> None:
    _search_folder_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; use an SSH tunnel to reach it)",
    )
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from unfreeze_hpo.dashboard import run_dashboard
    from unfreeze_hpo.results import local_folder

    run_dashboard(
        local_folder(args.search), host=args.host, port=args.port, study_storage=args.study_storage
    )
    return 0


# ---------------------------------------------------------------------------------------------
# helpers


def _all_or_errors(*steps: Callable[[], Any]) -> list[Any]:
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


def _yaml_arg(text: str, option: str) -> Any:
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


def _path_option(option: str, path: str) -> str:
    if "\0" in path:  # the OS refuses it; say so before anything is written
        raise ConfigError(Problem(option, path, "contains a NUL character", "remove it"))
    return path


def _pairs(items: Sequence[str], option: str) -> dict[str, Any]:
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
                out[key] = _yaml_arg(value, option)
            except ConfigError as exc:
                problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return out


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


COMMANDS: dict[
    str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]
] = {
    "blocks": (
        cmd_blocks,
        _blocks_args,
        "show a model's backbone blocks and preview a strategy's unfreeze schedule",
    ),
    "strategies": (cmd_strategies, _no_args, "list the freezing strategies and their parameters"),
    "models": (cmd_models, _models_args, "list the model names a family can build"),
    "validate": (cmd_validate, _config_arg, "check a task YAML and report every problem at once"),
    "train": (cmd_train, _train_args, "run one trial from a task YAML or exported schedule"),
    "check": (cmd_check, _check_args, "preflight: overfit a tiny subset and diagnose failures"),
    "report": (cmd_report, _report_args, "PNG plots and one HTML page of a search"),
    "dashboard": (cmd_dashboard, _dashboard_args, "serve a search's study with optuna-dashboard"),
    "search": (
        cmd_search,
        _search_args,
        "search unfreezing hyperparameters (default: a demo on the embedded default task)",
    ),
    "submit": (
        cmd_submit,
        _submit_args,
        "submit a search to a Ray cluster as a Ray Job (it survives this machine disconnecting)",
    ),
    "job": (cmd_job, _job_args, "status, logs, stop or list of submitted search jobs"),
    "trials": (
        cmd_trials,
        _trials_args,
        "list a search's trials: state, strategy, hyperparameters, metrics, prune/fail reason",
    ),
    "best": (cmd_best, _best_args, "show a search's best completed trials"),
    "export": (
        cmd_export,
        _export_args,
        "export a trial: a schedule YAML that `unfreeze-hpo train --config` replays, or a "
        "finetuning-scheduler schedule (--format lightning-fts)",
    ),
}


if __name__ == "__main__":
    sys.exit(main())
