"""Pruning efficiency: replay the recorded learning curves (benchmarks/data/curves.json, real
trials of the embedded default written by benchmarks/record_curves.py) through each pruner, with
no training, and compare the compute each spends on unstable trials, the compute it needs to
reach the best-known quality, and how often it prunes a top trial.

    .venv/bin/python benchmarks/pruning_replay.py           # every curve, 20 orders, ~15 s
    .venv/bin/python benchmarks/pruning_replay.py --quick   # 8 curves, 3 orders, ~5 s

Two sections: every recorded curve, then only the curves inside search_spaces/all.yaml (no stress
or diverge trials: what a search of the shipped space can produce). Each has the pruner table, the
verdict and a table of the spike rule at other settings (loss threshold x2 .. x6, the recovery
rule off): what the rule alone stops, the best trial among them, and spike + ASHA's figures.
``--quick`` replays the first 6 curves plus the first stress curve, the first failed one (so every
callback runs) and the first late one, 3 orders, one section.

Pruners, each the library's real implementation driven the way its library drives it, all on the
search's objective ``best_val_acc`` (max) with epochs as the time unit (``training_iteration`` =
epoch + 1 for Ray, the step of ``trial.report`` for Optuna):

- FIFO: Ray's ``FIFOScheduler``, no pruning.
- ASHA: Ray's ``AsyncHyperBandScheduler`` (max_t 12, grace 4, reduction factor 2: the search's
  defaults, ``SearchConfig``).
- median stopping: Ray's ``MedianStoppingRule`` (grace 4, its default 3 samples).
- Optuna SHA / Hyperband / median: ``SuccessiveHalvingPruner`` (min_resource 4, reduction
  factor 2), ``HyperbandPruner`` (min_resource 1, max_resource 12, its default factor 3),
  ``MedianPruner`` (n_warmup_steps 4, its default 5 startup trials).
- spike + ASHA with phase grace 1 (the search's default), spike + ASHA without it
  (``--phase-grace 0``) and spike + FIFO (``--scheduler fifo``): the project's own
  ``make_scheduler`` with the ``SpikeRule`` built from ``SearchConfig``'s defaults exactly as
  search.py builds it (loss x3, grad x50, 1 non-finite step, unrecovered window of 20 steps).
  With a phase grace, no rung stops a trial whose ``phase_epochs`` (epochs since its first
  unfreeze event, the event's included; since epoch 0 for a schedule without one:
  ``Strategy.phase_start``) are fewer than the grace: its value still counts at the rung, as
  in plain ASHA, and it is judged at the next rung it reaches in its phase.

How a trial is replayed. Ray schedulers get stub trials (``Trial(stub=True)``, as
tests/test_pruning.py drives them) and Tune's calls: ``on_trial_add`` when the trial starts,
``on_trial_result`` with each recorded epoch's full metrics dict, ``on_trial_complete`` with the
last result when it ends or is stopped (Tune's ``stop_trial``), ``on_trial_error`` when the
recorded trial failed. The controller passed to them lists no pending trials, as under the
search's ``max_concurrent_trials`` (so the median rule never yields). Tune's duplicate final
result of a function trainable is not replayed. Checked once against real Tune runs (one trial
at a time, the recorded order, ``tune.report`` of each recorded result): spike + ASHA, ASHA and
the median rule ran every trial for the same number of epochs as this replay at concurrency 1,
and spike + ASHA pruned the same 42 trials. Optuna pruners get an in-memory study:
``study.ask()`` at the start, ``trial.report(best_val_acc, epoch + 1)`` and
``trial.should_prune()`` each epoch, and ``study.tell`` with COMPLETE (the trial's best), PRUNED
or FAIL at the end. A STOP is a prune, except ASHA's stop at max_t (completion, as the search
counts it); a prune at the last epoch still counts (the search records that trial as PRUNED).

Order and concurrency. Trials start in a given order with ``--concurrency`` (default 2, the
search's max_concurrent) slots; in each round every running trial, slot by slot, reports its
next epoch and the pruner answers at once, so epochs take equal time; a freed slot takes the
next trial in the next round. A trial that failed spends the epoch it failed in (an epoch begun
counts in full). Order 0 is the recorded (sampling) order, orders 1.. are fixed shuffles
(seed k); figures are the median over orders (rates pooled over orders), so no single lucky
order decides.

Figures, per pruner:

- epochs on unstable trials: epochs spent on trials that end unstable, by the recorded data alone
  (no pruner's decisions): a trial that *failed* (diverged, non-finite metric, any TrialFailed),
  or one that *spiked and never recovered*: some unfreeze event at epoch e reported a loss ratio
  (``spike_loss_ratio``, max train loss over the pre-event baseline in the event's window) above
  the search's prune threshold (3), and no later epoch got back to where the trial stood before
  the event: train loss at or under, and val_acc at or over, those of epoch e - 1. (The spike
  itself is the signal the spike rule prunes on; the failure and the recovery are not.)
- epochs to best quality: cumulative epochs spent (all trials, pruned ones included) until a trial
  that ends COMPLETE (not pruned, not failed) has reported ``best_val_acc`` >= Q - epsilon, where
  Q is the best final ``best_val_acc`` over the completed trials of the replayed set and epsilon
  0.01 (``--epsilon``; one of the 256 validation clips is 0.004); an order in
  which the pruner pruned every such trial counts as never (infinitely many epochs) in the
  median, and the table says in how many orders it got there.
- false-prune rate: pruned top-10% trials / top-10% trials, where the top 10% (at least one,
  ties included) are the completed trials with the highest full-run ``best_val_acc``; the
  false prunes themselves are counted too, pooled over the orders.
- late unfreezers' false-prune rate: the same over the trials whose first unfreeze event comes
  at or after the first rung (epoch 4): pruned trials among the top 10% of them.

Verdict: the default (spike + ASHA, phase grace 1) meets the target when it prunes no more top
trials than plain ASHA, strictly fewer of the best late unfreezers, spends at most 1.1x ASHA's
epochs in all, and reaches the best quality in no more median epochs than the best non-spike
peer. Printed; exit 0 when the replay ran (1 only when the curves cannot be read).
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from common import parser, report, table

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "benchmarks" / "data" / "curves.json"
METRIC, MODE = "best_val_acc", "max"
OURS = "spike + ASHA, phase grace 1 (default)"
NO_GRACE = "spike + ASHA, no phase grace"


# ---------------------------------------------------------------------------------------------
# The recorded curves


@dataclass
class Curve:
    """One recorded trial: its per-epoch results (full metrics dicts) and how it ended."""

    index: int
    cohort: str  # space, aggressive, stress or diverge (record_curves.py)
    status: str  # completed or failed
    results: list[dict[str, float]]
    params: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None

    @property
    def final(self) -> float:
        """Full-run best_val_acc (-inf when nothing was reported)."""
        return self.results[-1][METRIC] if self.results else -math.inf

    @property
    def first_event(self) -> int | None:
        """The epoch of the trial's first unfreeze event (None: it had none)."""
        for r in self.results:
            if r.get("spike_events", 0) >= 1:
                return int(r["spike_event_epoch"])
        return None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)  # "nan", "inf", "-inf" read back


