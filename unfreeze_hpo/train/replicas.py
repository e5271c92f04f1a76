"""The replicas of one data-parallel trial: its ranks, the DDP wrapper over the trainable blocks,
and what keeps the replicas one model.

DDP registers its gradient all-reduce for the parameters that require grad when it wraps the
model, so a block unfrozen later would train on each rank from its own gradients and the
replicas would drift apart. Here the model is wrapped again at every plan that grows (at the
epoch boundary; the optimizer and its state are untouched), so the frozen blocks never enter the
reducer and skip their backward, and a newly unfrozen block joins the synchronisation at its
event. Each step counts the gradient elements DDP all-reduced, through its own communication
hook, and an epoch ends with a check that every parameter and buffer is the same on all ranks.

No Ray here: the ranks are torch.distributed's, whoever started it (Ray Train, torchrun, a test).
With one rank every call is a no-op and the model trains as it always has.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from unfreeze_hpo.errors import AuditError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in its trial: ``rank`` of ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # among the ranks on this node: which of the node's GPUs it takes

    @classmethod
    def current(cls) -> Ranks:
        """The ranks of the default process group (the local rank from ``LOCAL_RANK``, which
        Ray Train and torchrun set), or one rank when there is none."""
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            local = int(os.environ.get("LOCAL_RANK", rank))
            return cls(rank, dist.get_world_size(), local)
        return cls()

    @property
    def lead(self) -> bool:
        """The rank that writes the trial's files and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class _Synced:
    """Gradient elements DDP's reducer all-reduced since the last ``take`` (its hook's state:
    not the Replicas itself, so an old wrapper holds no reference back to it)."""

    elements: int = 0


def _counted_allreduce(
    synced: _Synced, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (sum, divided by the world size), counting the elements."""
    synced.elements += bucket.buffer().numel()
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


# DDP checks a hook's annotations against the types themselves; under postponed evaluation
# (``from __future__ import annotations``) they are strings, so they are set as objects here.
_counted_allreduce.__annotations__.update(
    bucket=dist.GradBucket, synced=_Synced, **{"return": torch.futures.Future[torch.Tensor]}
)


class Replicas:
    """One trial's model on every rank: ``module`` is what a training step calls (the DDP
    wrapper, or the model itself with one rank); ``model`` stays the plain module that the
    optimizer, the freezer, evaluation and checkpoints use."""

    def __init__(self, model: nn.Module, ranks: Ranks, device: torch.device) -> None:
        self.model, self.ranks, self.device = model, ranks, device
        self.module: nn.Module = model
        self.wraps = 0
        self.wrap_seconds = 0.0  # spent wrapping, all wraps together (the re-wrap's cost)
        self.synced = 0  # gradient elements the latest step all-reduced
        self._synced = _Synced()

    def wrap(self) -> None:
        """Wrap the model in DDP over the parameters that require grad now; call it after a
        plan is applied and before the epoch's first step. The first wrap broadcasts rank 0's
        weights and buffers (the replicas start as one); a later one only re-registers the
        reducer: the replicas are already identical, as the end-of-epoch check proves."""
        if not self.ranks.distributed:
            return
        started = time.perf_counter()
        first = self.module is self.model
        # The old wrapper's reducer removes its autograd hooks when it is freed: free it before
        # the new one registers its own, so no gradient is all-reduced twice. Dropping the last
        # reference frees it; a full collection (300 ms on a CPU) only if something kept it.
        old = weakref.ref(self.module)
        self.module = self.model
        if not first and old() is not None:
            gc.collect()
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(self.model, device_ids=ids, init_sync=first)
        ddp.register_comm_hook(self._synced, _counted_allreduce)
        self.module = ddp
        self.wraps += 1
        self.wrap_seconds += time.perf_counter() - started

    def sync(self, synced: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a backward: with ``synced`` False (a micro-batch of an accumulated step but the
        last) DDP keeps the gradient local, as one all-reduce per optimizer step suffices."""
        if synced or not isinstance(self.module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def take_synced(self) -> int:
        """Gradient elements all-reduced since the last call."""
        elements, self._synced.elements = self._synced.elements, 0
        return elements

    def check_synced(self, trainable: int, epoch: int, step: int) -> None:
        """Raise AuditError unless the step's all-reduce covered exactly the ``trainable``
        parameter elements: fewer means a trainable block outside the reducer (its replicas
        train apart), more means a frozen block inside it (a backward it should skip)."""
        if not self.ranks.distributed:
            return
        synced = self.synced = self.take_synced()
        if synced != trainable:
            raise AuditError(
                f"step {step} of epoch {epoch} all-reduced {synced:,} gradient elements but "
                f"{trainable:,} parameters are trainable: the DDP wrapper does not cover the "
                "plan's blocks (it must be wrapped again after every unfreeze event)"
            )

    def metrics(self) -> dict[str, float]:
        """What an epoch reports of the replicas (nothing with one rank): the workers, the
        wraps so far and the seconds they took, the elements each step all-reduces."""
        if not self.ranks.distributed:
            return {}
        return {
            "workers": float(self.ranks.world_size),
            "ddp_wraps": float(self.wraps),
            "ddp_wrap_seconds": self.wrap_seconds,
            "ddp_synced_params": float(self.synced),
        }

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (itself with one rank)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.ranks.distributed:
            return tensor
        out = tensor.to(self._collective_device, copy=True)  # the caller's stays as it is
        dist.all_reduce(out, op=op)
        return out.to(tensor.device)

    def max(self, value: float) -> float:
        """The largest of the ranks' ``value``."""
        if not self.ranks.distributed:
            return value
        return float(self._reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MAX))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a picklable object), in rank order."""
        if not self.ranks.distributed:
            return [value]
        out: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object) on every rank."""
        if not self.ranks.distributed:
            return value
        box = [value if self.ranks.lead else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_buffers(self) -> None:
        """Broadcast rank 0's buffers (BatchNorm running statistics): DDP does so before each
        forward, so after an epoch's last one the ranks' running statistics differ by that
        batch; from here validation and checkpoints see rank 0's, as the next epoch would."""
        if not self.ranks.distributed:
            return
        with torch.no_grad():
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)

    def check_identical(self, epoch: int) -> None:
        """Raise AuditError unless every parameter and floating buffer is the same on every
        rank: a float64 sum and absolute sum per tensor, compared by their maximum and minimum
        over the ranks (two all-reduces, one read)."""
        if not self.ranks.distributed:
            return
        named = [
            *self.model.named_parameters(),
            *((n, b) for n, b in self.model.named_buffers() if b.is_floating_point()),
        ]
        with torch.no_grad():
            local = torch.stack(
                [
                    torch.stack([t.sum(dtype=torch.float64), t.abs().sum(dtype=torch.float64)])
                    for _, t in named
                ]
            )
        high = self._reduce(local, dist.ReduceOp.MAX)
        low = self._reduce(local, dist.ReduceOp.MIN)
        differs = ((high != low).any(dim=1)).tolist()
        apart = [name for (name, _), bad in zip(named, differs, strict=True) if bad]
        if apart:
            shown = ", ".join(apart[:5]) + (f" and {len(apart) - 5} more" if len(apart) > 5 else "")
            raise AuditError(
                f"after epoch {epoch} the {self.ranks.world_size} replicas differ in {shown}: "
                "a trainable block was outside gradient synchronisation, or a rank stepped alone"
            )

    @property
    def _collective_device(self) -> torch.device:
        # NCCL reduces tensors on the GPU; gloo on the host.
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        return self.device if backend == "nccl" else torch.device("cpu")
