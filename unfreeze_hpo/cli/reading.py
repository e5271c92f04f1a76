"""The commands that read a search, without Ray: ``trials``, ``best``, ``export``, ``report``,
``dashboard``."""

from __future__ import annotations

import argparse
from pathlib import Path

from unfreeze_hpo.cli.options import all_or_errors, path_option, search_folder_args
from unfreeze_hpo.errors import ConfigError, Problem


def trials_args(p: argparse.ArgumentParser) -> None:
    search_folder_args(p)
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
    from unfreeze_hpo.results import listing

    search = results.open_search(args.search, study_storage=args.study_storage)
    _, table = all_or_errors(
        lambda: listing.check_format(args.format),
        lambda: listing.select(
            search,
            listing.trials_table(search),
            state=args.state,
            strategy=args.strategy,
            sort=args.sort,
            descending=args.desc,
        ),
    )
    if args.format == "table":
        print(
            f"search {search.name}: {len(table)} trials\nvalue: {search.objective.describe()} "
            f"({search.metric}); final: {search.objective.metric} at the last epoch"
        )
    print(listing.render(table, args.format, columns=args.columns, wide=args.wide))
    return 0


def best_args(p: argparse.ArgumentParser) -> None:
    search_folder_args(p)
    p.add_argument("--top", type=int, default=1, help="how many trials (default 1)")
    p.add_argument("--by", metavar="strategy", help="'strategy': the top trials of each strategy")
    _table_args(p)


def cmd_best(args: argparse.Namespace) -> int:
    from unfreeze_hpo import results
    from unfreeze_hpo.results import listing

    def by_of(by: str | None) -> str | None:
        if by not in (None, "strategy"):
            raise ConfigError(Problem("--by", by, "unknown grouping", "use --by strategy"))
        return by

    all_or_errors(
        lambda: by_of(args.by),
        lambda: listing.check_top(args.top),
        lambda: listing.check_format(args.format),
    )
    search = results.open_search(args.search, study_storage=args.study_storage)
    table = listing.best_trials(search, args.top, by_strategy=args.by == "strategy")
    # Hyperparameters of the branches not shown are empty columns: leave them out.
    table = table.drop(columns=[c for c in table.columns if table[c].isna().all()])
    order = "highest" if search.mode == "max" else "lowest"
    if args.format == "table":
        print(
            f"search {search.name}: best completed trials by {search.metric} ({order} first)\n"
            f"value: {search.objective.describe()}"
        )
        if "seeds" in table.columns:
            print(
                "re-run configs first, by seed_mean over their seeds; seed_sd: their spread, "
                "val_se: one reading's validation-sampling error, train_sd: the training "
                "seed's share of seed_sd"
            )
    print(listing.render(table, args.format, columns=args.columns, wide=args.wide))
    return 0


def export_args(p: argparse.ArgumentParser) -> None:
    search_folder_args(p)
    p.add_argument("--trial", type=int, help="trial number (default: the best completed trial)")
    p.add_argument("--out", required=True, help="the schedule YAML to write, e.g. schedule.yaml")
    p.add_argument(
        "--allow-incomplete", action="store_true", help="also export a pruned or failed trial"
    )
    p.add_argument(
        "--format",
        default="unfreeze-hpo",
        help="unfreeze-hpo (default): a trial YAML that `unfreeze-hpo train --config` replays; "
        "lightning-fts: an explicit schedule for Lightning's finetuning-scheduler; an export "
        "format registered with results.export.register_exporter",
    )
    p.add_argument(
        "--fts-prefix",
        help="lightning-fts: what the LightningModule puts before the model's parameter names "
        "(default 'model.', the model held as self.model; '' for none)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from unfreeze_hpo import results
    from unfreeze_hpo.results import export, fts

    options = {"fts_prefix": args.fts_prefix} if args.fts_prefix is not None else {}

    def checked_options(fmt: str) -> None:
        taking = [e.name for e in export.EXPORTERS.values() if "fts_prefix" in e.options]
        if (
            options
            and fmt in export.EXPORTERS
            and "fts_prefix" not in export.EXPORTERS[fmt].options
        ):
            fix = f"drop it, or add --format {' / '.join(taking)}"
            raise ConfigError(
                Problem("--fts-prefix", args.fts_prefix, f"only for {', '.join(taking)}", fix)
            )
        if options:
            fts.check_fts_prefix(args.fts_prefix)

    all_or_errors(
        lambda: export.exporter(args.format),
        lambda: checked_options(args.format),
        lambda: path_option("--out", args.out),
    )
    search = results.open_search(args.search, study_storage=args.study_storage)
    written = export.exporter(args.format).write(
        search, Path(args.out), args.trial, allow_incomplete=args.allow_incomplete, **options
    )
    for line in written.lines:
        print(line)
    return 0


def report_args(p: argparse.ArgumentParser) -> None:
    search_folder_args(p)
    p.add_argument("--out", help="folder for the PNGs and index.html (default: SEARCH/report)")
    p.add_argument("--top", type=int, default=5, help="best trials in the trainable-ratio plot")


def cmd_report(args: argparse.Namespace) -> int:
    from unfreeze_hpo.results import local_folder
    from unfreeze_hpo.results.report import build_report

    if args.out:
        path_option("--out", args.out)
    page = build_report(
        local_folder(args.search),
        Path(args.out) if args.out else None,
        study_storage=args.study_storage,
        top=args.top,
    )
    print(f"report: {page} (PNGs beside it)")
    return 0


def dashboard_args(p: argparse.ArgumentParser) -> None:
    search_folder_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; use an SSH tunnel to reach it)",
    )
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from unfreeze_hpo.results import local_folder
    from unfreeze_hpo.results.dashboard import run_dashboard

    run_dashboard(
        local_folder(args.search), host=args.host, port=args.port, study_storage=args.study_storage
    )
    return 0