def load_curves(path: Path) -> tuple[dict[str, Any], list[Curve]]:
    """The file's header and its trials, in recorded order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    curves = []
    for t in data["trials"]:
        columns = t["metrics"]
        n = len(columns.get("epoch", []))
        results = [
            {k: v for k, col in columns.items() if (v := _float(col[i])) is not None}
            for i in range(n)
        ]
        curves.append(
            Curve(t["index"], t["cohort"], t["status"], results, t["params"], t["failure"])
        )
    header = {k: v for k, v in data.items() if k != "trials"}
    return header, curves


def spiked_events(curve: Curve, threshold: float) -> set[int]:
    """Epochs of the unfreeze events whose window loss ratio exceeded ``threshold``."""
    return {
        int(r["spike_event_epoch"])
        for r in curve.results
        if r.get("spike_events", 0) >= 1 and r.get("spike_loss_ratio", 1.0) > threshold
    }


def unstable(curve: Curve, threshold: float) -> bool:
    """Failed, or spiked above ``threshold`` after an unfreeze and never recovered (docstring)."""
    if curve.status != "completed":
        return True
    losses = [r.get("train_loss", math.nan) for r in curve.results]
    accs = [r.get("val_acc", math.nan) for r in curve.results]
    for event in spiked_events(curve, threshold):
        if event < 1:
            continue  # no epoch before it to recover to (an epoch-0 plan is never an event)
        loss, acc = losses[event - 1], accs[event - 1]
        later = zip(losses[event + 1 :], accs[event + 1 :], strict=True)
        if not any(x <= loss and a >= acc for x, a in later):  # False for nan
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Drivers: one pruner, driven as its library drives it


class Driver:
    """start -> result* -> complete | error; ``result`` answers continue, stop or done."""

    def start(self, key: str) -> Any:
        raise NotImplementedError

    def result(self, handle: Any, epoch: int, result: Mapping[str, float]) -> str:
        raise NotImplementedError

    def complete(self, handle: Any, result: Mapping[str, float]) -> None:
        raise NotImplementedError

    def error(self, handle: Any) -> None:
        raise NotImplementedError


class _Controller:
    """What schedulers ask of Tune's controller: no pending trials (max_concurrent_trials)."""

    def get_live_trials(self) -> list[Any]:
        return []


