"""Faults a trial raises on purpose, for the reliability suite.

A trial config's ``faults:`` block lists them::

    faults:
      log: /abs/path/faults.jsonl        # every fault is appended here before it fires
      inject:
        - {kind: exit, epoch: 1, trials: 2}            # the first 2 trials to reach epoch 1 die
        - {kind: oom, stage: 1, every_attempt: true}   # and again after each restart
        - {kind: hold, epoch: 0, release: /abs/go}     # every trial waits for /abs/go to exist
        - {kind: exit, epoch: 1, rank: 1}              # worker 1 of a multi-worker trial dies

The block is honoured only when ``UNFREEZE_HPO_FAULT_INJECTION=1`` (the test suite sets it); in any
other run a config carrying it is refused, so no real search can inject a fault by accident.

Each fault fires where the real failure would: ``exit`` and ``crash_in_checkpoint`` kill the worker
process with SIGKILL, ``nan_loss`` feeds NaN inputs through the model, ``inf_grad`` makes one
gradient infinite through a tensor hook, ``oom`` raises ``torch.OutOfMemoryError`` or (``real``)
lowers the address-space limit so the allocator itself fails. ``hold`` is no failure but the
tests' synchronisation: a trial waits at a known point until the test lets it go on, so "a trial
is mid-run and none has ended" is a state a test reaches by construction, not by timing. The log
line is written and fsynced under a file lock before the fault fires, so a test can account for
every fault exactly once across worker restarts, driver kills and concurrent trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import resource
import signal
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unfreeze_hpo.errors import Problem
from unfreeze_hpo.params import build, param

ENV = "UNFREEZE_HPO_FAULT_INJECTION"

KINDS = {
    "exit": "the worker is killed after epoch `epoch`'s steps, before its checkpoint",
    "crash_in_checkpoint": "the worker is killed between writing epoch `epoch`'s checkpoint and "
    "renaming it into place",
    "nan_loss": "NaN inputs, hence a NaN loss, on every step from epoch `epoch` on",
    "nan_metric": "the reported metrics of epoch `epoch` are NaN",
    "inf_grad": "an infinite gradient on `steps` consecutive steps from global step `step`",
    "oom": "out of memory on the first step after unfreeze event `stage` (1 = the first)",
    "hold": "the trial waits after epoch `epoch`'s steps, before its report, until the file "
    "`release` exists (at most `hold_s` seconds)",
}


@dataclass(frozen=True)
class Fault:
    kind: str = param("exit", choices=tuple(KINDS), help="what goes wrong")
    epoch: int = param(0, ge=0, help="epoch (from 0) of exit, crash_in_checkpoint, nan_*")
    step: int = param(0, ge=0, help="first global step of inf_grad")
    steps: int = param(1, ge=1, help="consecutive steps of inf_grad")
    stage: int = param(1, ge=1, help="unfreeze event of oom (1 = the first)")
    trials: int = param(0, ge=0, help="how many trials it hits, the first to get there (0: all)")
    every_attempt: bool = param(False, help="fire again in a restarted trial (else once a trial)")
    real: bool = param(False, help="oom: lower the address-space limit so allocation fails")
    release: str = param("", help="hold: the absolute path whose creation lets the trial go on")
    hold_s: float = param(300.0, gt=0, help="hold: the longest wait, in seconds")
    rank: int = param(0, ge=0, help="the worker it hits in a trial of several (its rank)")


@dataclass(frozen=True)
class FaultsConfig:
    log: str = param("", help="absolute path of the JSON-lines log of fired faults")
    inject: tuple[Mapping[str, Any], ...] = param((), help="the faults, see unfreeze_hpo.faults")

    def faults(self) -> tuple[Fault, ...]:
        return tuple(Fault(**item) for item in self.inject)


def check(cfg: FaultsConfig) -> list[Problem]:
    """The problems of a ``faults:`` block; any block at all outside the test suite is one."""
    if not cfg.inject:
        return []
    if os.environ.get(ENV) != "1":
        return [
            Problem(
                "faults",
                cfg.inject,
                "fault injection is for the reliability tests only",
                f"remove the faults block (it is honoured only with {ENV}=1)",
            )
        ]
    problems: list[Problem] = []
    if not os.path.isabs(cfg.log):
        problems.append(
            Problem("faults.log", cfg.log, "must be an absolute path", "e.g. /tmp/faults.jsonl")
        )
    if not isinstance(cfg.inject, Sequence) or isinstance(cfg.inject, str):
        return [*problems, Problem("faults.inject", cfg.inject, "must be a list", "- {kind: exit}")]
    for i, item in enumerate(cfg.inject):
        fault = build(Fault, item, f"faults.inject[{i}]", problems)
        if fault is not None and fault.kind == "hold" and not os.path.isabs(fault.release):
            problems.append(
                Problem(
                    f"faults.inject[{i}].release",
                    fault.release,
                    "a hold needs an absolute path to wait for",
                    "e.g. /tmp/release",
                )
            )
    return problems


@dataclass
class Injector:
    """The faults of one trial (``trial_id``), fired at the hooks ``train`` calls; in a trial
    of several workers, those of this worker's ``rank``."""

    cfg: FaultsConfig = field(default_factory=FaultsConfig)
    trial_id: str = "local"
    rank: int = 0
    _faults: tuple[Fault, ...] = ()
    _hooks: list[Any] = field(default_factory=list)
    _limit: tuple[int, int] | None = None
    _attempt: str = ""  # one token per run of the trial: a restart is a new attempt

    def __post_init__(self) -> None:
        self._faults = self.cfg.faults()
        self._attempt = uuid.uuid4().hex

    def __bool__(self) -> bool:
        return any(f.rank == self.rank for f in self._faults)

    # --- hooks, in the order a trial meets them ---------------------------------------------

    def before_step(
        self,
        epoch: int,
        step: int,
        stage: int,
        params: Sequence[torch.nn.Parameter],
        inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Arm the faults of this step; ``after_step`` disarms them."""
        if self._fire("nan_loss", lambda f: epoch >= f.epoch, epoch=epoch, step=step):
            inputs = torch.full_like(inputs, math.nan)
        hit = self._fire(
            "inf_grad", lambda f: f.step <= step < f.step + f.steps, epoch=epoch, step=step
        )
        if hit and params:
            self._hooks.append(params[0].register_hook(lambda g: torch.full_like(g, math.inf)))
        oom = self._fire("oom", lambda f: f.stage == stage, epoch=epoch, step=step, stage=stage)
        if oom and oom.real:
            self._lower_memory_limit()
        elif oom:
            raise torch.OutOfMemoryError(
                f"injected: out of memory on the first step after unfreeze event {stage}"
            )
        return inputs

    def after_step(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, self._limit)
            self._limit = None

    def after_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        held = self._fire("hold", lambda f: f.epoch == epoch, epoch=epoch)
        if held:
            _wait_for(Path(held.release), held.hold_s)
        if self._fire("nan_metric", lambda f: f.epoch == epoch, epoch=epoch):
            for key in ("val_loss", "val_acc", "best_val_acc"):
                metrics[key] = math.nan
        if self._fire("exit", lambda f: f.epoch == epoch, epoch=epoch):
            _die()

    def before_rename(self, epoch: int) -> None:
        if self._fire("crash_in_checkpoint", lambda f: f.epoch == epoch, epoch=epoch):
            _die()

    # --- bookkeeping ------------------------------------------------------------------------

    def _fire(self, kind: str, due: Any, **where: int) -> Fault | None:
        """The first due fault of ``kind`` that may still fire here, logged before it fires."""
        for index, fault in enumerate(self._faults):
            mine = fault.kind == kind and fault.rank == self.rank
            if mine and due(fault) and self._claim(index, fault, where):
                return fault
        return None

    def _claim(self, index: int, fault: Fault, where: Mapping[str, int]) -> bool:
        with _locked(Path(self.cfg.log)) as f:
            f.seek(0)
            fired = _entries(f.read())
            mine = [e for e in fired if e["fault"] == index and e["trial_id"] == self.trial_id]
            others = {e["trial_id"] for e in fired if e["fault"] == index} - {self.trial_id}
            if fault.trials and not mine and len(others) >= fault.trials:
                return False  # the fault has hit as many trials as it may
            earlier = {e["attempt"] for e in mine} - {self._attempt}
            if earlier and not fault.every_attempt:
                return False  # it hit an earlier attempt of this trial
            if any(e["attempt"] == self._attempt and e["where"] == dict(where) for e in mine):
                return False  # this attempt met it here already (a step retried in place)
            entry = {
                "fault": index,
                "kind": fault.kind,
                "trial_id": self.trial_id,
                "attempt": self._attempt,
                "where": dict(where),
            }
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _lower_memory_limit(self) -> None:
        """Cap the address space a little above what the process maps now: the next large
        allocation (the gradients of the blocks just unfrozen) fails in the allocator."""
        mapped = _mapped_bytes()
        self._limit = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 16 * 2**20, self._limit[1]))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The fired faults, oldest first ([] when none fired)."""
    path = Path(path)
    return _entries(path.read_text()) if path.exists() else []


def _entries(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
