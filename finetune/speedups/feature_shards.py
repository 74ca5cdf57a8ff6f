"""Frozen features over N processes: each rank computes its shard once, then all ranks hold all of them.

Without this, every rank of a ``--nproc N`` / torchrun run ran the frozen part over the whole data set (N times the
work for the same numbers). Here rank r runs it over images ``r, r + N, r + 2N, ...`` (the evaluation sampler's
shard: every image exactly once across ranks), the shards are exchanged with ``all_gather_object`` (CPU tensors;
gloo or nccl) and put back in data-set order, so every rank trains the head on the same full feature matrix as a
single process would. With the persistent store (:mod:`.feature_store`) a hit counts only when every rank finds
the entry (nodes need not share a disk); after a miss rank 0 writes the gathered features to its store.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from finetune.parallel.distributed import Dist
from finetune.parallel.distributed import all_reduce_sum
from finetune.speedups import feature_store as S


def gather_rows(part: tuple[torch.Tensor, torch.Tensor] | None, n: int, d: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(features, labels)`` of rows ``rank::world_size`` (None when a rank's shard is empty), put
    back in row order: ``(features[n, ...], labels[n])`` on every rank."""
    import torch.distributed as dist

    parts: list[Any] = [None] * d.world_size
    dist.all_gather_object(parts, part)
    shape = next(p[0].shape[1:] for p in parts if p is not None)
    feats = torch.empty((n, *shape), dtype=torch.float32)
    labels = torch.empty(n, dtype=torch.int64)
    for r, p in enumerate(parts):
        if p is not None:
            feats[r::d.world_size] = p[0]
            labels[r::d.world_size] = p[1]
    return feats, labels


def all_hit(hit: bool, d: Dist) -> bool:
    """True when every rank found the store entry."""

    return int(all_reduce_sum(torch.tensor([int(hit)]), d).item()) == d.world_size


def sharded_features(stream: Callable[[int, int], Any], n: int, parts: dict[str, Any] | None, d: Dist, *,
                     cache_dir=None, info: dict[str, Any] | None = None, row_shape=None):
    """``(features, labels, hit)`` as :func:`finetune.speedups.feature_store.get_features`, computed by shards.

    ``stream(num_replicas, rank)`` yields the ``(features, labels)`` batches of one shard (see
    :func:`finetune.speedups.feature_store.stream_features`).
    """

    root = S.features_dir(cache_dir)
    key = S.make_key(parts) if root is not None and parts is not None else None
    expect = S.expected(parts, n, row_shape)  # a hit must fit the data set (rows, labels, feature shape)
    got = S.load(root, key, expect) if key is not None else None
    if key is not None and all_hit(got is not None, d):
        return got[0], got[1], True
    batches = list(stream(d.world_size, d.rank))
    mine = (torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches])) if batches else None
    feats, labels = gather_rows(mine, n, d)
    if key is not None and d.is_main and got is None:
        meta = {**(info or {}), "parts": {k: v for k, v in parts.items() if k != "items"}, "images": n}
        feats, labels = S.save(root, key, meta, lambda: iter([(feats, labels)]), n, expect)
    return feats, labels, False
