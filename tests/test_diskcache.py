"""The decoded-image cache on disk (finetune/data/diskcache.py): bitwise equal to the RAM cache, shared by
DataLoader workers, removed (a run's own) or kept and reused (--cache-dir), bad files recorded."""

from __future__ import annotations

import os

import torch

from finetune.config import DataCfg
from finetune.data import build_data, make_loader
from finetune.data import datasets as datasets_mod
from finetune.data.diskcache import DiskImages
from test_data import SMALL, tree


def cfg(root, **kw) -> DataCfg:
    return DataCfg(path=str(root), **{"augment": "strong", "image_size": 16, **kw})


def test_disk_cache_equals_ram_cache_bitwise_and_leaves_nothing(tmp_path):
    tree(tmp_path / "d", {"train/a": 5, "train/b": 4, "val/a": 2, "val/b": 2}, size=(40, 30), ext=".jpg")
    scratch = tmp_path / "run"
    scratch.mkdir()
    ram = build_data(cfg(tmp_path / "d", cache="ram"), SMALL)
    disk = build_data(cfg(tmp_path / "d", cache="disk"), SMALL, scratch=scratch)
    assert (ram.cache_kind, disk.cache_kind) == ("ram", "disk") and isinstance(disk.train.cache, DiskImages)
    assert os.listdir(scratch) == []  # a run's own cache is unlinked once opened (the open descriptor keeps it)
    assert len(disk.train.cache) == 9 and len(disk.val.cache) == 4
    for a, b in ((ram.train, disk.train), (ram.val, disk.val)):
        for i in range(len(a)):
            assert a.cache[i].dtype == b.cache[i].dtype == torch.uint8
            assert torch.equal(a.cache[i], b.cache[i]) and a.cache[i].shape == (3, 16, 21)
    # through forked DataLoader workers (they share the descriptor), strong augmentation: the same batches
    # (9 images in batches of 4: the batch of one is dropped)
    batches = [[x for x, _ in make_loader(b.train, 4, shuffle=True, seed=5, workers=2)] for b in (ram, disk)]
    assert len(batches[0]) == 2 and all(torch.equal(x, y) for x, y in zip(*batches))
    assert all(torch.equal(ram.val[i][0], disk.val[i][0]) for i in range(4))


def test_kept_cache_is_reused_and_records_bad_files(tmp_path, monkeypatch):
    root = tree(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"not a png")
    keep = tmp_path / "cache"
    first = build_data(cfg(root, cache="disk", cache_dir=str(keep), val_split=0), SMALL)
    files = sorted(os.listdir(keep))
    assert len(files) == 2 and files[0].startswith("finetune-imagecache-") and files[0].endswith(".bin")
    assert first.skipped == [str(root / "a" / "broken.png")] and len(first.train) == 6
    calls = []
    real = datasets_mod.decode
    monkeypatch.setattr(datasets_mod, "decode", lambda p, tf: calls.append(p) or real(p, tf))
    again = build_data(cfg(root, cache="disk", cache_dir=str(keep), val_split=0), SMALL)
    assert calls == [] and again.skipped == first.skipped  # nothing decoded: the kept cache served
    assert all(torch.equal(first.train.cache[i], again.train.cache[i]) for i in range(6))
    os.utime(root / "b" / "b_0.png", ns=(1, 1))  # a changed file: a new key, decoded again
    build_data(cfg(root, cache="disk", cache_dir=str(keep), val_split=0), SMALL)
    assert len(calls) == 7 and len(os.listdir(keep)) == 4


def test_a_run_through_the_disk_cache_trains_the_same_weights_and_cleans_up(tmp_path):
    from finetune import config
    from finetune.api import train

    from helpers import tiny_tree

    data = tiny_tree(tmp_path / "data", per_class=8)

    def run(name, cache):
        r = config.apply_overrides(config.load_recipe("default"), {
            "data.path": str(data), "data.val_split": 0.25, "train.epochs": 1, "train.batch_size": 8,
            "train.precision": "fp32", "train.tensorboard": False, "train.report": False, "data.cache": cache})
        train(r, out=tmp_path / name)
        return torch.load(tmp_path / name / "last.pt", weights_only=True)["model"], sorted(os.listdir(tmp_path / name))

    (ram, ram_files), (disk, disk_files) = run("ram", "ram"), run("disk", "disk")
    assert all(torch.equal(ram[k], disk[k]) for k in ram)  # bitwise
    assert disk_files == ram_files and not any("imagecache" in f for f in disk_files)
