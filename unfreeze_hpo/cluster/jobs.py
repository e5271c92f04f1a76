"""A search as a Ray Job: submitted to a cluster's Jobs server, it runs on the head node and
survives the submitting machine disconnecting; ``status``, ``logs`` and ``stop`` follow it.

The job runs ``python -m unfreeze_hpo.cli search ... --address auto`` in the uploaded working
directory, with this machine's ``unfreeze_hpo`` package shipped alongside (Ray's ``py_modules``):
the driver and every trial run the code that was checked here, and the cluster's nodes need only
the dependencies. The search options are checked here first, so a typo fails on the laptop, not
on the cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import unfreeze_hpo
from unfreeze_hpo import storage
from unfreeze_hpo.errors import ConfigError, Problem, UserError
from unfreeze_hpo.search.options import SearchConfig, as_option, search_options

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the Jobs server through an SSH tunnel or port-forward
PACKAGE = Path(unfreeze_hpo.__file__).resolve().parent  # the package a job ships
# Never uploaded with the working directory: environments, results, caches, weights.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "unfreeze-runs",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
Log = Callable[[str], None]


def address_of(address: str | None) -> str:
    """The Jobs server: the given one, else $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, or local."""
    return (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )


def client(address: str | None) -> Any:
    """A JobSubmissionClient; a UserError naming --address when no Jobs server answers."""
    from ray.job_submission import JobSubmissionClient

    where = address_of(address)
    _token_auth_like_ray_start()
    try:
        return JobSubmissionClient(where)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            Problem(
                "--address",
                where,
                f"no Ray Jobs server answers there ({message})",
                "give the head's dashboard address (http://HOST:8265); from a laptop, tunnel "
                "it first: ssh -L 8265:localhost:8265 HEAD (see cluster/README.md)",
            )
        ) from exc


def _token_auth_like_ray_start() -> None:
    """Send the Ray auth token when there is one and RAY_AUTH_MODE is unset: the rule ``ray
    start`` and ``ray.init`` follow, so a cluster started here with a token accepts us."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray: RAY_AUTH_MODE=token in the environment still works
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@dataclass(frozen=True)
class Submission:
    entrypoint: str
    working_dir: Path
    cfg: SearchConfig
    notes: list[str]


def prepare(
    values: Mapping[str, Any], working_dir: str | Path, *, debug: bool = False
) -> Submission:
    """Check the search options ``values`` (SearchConfig fields as given on the command line)
    for a run on a cluster, and build the job's entrypoint. Every problem at once."""
    from unfreeze_hpo.params import build
    from unfreeze_hpo.search import trackers
    from unfreeze_hpo.search.inputs import check_inputs, check_storage, load_inputs

    problems: list[Problem] = []
    notes: list[str] = []
    folder = Path(working_dir).expanduser().resolve()
    if not folder.is_dir():
        problems.append(
            Problem(
                "--working-dir", str(working_dir), "no such folder", "give the folder to upload"
            )
        )
    built = build(SearchConfig, dict(values), "search", problems)
    if built is not None:  # the packages are the cluster's business: the driver runs there
        problems += trackers.problems(built.trackers, installed=False)
    problems = [as_option(p) for p in problems]
    # With a bad number elsewhere, the paths are still checked: every problem in one go.
    cfg = built or dataclasses.replace(
        SearchConfig(),
        **{k: str(values[k]) for k in PATH_OPTIONS if values.get(k) is not None},  # type: ignore[arg-type]
    )

    shipped: dict[str, str] = {}  # space/base as the job sees them: relative to its working dir
    local: dict[str, str] = {}  # and as this machine finds them, to check them now
    for field in ("space", "base"):
        value = getattr(cfg, field)
        if value is None:
            continue
        path = Path(value).expanduser()
        here = path if path.is_absolute() else folder / path
        local[field] = str(here)
        if here.resolve().is_relative_to(folder):
            shipped[field] = here.resolve().relative_to(folder).as_posix()
        else:
            shipped[field] = str(here.resolve())
            notes.append(f"--{field} {here} is outside the working dir: it must exist on the head")
    problems += _cluster_paths(local.get("base"))
    inputs = None
    try:
        inputs = load_inputs(SearchConfig(space=local.get("space"), base=local.get("base")))
    except ConfigError as exc:
        for problem in exc.problems:
            if _elsewhere(problem):  # e.g. /nfs/data mounted on the cluster, not here
                notes.append(
                    f"{problem.field} {problem.value} is not on this machine: it must be "
                    "on every node"
                )
            else:
                problems.append(problem)
    if not storage.is_uri(cfg.storage_path) and not Path(cfg.storage_path).is_absolute():
        problems.append(
            Problem(
                "--storage-path",
                cfg.storage_path,
                "relative: the job would write into its temporary working dir on the head node",
                "give a path every node mounts (/nfs/unfreeze-runs) or a URI (s3://bucket/runs)",
            )
        )
    if cfg.weights_cache and not Path(cfg.weights_cache).expanduser().is_absolute():
        problems.append(
            Problem(
                "--weights-cache",
                cfg.weights_cache,
                "relative: each node would resolve it in its own copy of the job's working dir",
                "give a path every node mounts (/nfs/weights), or leave it out for each node's "
                "default cache",
            )
        )
    storage_problems = [as_option(p) for p in check_storage(cfg)]
    problems += storage_problems
    if inputs is not None:  # as `search` checks them; the resume where storage is readable
        problems += check_inputs(None if storage_problems else built, *inputs)
    if problems or built is None:
        raise ConfigError(problems)
    return Submission(_entrypoint(values, shipped, debug), folder, built, notes)


