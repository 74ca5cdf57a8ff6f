"""The persistent feature store: what invalidates an entry, what hits, damaged entries, cache list/clear."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from finetune.speedups import feature_store as featstore
from finetune.tools import probe as P
from helpers import tiny_tree


@pytest.fixture
def data(tmp_path) -> Path:
    return tiny_tree(tmp_path / "data", per_class=10)


def prep(data, recipe_over=None, **kw):
    from finetune import config

    over = dict(weights="none", data=str(data), image_size=32, epochs=1, precision="fp32", device="cpu", seed=0)
    over.update(kw)
    return P.prepare(config.apply_overrides(P.probe_recipe("smallcnn", **over), recipe_over or {}))


def n_entries() -> int:
    return len(featstore.entries())


def test_unchanged_hits_and_every_key_part_invalidates(data, tmp_path):
    torch.manual_seed(0)
    from finetune.models import build_model

    wfile = tmp_path / "w.pth"
    torch.save(build_model("smallcnn", num_classes=3).model.state_dict(), wfile)
    first = prep(data, weights=str(wfile))
    assert not first.from_store and n_entries() == 2  # train + val
    again = prep(data, weights=str(wfile))
    assert again.from_store and n_entries() == 2
    assert torch.equal(again.train[0], first.train[0]) and torch.equal(again.val[1], first.val[1])
    # a changed image: its size/mtime change the key of the split it is in (train or val) and nothing else
    img = sorted((data / "a").iterdir())[0]
    img.write_bytes(img.read_bytes() + b"\0")
    changed = prep(data, weights=str(wfile))
    assert not changed.from_store and n_entries() == 3
    assert prep(data, weights=str(wfile)).from_store
    # another transform (normalisation), precision, weights file: each a miss
    assert not prep(data, {"data.mean": [0.4, 0.4, 0.4]}, weights=str(wfile)).from_store
    assert not prep(data, weights=str(wfile), precision="bf16").from_store
    torch.manual_seed(1)
    torch.save(build_model("smallcnn", num_classes=3).model.state_dict(), wfile)
    after = prep(data, weights=str(wfile))
    assert not after.from_store and not torch.equal(after.train[0], changed.train[0])
    assert n_entries() == 9


def test_random_init_is_keyed_by_the_tensors(data):
    """weights none: the seed decides the backbone, so the tensors' hash (not the word 'none') is the identity."""
    a = prep(data, seed=0)
    assert prep(data, seed=0).from_store
    b = prep(data, seed=1)
    assert not b.from_store and not torch.equal(a.train[0], b.train[0])


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_entry_is_recomputed_never_used(data, caplog, damage):
    good = prep(data)
    good_x, good_y = good.train[0].clone(), good.train[1].clone()  # good's tensors map the file we damage
    entry = next(e for e in featstore.entries() if e.meta["split_of_data"] == "train")
    f = entry.path / "features.npy"
    blob = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(blob[: len(blob) - 100]))
        why = f"features.npy has {len(blob) - 100} bytes, expected {len(blob)}"
    elif damage == "flip":
        blob[-5] ^= 0xFF
        f.write_bytes(bytes(blob))
        why = "features.npy fails its checksum"
    else:
        (entry.path / "meta.json").write_text("{not json")
        why = "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    with caplog.at_level(logging.WARNING, logger="finetune"):
        again = prep(data)
    assert not again.from_store
    assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] == [
        f"feature cache entry '{entry.path}' is damaged ({why}); recomputing it"]
    assert torch.equal(again.train[0], good_x) and torch.equal(again.train[1], good_y)
    assert prep(data).from_store  # rewritten whole


def test_interrupted_write_leaves_no_entry(data, monkeypatch):
    import finetune.speedups.feature_store as FS

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(FS, "_crc", boom)
    with pytest.raises(KeyboardInterrupt):
        prep(data)
    root = featstore.features_dir()
    assert list(root.iterdir()) == []  # neither an entry nor the temporary directory


def test_features_are_memory_mapped_from_disk(data):
    p = prep(data)
    entry = next(e for e in featstore.entries() if e.meta["split_of_data"] == "train")
    import numpy as np

    on_disk = np.load(entry.path / "features.npy")
    assert entry.meta["shape"] == list(on_disk.shape) == list(p.train[0].shape)
    assert torch.equal(torch.from_numpy(on_disk), p.train[0])
    # the tensor is a view of the mapped file, not a copy in the process's heap
    assert p.train[0].untyped_storage().nbytes() == on_disk.nbytes


def test_cache_off_writes_nothing(data, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    assert not prep(data).from_store and not prep(data).from_store


def test_cache_list_and_clear(data, cli):
    prep(data)
    r = cli("cache", "list", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["root"] == str(featstore.features_dir())
    assert sorted((e["split"], e["images"], e["model"]) for e in doc["entries"]) == [
        ("train", 24, "smallcnn"), ("val", 6, "smallcnn")]
    assert cli("cache", "clear", "--older-than", "1d").stdout.startswith("removed 0 entries (0 B)")
    old = featstore.entries()[0]
    os.utime(old.path, (0, 0))  # unused since 1970
    size = old.bytes
    r = cli("cache", "clear", "--older-than", "7d")
    assert r.stdout.startswith(f"removed 1 entries ({size / 1024:.1f} KB)") and len(featstore.entries()) == 1
    r = cli("cache", "clear")
    assert r.stdout.startswith("removed 1 entries") and featstore.entries() == []


def test_cache_dir_flag_overrides_env(tmp_path, cli):
    r = cli("cache", "list", "--json", "--cache-dir", tmp_path / "elsewhere")
    assert json.loads(r.stdout) == {"root": str(tmp_path / "elsewhere" / "features"), "entries": []}
