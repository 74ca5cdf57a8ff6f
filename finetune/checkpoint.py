"""Checkpoints: atomic save, safe load, and the run directory.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read: ``"model"`` is a state_dict and the
rest (class names, model name, eval transform, freeze plan, recipe, optimizer state, RNG) is tensors, numbers,
strings, lists and dicts only — so the model can be rebuilt and used without the recipe, and loading runs no code.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune.errors import CheckpointError

RUN_FILES = ("config.yaml", "metrics.json", "last.pt", "best.pt")


def atomic_write_bytes(path: Path, write) -> None:
    """Write via ``write(fileobj)`` to a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any moment leaves either the old complete file or the new complete file, never a torn one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    with _suppress():  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    import torch

    try:
        atomic_write_bytes(Path(path), lambda f: torch.save(obj, f))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint '{path}': {e.strerror or e}; the previous checkpoint "
                              "is unchanged") from None


def atomic_write_text(path: Path, text: str) -> None:
    try:
        atomic_write_bytes(Path(path), lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise CheckpointError(f"cannot write '{path}': {e.strerror or e}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a finetune checkpoint safely (``weights_only=True``; pickled objects only inside
    :func:`finetune.serialization.trusted`); errors name the file and what to do."""
    from finetune.serialization import torch_load

    p = Path(path)
    if p.is_dir():
        p = p / "best.pt" if (p / "best.pt").is_file() else p / "last.pt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; pass a .pt file from a run directory "
                              "(runs/<run>/best.pt or last.pt)")
    ckpt = torch_load(p, CheckpointError, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise CheckpointError(f"'{p}' is not a finetune checkpoint (no 'model'/'model_name'); for plain weights "
                              "use --weights PATH with --model")
    ckpt["_path"] = str(p)
    return ckpt


EXPORT_SUFFIX = {"safetensors": ".safetensors", "state-dict": ".pth"}


def export_weights(checkpoint: str | Path, fmt: str = "safetensors", out: str | Path | None = None, *,
                   overwrite: bool = False) -> Path:
    """Write the checkpoint's ``"model"`` state_dict alone as ``.safetensors`` or a ``torch.save``'d dict.

    ``out`` defaults to the checkpoint's name with the format's suffix, next to it. The write is atomic and never
    replaces an existing file unless ``overwrite``. The result loads with ``--weights PATH`` (and plain
    ``load_state_dict``); safetensors metadata records the model name and class count.
    """
    import torch

    if fmt not in EXPORT_SUFFIX:
        raise CheckpointError(f"unknown export format '{fmt}'; use safetensors or state-dict")
    ckpt = load_checkpoint(checkpoint)
    src = Path(ckpt["_path"])
    dest = Path(out) if out is not None else src.with_suffix(EXPORT_SUFFIX[fmt])
    if dest.resolve() == src.resolve():
        raise CheckpointError(f"refusing to export '{src}' onto itself; choose another --out")
    if dest.exists() and (not overwrite or dest.is_dir()):
        raise CheckpointError(f"'{dest}' already exists; pass --overwrite to replace it or choose another --out"
                              if not dest.is_dir() else f"'{dest}' is a directory; --out takes a file path")
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save(sd, metadata={"format": "pt", "model_name": str(ckpt["model_name"]),
                                  "num_classes": str(ckpt["num_classes"])})

        def write(f) -> None:
            f.write(data)
    else:
        def write(f) -> None:
            torch.save(sd, f)
    try:
        atomic_write_bytes(dest, write)
    except OSError as e:
        raise CheckpointError(f"cannot write '{dest}': {e.strerror or e}") from None
    return dest


def remove_temp_files(run_dir: Path) -> list[str]:
    """Delete the temp files a killed atomic write left in ``run_dir`` (``.NAME.XXXX.tmp``); returns their names.

    Only names of the run's own files are touched, so nothing of the user's is ever removed.
    """
    removed = []
    for name in RUN_FILES:
        for p in Path(run_dir).glob(f".{name}.*.tmp"):
            with _suppress():
                p.unlink()
                removed.append(p.name)
    return removed


def default_run_dir(model_name: str, root: str | Path = "runs") -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-")
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


def prepare_run_dir(out: Path, *, overwrite: bool) -> Path:
    """Create ``out``; an existing non-empty directory is an error unless ``overwrite`` (which only ever deletes
    what a finetune run wrote)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path '{out}' exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        is_run = (out / "config.yaml").is_file()
        if not overwrite and is_run and not (out / "last.pt").is_file():
            raise CheckpointError(f"output directory '{out}' holds a run that saved no checkpoint; pass --overwrite "
                                  "to replace it or choose another --out")
        if not overwrite and is_run:
            raise CheckpointError(f"output directory '{out}' already exists and is not empty; pass --overwrite to "
                                  "replace it, --resume to continue it, or choose another --out")
        if not overwrite:
            raise CheckpointError(f"output directory '{out}' already exists and is not empty (and is not a finetune "
                                  "run); choose another --out")
        if not is_run:
            raise CheckpointError(f"output directory '{out}' is not empty and is not a finetune run (no "
                                  "config.yaml); refusing to delete it with --overwrite; choose another --out")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to output directory '{out}': {e.strerror or e}; choose another "
                              "--out") from None
    return out
