"""A search's options: ``SearchConfig`` (its nested ``asha`` and ``pruning`` settings too) and
the one table from each setting to the command-line flag that ``search`` and ``submit`` take.

No Ray here: the results and the Jobs submission read a search's options without starting it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unfreeze_hpo import storage
from unfreeze_hpo.config import SEARCH_METRICS
from unfreeze_hpo.errors import Problem
from unfreeze_hpo.params import param
from unfreeze_hpo.search.objective import KINDS, Objective
from unfreeze_hpo.search.rules import AshaSettings, SpikeRule

STUDY_FILE = "study.db"  # the durable Optuna study of a search, inside its folder


def plain_name(name: Any) -> tuple[str, str] | None:
    """Why ``name`` cannot name a folder of its own under storage_path, if it cannot."""
    if isinstance(name, str) and re.fullmatch(r"\w[\w.-]{0,127}", name):
        return None
    return (
        "not a plain folder name",
        "use up to 128 letters, digits, '_', '-' and '.', starting with a letter or digit "
        "(no '/', '..' or spaces), e.g. demo-2",
    )


def kept_checkpoints(kept: Any) -> tuple[str, str] | None:
    """Why ``kept`` cannot be the number of Ray checkpoints a trial keeps, if it cannot."""
    if isinstance(kept, bool) or not isinstance(kept, int) or kept >= 1:
        return None  # a non-integer is the type check's to report
    return (
        "a trial must keep its latest checkpoint: a retried trial resumes from it",
        "use 1 or more (default 2); the fallback to checkpoint.prev.pt needs no second one",
    )


@dataclass(frozen=True)
class SearchConfig:
    """How to search; the trial itself comes from ``base`` and the sampled space."""

    name: str = param("demo", check=plain_name, help="experiment name: a folder under storage_path")
    storage_path: str = param("unfreeze-runs", help="where experiments are written")
    space: str | None = param(None, help="search-space YAML; default search_spaces/all.yaml")
    base: str | None = param(None, help="base trial YAML; default examples/embedded.yaml")
    num_trials: int = param(32, ge=1, help="trials to run")
    time_budget_s: float | None = param(None, gt=0, help="stop starting trials after this")
    max_concurrent: int = param(2, ge=1, help="trials running at once")
    cpus_per_trial: float = param(1.0, gt=0, help="CPUs reserved per trial (per worker)")
    gpus_per_trial: float = param(
        0.0, ge=0, help="GPUs per trial (per worker); fractions share a GPU"
    )
    workers_per_trial: int = param(
        1,
        ge=1,
        help="Ray Train workers per trial: N > 1 trains each trial data-parallel (DDP) on N "
        "workers, each with --cpus-per-worker and --gpus-per-worker, batch_size being the "
        "global batch",
    )
    cpus_per_worker: float | None = param(
        None, gt=0, help="CPUs of each worker of a trial; default --cpus-per-trial"
    )
    gpus_per_worker: float | None = param(
        None, ge=0, help="GPUs of each worker of a trial; default --gpus-per-trial"
    )
    metric: str = param(
        "val_acc", choices=SEARCH_METRICS, help="the per-epoch metric the objective is made of"
    )
    mode: str = param("max", choices=("max", "min"), help="max or min")
    objective: str = param(
        "last_k_mean",
        choices=KINDS,
        help="what a trial scores: last_k_mean (the metric's mean over its last k epochs), "
        "final (its last epoch) or best (its best epoch, biased upward by luck)",
    )
    objective_k: int = param(3, ge=1, help="the k of --objective last_k_mean")
    reseed_top: int = param(
        0,
        ge=0,
        help="once the trials end, re-run the N best completed configs with more training "
        "seeds and name the winner by its mean over them (0: no re-runs)",
    )
    reseed_seeds: int = param(2, ge=1, help="new training seeds per config --reseed-top re-runs")
    scheduler: str = param("asha", choices=("asha", "fifo"), help="the scheduler spikes wrap")
    asha: AshaSettings = field(default_factory=AshaSettings)
    pruning: SpikeRule = field(default_factory=SpikeRule)  # its window_steps: the base config's
    study_storage: str | None = param(None, help="SQLAlchemy URL; default SQLite in the folder")
    seed: int = param(0, ge=0, help="sampler seed")
    recipes: bool = param(True, help="evaluate the field notes' recipes first")
    preflight: bool = param(True, help="run the overfit check before any trial")
    max_failures: int = param(1, ge=0, help="retries of a trial whose worker died")
    checkpoint_every: int = param(
        1,
        ge=1,
        help="epochs between a trial's checkpoints (its last epoch always has one); a retried "
        "trial resumes from its last checkpoint and redoes the epochs after it",
    )
    checkpoints_kept: int = param(
        2,
        check=kept_checkpoints,
        help="Ray checkpoints kept per trial, at least 1: a retry resumes from the latest, and "
        "the fallback from a damaged latest file to the one before (checkpoint.prev.pt) lives "
        "in the trial's own folder, not in the kept checkpoints",
    )
    weights_cache: str | None = param(
        None,
        help="folder for pretrained hub weights (shared storage: downloaded once for all "
        "nodes); default the libraries' own caches (~/.cache/huggingface, ~/.cache/torch)",
    )
    address: str | None = param(None, help="Ray cluster address; default a local Ray")
    resource_check: bool = param(
        True,
        help="refuse to start when no node has a trial's CPUs and GPUs (turn off for "
        "autoscaling clusters that add GPU nodes on demand)",
    )
    log_to: str | None = param(
        None,
        help="experiment trackers for every trial, any of tensorboard,mlflow,wandb "
        "(local and offline, under the search folder)",
    )

    @property
    def worker_resources(self) -> tuple[float, float]:
        """CPUs and GPUs of each worker of a trial (a one-worker trial's are the trial's)."""
        cpus = self.cpus_per_trial if self.cpus_per_worker is None else self.cpus_per_worker
        gpus = self.gpus_per_trial if self.gpus_per_worker is None else self.gpus_per_worker
        return cpus, gpus

    @property
    def goal(self) -> Objective:
        """What the search optimizes, and the key its trials report it under."""
        return Objective(self.metric, self.objective, self.objective_k, self.mode)

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers ``log_to`` names, in order, each once."""
        names = (n.strip().lower() for n in (self.log_to or "").split(","))
        return tuple(dict.fromkeys(n for n in names if n))

    @property
    def location(self) -> str:
        """The search folder, ``<storage_path>/<name>``: an absolute local path or a URI."""
        return storage.join(storage.resolve(self.storage_path), self.name)

    @property
    def remote(self) -> bool:
        return storage.is_uri(self.storage_path)

    @property
    def folder(self) -> Path:
        """The search folder on this machine; only for a local (or NFS) ``storage_path``."""
        if self.remote:
            raise ValueError(f"storage_path {self.storage_path} is a URI, not a local folder")
        return Path(self.location)

    @property
    def study_url(self) -> str:
        """``study_storage``, else SQLite in a local search folder (a remote one needs a URL)."""
        return self.study_storage or f"sqlite:///{self.folder / STUDY_FILE}"


