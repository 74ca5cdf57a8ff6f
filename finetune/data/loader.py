"""DataLoaders: seeded, resumable order; workers sized for the machine.

Order and augmentation are functions of ``(seed, epoch)``: :class:`EpochSampler` draws epoch ``e``'s permutation
and one seed per sample from ``torch.Generator().manual_seed(seed * 1_000_003 + e)``, and our datasets seed the
transform of each item with its sample seed (``ds[(i, s)]``). So the batches of epoch ``e`` are the same whatever
the number of workers, and a resumed run gets them back with ``loader.sampler.set_epoch(e)`` (or
:func:`set_epoch`). Without ``set_epoch`` the sampler counts epochs itself (0, 1, 2, ... one per iteration), so
forgetting it never repeats one epoch's order.

Workers: ``None`` = 0 on machines with 2 or fewer usable cores and for data sets under 4 batches (measured on a
2-core box: a worker process competes with the model's own threads and the cached tensors make loading cheap),
else ``min(8, cores - 1)``. Workers are persistent, run torch with 1 thread each (so N workers don't start N x
cores threads), and memory is pinned when the device is CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.data.datasets import _Seeded


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(n_items: int, batch_size: int) -> int:
    """Worker processes for a data set of ``n_items`` (see the module docstring for the rule)."""
    cpus = usable_cpus()
    if cpus <= 2 or n_items < 4 * batch_size:
        return 0
    return min(8, cpus - 1)


class EpochSampler(Sampler):
    """Indices (or ``(index, seed)`` keys for datasets that take them) in an order fixed by ``(seed, epoch)``.

    Distributed (``num_replicas`` > 1): every rank draws the same global order and takes ``order[rank::replicas]``,
    so rank r's k-th batch of size B and the other ranks' k-th batches together are exactly the k-th batch of size
    ``replicas x B`` of a single process. ``pad=True`` (training) repeats the first indices so that every rank gets
    the same number of samples, as DistributedSampler does (DDP needs equal step counts); ``pad=False``
    (evaluation) covers every sample exactly once across ranks.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, keyed: bool = False, num_replicas: int = 1,
                 rank: int = 0, pad: bool = True, weights: list[float] | None = None):
        self.n, self.shuffle, self.seed, self.keyed = n, shuffle, int(seed), keyed
        # weights: draw the epoch's n indices with replacement, P(i) ~ weights[i] (WeightedRandomSampler's rule)
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.num_replicas, self.rank, self.pad = int(num_replicas), int(rank), pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next iteration epoch ``epoch`` (for resuming), beginning at position ``start`` of its order.

        ``start`` skips the first items of that epoch's order without changing the order or the per-sample
        seeds of the rest (a resume mid-epoch); it applies to the next iteration only. ``len()`` stays ``n``.
        """
        self.epoch, self.start = int(epoch), int(start)

    def _total(self) -> int:
        r = self.num_replicas
        return -(-self.n // r) * r if self.pad else self.n

    def __len__(self) -> int:
        r = self.num_replicas
        if r == 1:
            return self.n
        return self._total() // r if self.pad else len(range(self.rank, self.n, r))

    def generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def __iter__(self) -> Iterator:
        epoch, start = self.epoch, self.start
        self.epoch += 1  # the next iteration is the next epoch unless set_epoch says otherwise
        self.start = 0
        g = self.generator(epoch)
        if self.weights is not None and self.shuffle:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        if self.num_replicas > 1:
            order = (order + order[: self._total() - self.n])[self.rank::self.num_replicas]
        if not self.keyed:
            yield from order[start:]
            return
        seeds = torch.randint(0, 2**62, (self.n,), generator=g).tolist()  # drawn for all n: skipping keeps them
        if self.weights is not None and self.shuffle:  # an index can repeat: seed by position (new augmentation)
            for pos in range(start, len(order)):
                yield (order[pos], seeds[pos])
            return
        for i in order[start:]:
            yield (i, seeds[i])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, seed: int, device: str = "cpu",
                workers: int | None = None, drop_last: bool = False, num_replicas: int = 1,
                rank: int = 0, weights: list[float] | None = None) -> DataLoader:
    """A DataLoader over ``ds`` with an :class:`EpochSampler` (``loader.sampler.set_epoch(e)`` to resume).

    With ``num_replicas`` > 1 the loader yields this ``rank``'s shard: padded to equal length when shuffling
    (training), every sample exactly once across ranks otherwise (evaluation). A training epoch whose last batch
    would hold a single image drops it (BatchNorm cannot train on a batch of one; fastai drops every partial
    training batch); that image is in another batch in other epochs' orders. ``weights`` (with ``shuffle``):
    per-sample draw weights, an epoch draws ``len(ds)`` samples with replacement (a class-balanced sampler).
    """
    n = len(ds)  # type: ignore[arg-type]
    workers = default_workers(n, batch_size) if workers is None else int(workers)
    if getattr(ds, "streaming", False):  # tar shards (finetune/data/shards.py): an IterableDataset
        from finetune.data.shards import make_stream_loader

        return make_stream_loader(ds, batch_size, shuffle=shuffle, seed=seed, device=device,  # type: ignore
                                  workers=workers, num_replicas=num_replicas, rank=rank)
    sampler = EpochSampler(n, shuffle=shuffle, seed=seed, keyed=isinstance(ds, _Seeded) and shuffle,
                           num_replicas=num_replicas, rank=rank, pad=shuffle, weights=weights)
    if shuffle and len(sampler) > 1 and len(sampler) % batch_size == 1:
        drop_last = True  # a training batch of one image: BatchNorm in train mode cannot normalise it
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        persistent_workers=workers > 0, pin_memory=str(device).startswith("cuda"),
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=torch.Generator().manual_seed(int(seed)),
    )


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Make the loader's next pass epoch ``epoch`` (same order and augmentation as in the original run), starting
    after its first ``skip_batches`` batches (resuming mid-epoch)."""
    sampler = loader.sampler
    if skip_batches:
        if not isinstance(sampler, EpochSampler) and not getattr(sampler, "skips", False):
            raise TypeError("skipping batches needs a loader from make_loader (an EpochSampler)")
        sampler.set_epoch(epoch, start=skip_batches * int(loader.batch_size or 1))
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