class RayDriver(Driver):
    def __init__(self, make: Callable[[], Any]) -> None:
        from ray.tune.experiment import Trial
        from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

        from unfreeze_hpo.search.pruning import SpikeAwareScheduler

        self._trial_cls, self._stop = Trial, TrialScheduler.STOP
        self.scheduler = make()
        self._spike = isinstance(self.scheduler, SpikeAwareScheduler)
        base = self.scheduler.base if self._spike else self.scheduler
        self._max_t = base._max_t if isinstance(base, AsyncHyperBandScheduler) else None
        self._controller = _Controller()
        self._last: dict[str, dict[str, Any]] = {}  # trial_id -> its last result, as Tune keeps

    def start(self, key: str) -> Any:
        trial = self._trial_cls("__fake", stub=True, trial_id=key)
        self.scheduler.on_trial_add(self._controller, trial)
        return trial

    def result(self, handle: Any, epoch: int, result: Mapping[str, float]) -> str:
        flat = {**result, "training_iteration": epoch + 1, "trial_id": handle.trial_id}
        self._last[handle.trial_id] = flat
        decision = self.scheduler.on_trial_result(self._controller, handle, flat)
        if decision != self._stop:
            return "continue"
        self.scheduler.on_trial_complete(self._controller, handle, {**flat, "done": True})
        if self._spike:  # the search's own record: a reason means PRUNED
            return "stop" if handle.trial_id in self.scheduler.reasons else "done"
        return "done" if self._max_t is not None and epoch + 1 >= self._max_t else "stop"

    def complete(self, handle: Any, result: Mapping[str, float]) -> None:
        self.scheduler.on_trial_complete(self._controller, handle, self._last[handle.trial_id])

    def error(self, handle: Any) -> None:
        self.scheduler.on_trial_error(self._controller, handle)


class OptunaDriver(Driver):
    def __init__(self, pruner: optuna.pruners.BasePruner) -> None:
        self.study = optuna.create_study(
            study_name="pruning-replay",  # Hyperband's brackets hash the name: kept fixed
            direction="maximize",
            pruner=pruner,
            sampler=optuna.samplers.RandomSampler(seed=0),
        )

    def start(self, key: str) -> Any:
        return self.study.ask()

    def result(self, handle: Any, epoch: int, result: Mapping[str, float]) -> str:
        handle.report(result[METRIC], epoch + 1)
        if handle.should_prune():
            self.study.tell(handle, state=optuna.trial.TrialState.PRUNED)
            return "stop"
        return "continue"

    def complete(self, handle: Any, result: Mapping[str, float]) -> None:
        self.study.tell(handle, result[METRIC])

    def error(self, handle: Any) -> None:
        self.study.tell(handle, state=optuna.trial.TrialState.FAIL)


def search_rule(**overrides: Any) -> Any:
    """The SpikeRule the search driver uses by default (fields overridable): SearchConfig's, with
    the base's window (each result's spike_window_steps wins)."""
    import dataclasses

    from unfreeze_hpo import config
    from unfreeze_hpo.search.options import SearchConfig

    window = config.load(ROOT / "examples" / "embedded.yaml").signals.window_steps
    return dataclasses.replace(SearchConfig().pruning, window_steps=window, **overrides)


def asha_settings(epochs: int) -> dict[str, Any]:
    from unfreeze_hpo.search.options import SearchConfig

    cfg = SearchConfig()
    grace = min(cfg.asha.grace_period, epochs)
    return {"max_t": epochs, "grace_period": grace, "reduction_factor": cfg.asha.reduction_factor}


