"""Persistent feature store: the frozen part's outputs on disk, keyed by everything that determines them.

An entry is a directory ``<root>/features/<key>/`` holding ``features.npy`` (float32, ``[N, ...]``, written row
block by row block through a memory map, so a data set whose features exceed RAM still works), ``labels.npy``
(int64) and ``meta.json`` (what the key was made of, the shape, a CRC32 of both arrays). The key is a SHA-256 over
the model name, the weights' identity (a file's SHA-256, an enum or tag name, or the tensors themselves for random
init), the versions of torch and of the model's source library, the split point, the eval transform, the precision,
the memory layout, the device type, and every image's path, size, mtime, label and *content* (a BLAKE2b digest of
the file's bytes: an image rewritten with the same size and mtime -- a BMP, ``cp -p``, an archive with fixed mtimes
-- is a miss; the digest is remembered per (device, inode, size, mtime, ctime) in the process and in
``<root>/digests/``, so a rerun hashes only files written since: measured on 1000 images, the key costs 50 ms where
size and mtime alone cost 45 ms, and 70-140 ms the first time). Change any of them and the key changes; nothing
is ever looked up by name.

Writes are atomic: the entry is written into a temporary sibling directory (``.<key>.tmp-<pid>-<n>``) and renamed
into place; a reader sees a whole entry or none. Before writing, the store checks the free space (the entry's size
plus a margin) and preallocates the features file (``posix_fallocate``), so a full disk is a warning and the
features are kept in memory for this run (never a ``Bus error`` from the memory map); so is a cache folder that
cannot be written (hits are still read from it, read-only). Every hit is validated against its ``meta.json`` (sizes,
shape, CRC32) *and* against the data set (row count, the backbone's feature shape, dtypes, the labels of the images,
finite features); an entry that fails any check is reported with one warning, deleted where possible and
recomputed, never used. ``finetune cache list`` / ``finetune cache clear`` show and free the entries, including the
temporary directories of interrupted writes (marked ``unfinished``); ``clear`` reports only what it deleted.

Root: ``--cache-dir``, else ``$FINETUNE_CACHE``, else ``$XDG_CACHE_HOME/finetune`` (``~/.cache/finetune``).
``FINETUNE_CACHE=off`` keeps features in memory only (the previous behaviour).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune.errors import ConfigError, option
from finetune.files import cache_root

log = logging.getLogger("finetune")

FORMAT = 2  # bump when the layout or the meaning of a key part changes (2: content digests of the images)
MARGIN = 64 << 20  # free space left on the store's disk after an entry is written


def features_dir(cache_dir: str | Path | None = None) -> Path | None:
    root = cache_root(cache_dir)
    return root / "features" if root is not None else None


# ----------------------------------------------------------------------------------------------- keys


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, remembered per (path, device, inode, size, mtime, ctime) for the life of the process."""
    p = Path(path)
    st = p.stat()
    k = (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if k not in _SHA:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA[k] = h.hexdigest()
    return _SHA[k]


_SHA: dict[tuple, str] = {}


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


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(path: str, st: os.stat_result) -> tuple[str, tuple | None]:
    """``(digest, memo key)`` of the file at ``path`` (``st`` its stat); the key is None when the file changed
    while it was read or in the last 2 s (its ctime may not have ticked yet), so the digest is not remembered."""
    k = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    d = _DIGEST.get(k)
    if d is not None:
        return d, k
    d = _hash_file(path)
    after = os.stat(path)
    if (after.st_ctime_ns, after.st_size) == (st.st_ctime_ns, st.st_size) and \
            time.time_ns() - st.st_ctime_ns > _RACY_NS:
        _DIGEST[k] = d
        return d, k
    return d, None


def file_digest(path: str | Path) -> str:
    """BLAKE2b (128 bit) of a file's bytes, remembered per (path, device, inode, size, mtime, ctime). The ctime
    changes on every write and cannot be set back (``cp -p``, ``touch -d`` and archive extraction set the mtime
    only), so a rewritten file is hashed again."""
    p = str(Path(path).resolve())
    return _digest(p, os.stat(p))[0]


_DIGEST: dict[tuple, str] = {}
_RACY_NS = 2_000_000_000


def _memo_file(memo_dir: Path, paths: list[str]) -> Path:
    return memo_dir / "digests" / (hashlib.sha256("\0".join(paths).encode("utf-8")).hexdigest()[:32] + ".json")


def _read_memo(path: Path) -> dict[tuple, str]:
    """A digest memo written by :func:`items_identity` (untrusted: rows of the wrong form are ignored)."""
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    rows = doc.get("files") if isinstance(doc, dict) and doc.get("format") == 1 else None
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, list) and len(row) == 7 and isinstance(row[0], str) and isinstance(row[6], str) \
                and all(type(v) is int for v in row[1:6]) and re.fullmatch(r"[0-9a-f]{32}", row[6]):
            out[tuple(row[:6])] = row[6]
    return out