@dataclass(frozen=True)
class SearchOption:
    """One setting of SearchConfig and its command-line flag (``search`` and ``submit``)."""

    path: str  # "num_trials", "pruning.max_loss_ratio"
    flag: str  # "--num-trials", "--prune-loss-ratio"
    field: dataclasses.Field[Any]

    @property
    def default(self) -> Any:
        return self.field.default


# The flags whose name is not the field's own. A boolean that defaults to true is turned off by
# --no-<flag>.
_FLAG_NAMES = {
    "pruning.max_loss_ratio": "prune-loss-ratio",
    "pruning.max_grad_ratio": "prune-grad-ratio",
    "pruning.max_nonfinite": "prune-nonfinite",
    "pruning.require_recovery": "prune-unrecovered",
}


# Set from the base config, not by an option: the trials' spike window.
_NOT_OPTIONS = {"pruning.window_steps"}


# How searches recorded before the pruning and ASHA settings were nested name them.
_RECORDED_AS = {
    "grace_period": "asha.grace_period",
    "reduction_factor": "asha.reduction_factor",
    "prune_loss_ratio": "pruning.max_loss_ratio",
    "prune_grad_ratio": "pruning.max_grad_ratio",
    "prune_nonfinite": "pruning.max_nonfinite",
    "prune_unrecovered": "pruning.require_recovery",
}


def search_options() -> list[SearchOption]:
    """Every option of a search, its nested settings (``asha``, ``pruning``) included: the one
    mapping between SearchConfig fields and command-line flags."""
    nested = {"asha": AshaSettings, "pruning": SpikeRule}
    out = []
    for f in dataclasses.fields(SearchConfig):
        inner = nested.get(f.name)
        pairs = [(f"{f.name}.{g.name}", g) for g in dataclasses.fields(inner)] if inner else []
        for path, setting in pairs or [(f.name, f)]:
            if path not in _NOT_OPTIONS:
                flag = "--" + _FLAG_NAMES.get(path, setting.name.replace("_", "-"))
                out.append(SearchOption(path, flag, setting))
    return out


def search_values(flat: Mapping[str, Any]) -> dict[str, Any]:
    """SearchConfig values, nested as it takes them, from ``{option path: value}`` or from a
    recorded search (whose older records name some settings otherwise)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, tail = _RECORDED_AS.get(key, key).partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        elif isinstance(value, Mapping) and isinstance(out.get(head), dict):
            out[head].update(value)
        else:
            out[head] = value
    return out


def with_objective(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded search's options; one recorded before the objective was an option scored its
    trials by the final value of the metric (best_val_acc unless it named another)."""
    if "objective" in recorded:
        return dict(recorded)
    return {"metric": "best_val_acc", **recorded, "objective": "final"}


def as_option(problem: Problem) -> Problem:
    """A SearchConfig problem named by its command-line option (search.num_trials ->
    --num-trials, search.pruning.max_loss_ratio -> --prune-loss-ratio); others as they are."""
    path = problem.field.removeprefix("search.")
    flags = {o.path: o.flag for o in search_options()}
    if path not in flags:
        return problem
    return dataclasses.replace(problem, field=flags[path])