def spike_driver(kind: str, rule: Any, epochs: int, phase_grace: int = 1) -> Callable[[], Driver]:
    """The search's scheduler (make_scheduler) over ASHA or FIFO with ``rule``, no rung stopping
    a trial before ``phase_grace`` epochs of its phase (the search's default: 1)."""
    from unfreeze_hpo.search.pruning import make_scheduler

    asha = {**asha_settings(epochs), "phase_grace": phase_grace}
    return lambda: RayDriver(lambda: make_scheduler(kind, rule, metric=METRIC, mode=MODE, **asha))


def pruners(epochs: int) -> dict[str, Callable[[], Driver]]:
    """Every pruner compared, as fresh drivers; settings from the search's defaults."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    asha = asha_settings(epochs)
    grace, rf = asha["grace_period"], int(asha["reduction_factor"])
    rule = search_rule()

    return {
        "FIFO (no pruning)": lambda: RayDriver(FIFOScheduler),
        "ASHA (Ray)": lambda: RayDriver(
            lambda: AsyncHyperBandScheduler(
                time_attr="training_iteration", metric=METRIC, mode=MODE, **asha
            )
        ),
        "median stopping (Ray)": lambda: RayDriver(
            lambda: MedianStoppingRule(
                time_attr="training_iteration", metric=METRIC, mode=MODE, grace_period=grace
            )
        ),
        "successive halving (Optuna)": lambda: OptunaDriver(
            optuna.pruners.SuccessiveHalvingPruner(min_resource=grace, reduction_factor=rf)
        ),
        "Hyperband (Optuna)": lambda: OptunaDriver(
            optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
        ),
        "median (Optuna)": lambda: OptunaDriver(optuna.pruners.MedianPruner(n_warmup_steps=grace)),
        "spike + FIFO": spike_driver("fifo", rule, epochs),
        NO_GRACE: spike_driver("asha", rule, epochs, 0),
        OURS: spike_driver("asha", rule, epochs),
    }


# ---------------------------------------------------------------------------------------------
# The replay


@dataclass
class Replay:
    """What one pruner did with one order."""

    spent: dict[int, int]  # curve index -> epochs run
    ended: dict[int, str]  # curve index -> completed, pruned or failed
    epochs_to_best: int | None  # None: no COMPLETE trial reached the target


def replay(
    driver: Driver, curves: Sequence[Curve], order: Sequence[int], slots: int, target: float
) -> Replay:
    """Run ``curves`` (indices into it, in ``order``) through ``driver`` with ``slots`` at once."""
    queue = list(order)
    running: list[list[Any] | None] = [None] * slots  # [position, handle, next epoch]
    spent = dict.fromkeys(order, 0)
    ended: dict[int, str] = {}
    total, reached = 0, None
    while queue or any(running):
        for s in range(slots):
            if running[s] is None and queue:
                pos = queue.pop(0)
                running[s] = [pos, driver.start(f"t{pos:04d}"), 0]
        for s in range(slots):
            slot = running[s]
            if slot is None:
                continue
            pos, handle, epoch = slot
            curve = curves[pos]
            total += 1
            spent[pos] += 1
            if epoch >= len(curve.results):  # the epoch it failed in
                driver.error(handle)
                ended[pos], running[s] = "failed", None
                continue
            result = curve.results[epoch]
            last = epoch == len(curve.results) - 1
            answer = driver.result(handle, epoch, result)
            if answer == "continue" and not (last and curve.status == "completed"):
                slot[2] = epoch + 1
                continue
            if answer == "continue":
                driver.complete(handle, result)
            if answer == "stop":
                ended[pos] = "pruned"
            elif last and curve.status == "completed":
                ended[pos] = "completed"
                if reached is None and result[METRIC] >= target:
                    reached = total
            else:  # "done" before the recording ended: a stop at max_t of a shorter curve
                ended[pos] = "completed"
            running[s] = None
    return Replay(spent, ended, reached)


def orders(n: int, count: int) -> list[list[int]]:
    """The recorded order, then ``count - 1`` fixed shuffles (seed k)."""
    out = [list(range(n))]
    for k in range(1, count):
        order = list(range(n))
        random.Random(k).shuffle(order)
        out.append(order)
    return out


def top_trials(curves: Sequence[Curve], share: float) -> set[int]:
    """Positions of the completed trials in the top ``share`` by full-run metric, ties kept."""
    done = sorted(
        (c.final for c in curves if c.status == "completed" and math.isfinite(c.final)),
        reverse=True,
    )
    if not done:
        return set()
    cutoff = done[max(1, math.ceil(share * len(done))) - 1]
    return {i for i, c in enumerate(curves) if c.status == "completed" and c.final >= cutoff}


def late_unfreezers(curves: Sequence[Curve], rung: int) -> set[int]:
    """Positions of the trials whose first unfreeze event comes at or after epoch ``rung``
    (the first ASHA rung, counted in epochs)."""
    return {i for i, c in enumerate(curves) if (e := c.first_event) is not None and e >= rung}


def summarize(
    runs: Sequence[Replay], bad: set[int], top: set[int], late_top: set[int] = frozenset()
) -> dict[str, float | int | None]:
    tops = [pos for run in runs for pos in top]
    false = sum(run.ended[pos] == "pruned" for run in runs for pos in top)
    late_false = sum(run.ended[pos] == "pruned" for run in runs for pos in late_top)
    reached = [r.epochs_to_best for r in runs if r.epochs_to_best is not None]
    # An order that never reaches the target counts as infinitely many epochs in the median.
    to_best = statistics.median(
        math.inf if r.epochs_to_best is None else r.epochs_to_best for r in runs
    )
    return {
        "total_epochs": statistics.median(sum(r.spent.values()) for r in runs),
        "unstable_epochs": statistics.median(sum(r.spent[p] for p in bad) for r in runs),
        "epochs_to_best": to_best if math.isfinite(to_best) else None,
        "epochs_to_best_by_order": [r.epochs_to_best for r in runs],  # order 0: recorded
        "orders_reaching_best": len(reached),
        "orders": len(runs),
        "false_prune_rate": false / len(tops) if tops else 0.0,
        "false_prunes": false,  # pooled over the orders
        "late_false_prune_rate": late_false / (len(late_top) * len(runs)) if late_top else 0.0,
        "late_false_prunes": late_false,
        "pruned": statistics.median(sum(e == "pruned" for e in r.ended.values()) for r in runs),
        "unstable_pruned": statistics.median(
            sum(r.ended[p] == "pruned" for p in bad) for r in runs
        ),
    }


def verdict(results: Mapping[str, Mapping[str, Any]]) -> tuple[bool, str]:
    """The phase-aware default against plain ASHA and the best peer (the module's docstring)."""

    def to_best(name: str) -> float:
        e = results[name]["epochs_to_best"]
        return math.inf if e is None else float(e)

    peers = [n for n in results if not n.startswith("spike")]
    best = min(peers, key=lambda n: (to_best(n), results[n]["false_prune_rate"]))
    ours, asha = results[OURS], results["ASHA (Ray)"]
    checks = {
        "false prunes <= ASHA's": ours["false_prunes"] <= asha["false_prunes"],
        "fewer late-unfreezer false prunes than ASHA": (
            ours["late_false_prunes"] < asha["late_false_prunes"]
        ),
        "epochs in all <= 1.1 x ASHA's": ours["total_epochs"] <= 1.1 * asha["total_epochs"],
        f"epochs to best quality <= the best peer's ({best})": to_best(OURS) <= to_best(best),
    }
    lines = [f"{'ok ' if ok else 'NO '} {what}" for what, ok in checks.items()]
    lines.append(
        f"{OURS}: {ours['false_prunes']} false prunes ({ours['late_false_prunes']} late), "
        f"{ours['total_epochs']:g} epochs in all, {to_best(OURS):g} to best quality; ASHA (Ray): "
        f"{asha['false_prunes']} ({asha['late_false_prunes']} late), {asha['total_epochs']:g}, "
        f"{to_best('ASHA (Ray)'):g}; {best}: {to_best(best):g} to best quality"
    )
    mine = [math.inf if e is None else e for e in ours["epochs_to_best_by_order"]]
    theirs = [math.inf if e is None else e for e in results[best]["epochs_to_best_by_order"]]
    fewer = sum(a < b for a, b in zip(mine, theirs, strict=True))
    more = sum(a > b for a, b in zip(mine, theirs, strict=True))
    lines.append(
        f"order by order against {best}: fewer epochs to best quality in {fewer}, "
        f"as many in {len(mine) - fewer - more}, more in {more} of {len(mine)} orders"
    )
    return all(checks.values()), "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------


def spike_stop(curve: Curve, rule: Any) -> tuple[int, str] | None:
    """(epoch, reason) of the first result the spike rule stops ``curve`` at, or None. The rule
    is a pure function of each result, so this holds whatever the order or the base scheduler."""
    from unfreeze_hpo.search.rules import spike_verdict

    for result in curve.results:
        reason = spike_verdict(result, rule)
        if reason is not None:
            return int(result["epoch"]), reason
    return None


def reason_kind(reason: str) -> str:
    for start, kind in (
        ("loss not back", "unrecovered"),
        ("loss x", "loss"),
        ("grad norm", "grad"),
        ("validation", "val drop"),
    ):
        if reason.startswith(start):
            return kind
    return "non-finite"


SWEEP: tuple[tuple[str, dict[str, Any]], ...] = (
    ("loss x2", {"max_loss_ratio": 2.0}),
    ("loss x2.5", {"max_loss_ratio": 2.5}),
    ("loss x3 (default)", {}),
    ("loss x3, no recovery rule", {"require_recovery": False}),
    ("loss x4", {"max_loss_ratio": 4.0}),
    ("loss x6", {"max_loss_ratio": 6.0}),
)


def sensitivity(
    curves: Sequence[Curve], args: Any, epochs: int, bad: set[int], top: set[int], target: float
) -> dict[str, Any]:
    """The spike rule at other settings: what it stops, and spike + ASHA's figures with it."""
    ranked = sorted((c.final for c in curves if c.status == "completed"), reverse=True)
    plans = orders(len(curves), args.orders)
    rows, out = [], {}
    for label, overrides in SWEEP:
        rule = search_rule(**overrides)
        stops = {i: stop for i, c in enumerate(curves) if (stop := spike_stop(c, rule))}
        kinds = [reason_kind(reason) for _, reason in stops.values()]
        good = [curves[i].final for i in stops if curves[i].status == "completed"]
        best = max(good, default=None)
        runs = [
            replay(spike_driver("asha", rule, epochs)(), curves, order, args.concurrency, target)
            for order in plans
        ]
        figures = summarize(runs, bad, top)
        out[label] = {
            "stopped": sorted(curves[i].index for i in stops),
            "stopped_unstable": sum(i in bad for i in stops),
            "reasons": {k: kinds.count(k) for k in sorted(set(kinds))},
            "best_stopped": best,
            "spike_asha": figures,
        }
        rank = "" if best is None else f"{best:.3f} (#{ranked.index(best) + 1} of {len(ranked)})"
        rows.append(
            [
                label,
                f"{len(stops)} ({out[label]['stopped_unstable']} unstable)",
                ", ".join(f"{k} {n}" for k, n in out[label]["reasons"].items()) or "-",
                rank or "-",
                f"{figures['total_epochs']:g}",
                "never" if figures["epochs_to_best"] is None else f"{figures['epochs_to_best']:g}",
                f"{figures['false_prune_rate']:.0%}",
            ]
        )
    print(
        "The spike rule's settings (what it stops is the same in any order and under any base):\n"
    )
    header = [
        "spike rule",
        "trials it stops",
        "by reason",
        "best stopped trial (rank)",
        "spike + ASHA: epochs in all",
        "to best quality",
        "false-prune rate",
    ]
    print(table(rows, header) + "\n")
    return out


def section(title: str, curves: Sequence[Curve], args: Any, epochs: int) -> dict[str, Any]:
    """Replay ``curves`` through every pruner; print the summary, table and verdict."""
    from unfreeze_hpo.search.options import SearchConfig

    threshold = SearchConfig().pruning.max_loss_ratio
    bad = {i for i, c in enumerate(curves) if unstable(c, threshold)}
    top = top_trials(curves, args.top)
    late = late_unfreezers(curves, asha_settings(epochs)["grace_period"])
    late_top = {sorted(late)[i] for i in top_trials([curves[j] for j in sorted(late)], args.top)}
    quality = max((c.final for c in curves if c.status == "completed"), default=math.nan)
    target = quality - args.epsilon
    failed = sum(c.status != "completed" for c in curves)
    spiked = sum(bool(spiked_events(c, threshold)) for c in curves)
    print(
        f"## {title}\n\n{len(curves)} curves: {len(curves) - failed} completed, {failed} failed, "
        f"{spiked} spiked above x{threshold:g} after an unfreeze, {len(bad)} unstable; best "
        f"{METRIC} {quality:.4f}, target >= {target:.4f}; top {args.top:.0%}: {len(top)} trials; "
        f"{len(late)} late unfreezers (first event at or after the first rung), the top "
        f"{args.top:.0%} of them: {len(late_top)}; "
        f"{args.orders} orders, concurrency {args.concurrency}\n"
    )
    results: dict[str, dict[str, Any]] = {}
    plans = orders(len(curves), args.orders)
    for name, make in pruners(epochs).items():
        runs = [replay(make(), curves, order, args.concurrency, target) for order in plans]
        results[name] = summarize(runs, bad, top, late_top)

    def fmt(value: float | None) -> str:
        return "never" if value is None else f"{value:g}"

    def reached(r: Mapping[str, Any]) -> str:
        if r["orders_reaching_best"] == r["orders"]:
            return ""
        return f" (reached in {r['orders_reaching_best']}/{r['orders']} orders)"

    rows = [
        [
            name,
            fmt(r["total_epochs"]),
            f"{fmt(r['unstable_epochs'])} ({fmt(r['unstable_pruned'])}/{len(bad)} stopped)",
            fmt(r["epochs_to_best"]) + reached(r),
            f"{r['false_prune_rate']:.0%} ({r['false_prunes']})",
            f"{r['late_false_prune_rate']:.0%} ({r['late_false_prunes']})",
            fmt(r["pruned"]),
        ]
        for name, r in results.items()
    ]
    header_row = [
        "pruner",
        "epochs in all",
        "epochs on unstable trials",
        "epochs to best quality",
        f"false-prune rate (top {args.top:.0%})",
        "false-prune rate, late unfreezers",
        "trials pruned",
    ]
    print(table(rows, header_row))
    print(
        f"\n(medians over {args.orders} orders; false-prune rates pooled over them, false prunes "
        "in brackets)"
    )
    ok, line = verdict(results)
    target_text = (
        "no more false prunes than ASHA, fewer among late unfreezers, <= 1.1x its epochs, "
        "epochs to best quality no worse than the best peer"
    )
    print(f"\nverdict ({target_text}): {'MET' if ok else 'NOT MET'}\n  {line}\n")
    sweep = sensitivity(curves, args, epochs, bad, top, target)
    return {
        "settings": {
            "n_curves": len(curves),
            "orders": args.orders,
            "concurrency": args.concurrency,
            "epsilon": args.epsilon,
            "top_share": args.top,
            "best_quality": quality,
            "unstable": [curves[i].index for i in sorted(bad)],
            "top": [curves[i].index for i in sorted(top)],
            "late_unfreezers": [curves[i].index for i in sorted(late)],
            "late_top": [curves[i].index for i in sorted(late_top)],
        },
        "pruners": results,
        "verdict": {"met": ok, "detail": line},
        "spike_rule_settings": sweep,
    }


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--curves", type=Path, default=CURVES)
    p.add_argument("--orders", type=int, default=20, help="replay orders (0 = recorded)")
    p.add_argument("--concurrency", type=int, default=2, help="trials running at once")
    p.add_argument("--epsilon", type=float, default=0.01, help="best quality minus this counts")
    p.add_argument("--top", type=float, default=0.1, help="share of trials that are 'top'")
    p.add_argument("--limit", type=int, help="replay only the first N curves")
    args = p.parse_args()
    if args.quick:
        args.orders = min(args.orders, 3)
    try:
        header, curves = load_curves(args.curves)
    except (OSError, ValueError, KeyError) as exc:
        print(f"cannot read {args.curves}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.quick:  # the first 6, and the first stress, failed and late trials
        extra = [
            next((c for c in curves if c.cohort == "stress"), None),
            next((c for c in curves if c.status == "failed"), None),
            next((c for c in curves if c.cohort == "late"), None),
        ]
        curves = curves[:6] + [c for c in extra if c is not None]
    elif args.limit:
        curves = curves[: args.limit]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("unfreeze_hpo.search.pruning").setLevel(logging.WARNING)
    epochs = int(header["settings"]["epochs"])
    print(f"{args.curves} (recorded {header.get('date')}, {header.get('machine')})\n")
    figures = section("every recorded curve", curves, args, epochs)
    figures["settings"]["curves"] = str(args.curves)
    in_space = [c for c in curves if c.cohort in ("space", "aggressive", "late")]
    if len(in_space) < len(curves) and not args.quick:
        figures["in_space"] = section(
            "the curves inside search_spaces/all.yaml (no stress or diverge trials)",
            in_space,
            args,
            epochs,
        )
    report(args.json, "pruning_replay", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
