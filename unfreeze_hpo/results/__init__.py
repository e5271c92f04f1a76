"""Read a search (its Optuna study, ``search.yaml`` and Ray folder) without Ray or a running search.

``open_search`` gives the ``Search``; ``trials`` tables its trials and picks the best, ``report``
draws it, ``export`` turns one trial into a schedule a user trains with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from unfreeze_hpo import config, storage, yamlfile
from unfreeze_hpo.config import TrialConfig
from unfreeze_hpo.errors import ConfigError, Problem, UserError
from unfreeze_hpo.params import build
from unfreeze_hpo.search.inputs import SEARCH_FILE
from unfreeze_hpo.search.objective import Objective
from unfreeze_hpo.search.options import STUDY_FILE, SearchConfig, search_values, with_objective
from unfreeze_hpo.search.space import SearchSpace, space_from_dict

STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "running",
}
# Bookkeeping Ray adds to every result: not metrics the trial reached.
RAY_KEYS = frozenset(
    {
        "timestamp",
        "training_iteration",
        "time_this_iter_s",
        "time_total_s",
        "time_since_restore",
        "iterations_since_restore",
        "pid",
        "done",
        "should_checkpoint",
    }
)


@dataclass(frozen=True)
class Search:
    """An opened search folder: its study, the base config and space its trials were built from."""

    folder: Path
    name: str
    study: optuna.Study
    base: TrialConfig
    space: SearchSpace
    objective: Objective  # what the study's values are
    study_url: str = ""

    @property
    def metric(self) -> str:
        """The key the trials report the objective under: the study's metric name."""
        return self.objective.key

    @property
    def mode(self) -> str:
        return self.objective.mode


# ---------------------------------------------------------------------------------------------
# The search record (written by the search, read here)


def open_search(path: str | Path, *, study_storage: str | None = None) -> Search:
    """Open the search folder ``path`` (``<storage_path>/<name>``, local or a URI); UserError when
    it is not one. A remote search is read through a local mirror of its small files."""
    folder = local_folder(path)
    if not folder.is_dir():
        raise UserError(search_problem(path, "no such folder", _nearby_searches(folder.parent)))
    record = folder / SEARCH_FILE
    if not record.is_file():
        if (folder / STUDY_FILE).exists() or (folder / "ray").is_dir():
            why = f"a search from before {SEARCH_FILE} was recorded"
            fix = (
                "run the same `unfreeze-hpo search` command again: it resumes the search, "
                f"keeps its trials and records {SEARCH_FILE}"
            )
            return raise_problem(search_problem(path, why, fix))
        why = f"not a search folder (no {SEARCH_FILE})"
        return raise_problem(search_problem(path, why, _nearby_searches(folder)))
    cfg, base, space = _read_record(record)
    url = study_url(folder, study_storage or cfg.study_storage)
    study = load_study(path, cfg.name, url)
    return Search(folder, cfg.name, study, base, space, cfg.goal, url)


def local_folder(path: str | Path) -> Path:
    """The search folder ``path`` on this machine: itself, or for a URI a refreshed local mirror
    of its records, results and metrics (see ``storage.mirror``)."""
    if "\0" in str(path):  # no path holds one; Path.resolve would raise
        return raise_problem(search_problem(path, "contains a NUL character", "remove it"))
    if not storage.is_uri(str(path)):
        return Path(path).expanduser().resolve()
    location = str(path)
    if problem := storage.check_location(location, "SEARCH"):
        raise UserError(problem)
    try:
        if storage.read_text(storage.join(location, SEARCH_FILE)) is None:
            why = f"not a search folder (no {SEARCH_FILE} there)"
            fix = "give <storage_path>/<name> as the search wrote it, e.g. s3://bucket/runs/demo"
            return raise_problem(search_problem(location, why, fix))
        return storage.mirror(location, storage.cache_dir())
    except OSError as exc:  # no such bucket, no credentials, endpoint down
        why = f"cannot read it ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
        fix = "check the URI and that this machine's credentials can read it"
        return raise_problem(search_problem(location, why, fix))


def study_url(folder: Path, study_storage: str | None = None) -> str:
    """Where the search in ``folder`` keeps its study: ``study_storage`` when given, else the URL
    its ``search.yaml`` records (PostgreSQL, a file on NFS), else its own SQLite file (absolute,
    so a dashboard started from another working directory opens the same file)."""
    if study_storage:
        return study_storage
    if recorded := recorded_study_storage(folder):
        return recorded
    return own_study_url(folder)


def own_study_url(folder: Path) -> str:
    """The SQLite study file inside the search folder, as an absolute URL."""
    return f"sqlite:///{(folder / STUDY_FILE).resolve()}"


def recorded_study_storage(folder: Path) -> str | None:
    """The ``study_storage`` URL recorded in a search folder's ``search.yaml``, if any."""
    try:
        values, _ = yamlfile.parse_yaml((folder / SEARCH_FILE).read_text(encoding="utf-8"), "")
    except (OSError, ConfigError):
        return None
    search = values.get("search") if isinstance(values, dict) else None
    url = search.get("study_storage") if isinstance(search, dict) else None
    return url if isinstance(url, str) and url else None


def _read_record(record: Path) -> tuple[SearchConfig, TrialConfig, SearchSpace]:
    values, _ = yamlfile.parse_yaml(record.read_text(encoding="utf-8"), str(record))
    problems: list[Problem] = []
    recorded = values.get("search")
    if isinstance(recorded, Mapping):  # the names of older records too
        recorded = search_values(with_objective(recorded))
    cfg = build(SearchConfig, recorded, "search", problems)
    base = space = None
    try:
        base = config.from_dict(values.get("base") or {}, source=str(record))
    except ConfigError as exc:
        problems += exc.problems
    try:
        space = space_from_dict(values.get("space") or {}, source=str(record))
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        # Typically a data folder or checkpoint that has moved since the search ran.
        raise ConfigError(problems)
    assert cfg is not None and base is not None and space is not None
    return cfg, base, space


def load_study(path: str | Path, name: str, url: str) -> optuna.Study:
    """The study ``name`` in ``url``, read-only; a UserError naming SEARCH when it is absent."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        # Optuna would create an empty database there; a reader must not write.
        why = "the search has no study yet (no trial has ended)"
        return raise_problem(
            search_problem(path, why, "wait for the first trial, or start the search")
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        db = optuna.storages.get_storage(url)
    except Exception as exc:  # a bad URL or a missing database driver is bad input: say which
        why = f"cannot open the storage {storage.redact(url)} ({storage.database_error(exc)})"
        return raise_problem(search_problem(path, why, "check --study-storage"))
    try:
        return optuna.load_study(study_name=name, storage=db)
    except KeyError:
        names = ", ".join(optuna.get_all_study_names(db)) or "none"
        fix = f"pass --study-storage with the URL the search wrote study {name!r} to"
        return raise_problem(
            search_problem(
                path, f"study {name!r} is not in {storage.redact(url)} (it holds {names})", fix
            )
        )


def search_problem(path: str | Path, why: str, fix: str) -> Problem:
    return Problem("SEARCH", str(path), why, fix)


def _nearby_searches(folder: Path) -> str:
    found = sorted(p.parent.name for p in folder.glob(f"*/{SEARCH_FILE}"))[:5]
    example = f"; searches in {folder}: {', '.join(found)}" if found else ""
    return f"give a search folder, <storage_path>/<name> (e.g. unfreeze-runs/demo){example}"


def raise_problem(problem: Problem) -> Any:
    raise UserError(problem)


def or_list(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
