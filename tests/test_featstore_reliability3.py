"""Feature store, reliability round 3 (issue 27 rows 5, 6, 7, 8, 17): a full disk, a read-only store, images
rewritten with the same size and mtime, tampered entries whose checksums were re-signed, bad --older-than ages."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finetune.speedups import feature_store as featstore
from helpers import tiny_tree
from test_featstore import prep


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(featstore, "_WARNED", set(), raising=False)  # it warns once per cause and store in a process


@pytest.fixture
def data(tmp_path) -> Path:
    return tiny_tree(tmp_path / "data", per_class=10)


def uncached(data, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setenv("FINETUNE_CACHE", "off")
        return prep(data, **kw)


def store_files() -> list[str]:
    root = featstore.features_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.is_dir() else []


def messages(caplog, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


def same(a, b) -> bool:
    return torch.equal(a.train[0], b.train[0]) and torch.equal(a.train[1], b.train[1]) and \
        torch.equal(a.val[0], b.val[0]) and torch.equal(a.val[1], b.val[1])


# ----------------------------------------------------------------------------------------------- row 5: full disk


def test_too_little_free_space_keeps_features_in_memory_with_one_warning(data, monkeypatch, caplog):
    want = uncached(data, monkeypatch)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10 << 30, used=10 << 30, free=5000))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        got = prep(data)
    root = featstore.features_dir()
    assert messages(caplog, "feature cache") == [
        f"feature cache: 4.9 KB free on the disk of '{root}', the features need 10.2 KB (+ 64.0 MB spare); keeping "
        "them in memory this run (free some space, e.g. 'finetune cache clear', or point data.cache_dir / "
        "FINETUNE_CACHE elsewhere)"]
    assert not got.from_store and same(got, want)
    assert store_files() == []  # not even the features/ folder's temporary directories


def test_full_disk_while_reserving_the_file_is_a_warning_not_a_bus_error(data, monkeypatch, caplog):
    """The free-space check passed but the disk filled up (another writer): posix_fallocate says ENOSPC before a
    page of the memory map is touched, so it is an OSError (a warning), never a SIGBUS."""
    want = uncached(data, monkeypatch)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        got = prep(data)
    root = featstore.features_dir()
    assert messages(caplog, "feature cache") == [
        f"feature cache: cannot write to '{root}' ([Errno 28] No space left on device); keeping the features in "
        "memory this run (free some space, e.g. 'finetune cache clear', or point data.cache_dir / FINETUNE_CACHE "
        "elsewhere)"]
    assert not got.from_store and same(got, want)
    assert store_files() == []  # the temporary entry is gone


def test_linear_probe_train_on_a_full_disk_completes(tmp_path, monkeypatch, caplog):
    from finetune import config
    from finetune.run.runner import train

    over = {"train.epochs": 1, "train.batch_size": 64, "train.precision": "fp32", "train.tensorboard": False,
            "data.image_size": 32, "data.augment": "none", "freeze.backbone": True, "train.cache_features": "on",
            "data.path": str(tiny_tree(tmp_path / "data", per_class=8))}
    off = train(config.apply_overrides(config.load_recipe("default"), {**over, "train.cache_features": "off"}),
                out=tmp_path / "off")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10 << 30, used=10 << 30, free=0))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        res = train(config.apply_overrides(config.load_recipe("default"), over), out=tmp_path / "full")
    assert len(messages(caplog, "feature cache: 0 B free")) == 1
    assert [e["val_acc"] for e in res.epochs] == [e["val_acc"] for e in off.epochs]
    assert (tmp_path / "full" / "last.pt").is_file() and store_files() == []


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


@pytest.mark.subprocess
def test_unfinished_entries_are_listed_and_cleared(data, cli):
    prep(data)
    root = featstore.features_dir()
    killed = root / f".{'a' * 64}.tmp-{_dead_pid()}-123"  # what a fill killed mid-write leaves
    killed.mkdir()
    (killed / "features.npy").write_bytes(b"\0" * 3000)
    running = root / f".{'b' * 64}.tmp-{os.getpid()}-456"  # a write in progress (this process)
    running.mkdir()
    (running / "features.npy").write_bytes(b"\0" * 100)
    doc = json.loads(cli("cache", "list", "--json").stdout)
    temp = sorted((e["key"][:1], e["unfinished"], e["writer_running"], e["bytes"]) for e in doc["entries"]
                  if e["unfinished"])
    assert temp == [("a", True, False, 3000), ("b", True, True, 100)] and len(doc["entries"]) == 4
    r = cli("cache", "list")
    total = sum(e["bytes"] for e in doc["entries"]) / 1024
    # the model column's cells (the data paths show whole now, and this test's tmp folder says "unfinished")
    cells = [x.split("│")[1].strip() for x in r.stdout.splitlines() if x.startswith("│")]
    assert cells.count("unfinished") == 2 and r.stdout.endswith(f"\n2 entries, {total:.1f} KB (2 unfinished)\n")
    r = cli("cache", "clear", "--older-than", "7d")  # the complete entries are fresh: only the leftover goes
    assert r.exit_code == 0
    assert r.stdout == (f"removed 1 entries (2.9 KB, 1 of them unfinished) from {root}\n"
                        "kept 1 unfinished entries that a running process is still writing\n")
    assert not killed.exists() and running.exists() and len(featstore.entries()) == 2


# ----------------------------------------------------------------------------------------------- row 6: read-only


def test_read_only_store_hit_is_used(data, monkeypatch):
    first = prep(data)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "utime", denied)
    again = prep(data)
    assert again.from_store and same(again, first)


def _deny_under(monkeypatch, root: Path, *names: str) -> None:
    """``os.<name>`` raises PermissionError for paths under ``root`` (and for shutil.rmtree's relative, dir_fd
    calls): a read-only folder, as root (whom chmod does not stop) sees it."""
    for name in names:
        real = getattr(os, name)

        def denied(path, *a, _real=real, **k):
            if k.get("dir_fd") is not None or str(path).startswith(str(root)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return _real(path, *a, **k)

        monkeypatch.setattr(os, name, denied)


def test_read_only_store_miss_is_computed_in_memory(data, monkeypatch, caplog):
    want = uncached(data, monkeypatch)
    root = featstore.features_dir()
    _deny_under(monkeypatch, root.parent, "mkdir")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        got = prep(data)
    assert messages(caplog, "feature cache") == [
        f"feature cache '{root}' cannot be written ([Errno 13] Permission denied: '{root}'); computing the "
        "features that are not stored there in memory this run"]
    assert not got.from_store and same(got, want) and not root.exists()


def test_clear_reports_only_what_it_deleted(data, cli, monkeypatch):
    prep(data)
    root = featstore.features_dir()
    before = store_files()
    _deny_under(monkeypatch, root, "unlink", "rmdir")
    r = cli("cache", "clear")
    assert r.stdout == f"removed 0 entries (0 B) from {root}\n"
    assert r.exit_code == 1 and r.stderr.startswith("Error: could not delete 2 cache entries, e.g. '")
    assert r.stderr.strip().endswith("(Permission denied); check the permissions of the cache folder "
                                     "(--cache-dir / FINETUNE_CACHE)")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert store_files() == before  # nothing was deleted, and nothing claimed


# ----------------------------------------------------------------------------------------------- row 7: stale


def bmp_tree(root: Path) -> Path:
    from PIL import Image

    for c, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            px = np.random.default_rng(10 * c + i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.bmp")
    return root


def test_image_rewritten_with_same_size_and_mtime_is_a_miss(tmp_path, monkeypatch):
    from PIL import Image

    data = bmp_tree(tmp_path / "data")
    first = prep(data)
    assert prep(data).from_store
    for img in sorted(data.rglob("*.bmp")):  # every image rewritten, as 'cp -p' of other files would
        st = img.stat()
        px = np.random.default_rng(st.st_size + len(img.name)).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(px).save(img)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (img.stat().st_size, img.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = prep(data)
    want = uncached(data, monkeypatch)
    assert not again.from_store and same(again, want) and not torch.equal(again.train[0], first.train[0])
    assert prep(data).from_store


def test_digests_are_remembered_across_processes_until_a_file_changes(tmp_path, monkeypatch):
    """A cached rerun in a new process hashes nothing (the digests are remembered in <cache>/digests/ per (device,
    inode, size, mtime, ctime)); a file rewritten with the same size and mtime has a new ctime: hashed again."""
    from PIL import Image

    data = bmp_tree(tmp_path / "data")
    monkeypatch.setattr(featstore, "_RACY_NS", -(10 ** 15))  # the files are seconds old: remember them at once
    hashed = []
    real = featstore._hash_file
    monkeypatch.setattr(featstore, "_hash_file", lambda p: hashed.append(p) or real(p))
    first = prep(data)
    assert len(hashed) == 24 and len(set(hashed)) == 24  # 19 train + 5 val images, each once
    assert len(list((featstore.features_dir().parent / "digests").iterdir())) == 2  # one memo per split
    featstore._DIGEST.clear()  # a new process
    hashed.clear()
    again = prep(data)
    assert again.from_store and hashed == [] and same(again, first)
    img = sorted(data.rglob("*.bmp"))[0]
    st = img.stat()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    featstore._DIGEST.clear()
    changed = prep(data)
    assert hashed == [str(img.resolve())] and not changed.from_store


# ----------------------------------------------------------------------------------------------- row 8: tampered


def resign(entry: Path, feats=None, labels=None, meta=None) -> None:
    """Write tampered arrays and fix up meta.json's sizes, shape and checksums, as a careful tamperer would."""
    m = json.loads((entry / "meta.json").read_text())
    if feats is not None:
        np.save(entry / "features.npy", feats)
        m["shape"] = list(feats.shape)
    if labels is not None:
        np.save(entry / "labels.npy", labels)
    for stem in ("features", "labels"):
        blob = (entry / f"{stem}.npy").read_bytes()
        m[f"bytes_{stem}"], m[f"crc_{stem}"] = len(blob), zlib.crc32(blob)
    (entry / "meta.json").write_text(json.dumps(meta if meta is not None else m))