def items_identity(dataset, memo_dir: str | Path | None = None) -> list[list[Any]] | None:
    """``[path, size, mtime_ns, content digest, label]`` per image of an image-file data set, in order (see
    :func:`file_digest`); None for other data sets (in-memory CIFAR tensors), which are not stored.

    ``memo_dir`` (the cache root, above ``features/``): the digests are remembered there too, in
    ``digests/<hash of the paths>.json``, so that a rerun in a new process hashes only the files whose (device,
    inode, size, mtime, ctime) changed."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    paths = [str(Path(p).resolve()) for p, _ in samples]
    memo = _memo_file(Path(memo_dir), paths) if memo_dir is not None else None
    known = _read_memo(memo) if memo is not None else {}
    _DIGEST.update(known)
    out, rows = [], []
    for p, (_, label) in zip(paths, samples):
        st = os.stat(p)
        d, k = _digest(p, st)
        out.append([p, st.st_size, st.st_mtime_ns, d, int(label)])
        if k is not None:
            rows.append([*k, d])
    if memo is not None and rows and {tuple(r[:6]) for r in rows} != set(known):
        try:  # best effort: a read-only or full store only costs the next run the hashing
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"format": 1, "files": rows}), "utf-8")
            os.replace(tmp, memo)
        except OSError:
            pass
    return out


def _versions(source: str) -> dict[str, str]:
    """torch's version (its kernels make the numbers) and the model source's packages (``BackboneSource.packages``:
    timm/torchvision define the architecture): an upgrade recomputes rather than trusting features from other
    code."""
    from importlib.metadata import PackageNotFoundError, version

    # imported here: the models package's __init__ loads torch ('cache list' does not)
    from finetune.models.sources import registered_sources

    src = registered_sources().get(source)
    out = {}
    for pkg in ("torch", *(src.packages if src else ())):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def make_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------------------------- entries

_TMP = re.compile(r"^\.([0-9a-f]{64})\.tmp-(\d+)-\d+$")


@dataclass
class Entry:
    key: str
    path: Path
    meta: dict[str, Any]
    temp: bool = False  # the temporary directory of a write in progress, or of one interrupted by a kill
    pid: int | None = None  # the writing process of a temporary directory

    def _stats(self) -> list[os.stat_result]:
        """The entry folder's own stat, then its files' (a folder that another process removes meanwhile: none)."""
        out = []
        try:
            out.append(self.path.stat())
            for f in self.path.iterdir():
                if f.is_file() and not f.is_symlink():
                    out.append(f.stat())
        except OSError:
            pass
        return out

    @property
    def bytes(self) -> int:
        return sum(st.st_size for st in self._stats()[1:])

    @property
    def last_used(self) -> float:
        stats = self._stats() if self.temp else self._stats()[:1]  # a temporary folder: the last write into it
        return max((st.st_mtime for st in stats), default=time.time())

    @property
    def writer_alive(self) -> bool:
        """For a temporary directory: is the process that writes it still running (on this machine)?"""
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # another user's process
            return True
        return True


@dataclass
class Expect:
    """What a hit must match, from the data set (never from the entry): its row count, its labels in order, and
    (lazily: one image through the frozen part) the shape of one feature row."""

    n: int
    labels: list[int] | None = None
    row_shape: Callable[[], tuple[int, ...] | None] | None = None


def expected(parts: dict[str, Any] | None, n: int, row_shape=None) -> Expect:
    items = (parts or {}).get("items")
    labels = [int(it[-1]) for it in items] if isinstance(items, list) else None
    return Expect(n, labels, row_shape)


def _warn_once(what: str, msg: str) -> None:
    """One warning per (cause, store) in a process: a run's train and val splits hit the same full disk once."""
    if what not in _WARNED:
        _WARNED.add(what)
        log.warning(msg)


