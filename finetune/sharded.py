"""Sharded checkpoints for FSDP2 runs: ``last.pt``'s weights and optimizer state as ``torch.distributed.checkpoint``
(DCP) files, each rank writing its own shard, so no process ever holds the whole training state.

``train.checkpoint_format: auto`` (the default; ``--checkpoint-format``) under ``--strategy fsdp``:

- every epoch, every rank writes its shards of the model and optimizer state to ``RUN/shards/eNNNN/``
  (``__R_0.distcp`` per rank, ``.metadata`` by rank 0); then rank 0 writes ``last.pt``, the run's commit point: all
  the usual metadata (recipe, metrics, best, RNG), ``"model": {}``, no optimizer, and ``"sharded": {"path":
  "shards/eNNNN", ...}``. The previous epoch's shards are removed only after that, so a kill at any moment leaves a
  ``last.pt`` whose shards are whole (``shards/`` folders it does not name are removed on resume);
- ``best.pt`` (and top-k files) stay consolidated: the model alone is gathered to rank 0 when an epoch improves,
  so they load in one process with ``torch.load(weights_only=True)`` as before;
- resume: the model is built and sharded at the new run's world size, then :func:`load_into` reads its part of
  every tensor (DCP reshards: a run saved by 2 processes resumes with 1, 2 or 4); a run without FSDP (1 process,
  or DDP) loads the full tensors the same way;
- ``finetune eval/predict/export`` of ``last.pt`` itself (``best.pt`` is the default) read the shards into one
  process (:func:`materialize`).

``full``: one consolidated ``last.pt`` as a DDP run writes (weights and optimizer state gathered to rank 0).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDS = "shards"  # the folder in the run directory
FORMAT = "torch.distributed.checkpoint"


def _no_dist() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet():
    """DCP warns that it loads "in a single process" whenever no process group is up: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield


def folder(epochs_done: int) -> str:
    return f"{SHARDS}/e{epochs_done:04d}"


def save(model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, epochs_done: int, dd) -> dict[str, Any]:
    """Every rank writes its shards of the model and optimizer state (collective); returns the entry ``last.pt``
    names them by."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from finetune import distributed as dist_

    rel = folder(epochs_done)
    if dd.is_main:  # what a killed earlier write of the same epoch left (last.pt never named it)
        shutil.rmtree(run_dir / rel, ignore_errors=True)
    dist_.barrier(dd)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(run_dir / rel), no_dist=_no_dist())
    return {"path": rel, "format": FORMAT, "world_size": dd.world_size}


def load_into(model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, entry: dict[str, Any]) -> None:
    """Load the shards ``entry`` names into ``model`` and ``optimizer`` (every rank: collective under a process
    group). ``model`` may be FSDP-sharded at any world size (each rank reads its part) or whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)  # (an empty optimizer state is initialised by a step at lr 0)
    state = {"model": msd, "optim": osd}
    with _quiet():
        dcp.load(state, checkpoint_id=str(path_of(run_dir, entry)), no_dist=_no_dist())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def path_of(run_dir: Path, entry: dict[str, Any]) -> Path:
    from finetune.errors import CheckpointError

    rel = str(entry.get("path", ""))
    p = Path(run_dir) / rel
    if not rel.startswith(f"{SHARDS}/") or ".." in Path(rel).parts or not (p / ".metadata").is_file():
        raise CheckpointError(f"'{Path(run_dir) / 'last.pt'}' names sharded weights in '{p}', which is missing or "
                              "incomplete; resume from a copy of the whole run directory (last.pt with its "
                              f"{SHARDS}/ folder)")
    return p


def materialize(run_dir: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole model state_dict from the shards, in this process (no process group needed; the optimizer state
    is not read). What ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` does, for one key."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    with _quiet():
        _load_state_dict(state, storage_reader=FileSystemReader(str(path_of(run_dir, entry))),
                         planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return state["model"]


def remove_stale(run_dir: Path, keep: str | None) -> list[str]:
    """Remove the ``shards/`` folders ``last.pt`` does not name (``keep``): the previous epoch's, or what a kill
    left. Returns their names."""
    root = Path(run_dir) / SHARDS
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if f"{SHARDS}/{p.name}" != keep:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(f"{SHARDS}/{p.name}")
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return removed