@pytest.mark.parametrize("tamper", ["out_of_range", "swapped", "fewer_rows", "row_shape", "meta_list", "nan",
                                    "labels_float"])
def test_tampered_resigned_entry_is_recomputed(data, caplog, tamper):
    good = prep(data)
    good_x, good_y = good.train[0].clone(), good.train[1].clone()
    entry = next(e for e in featstore.entries() if e.meta["split_of_data"] == "train").path
    x, y = np.load(entry / "features.npy"), np.load(entry / "labels.npy")
    n, d = x.shape
    if tamper == "out_of_range":
        y[0] = 7
        resign(entry, labels=y)
        why = f"1 labels differ from the data set's (first at row 0: 7, the image's label is {int(good_y[0])})"
    elif tamper == "swapped":
        j = int(np.nonzero(y != y[0])[0][0])
        y[0], y[j] = y[j], y[0]
        resign(entry, labels=y)
        why = f"2 labels differ from the data set's (first at row 0: {int(good_y[j])}, the image's label is " \
              f"{int(good_y[0])})"
    elif tamper == "fewer_rows":
        resign(entry, feats=x[:-1], labels=y[:-1])
        why = f"it has {n - 1} rows, the data set has {n} images"
    elif tamper == "row_shape":
        resign(entry, feats=np.ascontiguousarray(x[:, : d // 2]))
        why = f"its rows are [{d // 2}], the backbone gives [{d}]"
    elif tamper == "meta_list":
        resign(entry, meta=[1, 2])
        why = "meta.json holds a list, not an object"
    elif tamper == "nan":
        x[3, 1] = np.nan
        resign(entry, feats=x)
        why = "features.npy holds NaN or inf"
    else:
        resign(entry, labels=y.astype(np.float64))
        why = f"shape [{n}, {d}] float32 / [{n}] float64 does not match [{n}, {d}] float32 / int64"
    with caplog.at_level(logging.WARNING, logger="finetune"):
        again = prep(data)
    assert messages(caplog, "damaged") == [f"feature cache entry '{entry}' is damaged ({why}); recomputing it"]
    assert not again.from_store
    assert torch.equal(again.train[0], good_x) and torch.equal(again.train[1], good_y)
    assert prep(data).from_store  # rewritten whole


# ----------------------------------------------------------------------------------------------- row 17: ages


@pytest.mark.parametrize("age", ["-1d", "0", "0h", "nan", "inf", "-inf", "nand", "1e400d"])
def test_non_positive_or_non_finite_age_is_refused(data, cli, age):
    prep(data)
    before = store_files()
    r = cli("cache", "clear", "--older-than", age)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == (f"Error: --older-than '{age}' is not a positive age; use a number and a unit, e.g. 30m, "
                        "12h, 7d or 2w\n")
    assert store_files() == before