_WARNED: set[str] = set()


def _crc(path: Path) -> int:
    c = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            c = zlib.crc32(block, c)
    return c


def _all_finite(a) -> bool:
    import numpy as np

    step = max(1, (1 << 24) // max(1, a[0].size * 4)) if len(a) else 1  # ~16 MB of rows at a time
    return all(bool(np.isfinite(a[i:i + step]).all()) for i in range(0, len(a), step))


def _check(entry: Path, meta: Any, expect: Expect | None = None):
    """Open the arrays of a complete-looking entry; raises ValueError naming what doesn't match its ``meta.json`` or
    the data set (``expect``)."""
    import numpy as np

    if not isinstance(meta, dict):
        raise ValueError(f"meta.json holds a {type(meta).__name__}, not an object")
    fpath, lpath = entry / "features.npy", entry / "labels.npy"
    for p, crc_key in ((fpath, "crc_features"), (lpath, "crc_labels")):
        if not p.is_file() or p.is_symlink():
            raise ValueError(f"{p.name} is missing")
        if p.stat().st_size != meta.get("bytes_" + p.stem):
            raise ValueError(f"{p.name} has {p.stat().st_size} bytes, expected {meta.get('bytes_' + p.stem)}")
        if _crc(p) != meta.get(crc_key):
            raise ValueError(f"{p.name} fails its checksum")
    feats = np.load(fpath, mmap_mode="c")  # copy-on-write: a writable view (torch wants one); the file never changes
    labels = np.load(lpath)
    if list(feats.shape) != meta.get("shape") or feats.dtype != np.float32 or feats.ndim < 2 \
            or labels.shape != (feats.shape[0],) or labels.dtype != np.int64:
        raise ValueError(f"shape {list(feats.shape)} {feats.dtype} / {list(labels.shape)} {labels.dtype} does not "
                         f"match {meta.get('shape')} float32 / int64")
    if expect is not None:
        if feats.shape[0] != expect.n:
            raise ValueError(f"it has {feats.shape[0]} rows, the data set has {expect.n} images")
        want = expect.row_shape() if expect.row_shape is not None else None
        if want is not None and tuple(feats.shape[1:]) != tuple(want):
            raise ValueError(f"its rows are {list(feats.shape[1:])}, the backbone gives {list(want)}")
        if expect.labels is not None:
            _check_labels(labels, expect.labels, meta.get("replaced", []))
    if not _all_finite(feats):
        raise ValueError("features.npy holds NaN or inf")
    return feats, labels


def _check_labels(labels, want: list[int], replaced: Any) -> None:
    """The stored labels are the data set's, in order; except at ``replaced`` rows (an unreadable image that the
    loader replaced by the next readable one when the entry was written), which hold one of the data set's labels."""
    import numpy as np

    want_a = np.asarray(want, dtype=np.int64)
    if not isinstance(replaced, list) or not all(isinstance(i, int) and 0 <= i < len(want) for i in replaced):
        raise ValueError("meta.json's 'replaced' is not a list of row numbers")
    differ = np.nonzero(labels != want_a)[0]
    bad = sorted(set(differ.tolist()) - set(replaced))
    if bad:
        raise ValueError(f"{len(bad)} labels differ from the data set's (first at row {bad[0]}: {int(labels[bad[0]])}"
                         f", the image's label is {want[bad[0]]})")
    if replaced and not np.isin(labels[replaced], want_a).all():
        raise ValueError("a replaced row's label is not one of the data set's")


def load(root: Path, key: str, expect: Expect | None = None):
    """``(features, labels)`` tensors (features memory-mapped) of entry ``key``, or None when there is none or it is
    damaged or doesn't fit the data set (``expect``; then it is deleted with a warning, so the caller recomputes it).
    A read-only store is read all the same (the last-used time is then left as it is)."""
    import torch

    entry = root / key
    if not entry.is_dir() or entry.is_symlink():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text("utf-8"))
        feats, labels = _check(entry, meta, expect)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, EOFError, SyntaxError, OverflowError) as e:
        log.warning(f"feature cache entry '{entry}' is damaged ({e}); recomputing it")
        shutil.rmtree(entry, ignore_errors=True)
        return None
    try:
        os.utime(entry)  # last used: what 'finetune cache clear --older-than' goes by
    except OSError:  # a read-only store: use the entry all the same
        pass
    return torch.from_numpy(feats), torch.from_numpy(labels)