PATH_FIELDS = ("data.root", "model.checkpoint")
PATH_OPTIONS = ("name", "storage_path", "study_storage", "space", "base", "weights_cache")


def _cluster_paths(base_file: str | None) -> list[Problem]:
    """Paths in the base config must be absolute: a trial runs on any node, and a relative path
    exists only in the head's copy of the working dir."""
    if not base_file:
        return []
    from unfreeze_hpo.yamlfile import parse_yaml

    try:
        values, _ = parse_yaml(Path(base_file).read_text(encoding="utf-8"), base_file)
    except (OSError, ConfigError):
        return []  # load_inputs reports it
    problems = []
    for field in PATH_FIELDS:
        section, key = field.split(".")
        value = (values.get(section) or {}).get(key) if isinstance(values, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            problems.append(
                Problem(
                    field,
                    value,
                    "relative: trials run on every node, where it does not resolve",
                    "give an absolute path on storage every node mounts (e.g. /nfs/data/clips)",
                )
            )
    return problems


def _elsewhere(problem: Problem) -> bool:
    """A path problem that only says the path is missing on this machine."""
    return (
        problem.field.endswith(PATH_FIELDS)
        and problem.message.startswith("no such")
        and Path(str(problem.value)).expanduser().is_absolute()
    )


def _entrypoint(values: Mapping[str, Any], paths: Mapping[str, str], debug: bool) -> str:
    """``search`` with the given options, on the cluster it runs in."""
    # The package ships with the job (py_modules), so the cluster needs only its dependencies.
    argv = ["python", "-m", "unfreeze_hpo.cli", *(["--debug"] if debug else []), "search"]
    for option in search_options():
        head, _, tail = option.path.partition(".")
        value = (values.get(head) or {}).get(tail, MISSING) if tail else values.get(head, MISSING)
        if value is MISSING:
            continue
        if option.default is True or option.default is False:
            if value != option.default:
                argv.append(f"--no-{option.flag[2:]}" if option.default else option.flag)
            continue
        argv += [option.flag, str(paths.get(option.path, value))]
    argv += ["--address", "auto"]
    return shlex.join(argv)


def submit(
    submission: Submission, *, address: str | None = None, submission_id: str | None = None
) -> str:
    """Submit the search; its job id."""
    cfg = submission.cfg
    job_id = submission_id or f"unfreeze-hpo-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs = client(address)
    try:
        submitted: str = jobs.submit_job(
            entrypoint=submission.entrypoint,
            submission_id=job_id,
            runtime_env={
                "working_dir": str(submission.working_dir),
                # This machine's unfreeze_hpo, on every node the job touches (driver, trials).
                "py_modules": [str(PACKAGE)],
                "excludes": EXCLUDES,
            },
            metadata={"unfreeze_hpo": "search", "name": cfg.name, "results": cfg.location},
        )
    except RuntimeError as exc:  # the server refused: a duplicate id, an upload too large
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "refused"
        raise UserError(
            Problem("submit", job_id, f"the Jobs server refused the job ({message})", "see above")
        ) from exc
    return submitted


def status(job_id: str, *, address: str | None = None) -> Any:
    """The job's JobDetails (status, message, start and end times)."""
    jobs = client(address)
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:
        raise _unknown_job(job_id, jobs) from exc


def logs(job_id: str, *, address: str | None = None, follow: bool = False, out: Log = print) -> str:
    """Print the job's logs (``follow``: until it ends); its final status."""
    jobs = client(address)
    try:
        if not follow:
            out(jobs.get_job_logs(job_id).rstrip("\n"))
        else:

            async def tail() -> None:
                async for chunk in jobs.tail_job_logs(job_id):
                    out(chunk.rstrip("\n"))

            asyncio.run(tail())
        return str(jobs.get_job_status(job_id).value)
    except RuntimeError as exc:
        raise _unknown_job(job_id, jobs) from exc


def stop(job_id: str, *, address: str | None = None, timeout_s: float = 60.0) -> str:
    """Ask the job to stop and wait until it has; its final status."""
    jobs = client(address)
    try:
        jobs.stop_job(job_id)
        deadline = time.monotonic() + timeout_s
        while (state := str(jobs.get_job_status(job_id).value)) not in TERMINAL:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return state
    except RuntimeError as exc:
        raise _unknown_job(job_id, jobs) from exc


def searches(*, address: str | None = None) -> list[dict[str, Any]]:
    """The cluster's search jobs, newest first: id, status, name, results, start time."""
    rows = []
    for job in client(address).list_jobs():
        meta = job.metadata or {}
        if meta.get("unfreeze_hpo") != "search":
            continue
        rows.append(
            {
                "job": job.submission_id,
                "status": str(job.status.value),
                "name": meta.get("name", ""),
                "results": meta.get("results", ""),
                "started": time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000)
                ),
            }
        )
    return sorted(rows, key=lambda r: r["started"], reverse=True)


def _unknown_job(job_id: str, jobs: Any) -> UserError:
    known = [j.submission_id for j in jobs.list_jobs() if j.submission_id][-5:]
    fix = f"known jobs: {', '.join(known)}" if known else "no job has been submitted there"
    return UserError(Problem("JOB", job_id, "no such job on this cluster", fix))
