"""One trial: the full fine-tuning loop with gradual unfreezing, ``run(cfg, report) -> Summary``.

Each epoch: the strategy's plan is applied and audited; each step trains with non-finite
numbers skipped and counted, never sanitised; each epoch ends with validation (and the test
split, when the data has one: reported, never chosen on), the drift probe, spike signals, a
metrics line, an atomic checkpoint (every ``checkpoint_every`` epochs) and a report.

A step never waits on the host: its loss, gradient norm and skip flag stay on the device (a
non-finite step is skipped there, by the fused optimizer's ``found_inf``), and the loop reads
them ``READ_EVERY`` steps at a time. No Ray, YAML or pandas here.

    trial.py        what one trial trains with: ``setup(cfg) -> Trial``, the loop's state
    step.py         one optimizer step on the device, and the batched read of its values
    loop.py         ``run``: epochs, validation, metrics, reports
    checkpoints.py  atomic checkpoints, resume and its fallback to the previous one
    replicas.py     a data-parallel trial's ranks: DDP wrapped again at each unfreeze event,
                    the replicas checked identical every epoch
    drift.py memory.py   the drift probe and each epoch's peak memory
"""

from unfreeze_hpo.train.checkpoints import RESUMABLE_CHANGES
from unfreeze_hpo.train.loop import evaluate, run
from unfreeze_hpo.train.replicas import Ranks, Replicas
from unfreeze_hpo.train.step import (
    READ_EVERY,
    SKIPPED,
    StepOutcome,
    autocast,
    backward,
    optimizer_step,
    read_outcomes,
    train_step,
)
from unfreeze_hpo.train.trial import (
    Log,
    LoopState,
    Report,
    Summary,
    Trial,
    TrialFailed,
    resolve_device,
    seed_everything,
    setup,
)

__all__ = [
    "READ_EVERY",
    "RESUMABLE_CHANGES",
    "SKIPPED",
    "Log",
    "LoopState",
    "Ranks",
    "Replicas",
    "Report",
    "StepOutcome",
    "Summary",
    "Trial",
    "TrialFailed",
    "autocast",
    "backward",
    "evaluate",
    "optimizer_step",
    "read_outcomes",
    "resolve_device",
    "run",
    "seed_everything",
    "setup",
    "train_step",
]