def _free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _preallocate(path: Path) -> None:
    """Reserve the blocks of ``path`` (``posix_fallocate``), so that a full disk is an ``OSError`` here rather than a
    ``SIGBUS`` (``Bus error``) when a page of the memory map is written later. A file system without it: nothing."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _in_memory(batches) -> tuple[Any, Any]:
    """The rest of a feature stream, in memory, as :func:`.feature_cache.compute_features` returns it."""
    import torch

    feats, labels = [], []
    for f, y in batches:
        feats.append(f.float())
        labels.append(y)
    return torch.cat(feats).clone(), torch.cat(labels).clone()


def size_text(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KB``, ... ``2.0 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def save(root: Path, key: str, meta: dict[str, Any], batches: Callable[[], Any], n: int,
         expect: Expect | None = None):
    """Stream ``batches()`` (an iterator of ``(features, labels)`` CPU tensors, ``n`` rows in all) into a new entry,
    atomically; returns the entry's ``(features, labels)`` as :func:`load` does.

    When the entry cannot be written (too little free space, a full disk, a store that cannot be written, features
    that are not finite) the features are returned in memory instead, with one warning, and nothing is left on disk.
    """
    stream = iter(batches())
    first = next(stream, None)
    if first is None:
        raise RuntimeError(f"expected {n} feature rows, got 0")
    stream = itertools.chain([first], stream)
    row_shape = tuple(first[0].shape[1:])
    need = n * math.prod(row_shape) * 4 + n * 8 + 4096
    free = _free_bytes(root)
    if free < need + MARGIN:
        _warn_once(f"space:{root}", f"feature cache: {size_text(free)} free on the disk of '{root}', the features "
                   f"need {size_text(need)} (+ {size_text(MARGIN)} spare); keeping them in memory this run (free some "
                   f"space, e.g. 'finetune cache clear', or point {option('data.cache_dir')} / FINETUNE_CACHE "
                   "elsewhere)")
        return _in_memory(stream)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
    except OSError as e:
        _warn_once(f"write:{root}", f"feature cache '{root}' cannot be written ({e}); computing the features that "
                   "are not stored there in memory this run")
        return _in_memory(stream)
    try:
        return _write_entry(root, key, tmp, meta, stream, n, row_shape, expect)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _give_up(root: Path, tmp: Path, mm, e: Exception | str):
    """Keep what was computed in memory, drop the temporary directory, warn once."""
    import numpy as np
    import torch

    feats = torch.from_numpy(np.array(mm)) if mm is not None else None
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, str):
        log.warning(e)
    else:
        _warn_once(f"write:{root}", f"feature cache: cannot write to '{root}' ({e}); keeping the features in "
                   f"memory this run (free some space, e.g. 'finetune cache clear', or point {option('data.cache_dir')}"
                   " / FINETUNE_CACHE elsewhere)")
    return feats


def _write_entry(root: Path, key: str, tmp: Path, meta: dict[str, Any], stream, n: int, row_shape: tuple,
                 expect: Expect | None):
    """:func:`save`'s part once the temporary directory exists: fill the memory map, check, commit by rename."""
    import numpy as np
    import torch

    try:
        mm = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32, shape=(n, *row_shape))
        _preallocate(tmp / "features.npy")
    except OSError as e:
        _give_up(root, tmp, None, e)  # nothing written into it yet
        return _in_memory(stream)
    labels = _fill(mm, stream, n)
    if not _all_finite(mm):
        feats = _give_up(root, tmp, mm, f"feature cache: the features of {meta.get('data', 'the data')} "
                         f"({meta.get('split_of_data', '?')}) hold NaN or inf (the backbone overflows at "
                         f"{meta.get('precision', 'this precision')}?); not storing them")
        return feats, torch.from_numpy(labels)
    replaced = []
    if expect is not None and expect.labels is not None and len(expect.labels) == n:
        replaced = np.nonzero(labels != np.asarray(expect.labels, dtype=np.int64))[0].tolist()
    try:
        _commit_files(tmp, mm, labels, {**meta, "key": key, "replaced": replaced})
    except OSError as e:
        return _give_up(root, tmp, mm, e), torch.from_numpy(labels)
    try:
        os.rename(tmp, root / key)
    except OSError:  # another process stored the same entry first: same key, same contents; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    out = load(root, key, expect)
    if out is None:  # not readable after all (theirs was damaged, or the disk): this run keeps its own
        return torch.from_numpy(np.array(mm)), torch.from_numpy(labels)
    return out


