"""Where a search lives: a local (or NFS) folder, or a URI on storage pyarrow opens (s3://, gs://).

Ray Tune writes its experiment through pyarrow's filesystems; the few files of our own
(``search.yaml``) go through the same layer, so one ``storage_path`` works for both. A remote
search is read through a local mirror of its small files (records, results, metrics; never
model checkpoints), so every reader works on a plain folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from unfreeze_hpo import trialdir
from unfreeze_hpo.errors import Problem, describe

if TYPE_CHECKING:  # pyarrow is imported when a file is touched, not by every config reader
    from pyarrow import fs as pafs

URI_FIX = "a local or NFS path, or a URI such as s3://bucket/runs or gs://bucket/runs"

# The files a reader of a search needs; anything else (checkpoint.pt, events files) stays put.
MIRRORED = frozenset({"search.yaml", "result.json", "params.json", trialdir.METRICS})


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def resolve(path: str | os.PathLike[str]) -> str:
    """A local path made absolute (``~`` expanded); a URI as given."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """``base`` with path parts appended; a URI keeps its query (``?endpoint_override=...``)."""
    if not is_uri(base):
        return str(Path(base).joinpath(*parts))
    url = urlsplit(base)
    path = "/".join([url.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit(url._replace(path=path))


def name_of(location: str) -> str:
    """The last path part: the search name of ``<storage_path>/<name>``."""
    path = urlsplit(location).path if is_uri(location) else location
    return Path(path.rstrip("/")).name


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem and path for a location (local paths included)."""
    from pyarrow import fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), resolve(location)
    return pafs.FileSystem.from_uri(location)


def check_location(location: str, field: str) -> Problem | None:
    """A Problem when pyarrow cannot open ``location`` (unknown scheme, malformed URI)."""
    if not is_uri(location):
        return None
    try:
        open_location(location)
    except Exception as exc:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        return Problem(field, location, f"cannot be opened ({describe(exc)})", URI_FIX)
    return None


def unreachable(location: str) -> str | None:
    """Why ``location`` cannot be used (its bucket is missing or cannot be read); None when it
    can, or when it is local (folders are made as needed). Reads only."""
    if not is_uri(location):
        return None
    from pyarrow import fs as pafs

    try:
        filesystem, path = open_location(location)
        bucket = path.strip("/").split("/", 1)[0]
        if filesystem.get_file_info(bucket).type != pafs.FileType.Directory:
            return f"no bucket {bucket!r} there"
    except Exception as exc:  # OSError from the store: credentials, endpoint, permissions
        return describe(exc)
    return None


def write_text(location: str, text: str) -> None:
    """Write a whole file at a URI in one PUT: no reader sees part of it. (Local files go through
    ``yamlfile.write_atomic``, a rename.)"""
    filesystem, key = open_location(location)
    filesystem.create_dir(key.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(key) as out:
        out.write(text.encode("utf-8"))


def read_text(location: str) -> str | None:
    """The file's text; None when it does not exist."""
    from pyarrow import fs as pafs

    filesystem, path = open_location(location)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as inp:
        data: bytes = inp.read()
    return data.decode("utf-8")


def cache_dir() -> Path:
    """The project's cache: ``$UNFREEZE_HPO_CACHE``, else ``~/.cache/unfreeze-hpo``."""
    root = os.environ.get("UNFREEZE_HPO_CACHE") or Path.home() / ".cache" / "unfreeze-hpo"
    return Path(root)


def mirror(location: str, cache: Path) -> Path:
    """Copy the small files of the remote search folder ``location`` under ``cache``.

    The mirror is ``cache/remote/<hash of location>/<name>``: stable, so a second read only
    refreshes it. Files that changed size are copied again; a running search can be re-read.
    """
    from pyarrow import fs as pafs

    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    local = cache / "remote" / digest / name_of(location)
    filesystem, root = open_location(location)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File or info.base_name not in MIRRORED:
            continue
        target = local / info.path[len(root) :].lstrip("/")
        if target.is_file() and target.stat().st_size == info.size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(info.path) as inp:
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(inp.read())
        os.replace(tmp, target)
    return local


# ---------------------------------------------------------------------------------------------
# The study's database (a SQLAlchemy URL)

# The package behind each SQLAlchemy driver name people write most.
DRIVERS = {
    "postgresql": "psycopg[binary]",
    "postgresql+psycopg2": "psycopg2-binary",
    "mysql": "mysqlclient",
}


def redact(url: str) -> str:
    """A SQLAlchemy URL fit to print: the password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide in it
        return url


def check_study_storage(url: str, field: str = "study_storage") -> Problem | None:
    """A Problem when ``url`` is not a SQLAlchemy URL, or its database driver is not installed."""
    from sqlalchemy.engine import make_url

    example = "e.g. postgresql://USER@HOST:5432/DB or sqlite:////shared/runs/study.db"
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except Exception as exc:  # sqlalchemy.exc.ArgumentError / NoSuchModuleError
        return Problem(field, redact(url), f"not a database URL ({describe(exc)})", example)
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        name = parsed.drivername  # "postgresql" (its default driver) or "postgresql+asyncpg"
        package = DRIVERS.get(name) or (parsed.get_driver_name() if "+" in name else name)
        why = f"its driver is not installed ({describe(exc)})"
        return Problem(field, redact(url), why, f"pip install {package}")
    return None


def connect_problem(url: str, field: str = "study_storage") -> Problem | None:
    """A Problem when the study database at ``url`` cannot be opened (server down, no such
    database, bad credentials); opening it creates Optuna's tables, as the search would."""
    import optuna

    try:
        optuna.storages.get_storage(url)
    except Exception as exc:  # sqlalchemy.exc.OperationalError and friends
        why = f"cannot open the database ({database_error(exc)})"
        fix = "check host, port, database name and credentials; the database must exist"
        return Problem(field, redact(url), why, fix)
    return None


def database_error(exc: BaseException) -> str:
    """A driver's error on one line, without SQLAlchemy's "Background on this error" link."""
    cause = getattr(exc, "orig", None) or exc
    lines = [
        line.strip()
        for line in str(cause).splitlines()
        if line.strip() and not line.strip().startswith("(Background on this error")
    ]
    return f"{type(cause).__name__}: {'; '.join(lines) or '(no message)'}"
