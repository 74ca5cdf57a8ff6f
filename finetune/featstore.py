"""Persistent feature store: the frozen part's outputs on disk, keyed by everything that determines them.

An entry is a directory ``<root>/features/<key>/`` holding ``features.npy`` (float32, ``[N, ...]``, written row
block by row block through a memory map, so a data set whose features exceed RAM still works), ``labels.npy``
(int64) and ``meta.json`` (what the key was made of, the shape, a CRC32 of both arrays). The key is a SHA-256 over
the model name, the weights' identity (a file's SHA-256, an enum or tag name, or the tensors themselves for random
init), the versions of torch and of the model's source library, the split point, the eval transform, the precision,
the memory layout, the device type, and every image's path, size, mtime and label. Change any of them and the key
changes; nothing is ever looked up by name.

Writes are atomic: the entry is written into a temporary sibling directory and renamed into place; a reader sees a
whole entry or none. A loaded entry whose size, shape or checksum doesn't match its ``meta.json`` is reported with a
warning, deleted and recomputed, never used. ``finetune cache list`` / ``finetune cache clear`` show and free it.

Root: ``--cache-dir``, else ``$FINETUNE_CACHE``, else ``$XDG_CACHE_HOME/finetune`` (``~/.cache/finetune``).
``FINETUNE_CACHE=off`` keeps features in memory only (the previous behaviour).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune.errors import ConfigError

log = logging.getLogger("finetune")

FORMAT = 1  # bump when the layout or the meaning of a key part changes


def cache_root(cache_dir: str | Path | None = None) -> Path | None:
    """The cache root (its ``features/`` folder holds the entries), or None when persistence is off."""
    value = str(cache_dir) if cache_dir is not None else os.environ.get("FINETUNE_CACHE")
    if value is not None and value.strip().lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


def features_dir(cache_dir: str | Path | None = None) -> Path | None:
    root = cache_root(cache_dir)
    return root / "features" if root is not None else None


# ----------------------------------------------------------------------------------------------- keys


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for the life of the process."""
    p = Path(path)
    st = p.stat()
    k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _SHA:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA[k] = h.hexdigest()
    return _SHA[k]


_SHA: dict[tuple[str, int, int], str] = {}


def weights_identity(weights: str, module=None) -> str:
    """What identifies the weights: a local file's SHA-256, an enum/tag name, or (random init, ``none``) a hash of
    ``module``'s tensors (random init depends on the seed, so the name alone says nothing)."""
    if weights and weights != "none" and Path(weights).is_file():
        return "sha256:" + file_sha256(weights)
    if weights in ("none", "", None) and module is not None:
        h = hashlib.sha256()
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return "tensors:" + h.hexdigest()
    return "name:" + str(weights)


def items_identity(dataset) -> list[list[Any]] | None:
    """``[path, size, mtime_ns, label]`` per image of an image-file data set, in order; None for other data sets
    (in-memory CIFAR tensors), which are not stored."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    out = []
    for p, label in samples:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns, int(label)])
    return out


def _versions(source: str) -> dict[str, str]:
    """torch's version (its kernels make the numbers) and the model source's (timm/torchvision define the
    architecture): an upgrade recomputes rather than trusting features from other code."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "timm" if source == "timm" else "torchvision" if source == "torchvision" else None):
        if pkg:
            try:
                out[pkg] = version(pkg)
            except PackageNotFoundError:
                out[pkg] = "?"
    return out


def make_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------------------------- entries


@dataclass
class Entry:
    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    @property
    def last_used(self) -> float:
        return self.path.stat().st_mtime


def _crc(path: Path) -> int:
    c = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            c = zlib.crc32(block, c)
    return c


def _check(entry: Path, meta: dict[str, Any]):
    """Open the arrays of a complete-looking entry; raises ValueError naming what doesn't match."""
    import numpy as np

    fpath, lpath = entry / "features.npy", entry / "labels.npy"
    for p, crc_key in ((fpath, "crc_features"), (lpath, "crc_labels")):
        if not p.is_file():
            raise ValueError(f"{p.name} is missing")
        if p.stat().st_size != meta.get("bytes_" + p.stem):
            raise ValueError(f"{p.name} has {p.stat().st_size} bytes, expected {meta.get('bytes_' + p.stem)}")
        if _crc(p) != meta.get(crc_key):
            raise ValueError(f"{p.name} fails its checksum")
    feats = np.load(fpath, mmap_mode="c")  # copy-on-write: a writable view (torch wants one); the file never changes
    labels = np.load(lpath)
    if list(feats.shape) != meta.get("shape") or feats.dtype != np.float32 or labels.shape != (feats.shape[0],):
        raise ValueError(f"shape {list(feats.shape)} / {labels.shape} does not match {meta.get('shape')}")
    return feats, labels


def load(root: Path, key: str):
    """``(features, labels)`` tensors (features memory-mapped) of entry ``key``, or None when there is none or it is
    damaged (then it is deleted with a warning, so the caller recomputes it)."""
    import torch

    entry = root / key
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text("utf-8"))
        feats, labels = _check(entry, meta)
    except (OSError, ValueError) as e:
        log.warning(f"feature cache entry '{entry}' is damaged ({e}); recomputing it")
        shutil.rmtree(entry, ignore_errors=True)
        return None
    os.utime(entry)  # last used: what 'finetune cache clear --older-than' goes by
    return torch.from_numpy(feats), torch.from_numpy(labels)