def _fill(mm, stream, n: int):
    """Write the stream's rows into the memory map; returns the labels (exactly ``n`` rows, or RuntimeError)."""
    import numpy as np

    labels, row = np.empty(n, dtype=np.int64), 0
    for f, y in stream:
        if row + len(f) > n:
            raise RuntimeError(f"expected {n} feature rows, got more")
        mm[row:row + len(f)] = f.float().numpy()
        labels[row:row + len(f)] = y.numpy()
        row += len(f)
    if row != n:
        raise RuntimeError(f"expected {n} feature rows, got {row}")
    return labels


def _commit_files(tmp: Path, mm, labels, meta: dict[str, Any]) -> None:
    """features.npy and labels.npy made durable, then meta.json with their sizes and checksums (the entry is whole
    once meta.json exists)."""
    import numpy as np

    mm.flush()
    np.save(tmp / "labels.npy", labels)
    for p in (tmp / "features.npy", tmp / "labels.npy"):
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())
    meta = {**meta, "shape": list(mm.shape), "created": time.time(),
            "bytes_features": (tmp / "features.npy").stat().st_size,
            "bytes_labels": (tmp / "labels.npy").stat().st_size,
            "crc_features": _crc(tmp / "features.npy"), "crc_labels": _crc(tmp / "labels.npy")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), "utf-8")


def entries(cache_dir: str | Path | None = None, temp: bool = False) -> list[Entry]:
    """The stored entries (complete ones; with ``temp`` also the temporary directories of writes in progress or
    interrupted, ``Entry.temp``). Symbolic links are not entries."""
    root = features_dir(cache_dir)
    if root is None or not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_symlink() or not d.is_dir():
            continue
        if not d.name.startswith("."):
            try:
                meta = json.loads((d / "meta.json").read_text("utf-8"))
            except (OSError, ValueError):
                meta = {}
            out.append(Entry(d.name, d, meta if isinstance(meta, dict) else {}))
        elif temp and (m := _TMP.match(d.name)):
            out.append(Entry(m.group(1), d, {}, temp=True, pid=int(m.group(2))))
    return out


def parse_age(text: str) -> float:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w`` (or a number of days) -> seconds; positive and finite."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        secs = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t) * 86400
    except ValueError:
        raise ConfigError(f"--older-than '{text}' is not an age; use e.g. 30m, 12h, 7d or 2w") from None
    if not math.isfinite(secs) or secs <= 0:
        raise ConfigError(f"--older-than '{text}' is not a positive age; use a number and a unit, e.g. 30m, 12h, 7d "
                          "or 2w")
    return secs


def _remove(path: Path) -> tuple[bool, int, OSError | None]:
    """Delete directory ``path`` (never through a symbolic link): ``(gone, bytes freed, first error)``."""
    if not path.is_dir() or path.is_symlink():  # removed meanwhile by someone else: not ours to count
        return False, 0, None
    files = {}
    for d, _, names in os.walk(path):  # does not follow symbolic links
        for name in names:
            f = Path(d) / name
            if f.is_file() and not f.is_symlink():
                files[f] = f.stat().st_size
    errors: list[OSError] = []

    def onerror(func, p, exc_info):
        errors.append(exc_info[1])

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda func, p, exc: errors.append(exc))
    else:
        shutil.rmtree(path, onerror=onerror)
    freed = sum(size for f, size in files.items() if not f.exists())
    return not path.exists(), freed, errors[0] if errors else None


@dataclass
class Cleared:
    removed: int = 0  # entries deleted (complete and unfinished)
    unfinished: int = 0  # of which temporary directories of interrupted writes
    freed: int = 0
    failed: list[tuple[Path, OSError | None]] = None  # type: ignore[assignment]
    busy: int = 0  # temporary directories kept: their writer is still running
    backbones: int = 0  # backbones kept for head-only reruns (backbone_store.py): `cache clear` deletes them too


