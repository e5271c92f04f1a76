"""DataLoaders for one trial: built once, their workers kept across epochs, every sample's
randomness a function of ``(seed, epoch, index)``.

A train crop, flip or clip start is drawn inside whichever process decodes the sample; with
workers that is a worker whose random state depends on how many workers there are and on when
the loader was started. Here each sample is drawn under generators seeded from its own
``(seed, epoch, index)`` (torch, ``random`` and numpy, restored afterwards), and the epoch's
order comes from ``(seed, epoch)``: the batches of an epoch are the same with 0 or 8 workers,
and a run resumed at epoch k sees what the uninterrupted run saw.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from unfreeze_hpo.data.spec import Item

# The epoch's order is drawn from this stream; one int64 is drawn first, as a torch DataLoader
# with shuffle=True and a generator does, so orders match a plain seeded torch loader.
ORDER_SEED_STRIDE = 1_000_003


def order_seed(seed: int, epoch: int) -> int:
    return seed * ORDER_SEED_STRIDE + epoch


def sample_seeds(seed: int, epoch: int, indices: Sequence[int]) -> list[int]:
    """A 32-bit seed for each sample of one epoch: splitmix64's finaliser over seed, epoch and
    index in turn, for a whole batch at once (numpy's ``SeedSequence`` mixes as well, at 8 us a
    sample)."""
    with np.errstate(over="ignore"):
        x = _mix(np.uint64(seed % 2**64) + _GOLDEN)
        x = _mix((x ^ np.uint64(epoch % 2**64)) + _GOLDEN)
        x = _mix((x ^ np.asarray(indices, dtype=np.uint64)) + _GOLDEN)
    return (x >> np.uint64(32)).tolist()


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: Any) -> Any:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(cpus: float | None = None) -> int:
    """Loader workers for a trial given ``cpus`` (Ray's CPUs for the trial; default: the
    process's CPUs), leaving one for the training process itself."""
    given = available_cpus() if cpus is None else int(cpus)
    return max(0, given - 1)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: a permutation from ``(seed, epoch)`` when shuffling, else
    ``0 .. n-1``. ``set_epoch`` is called in the main process, so persistent workers need no
    message to follow it.

    With ``world_size`` ranks each takes its shard of that one order: for training (``even``)
    the way torch's ``DistributedSampler`` shards, padded with the order's head so every rank
    takes as many steps; for evaluation a strided split without repeats. The order itself does
    not depend on the ranks, so N ranks with a global batch of B see the batches one process
    with batch B sees, and every sample keeps its ``(seed, epoch, index)`` draws."""

    def __init__(
        self,
        length: int,
        seed: int,
        shuffle: bool,
        *,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
    ) -> None:
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.length
        if self.even:
            return math.ceil(self.length / self.world_size)
        return len(range(self.rank, self.length, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(order_seed(self.seed, self.epoch))
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.world_size > 1 and self.even:
            shard: DistributedSampler[int] = DistributedSampler(
                order,  # type: ignore[arg-type]  # a sized sequence is all it reads
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=False,
            )
            order = [order[i] for i in shard]
        elif self.world_size > 1:
            order = order[self.rank :: self.world_size]
        epoch = self.epoch
        return ((epoch, index) for index in order)


class SeededSamples(Dataset[Item]):
    """``dataset[(epoch, index)]``: ``dataset[index]`` drawn under torch, ``random`` and numpy
    seeded from ``(seed, epoch, index)``; the caller's generator states are restored after.

    A batch is fetched through ``__getitems__``, so the states are saved and restored once per
    batch, not per sample (numpy's alone costs 70 us a round trip)."""

    def __init__(self, dataset: Dataset[Item], seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Item:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Item]:
        samples = []
        epochs = {epoch for epoch, _ in keys}  # one, from an EpochSampler
        seeds = {
            e: sample_seeds(self.seed, e, [i for epoch, i in keys if epoch == e]) for e in epochs
        }
        with kept_random_state():
            for epoch, index in keys:
                seed_all(seeds[epoch].pop(0))
                samples.append(self.dataset[index])
        return samples


def seed_all(seed: int) -> None:
    """Seed torch's CPU generator, ``random`` and numpy's global one (``torch.manual_seed``
    would also seed every accelerator's: 90 us a call, and a sample is drawn on the CPU)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Restore torch's CPU, ``random``'s and numpy's global states afterwards, in the training
    process; a loader worker's own states are never read (each sample seeds them), so they are
    left as they are."""
    if torch.utils.data.get_worker_info() is not None:
        yield
        return
    saved = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def loader(
    dataset: Dataset[Item],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    workers: int,
    device: torch.device,
    drop_last: bool = False,
    prefetch_factor: int = 2,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader[Any]:
    """A loader to keep for the whole trial; call ``set_epoch`` before each epoch's pass.

    Workers persist across epochs; on CUDA batches are pinned so ``.to(device,
    non_blocking=True)`` overlaps the copy with compute. The loader's own generator seeds its
    workers, so starting it never draws from the training process's random state. With
    ``world_size`` ranks it loads rank ``rank``'s shard (see ``EpochSampler``; a shuffled
    loader is a training one, sharded evenly), ``batch_size`` being this rank's part of a batch.
    """
    sampler = EpochSampler(
        len(dataset),  # type: ignore[arg-type]
        seed,
        shuffle,
        rank=rank,
        world_size=world_size,
        even=shuffle,
    )
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"persistent_workers": True, "prefetch_factor": prefetch_factor}
    return DataLoader(
        SeededSamples(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def set_epoch(loader: DataLoader[Any], epoch: int) -> None:
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler), "not a loader built by data.loading.loader"
    sampler.set_epoch(epoch)


def batches(loader: DataLoader[Any], epoch: int) -> Iterator[Any]:
    """The loader's batches for ``epoch``."""
    set_epoch(loader, epoch)
    return iter(loader)


def close(loader: DataLoader[Any]) -> None:
    """Stop the loader's persistent workers now, not whenever the loader is collected (torch
    has no public call for it; this is what the iterator's own ``__del__`` does)."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None
