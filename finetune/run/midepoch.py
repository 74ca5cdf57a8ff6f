"""Mid-epoch saves (``train.save_every_steps``) and where a resumed epoch starts, per process.

``last.pt`` saved inside an epoch holds ``"partial"``: batches done, the running loss/accuracy sums, the first
step's LR, the RNG states, and ``"ranks"``: every process's own ``[loss_sum, correct, seen]``. Under DDP each rank
sums only its shard, so rank 0's sums alone are not the epoch's: the save gathers all of them (one small
all-reduce at the save points, which every rank reaches at the same step), and a resumed rank continues from its
own (:func:`for_rank`), so the epoch's train loss/accuracy equal an uninterrupted run's.

The bookkeeping is two small pieces: :class:`MidEpochSaves`, the listener that writes those saves (on every rank:
the gather is a collective), and :func:`enter_epoch`, which puts a (resumed) epoch's randomness and data where the
save left them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from finetune import data as D
from finetune.parallel import distributed as dist_
from finetune.run import checkpoint as ck
from finetune.training import regularization as R
from finetune.training.events import Callback


class MidEpochSaves(Callback):
    """``train.save_every_steps``: the save points of each epoch go to that epoch's :func:`saver` (add it only when
    saving is on: a save point reads the exact sums from the device)."""

    def __init__(self):
        self.save: Callable[[dict[str, Any]], None] | None = None

    def on_epoch_start(self, run, epoch, phase):
        self.save = saver(run.cfg, run.run_dir, lambda: run.checkpoint(epoch, None).to_dict(), run.dd, run.device)

    def on_save_point(self, progress):
        if self.save is not None:
            self.save(progress)


def enter_epoch(loader, epoch: int, seed: int, partial: dict[str, Any] | None, mixing: bool, dd: dist_.Dist,
                summed: bool) -> dict[str, Any] | None:
    """Seed the epoch (order, augmentation and dropout are functions of the epoch's ``seed``: a resumed run repeats
    them exactly; timm's Mixup draws from NumPy's global RNG), or, resuming mid-epoch (``partial``), continue the
    RNG where the save was and skip the batches already trained. Returns this rank's ``resume`` for
    :func:`finetune.training.engine.train_one_epoch` (:func:`for_rank`)."""
    torch.manual_seed(seed)
    if mixing:
        R.seed_numpy(seed)
    if partial:
        torch.set_rng_state(partial["rng"])
        if partial.get("np_rng") is not None:
            R.set_numpy_rng_state(partial["np_rng"])
    D.set_epoch(loader, epoch, int(partial["batches"]) if partial else 0)
    return for_rank(partial, dd, summed)


def saver(cfg, run_dir: Path, make_ckpt: Callable[[], dict], dd: dist_.Dist,
          device: torch.device) -> Callable[[dict[str, Any]], None] | None:
    """What :class:`MidEpochSaves` does at a save point (``on_save_point(progress)``), on every rank: every
    ``train.save_every_steps`` optimizer steps, rank 0 writes last.pt with ``"epoch"`` = completed epochs and
    ``"partial"`` = where this epoch is, so a resume continues exactly there. None when mid-epoch saving is off."""
    every = cfg.train.save_every_steps
    if not every:
        return None
    acc = cfg.train.accumulate

    def on_step(progress: dict[str, Any]) -> None:
        if (progress["batches"] // acc) % every:
            return
        ranks = rank_sums(progress, dd, device)  # a collective: every rank, same step
        if not dd.is_main:
            return
        np_rng = R.numpy_rng_state() if cfg.train.mixup or cfg.train.cutmix else None
        ck.save_checkpoint({**make_ckpt(), "partial": {**progress, "ranks": ranks, "rng": torch.get_rng_state(),
                                                       "np_rng": np_rng}}, run_dir / "last.pt")

    return on_step


def rank_sums(progress: dict[str, Any], dd: dist_.Dist, device: torch.device) -> list[list]:
    """Every rank's ``[loss_sum, correct, seen]``, indexed by rank (exact: float64 slots, each filled by one rank)."""
    mine = [float(progress["loss_sum"]), int(progress["correct"]), int(progress["seen"])]
    if not dd.enabled:
        return [mine]
    t = torch.zeros(dd.world_size, 3, dtype=torch.float64, device=device)
    t[dd.rank] = torch.tensor(mine, dtype=torch.float64)
    return [[row[0], int(row[1]), int(row[2])] for row in dist_.all_reduce_sum(t, dd).tolist()]


def for_rank(partial: dict[str, Any] | None, dd: dist_.Dist, summed: bool) -> dict[str, Any] | None:
    """The ``resume`` dict for this rank: its own sums from ``partial["ranks"]``. Resumed with another number of
    processes, rank 0 carries all the saved sums (``summed``: the epoch's sums are added over ranks at its end) or
    the first rank's (every rank trained on all the data: the cached-feature phase), the others start at zero.
    A save without ``"ranks"`` (written before they were saved: rank 0's sums only) is used as it is."""
    if not partial or not partial.get("ranks"):
        return partial
    ranks = partial["ranks"]
    if len(ranks) == dd.world_size:
        mine = ranks[dd.rank]
    elif not summed:
        mine = ranks[0]
    elif dd.is_main:
        mine = [sum(r[0] for r in ranks), sum(r[1] for r in ranks), sum(r[2] for r in ranks)]
    else:
        mine = [0.0, 0, 0]
    return {**partial, "loss_sum": float(mine[0]), "correct": int(mine[1]), "seen": int(mine[2])}
