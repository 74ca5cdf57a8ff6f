"""Which data a run was trained and validated on, so that ``eval`` and ``--resume`` from another working directory
(or after the folder changed) don't silently use other images.

A checkpoint's ``"data"`` holds, besides the path as typed: ``root``, the absolute path (``sample`` and a CIFAR
spec's folder made absolute too), and ``val_fingerprint`` / ``val_count``: a SHA-256 over the sorted
``relative path<TAB>class`` lines of the val images (paths relative to the root: moving the whole folder keeps
it). ``--resume`` reads the data from ``root`` and refuses when the val list differs (the recorded best accuracy
and early stopping would compare different images); ``eval`` of the run's own data warns.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from finetune.errors import CheckpointError

log = logging.getLogger("finetune")


def absolute(path: str) -> str:
    """``path`` (a folder, ``sample``, ``cifar10:ROOT``) with its folder made absolute; ``sample`` stays."""
    from finetune.data.build import _CIFAR

    p = str(path).strip()
    if p == "sample":
        return p
    m = _CIFAR.match(p)
    if m:
        return f"{m.group(1)}:{os.path.abspath(os.path.expanduser(m.group(2)))}"
    return os.path.abspath(os.path.expanduser(p))


def fingerprint(dataset, root: str) -> tuple[str, int]:
    """``(sha256 hex, count)`` of a dataset's ``(path, class)`` list, paths relative to ``root``."""
    samples = getattr(dataset, "samples", None)
    if samples is None:  # in-memory data (CIFAR): its size is the identity we have
        return "", len(dataset)
    names = list(dataset.class_names)
    lines = [f"{os.path.relpath(os.path.abspath(p), root)}\t{names[t]}\n" for p, t in samples]
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest(), len(lines)


def identity(data_cfg, bundle) -> dict[str, Any]:
    """What a checkpoint stores about its data besides the path as typed (see the module docstring), and whether
    CSV labels may point outside the data folder (so ``eval`` reads the same list)."""
    from finetune.data.build import resolve_data_path

    root = absolute(data_cfg.path)
    spec = resolve_data_path(data_cfg.path)
    fp, n = fingerprint(bundle.val, str(spec)) if bundle.val is not None else ("", 0)
    return {"root": root, "val_fingerprint": fp, "val_count": n, "allow_outside": data_cfg.allow_outside}


def resume_recipe(state: dict, data: dict) -> dict:
    """The stored recipe ``data`` with ``data.path`` = the absolute root the run used (checkpoints from before the
    root was stored keep the path as typed)."""
    root = (state.get("data") or {}).get("root")
    return {**data, "data": {**data["data"], "path": root}} if root else data


def check_resume(state: dict, bundle, run_dir, world_size: int = 1, batch_size: int = 0) -> None:
    """Refuse to resume on val images other than the run's (the best accuracy so far was measured on those); warn
    when the number of processes changed (the global batch with it)."""
    was = int(state.get("world_size") or 1)
    if was != world_size:
        log.warning(f"resuming a run trained with {was} process{'es' if was > 1 else ''} in {world_size}: the global "
                    f"batch changes from {was * batch_size} to {world_size * batch_size} (--batch-size is per "
                    f"process), so the result differs from an uninterrupted run; resume with --nproc {was} to keep it")
    info = state.get("data") or {}
    if not info.get("val_fingerprint"):
        return
    from finetune.data.build import resolve_data_path

    fp, n = fingerprint(bundle.val, str(resolve_data_path(info["root"]))) if bundle.val is not None else ("", 0)
    if fp != info["val_fingerprint"]:
        raise CheckpointError(f"cannot resume: the validation images in '{info['root']}' are not the ones this run "
                              f"validated on ({info.get('val_count')} images then, {n} now, or renamed); restore "
                              f"them, or start a new run from '{Path(run_dir) / 'config.yaml'}'")


def check_eval(info: dict, dataset, path: str) -> None:
    """Warn when ``eval`` of the run's own val split sees other images than training validated on."""
    if not info.get("val_fingerprint"):
        return
    from finetune.data.build import resolve_data_path

    fp, n = fingerprint(dataset, str(resolve_data_path(path)))
    if fp != info["val_fingerprint"]:
        log.warning("the validation images in '%s' differ from the ones the run validated on (%s images then, %d "
                    "now, or renamed); the accuracy is not comparable with the one training recorded", path,
                    info.get("val_count"), n)