def save(root: Path, key: str, meta: dict[str, Any], batches: Callable[[], Any], n: int):
    """Stream ``batches()`` (an iterator of ``(features, labels)`` CPU tensors, ``n`` rows in all) into a new entry,
    atomically; returns the entry's ``(features, labels)`` as :func:`load` does."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        mm, labels, row = None, np.empty(n, dtype=np.int64), 0
        for f, y in batches():
            f = f.float().numpy()
            if mm is None:
                mm = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32,
                                               shape=(n, *f.shape[1:]))
            mm[row:row + len(f)] = f
            labels[row:row + len(f)] = y.numpy()
            row += len(f)
        if mm is None or row != n:
            raise RuntimeError(f"expected {n} feature rows, got {row}")
        shape = list(mm.shape)
        mm.flush()
        del mm
        np.save(tmp / "labels.npy", labels)
        for p in (tmp / "features.npy", tmp / "labels.npy"):
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
        meta = {**meta, "key": key, "shape": shape, "created": time.time(),
                "bytes_features": (tmp / "features.npy").stat().st_size,
                "bytes_labels": (tmp / "labels.npy").stat().st_size,
                "crc_features": _crc(tmp / "features.npy"), "crc_labels": _crc(tmp / "labels.npy")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), "utf-8")
        try:
            os.rename(tmp, root / key)
        except OSError:  # another process stored the same entry first: same key, same contents; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out = load(root, key)
    if out is None:
        raise RuntimeError(f"feature cache entry '{root / key}' could not be read back")
    return out


def entries(cache_dir: str | Path | None = None) -> list[Entry]:
    """The stored entries (complete ones: temporary directories of writes in progress are left out)."""
    root = features_dir(cache_dir)
    if root is None or not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            try:
                meta = json.loads((d / "meta.json").read_text("utf-8"))
            except (OSError, ValueError):
                meta = {}
            out.append(Entry(d.name, d, meta))
    return out


def parse_age(text: str) -> float:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t) * 86400
    except ValueError:
        raise ConfigError(f"--older-than '{text}' is not an age; use e.g. 30m, 12h, 7d or 2w") from None


def clear(cache_dir: str | Path | None = None, older_than: float | None = None) -> tuple[int, int]:
    """Delete entries (those not used for ``older_than`` seconds, or all) and stale temporary directories;
    returns ``(entries removed, bytes freed)``."""
    now, n, freed = time.time(), 0, 0
    for e in entries(cache_dir):
        if older_than is None or now - e.last_used > older_than:
            freed += e.bytes
            shutil.rmtree(e.path, ignore_errors=True)
            n += 1
    root = features_dir(cache_dir)
    if root is not None and root.is_dir():
        for d in root.glob(".*.tmp-*"):
            if now - d.stat().st_mtime > 3600:  # a write interrupted by a kill, long ago
                shutil.rmtree(d, ignore_errors=True)
    return n, freed


# ----------------------------------------------------------------------------------------------- the front door


def get_features(compute: Callable[[], Any], batches: Callable[[], Any] | None, n: int, parts: dict[str, Any] | None,
                 *, cache_dir: str | Path | None = None, info: dict[str, Any] | None = None):
    """``(features, labels, hit)``: from the store when an entry for ``parts`` exists, else computed (streamed into
    a new entry by ``batches``, or in memory by ``compute`` when there is no store or no key)."""
    root = features_dir(cache_dir)
    if root is None or parts is None or batches is None:
        f, y = compute()
        return f, y, False
    key = make_key(parts)
    got = load(root, key)
    if got is not None:
        return got[0], got[1], True
    f, y = save(root, key, {**(info or {}), "parts": {k: v for k, v in parts.items() if k != "items"},
                            "images": n}, batches, n)
    return f, y, False


def stream_features(frozen, dataset, *, batch_size: int = 64, device="cpu", precision: str = "fp32",
                    channels_last: bool = False, workers: int | None = None, num_replicas: int = 1, rank: int = 0,
                    fast: str = "auto"):
    """Yield ``(features, labels)`` CPU batches of ``frozen`` over ``dataset`` in order, as
    :func:`finetune.features.compute_features` computes them (eval mode, ``inference_mode``, the run's precision;
    ``fast`` auto: on a conv+BN-folded copy, :mod:`finetune.fastinfer`). With ``num_replicas`` > 1: only the
    images ``rank, rank + num_replicas, ...`` (the evaluation sampler's shard)."""
    import torch

    from finetune.data import make_loader
    from finetune.engine import autocast, to_device
    from finetune.fastinfer import FastInference

    device = torch.device(device)
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, device=device.type, workers=workers,
                         num_replicas=num_replicas, rank=rank)
    was = frozen.training
    frozen.eval()
    run = FastInference(frozen, fast)
    try:
        with torch.inference_mode():
            for x, y in loader:
                x, _ = to_device(x, y, device, channels_last)
                with autocast(device, precision):
                    f = run(x)
                yield f.float().cpu(), y
    finally:
        frozen.train(was)
