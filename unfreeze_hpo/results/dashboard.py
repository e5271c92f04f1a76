"""optuna-dashboard on a search's study: the command that serves it, and running it as a child
that ends when this process is stopped (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from unfreeze_hpo.errors import Problem, UnfreezeHPOError, UserError
from unfreeze_hpo.results.report import storage_url


def dashboard_command(
    search_folder: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    study_storage: str | None = None,
) -> list[str]:
    """The argv that serves the search's study with optuna-dashboard (local-only by default)."""
    if not 0 < port < 65536:
        raise UserError(Problem("--port", port, "not a TCP port", "pass a port in 1..65535"))
    url = storage_url(search_folder, study_storage)
    # The script next to this interpreter: the dashboard of this environment, not one on PATH.
    script = Path(sys.executable).parent / "optuna-dashboard"
    if not script.is_file():
        message = "optuna-dashboard is not installed in this environment"
        raise UserError(Problem("dashboard", str(script), message, "pip install optuna-dashboard"))
    return [str(script), url, "--host", host, "--port", str(port)]


def run_dashboard(
    search_folder: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    study_storage: str | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Serve the study until Ctrl-C (blocking)."""
    argv = dashboard_command(search_folder, host=host, port=port, study_storage=study_storage)
    log(f"optuna-dashboard on http://{host}:{port}/ for {argv[1]} (Ctrl-C stops it)")
    if host in ("0.0.0.0", "::"):
        log("warning: bound to every interface: anyone who reaches this machine can edit the study")
    process = subprocess.Popen(argv)
    try:
        with _terminate_raises():
            code = process.wait()
    except (KeyboardInterrupt, _Terminated):  # Ctrl-C, `kill` or a supervisor stopping us
        _stop(process)
        return
    if code:
        raise UnfreezeHPOError(f"optuna-dashboard exited with code {code} (its message is above)")


class _Terminated(Exception):
    """SIGTERM arrived while the dashboard ran."""


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM raises ``_Terminated`` in the block (as SIGINT raises KeyboardInterrupt), so the
    child is stopped rather than orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return

    def terminated(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the child (a Ctrl-C at a terminal reached it too; a signal to us alone did not)."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
