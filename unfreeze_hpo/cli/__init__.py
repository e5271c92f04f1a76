"""The ``unfreeze-hpo`` command: a thin command table over the library.

User errors print one line per problem (field, value, fix) and exit 2 without a traceback;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from unfreeze_hpo.cli.library import (
    blocks_args,
    check_args,
    cmd_blocks,
    cmd_check,
    cmd_models,
    cmd_strategies,
    cmd_train,
    cmd_validate,
    models_args,
    train_args,
)
from unfreeze_hpo.cli.options import config_arg, no_args
from unfreeze_hpo.cli.reading import (
    best_args,
    cmd_best,
    cmd_dashboard,
    cmd_export,
    cmd_report,
    cmd_trials,
    dashboard_args,
    export_args,
    report_args,
    trials_args,
)
from unfreeze_hpo.cli.searching import (
    cmd_job,
    cmd_search,
    cmd_submit,
    job_args,
    search_args,
    submit_args,
)
from unfreeze_hpo.errors import UnfreezeHPOError, UserError

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


COMMANDS: dict[
    str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]
] = {
    "blocks": (
        cmd_blocks,
        blocks_args,
        "show a model's backbone blocks and preview a strategy's unfreeze schedule",
    ),
    "strategies": (cmd_strategies, no_args, "list the freezing strategies and their parameters"),
    "models": (cmd_models, models_args, "list the model names a family can build"),
    "validate": (cmd_validate, config_arg, "check a task YAML and report every problem at once"),
    "train": (cmd_train, train_args, "run one trial from a task YAML or exported schedule"),
    "check": (cmd_check, check_args, "preflight: overfit a tiny subset and diagnose failures"),
    "report": (cmd_report, report_args, "PNG plots and one HTML page of a search"),
    "dashboard": (cmd_dashboard, dashboard_args, "serve a search's study with optuna-dashboard"),
    "search": (
        cmd_search,
        search_args,
        "search unfreezing hyperparameters (default: a demo on the embedded default task)",
    ),
    "submit": (
        cmd_submit,
        submit_args,
        "submit a search to a Ray cluster as a Ray Job (it survives this machine disconnecting)",
    ),
    "job": (cmd_job, job_args, "status, logs, stop or list of submitted search jobs"),
    "trials": (
        cmd_trials,
        trials_args,
        "list a search's trials: state, strategy, hyperparameters, metrics, prune/fail reason",
    ),
    "best": (cmd_best, best_args, "show a search's best completed trials"),
    "export": (
        cmd_export,
        export_args,
        "export a trial: a schedule YAML that `unfreeze-hpo train --config` replays, or a "
        "finetuning-scheduler schedule (--format lightning-fts)",
    ),
}
