"""The decoded-image cache on disk, for data sets larger than RAM.

Same content as the RAM cache (:func:`finetune.data.datasets.decode`: uint8 CHW at the pre-crop size), stored in
one flat file of raw bytes plus an index (offset and shape per file, and the files that failed to decode with
their reasons). Items are read with ``os.pread`` into a fresh buffer: the bytes come from the kernel's page cache
(shared by DataLoader workers and by the processes of one machine) and are never counted in a process's RSS, which
a ``numpy.memmap`` would do for every page it touches (benchmarks/ram_bench.py: 1.67x the peak RSS for 8x the
data through a memmap, 1.01x with pread), though the kernel could drop those pages. Cached and RAM-cached items
are bitwise equal (the same bytes).

Each fill has a random id, written both into the index and into a trailer after the data file's last record; the
index also records the data size and the crc32 of a sample of records. On open (once, not per read) the data file
is checked against its index: an index paired with another fill's data (two runs filling one ``--cache-dir`` at
once), a truncated or damaged file is decoded again, with one warning, instead of serving wrong images.

Where: ``data.cache_dir`` (kept after the run, and reused by a later run with the same files and pre-crop size: the
file name carries a hash of the paths, sizes, mtimes and the resize settings), else the run directory (or the
system temp folder outside a run), where the files are unlinked as soon as every process has opened them (Linux):
the space is freed when the run's processes exit, even after ``kill -9``, and nothing is left to clean up. Under
torchrun, local rank 0 of each machine decodes; the other ranks wait for its index, then read the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from finetune.errors import DataError

log = logging.getLogger("finetune")
VERSION = 2  # 2: the data file ends with a trailer holding the fill id the index records
TRAILER_MAGIC = b"finetune-imagecache-fill:"
TRAILER_BYTES = 64
CHECKED = 8  # records whose crc32 is compared on open
PREFIX = ".imagecache-"  # in a run directory: ".NAME.tmp" files are the run's own temp files (--overwrite)


class DiskImages(Sequence):
    """uint8 CHW tensors of some files of a :class:`DiskStore`, by position (what ``ImageDataset.cache`` takes)."""

    def __init__(self, store: DiskStore, offsets: np.ndarray, shapes: np.ndarray):
        self.store, self.offsets, self.shapes = store, offsets, shapes

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        c, h, w = (int(v) for v in self.shapes[i])
        buf = self.store.pread(int(self.offsets[i]), c * h * w)
        return torch.frombuffer(buf, dtype=torch.uint8).view(c, h, w)


class DiskStore:
    """One cache file (opened read-only) and its index ``{path: (offset, c, h, w)}`` / ``{path: reason}``."""

    def __init__(self, data_path: Path, index: dict, *, kept: bool):
        self.data_path, self.kept = Path(data_path), kept
        self.slots: dict[str, tuple[int, int, int, int]] = {str(p): tuple(int(x) for x in v)
                                                             for p, v in index["slots"].items()}
        if any(len(v) != 4 for v in self.slots.values()):
            raise ValueError("slot of the wrong length")
        self.bad: dict[str, str] = {str(p): str(r) for p, r in index["bad"].items()}
        self.nbytes = int(index.get("nbytes", 0))
        self.fill = str(index.get("fill", ""))
        self.check = [tuple(int(x) for x in c) for c in index.get("check", [])]
        self.fd = os.open(self.data_path, os.O_RDONLY)

    def mismatch(self) -> str:
        """Why the open data file is not the one this index was written with ("" when it is): the data size, the
        fill id in the file's trailer and the crc32 of a sample of records must match (read once, on open: the
        trailer and a few records, not the whole file)."""
        if not self.fill:
            return "the index has no fill id"
        size = os.fstat(self.fd).st_size
        if size != self.nbytes + TRAILER_BYTES:
            return f"the data file has {size:,} bytes, the index expects {self.nbytes + TRAILER_BYTES:,}"
        try:
            if bytes(self.pread(self.nbytes, TRAILER_BYTES)) != trailer(self.fill):
                return "the data file comes from another fill"
            for off, n, crc in self.check:
                if zlib.crc32(self.pread(off, n)) != crc:
                    return f"the record at byte {off:,} fails its checksum"
        except DataError:
            return "the data file is truncated"
        return ""

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def pread(self, offset: int, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:  # pread may return less than asked (signals, huge reads)
            k = os.preadv(self.fd, [view[got:]], offset + got)
            if k <= 0:
                raise DataError(f"the image cache '{self.data_path}' is truncated; delete it and run again")
            got += k
        return buf

    def lookup(self, path: Path):
        """The slot of ``path`` (for :func:`finetune.data.build.select_items`), or the recorded read error."""
        key = str(path)
        if key in self.bad:
            raise DataError(f"cannot read image '{path}': {self.bad[key]}")
        return self.slots[key]

    def images(self, paths: Sequence[Path]) -> DiskImages:
        s = np.array([self.slots[str(p)] for p in paths], dtype=np.int64).reshape(-1, 4)
        return DiskImages(self, s[:, 0].copy(), s[:, 1:].astype(np.int32))

    def __del__(self):  # forked DataLoader workers inherit the descriptor (each closes its own copy)
        fd = getattr(self, "fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def cache_key(paths: Sequence[Path], tf: dict) -> str:
    """A hash of what the cached bytes depend on: each file's path, size and mtime, the pre-crop size and the
    interpolation (and this format's version)."""
    h = hashlib.sha256(json.dumps([VERSION, int(tf["resize"]), tf["interpolation"]]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:20]


def free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _local_rank() -> tuple[int, bool]:
    """(local rank, several processes on this machine)."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1


def _names(folder: Path, key: str, kept: bool) -> tuple[Path, Path]:
    host = socket.gethostname() if int(os.environ.get("WORLD_SIZE", 1)) > int(os.environ.get("LOCAL_WORLD_SIZE", 1)) \
        else ""  # several machines may share the folder: one file per machine
    stem = f"{'finetune-imagecache-' if kept else PREFIX}{key}{'-' + host if host else ''}"
    tail = "" if kept else ".tmp"
    return folder / f"{stem}.bin{tail}", folder / f"{stem}.json{tail}"


def open_store(paths: Sequence[Path], tf: dict, *, cache_dir: str | None, scratch: Path | None,
               read_all) -> DiskStore:
    """The disk cache of ``paths``: reused when a complete one with the same key exists in ``cache_dir``, else
    decoded once (by local rank 0; ``read_all(paths, fn)`` is the toolkit's threaded reader)."""
    kept = cache_dir is not None
    folder = Path(cache_dir).expanduser() if kept else Path(scratch or tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the image cache folder '{folder}': {e.strerror}; pass another "
                        "--cache-dir") from None
    data_path, index_path = _names(folder, cache_key(paths, tf), kept)
    rank, shared = _local_rank()
    if not index_path.is_file():
        if rank == 0:
            _fill(paths, tf, data_path, index_path, read_all)
        else:
            _wait_for(index_path)
    else:
        log.info("reusing the image cache '%s'", data_path)
    store, why = _load(data_path, index_path, kept)
    while store is None:
        if rank == 0:  # an index paired with another fill's data (two runs filling one --cache-dir), a damaged file
            log.warning("the image cache '%s' does not match its index (%s); decoding the images again",
                        data_path, why)
            _fill(paths, tf, data_path, index_path, read_all)
            store, why = _load(data_path, index_path, kept)
            if store is None:
                raise DataError(f"the image cache '{data_path}' was just written and does not match its index "
                                f"({why}); is another process writing it? delete it and run again")
        else:  # local rank 0 refills it
            time.sleep(0.2)
            store, why = _load(data_path, index_path, kept)
    if not kept:
        _unlink_when_opened(data_path, index_path, rank, shared)
    return store


def _load(data_path: Path, index_path: Path, kept: bool) -> tuple[DiskStore | None, str]:
    """The store, verified against its data file (see :meth:`DiskStore.mismatch`), or None and why not."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "the index is missing"
    except (OSError, ValueError, RecursionError):
        return None, "the index cannot be read"
    try:
        store = DiskStore(data_path, index, kept=kept)
    except FileNotFoundError:
        return None, "the data file is missing"
    except OSError as e:
        raise DataError(f"cannot read the image cache '{data_path}': {e.strerror or e}; pass another --cache-dir "
                        "(or data.cache: off)") from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
        return None, "the index is damaged"
    why = store.mismatch()
    if why:
        store.close()
        return None, why
    return store, ""


def trailer(fill: str) -> bytes:
    """The bytes after the last record of a data file: they tie it to the index written with it."""
    return (TRAILER_MAGIC + fill.encode("ascii")).ljust(TRAILER_BYTES, b"\0")[:TRAILER_BYTES]


def _fill(paths, tf: dict, data_path: Path, index_path: Path, read_all) -> None:
    """Decode every file into ``data_path`` (a temp name first; the index is written last, atomically: a cache
    without its index is incomplete and is rebuilt)."""
    from finetune.data.datasets import decode

    tmp = data_path.with_suffix(f".{os.getpid()}{data_path.suffix}")  # in a run dir: .imagecache-K.bin.PID.tmp
    lock = threading.Lock()
    t0 = time.perf_counter()
    fill = secrets.token_hex(16)
    crcs: dict[int, int] = {}
    with open(tmp, "wb") as f:
        def write(p: Path):
            img = decode(p, tf).numpy()
            data = img.tobytes()
            crc = zlib.crc32(data)
            with lock:
                off = f.tell()
                f.write(data)
                crcs[off] = crc
            return (off, *img.shape)

        try:
            slots, bad = read_all(paths, write)
            nbytes = f.tell()
            f.write(trailer(fill))
        except OSError as e:
            f.close()
            tmp.unlink(missing_ok=True)
            raise DataError(f"cannot write the image cache '{data_path}': {e.strerror}; free space or pass "
                            "another --cache-dir (or data.cache: off)") from None
    os.replace(tmp, data_path)
    order = sorted(slots.values())
    sample = order[::max(1, -(-len(order) // CHECKED))][:CHECKED]  # evenly over the file
    index = {"slots": {str(p): list(v) for p, v in slots.items()}, "bad": {str(p): r for p, r in bad.items()},
             "nbytes": nbytes, "fill": fill,
             "check": [[int(v[0]), int(v[1] * v[2] * v[3]), crcs[v[0]]] for v in sample]}
    part = index_path.with_suffix(f".{os.getpid()}{index_path.suffix}")
    part.write_text(json.dumps(index))
    os.replace(part, index_path)
    log.info("decoded %d images into the image cache '%s' (%.2f GB) in %.1f s", len(slots), data_path,
             nbytes / 1e9, time.perf_counter() - t0)


def _wait_for(index_path: Path) -> None:
    """Another process of this machine fills the cache (it may take hours for a big data set: no timeout; torchrun
    stops this process if that one fails)."""
    while not index_path.is_file():
        time.sleep(0.2)


def _unlink_when_opened(data_path: Path, index_path: Path, rank: int, shared: bool) -> None:
    """Remove a run's own cache files once every process of this machine has them open (Linux keeps an open file's
    data until the last descriptor closes); elsewhere remove them at exit."""
    if sys.platform != "linux":
        import atexit

        if rank == 0:
            atexit.register(lambda: [p.unlink(missing_ok=True) for p in (data_path, index_path)])
        return
    if shared and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has opened the file
    if rank == 0:
        for p in (data_path, index_path):
            p.unlink(missing_ok=True)
