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
import io
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import CheckpointError, FinetuneError, shown
from finetune.parallel import distributed as dist_

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
    path = path_of(run_dir, entry)
    md = read_metadata(path)  # checked before DCP sees it (DCP logs its reader's errors with tracebacks)
    with _quiet(), _damaged(path):
        dcp.load(state, storage_reader=_safe_reader(path, md), planner=_safe_planner(), no_dist=_no_dist())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def path_of(run_dir: Path, entry: dict[str, Any]) -> Path:
    """The shard folder ``entry`` (from an untrusted ``last.pt``) names: ``shards/eNNNN`` inside ``run_dir``, a real
    folder (no symbolic link on the way: reading or writing through one leaves the run directory) with its
    ``.metadata``."""
    rel = str(entry.get("path", "")) if isinstance(entry, dict) else ""
    p = Path(run_dir) / rel
    if not _ENTRY.fullmatch(rel) or not (p / ".metadata").is_file():
        raise CheckpointError(f"'{Path(run_dir) / 'last.pt'}' names sharded weights in '{p}', which is missing or "
                              "incomplete; resume from a copy of the whole run directory (last.pt with its "
                              f"{SHARDS}/ folder)")
    for q in (p.parent, p, p / ".metadata"):
        if q.is_symlink():
            raise CheckpointError(f"'{q}' is a symbolic link; sharded weights are read only from real files inside "
                                  f"the run directory; replace the link by a copy of what it points to")
    return p


def materialize(run_dir: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole model state_dict from the shards, in this process (no process group needed; the optimizer state
    is not read). What ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` does, for one key."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = path_of(run_dir, entry)
    md = read_metadata(path)
    state: dict[str, Any] = {}
    with _quiet(), _damaged(path):
        _load_state_dict(state, storage_reader=_safe_reader(path, md),
                         planner=_safe_planner(empty=True, keys={"model"}), no_dist=True)
    model = state.get("model")
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"the sharded weights in '{path}' hold no model state_dict; they are damaged or were "
                              "not written by finetune")
    return model


# What a shard folder may hold, as the toolkit names it (``folder()``; DCP's files): anything else is not read.
_ENTRY = re.compile(rf"{SHARDS}/e\d{{4,}}")
_DATA_FILE = re.compile(r"__\d+_\d+\.distcp")

# The classes DCP's ``.metadata`` pickle is made of (torch 2.1 - 2.x): ``FileSystemReader.read_metadata`` reads it
# with plain ``pickle.load``, so a crafted file would run code. Only these are resolved; anything else is refused.
_DCP_METADATA = {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"}
_ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in _DCP_METADATA} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"'{module}.{name}' is not part of torch.distributed.checkpoint's metadata")


def read_metadata(path: Path) -> Any:
    """A shard folder's ``.metadata``, unpickled with only DCP's metadata classes, and checked: every tensor or
    byte record it lists lives in a ``__R_N.distcp`` file of that folder."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    meta_file = Path(path) / ".metadata"
    try:
        with open(meta_file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, TypeError, ValueError, IndexError,
            KeyError, RecursionError, MemoryError) as e:
        raise CheckpointError(f"refusing to read '{meta_file}': it is not torch.distributed.checkpoint metadata "
                              f"({shown(e)[:120]}); it is damaged or was not written by finetune") from None
    except OSError as e:
        raise CheckpointError(f"cannot read '{meta_file}': {e.strerror or e}") from None
    data = getattr(md, "storage_data", None)
    if not isinstance(md, Metadata) or not isinstance(data, dict) or not all(
            isinstance(v, _StorageInfo) and isinstance(v.relative_path, str) and _DATA_FILE.fullmatch(v.relative_path)
            and not (Path(path) / v.relative_path).is_symlink() for v in data.values()):
        raise CheckpointError(f"refusing to read '{meta_file}': its records do not name shard files of that folder "
                              "(__R_N.distcp); it is damaged or was not written by finetune")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    return md


def _safe_reader(path: Path, md: Any):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader, with the metadata that :func:`read_metadata` read instead of ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(path))


def _safe_planner(empty: bool = False, keys: set[str] | None = None):
    """DCP's load planner with non-tensor records (the optimizer's param_groups) read by ``torch.load`` with
    ``weights_only=True``: DCP's own planner unpickles them freely."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner

    class SafePlanner(base):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:  # DefaultLoadPlanner's, weights_only
            from torch.distributed.checkpoint._traverse import set_element

            obj = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner(keys=keys) if empty else SafePlanner()


@contextlib.contextmanager
def _damaged(path: Path):
    """DCP's errors on a damaged shard folder (a missing or truncated ``.distcp``, a record that does not fit) as one
    CheckpointError line. DCP raises ``CheckpointException``, a ``BaseException``, holding each rank's error."""
    try:
        yield
    except (FinetuneError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - see above
        raise CheckpointError(f"cannot read the sharded weights in '{path}': {_reason(e)}; they are damaged or "
                              "incomplete: resume from a whole copy of the run directory") from None


def _reason(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:  # DCP's CheckpointException: {rank: (exception, traceback)}
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) and first and isinstance(first[0], BaseException) else e
    if isinstance(e, pickle.UnpicklingError):
        return "a record holds objects other than plain data (not loaded: unpickling them could run code)"
    if isinstance(e, FileNotFoundError):
        return f"'{Path(e.filename).name if e.filename else e}' is missing"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return shown(f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)[:160]


def remove_stale(run_dir: Path, keep: str | None) -> list[str]:
    """Remove the ``shards/eNNNN`` entries ``last.pt`` does not name (``keep``): the previous epoch's, or what a kill
    left. Returns their names. Only entries named as :func:`folder` names them are touched, and no symbolic link is
    followed: a link is removed itself, never what it points to; a ``shards`` that is a link is left alone."""
    root = Path(run_dir) / SHARDS
    removed = []
    if root.is_symlink() or not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        rel = f"{SHARDS}/{p.name}"
        if rel == keep or not _ENTRY.fullmatch(rel):
            continue
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)  # (rmtree does not follow the links inside)
        removed.append(rel)
    if keep is None:
        with contextlib.suppress(OSError):
            root.rmdir()  # when empty
    return removed
