"""The commands that run a search: ``search`` (here or on a cluster), ``submit`` and ``job``
(a search as a Ray Job)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from unfreeze_hpo.errors import ConfigError, Problem, UserError


def search_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from unfreeze_hpo.search.options import search_options

    # One option per SearchConfig setting, so the command and the library cannot drift apart.
    for option in search_options():
        if option.path in skip:
            continue
        f, flag = option.field, option.flag
        if f.default is True:
            p.add_argument(
                f"--no-{flag.removeprefix('--')}",
                dest=option.path,
                action="store_false",
                default=argparse.SUPPRESS,
                help=f"turn off: {f.metadata['help']}",
            )
        elif f.default is False:
            p.add_argument(
                flag,
                dest=option.path,
                action="store_true",
                default=argparse.SUPPRESS,
                help=f.metadata["help"],
            )
        else:
            shown = "" if f.default is None else f" (default: {f.default})"
            p.add_argument(
                flag,
                dest=option.path,
                metavar=f.name.upper(),
                default=argparse.SUPPRESS,
                help=f"{f.metadata['help']}{shown}",
            )


def given_search_values(args: argparse.Namespace) -> dict[str, Any]:
    """The SearchConfig values given on the command line (options left out are not there)."""
    from unfreeze_hpo.search.options import search_options, search_values

    given = {o.path: getattr(args, o.path) for o in search_options() if hasattr(args, o.path)}
    return search_values(given)


def cmd_search(args: argparse.Namespace) -> int:
    from unfreeze_hpo.params import build
    from unfreeze_hpo.search.driver import PreflightFailed, run_search
    from unfreeze_hpo.search.inputs import check_inputs, check_storage, load_inputs
    from unfreeze_hpo.search.options import SearchConfig, as_option
    from unfreeze_hpo.storage import redact

    values = given_search_values(args)
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
    print(f"best trial #{result.best.number}: {cfg.goal.key} {result.best.value:.4f}")
    for key, value in sorted(result.best.params.items()):
        print(f"    {key} = {value:.4g}" if isinstance(value, float) else f"    {key} = {value}")
    shown = redact(result.study_url)
    print(f"results: {result.folder} (study {result.study_name!r} in {shown})")
    return 0


def address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the cluster's Jobs server, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS, "
        "$RAY_ADDRESS, else http://127.0.0.1:8265 through an SSH tunnel or port-forward)",
    )


def submit_args(p: argparse.ArgumentParser) -> None:
    address_arg(p)
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
    search_args(p, skip=("address",))


def cmd_submit(args: argparse.Namespace) -> int:
    from unfreeze_hpo.cluster import jobs

    values = given_search_values(args)  # submit has no --address of the search: the job's is auto
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


def job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=JOB_ACTIONS, help="what to do with the job")
    p.add_argument("job_id", nargs="?", metavar="JOB", help="the id `submit` printed")
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    address_arg(p)


def cmd_job(args: argparse.Namespace) -> int:
    import pandas as pd

    from unfreeze_hpo.cluster import jobs

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