def clear(cache_dir: str | Path | None = None, older_than: float | None = None) -> Cleared:
    """Delete entries (those not used for ``older_than`` seconds, or all) and the temporary directories of writes
    that were interrupted (their process is gone, or they were last written over an hour ago); what was deleted."""
    now, out = time.time(), Cleared(failed=[])
    for e in entries(cache_dir, temp=True):
        if e.temp:
            if e.writer_alive and now - e.last_used < 3600:
                out.busy += 1
                continue
        elif older_than is not None and now - e.last_used <= older_than:
            continue
        gone, freed, err = _remove(e.path)
        out.freed += freed
        if gone:
            out.removed += 1
            out.unfinished += e.temp
        elif e.path.exists():
            out.failed.append((e.path, err))
    root = features_dir(cache_dir)
    memo = root.parent / "digests" if root is not None else None
    if older_than is None and memo is not None and memo.is_dir() and not memo.is_symlink():
        out.freed += _remove(memo)[1]  # the images' digests (see items_identity): a rerun hashes them again
    return out


# ----------------------------------------------------------------------------------------------- the front door


def get_features(compute: Callable[[], Any], batches: Callable[[], Any] | None, n: int, parts: dict[str, Any] | None,
                 *, cache_dir: str | Path | None = None, info: dict[str, Any] | None = None,
                 row_shape: Callable[[], tuple[int, ...] | None] | None = None):
    """``(features, labels, hit)``: from the store when an entry for ``parts`` exists and fits the data set (``n``
    rows, the labels of ``parts['items']``, rows of ``row_shape()``), else computed (streamed into a new entry by
    ``batches``, or in memory by ``compute`` when there is no store or no key, or when the entry cannot be written)."""
    root = features_dir(cache_dir)
    if root is None or parts is None or batches is None:
        f, y = compute()
        return f, y, False
    key = make_key(parts)
    expect = expected(parts, n, row_shape)
    got = load(root, key, expect)
    if got is not None:
        return got[0], got[1], True
    f, y = save(root, key, {**(info or {}), "parts": {k: v for k, v in parts.items() if k != "items"},
                            "images": n}, batches, n, expect)
    return f, y, False


def stream_features(frozen, dataset, *, batch_size: int = 64, device="cpu", precision: str = "fp32",
                    channels_last: bool = False, workers: int | None = None, num_replicas: int = 1, rank: int = 0,
                    fast: str = "auto"):
    """Yield ``(features, labels)`` CPU batches of ``frozen`` over ``dataset`` in order, as
    :func:`.feature_cache.compute_features` computes them (eval mode, ``inference_mode``, the run's precision;
    ``fast`` auto: on a conv+BN-folded copy, :mod:`finetune.models.fold`). With ``num_replicas`` > 1: only the
    images ``rank, rank + num_replicas, ...`` (the evaluation sampler's shard)."""
    import torch

    from finetune.data import make_loader
    from finetune.training.engine import autocast, to_device
    from finetune.models.fold import FastInference

    device = torch.device(device)
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, device=device.type, workers=workers,
                         num_replicas=num_replicas, rank=rank)
    was = frozen.training
    frozen.eval()
    run = FastInference(frozen, fast)
    told = Progress(-(-len(dataset) // num_replicas))
    try:
        with torch.inference_mode():
            for x, y in loader:
                x, _ = to_device(x, y, device, channels_last)
                with autocast(device, precision):
                    f = run(x)
                yield f.float().cpu(), y
                told.step(len(y))
    finally:
        frozen.train(was)


class Progress:
    """A line now and then while the frozen part runs over the images (the first run of a probe on a few thousand
    photos takes minutes on a CPU, and said nothing until it was done): every ``FINETUNE_PROGRESS_SECONDS`` (30 s;
    the first after 10 s), through the ``finetune`` logger, so the CLI prints it with or without a terminal."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.t0 = self.last = time.monotonic()
        try:
            self.every = float(os.environ.get("FINETUNE_PROGRESS_SECONDS", "30"))
        except ValueError:
            self.every = 30.0
        self.first = min(10.0, self.every)

    def step(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        wait = self.first if self.last == self.t0 else self.every
        if now - self.last < wait or self.done >= self.total or self.every <= 0:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / max(rate, 1e-9)
        log.info(f"frozen features: {self.done}/{self.total} images ({100 * self.done / self.total:.0f}%), "
                 f"{rate:.1f} img/s, about {_duration(left)} left")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s} s"
