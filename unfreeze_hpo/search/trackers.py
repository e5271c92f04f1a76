"""Experiment trackers for ``search --log-to``: Ray Tune's own TensorBoard, MLflow and W&B loggers.

Each logger callback runs on the driver and opens one tracker run per trial, with the trial's
config (flat, dotted keys) as its hyperparameters and every numeric result as a per-epoch metric,
so the unfreeze events show as the ``unfrozen_blocks`` and ``spike_event_*`` series. All defaults
are local and offline; what each tracker writes, and where:

- ``tensorboard``: Ray's ``TBXLoggerCallback`` writes ``events.out.tfevents.*`` into each trial's
  Ray folder (``trial.local_path``, which Ray syncs to ``<storage_path>/<name>/ray/<trial>/``;
  view with ``tensorboard --logdir <folder>/ray``). Metrics are tagged ``ray/tune/<name>``
  (tensorboardX turns characters other than letters, digits, "_", "-", "." and "/" into "_"); the
  values the searcher chose (``trial.evaluated_params``) go to the HPARAMS tab when a trial ends.
  Ray adds this logger by itself unless ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``.
- ``mlflow``: Ray's ``MLflowLoggerCallback`` with a SQLite store at
  ``<folder>/mlflow/mlflow.db`` (artifacts under ``<folder>/mlflow/artifacts``), unless
  ``MLFLOW_TRACKING_URI`` is set; experiment = the search's name, one run per trial named after
  it, params = the config. Metric names MLflow would refuse are sanitised (``mlflow_key``).
- ``wandb``: Ray's ``WandbLoggerCallback`` in offline mode (``WANDB_MODE=offline`` unless the
  user set ``WANDB_MODE``), project = the search's name, runs under ``<folder>/wandb/`` unless
  ``WANDB_DIR`` is set (upload later with ``wandb sync <folder>/wandb/offline-run-*``).

Ray and the tracker packages are imported only when callbacks are built.
"""

from __future__ import annotations

import importlib.util
import numbers
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unfreeze_hpo.errors import Problem

if TYPE_CHECKING:
    from ray import tune

NAMES = ("tensorboard", "mlflow", "wandb")
FIELD = "log_to"
INSTALL = "pip install 'unfreeze-hpo[trackers]'"
# tracker -> (the module Ray's callback imports, the smallest pip package that provides it)
_PACKAGES = {
    "tensorboard": ("tensorboardX", "tensorboardX"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
# What MLflow accepts in a metric name (mlflow.utils.validation), one "/"-separated part at a time.
_MLFLOW_BAD = re.compile(r"[^\w\-. :]")
_MLFLOW_KEY_LENGTH = 250


def problems(names: Sequence[str], *, installed: bool = True) -> list[Problem]:
    """What stops these trackers from running: unknown names, and (with ``installed``) tracker
    packages missing here (a search submitted to a cluster needs them on its head only)."""
    found: list[Problem] = []
    for name in names:
        if name not in _PACKAGES:
            found.append(
                Problem(
                    FIELD,
                    name,
                    f"unknown tracker; known: {', '.join(NAMES)}",
                    f"use a comma-separated subset of {','.join(NAMES)}, e.g. tensorboard,mlflow",
                )
            )
            continue
        if not installed:
            continue
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            found.append(
                Problem(
                    FIELD,
                    name,
                    f"needs the Python package {package}, which is not installed",
                    f"{INSTALL} (or pip install {package})",
                )
            )
    return found


def callbacks(names: Sequence[str], *, experiment: str, folder: str | Path) -> list[tune.Callback]:
    """Ray Tune logger callbacks for ``names``, writing under the local search folder ``folder``.

    Check ``problems(names)`` first: an unknown name raises ValueError, a missing package
    ImportError. Asking for ``wandb`` sets ``WANDB_MODE=offline`` in this process unless it is set.
    """
    folder = Path(folder).absolute()
    out: list[tune.Callback] = []
    for name in names:
        if name == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
        elif name == "mlflow":
            out.append(_mlflow(experiment, folder))
        elif name == "wandb":
            out.append(_wandb(experiment, folder))
        else:
            raise ValueError(f"unknown tracker {name!r}; known: {', '.join(NAMES)}")
    return out


def mlflow_key(name: str) -> str:
    """``name`` as a metric name MLflow accepts: other characters become "_", and no part of
    the "/"-separated path is empty, "." or ".." (MLflow refuses names that normalise away)."""
    parts = [_MLFLOW_BAD.sub("_", part) for part in name.split("/") if part]
    key = "/".join("_" if not part.strip(".") else part for part in parts) or "_"
    return key[:_MLFLOW_KEY_LENGTH].rstrip("/")


def _mlflow(experiment: str, folder: Path) -> tune.Callback:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowCallback(MLflowLoggerCallback):
        """Ray's MLflow logger, with a local SQLite store by default, safe metric names and
        one write per result (Ray's writes each metric on its own: ~25 ms apiece on SQLite)."""

        def setup(self, *args: Any, **kwargs: Any) -> None:
            if self.tracking_uri is not None:  # the local store: a store the environment names
                # is left to MLflow's own resolution
                _local_experiment(self.tracking_uri, experiment, folder / "mlflow" / "artifacts")
            super().setup(*args, **kwargs)

        def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
            from mlflow.entities import Metric

            step = result.get("timesteps_total") or result["training_iteration"]
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in mlflow_metrics(result).items()]
            client = self.mlflow_util._get_client()
            client.log_batch(self._trial_runs[trial], metrics=metrics)

    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = None if env_uri else f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"
    return MLflowCallback(tracking_uri=uri, experiment_name=experiment)


def mlflow_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A Tune result as MLflow metrics: nested dicts flattened to "a/b", names made valid, only
    numbers (bools as 0/1). The config is left out: Ray logs it once, as the run's params."""
    flat = _flatten({k: v for k, v in result.items() if k != "config"})
    return {mlflow_key(k): float(v) for k, v in flat.items() if isinstance(v, numbers.Real)}


def _local_experiment(uri: str, experiment: str, artifacts: Path) -> None:
    """Create the store's folder, and the experiment with its artifacts beside the store
    (MLflow would put them under the working directory)."""
    import mlflow

    artifacts.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=artifacts.as_uri())


def _flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as "a/b" keys, the way Ray's loggers flatten results."""
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _wandb(experiment: str, folder: Path) -> tune.Callback:
    from ray.air.integrations.wandb import WandbLoggerCallback

    # Ray reads the mode from the environment (offline needs no API key); the logging actors get
    # it as an argument too, since a Ray worker does not see this process's later environment.
    mode = os.environ.setdefault("WANDB_MODE", "offline")
    where = os.environ.get("WANDB_DIR") or str(folder)  # wandb writes under <dir>/wandb/
    Path(where).mkdir(parents=True, exist_ok=True)
    callback: tune.Callback = WandbLoggerCallback(project=experiment, mode=mode, dir=where)
    return callback
