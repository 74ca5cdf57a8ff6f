"""CIFAR-10/100 from torchvision's on-disk format (``--data cifar10:ROOT``), read without a download.

ROOT holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), as torchvision.datasets extracts it; ROOT may also
be that folder itself. Files are read with a restricted unpickler (numpy arrays, lists, numbers, strings only), so
a stray pickle cannot run code. Nothing is downloaded unless asked (``download=True``, the CLI's ``--download``),
and then through ``torchvision.datasets``. The test set is the validation set; ``val_split`` is not used.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from finetune.errors import DataError

LAYOUT = {
    "cifar10": {"title": "CIFAR-10", "folder": "cifar-10-batches-py", "archive": "cifar-10-python.tar.gz",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "meta": "batches.meta", "names": "label_names", "labels": "labels"},
    "cifar100": {"title": "CIFAR-100", "folder": "cifar-100-python", "archive": "cifar-100-python.tar.gz",
                 "train": ["train"], "test": ["test"], "meta": "meta", "names": "fine_label_names",
                 "labels": "fine_labels"},
}
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load(path: Path, archive: str = "the archive") -> dict:
    try:
        with open(path, "rb") as f:
            data = _SafeUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read CIFAR file '{path}': {e}") from None
    if not isinstance(data, dict):
        raise _malformed(path, f"not a mapping (got {type(data).__name__})", archive)
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _malformed(path: Path, why: str, archive: str) -> DataError:
    return DataError(f"CIFAR file '{path}' is malformed: {why}; re-extract {archive}")


def _batch(path: Path, labels_key: str, n_classes: int, archive: str) -> tuple[np.ndarray, list[int]]:
    """One batch file's images (uint8 N x 3 x 32 x 32) and labels, checked (a bad file is one error, not a
    traceback from deep inside numpy)."""
    d = _load(path, archive)
    for key in ("data", labels_key):
        if key not in d:
            raise _malformed(path, f"no '{key}' entry", archive)
    try:
        images = np.asarray(d["data"], dtype=np.uint8)
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
            raise ValueError
        images = images.reshape(-1, 3, 32, 32)
        labels = [int(t) for t in d[labels_key]]
    except (TypeError, ValueError, OverflowError):
        raise _malformed(path, "'data' is not N images of 3x32x32 bytes", archive) from None
    if len(labels) != len(images):
        raise _malformed(path, f"{len(images)} images but {len(labels)} labels", archive)
    bad = next((t for t in labels if not 0 <= t < n_classes), None)
    if bad is not None:
        raise _malformed(path, f"label {bad} is not a class index (0..{n_classes - 1})", archive)
    return images, labels


def folder(name: str, root: Path) -> Path:
    lay = LAYOUT[name]
    return root if root.name == lay["folder"] else root / lay["folder"]


def download(name: str, root: Path) -> None:
    """Fetch and extract the archive into ``root`` with torchvision (only when the user asked for it)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, timeouts, disk errors all mean the same here
        raise DataError(f"cannot download {LAYOUT[name]['title']} into '{root}': {e}") from None


def load(name: str, root: Path, *, do_download: bool = False) -> dict:
    """``{"train": (uint8 NCHW, labels), "test": (...), "classes": [...]}``."""
    lay = LAYOUT[name]
    base = folder(name, root)
    needed = [*lay["train"], *lay["test"], lay["meta"]]
    if do_download and not all((base / f).is_file() for f in needed):
        download(name, root)
    missing = [f for f in needed if not (base / f).is_file()]
    if missing:
        raise DataError(f"{lay['title']} not found in '{root}' (missing {base / missing[0]}); extract "
                        f"{lay['archive']} there, or pass --download to fetch it")
    meta = _load(base / lay["meta"], lay["archive"])
    names = meta.get(lay["names"])
    if not isinstance(names, (list, tuple)) or not names:
        raise _malformed(base / lay["meta"], f"no '{lay['names']}' list", lay["archive"])
    out: dict = {"classes": [str(c) for c in names]}
    for split in ("train", "test"):
        parts = [_batch(base / f, lay["labels"], len(names), lay["archive"]) for f in lay[split]]
        out[split] = (torch.from_numpy(np.concatenate([im for im, _ in parts])), [t for _, ts in parts for t in ts])
    return out
