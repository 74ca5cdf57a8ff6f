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


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _SafeUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read CIFAR file '{path}': {e}") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


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
    out: dict = {"classes": [str(c) for c in _load(base / lay["meta"])[lay["names"]]]}
    for split in ("train", "test"):
        parts = [_load(base / f) for f in lay[split]]
        images = np.concatenate([np.asarray(p["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for p in parts])
        labels = [int(t) for p in parts for t in p[lay["labels"]]]
        out[split] = (torch.from_numpy(images), labels)
    return out
