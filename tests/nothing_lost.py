"""The check every fault test ends with: nothing a search was asked for is lost or recorded twice.

``assert_nothing_lost(folder, requested)`` reads a finished search the way a user does (its study,
``search.yaml`` and Ray folder) and fails with every broken promise it finds:

- every requested trial has exactly one terminal state: complete, pruned or failed, the last two
  with their reason; none is left RUNNING; no Ray trial is recorded twice (across restores too);
- each trial's reported epochs increase one by one from 1, and a complete trial ends at the
  configured number of epochs;
- every checkpoint a trial left behind (a multi-worker trial's, in its Ray Train run) loads with
  ``weights_only=True``;
- the winner ``best`` and ``export`` use is the best complete trial with a finite metric;
- with ``faults_log``, every injected fault fired once and left its mark on its trial's record: a
  killed worker a restart (and the trial failed only past ``max_failures``), a NaN or an OOM a
  failed or pruned trial whose reason says so, an infinite gradient a skipped step.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import optuna
import torch

from unfreeze_hpo import faults, results
from unfreeze_hpo.results import listing
from unfreeze_hpo.trialdir import CHECKPOINT, RUNS

State = optuna.trial.TrialState
TERMINAL = {State.COMPLETE, State.PRUNED, State.FAIL}


def assert_nothing_lost(
    folder: str | Path,
    requested: int,
    *,
    faults_log: str | Path | None = None,
    max_failures: int = 1,
) -> None:
    search = results.open_search(folder)
    trials = search.study.get_trials(deepcopy=False)
    broken: list[str] = []
    if len(trials) != requested:
        broken.append(f"{len(trials)} trials recorded, {requested} requested")
    ids = [t.user_attrs.get("ray_trial_id") for t in trials]
    if len(set(ids)) != len(ids):
        broken.append(f"a Ray trial recorded twice: {sorted(ids)}")
    for t in trials:
        broken += _trial_problems(t, search.base.epochs)
    broken += _checkpoint_problems(Path(search.folder))
    broken += _winner_problems(search, trials)
    if faults_log is not None:
        broken += _fault_problems(faults.read_log(faults_log), trials, max_failures)
    assert not broken, "lost or doubled:\n  " + "\n  ".join(broken)


def _trial_problems(t: optuna.trial.FrozenTrial, epochs: int) -> list[str]:
    name = f"trial #{t.number} ({t.user_attrs.get('ray_trial_id')})"
    if t.state not in TERMINAL:
        return [f"{name} is {t.state.name}"]
    out = []
    if t.user_attrs.get("status") != t.state.name.lower():
        out.append(f"{name}: status {t.user_attrs.get('status')!r} but state {t.state.name}")
    if t.state != State.COMPLETE and not t.user_attrs.get("reason"):
        out.append(f"{name} is {t.state.name} without a reason")
    steps = sorted(t.intermediate_values)
    if steps != list(range(1, len(steps) + 1)):
        out.append(f"{name}: reported epochs {steps} do not run 1, 2, 3, ...")
    if t.state == State.COMPLETE and (not steps or steps[-1] != epochs):
        out.append(f"{name} is complete after {steps[-1] if steps else 0} of {epochs} epochs")
    return out


def _checkpoint_problems(folder: Path) -> list[str]:
    """Every checkpoint of the search: one-worker trials' in their Tune trial folders under
    ``ray/``, multi-worker trials' in their Ray Train runs under ``train/``."""
    out = []
    found = [*folder.glob(f"ray/*/checkpoint_*/{CHECKPOINT}")]
    found += folder.glob(f"{RUNS}/*/checkpoint_*/{CHECKPOINT}")
    for path in sorted(found):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any reason it cannot be loaded is a loss
            out.append(f"{path} does not load: {type(exc).__name__}: {exc}")
    return out


def _winner_problems(search: results.Search, trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    complete = [
        t
        for t in trials
        if t.state == State.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]
    if not complete:
        return []
    sign = 1 if search.mode == "max" else -1
    best = max(complete, key=lambda t: (sign * float(t.value or 0.0), -t.number))
    winner = int(listing.best_trials(search, top=1)["number"].iloc[0])
    if winner != best.number:
        return [f"the exported winner is trial #{winner}, the best complete is #{best.number}"]
    return []


TRANSIENT = {"exit", "crash_in_checkpoint"}  # the worker dies; Ray retries the trial


def _fault_problems(
    fired: list[dict], trials: list[optuna.trial.FrozenTrial], max_failures: int
) -> list[str]:
    out = []
    keys = Counter(
        (e["fault"], e["trial_id"], e["attempt"], tuple(sorted(e["where"].items()))) for e in fired
    )
    out += [f"fault {k} fired {n} times" for k, n in keys.items() if n > 1]
    by_id = {t.user_attrs.get("ray_trial_id"): t for t in trials}
    for trial_id in sorted({e["trial_id"] for e in fired}):
        mine = [e for e in fired if e["trial_id"] == trial_id]
        t = by_id.get(trial_id)
        if t is None:
            out.append(f"trial {trial_id} met {len(mine)} fault(s) but is not recorded")
            continue
        out += _marks(t, mine, max_failures)
    return out


def _marks(t: optuna.trial.FrozenTrial, fired: list[dict], max_failures: int) -> list[str]:
    """What the faults ``fired`` into trial ``t`` must have left on its record."""
    name = f"trial #{t.number} ({t.user_attrs.get('ray_trial_id')})"
    kinds = {e["kind"] for e in fired}
    reason = str(t.user_attrs.get("reason", ""))
    out = []
    deaths = len({e["attempt"] for e in fired if e["kind"] in TRANSIENT})
    if deaths and int(t.user_attrs.get("restarts", 0)) < deaths:
        out.append(f"{name}: {deaths} worker(s) killed, {t.user_attrs.get('restarts')} restarts")
    if kinds <= TRANSIENT:
        if deaths > max_failures and t.state != State.FAIL:
            out.append(
                f"{name}: killed {deaths} times (max_failures {max_failures}) but {t.state.name}"
            )
        if deaths <= max_failures and t.state == State.FAIL:
            out.append(f"{name}: killed {deaths} times and retried, yet FAIL: {reason}")
    if "oom" in kinds and not (
        t.state == State.FAIL and "oom at epoch" in reason and "stage" in reason
    ):
        out.append(f"{name}: out of memory, but {t.state.name} with reason {reason!r}")
    if "nan_metric" in kinds and not (t.state == State.FAIL and "nonfinite_metric" in reason):
        out.append(f"{name}: NaN metric, but {t.state.name} with reason {reason!r}")
    if "nan_loss" in kinds and not (
        t.state in (State.FAIL, State.PRUNED) and ("non-finite" in reason or "diverged" in reason)
    ):
        out.append(f"{name}: NaN loss, but {t.state.name} with reason {reason!r}")
    if "inf_grad" in kinds and kinds == {"inf_grad"}:
        steps = len({e["where"]["step"] for e in fired})
        skipped = int(t.user_attrs.get("final", {}).get("skipped_total", 0))
        if t.state == State.FAIL:
            if "diverged" not in reason:
                out.append(f"{name}: infinite gradients, but FAIL with reason {reason!r}")
        elif skipped < steps:
            out.append(f"{name}: {steps} infinite gradient steps, {skipped} skipped")
    return out
