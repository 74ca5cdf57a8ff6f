"""Streaming tar shards (finetune/data/shards.py): brace patterns, labels and counts, each sample once per epoch
across DataLoader workers and ranks, a deterministic order per (seed, epoch), exact skipping for a mid-epoch
resume, and a run that resumes at an epoch boundary bitwise."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import DataCfg
from finetune.data import build_data, build_eval_dataset, make_loader, set_epoch
from finetune.data.shards import expand
from finetune.errors import DataError
from finetune.models.smallcnn import DEFAULT_CFG

SMALL = dict(DEFAULT_CFG)
CLASSES = ("ant", "bee", "cat")


def _png(i: int) -> bytes:
    """A solid 12x10 image whose first pixel encodes ``i`` (R = i % 256, G = i // 256)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 12, 3), (i % 256, i // 256, 7), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, sizes: list[int], label: str = "txt", start: int = 0) -> list[int]:
    """Shards ``folder/s-000.tar`` ... with sizes ``sizes``; sample i has class i % 3; returns the ids."""
    folder.mkdir(parents=True, exist_ok=True)
    i, ids = start, []
    for k, n in enumerate(sizes):
        with tarfile.open(folder / f"s-{k:03d}.tar", "w") as tar:
            for _ in range(n):
                _add(tar, f"x/{i:05d}.png", _png(i))
                _add(tar, f"x/{i:05d}.{label}", (CLASSES[i % 3] if label == "txt" else str(i % 3)).encode())
                ids.append(i)
                i += 1
    return ids


def ident(img: torch.Tensor) -> torch.Tensor:  # a transform that returns the sample's id
    return torch.tensor(int(img[0, 0, 0]) + 256 * int(img[1, 0, 0]))


def ids_of(loader) -> list[int]:
    return [int(v) for x, _ in loader for v in x]


def stream(folder: Path, n_shards: int, **kw):
    cfg = DataCfg(path=f"{folder}/s-{{000..{n_shards - 1:03d}}}.tar", augment="none", **kw)
    b = build_data(cfg, SMALL)
    return b, b.train.with_transform(ident)


def test_brace_expansion():
    assert expand("d/t-{000..002}.tar") == ["d/t-000.tar", "d/t-001.tar", "d/t-002.tar"]
    assert expand("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]


def test_labels_counts_and_held_out_val(tmp_path):
    ids = make_shards(tmp_path, [7, 5, 6, 4])
    b, _ = stream(tmp_path, 4)
    assert b.class_names == list(CLASSES) and len(b.train) == 18 and len(b.val) == 4  # the last shard is val
    assert Counter(int(t) for t in b.train.targets) == Counter(i % 3 for i in ids[:18])
    assert [t for _, t in b.val.samples] == [i % 3 for i in ids[18:]]
    assert [int(b.val.with_transform(ident)[i][0]) for i in range(4)] == ids[18:]  # read by offset
    assert build_data(DataCfg(path=str(tmp_path / "s-003.tar"), augment="none"), SMALL).val is None  # one shard
    # val read by offset = the same tensor `finetune eval` gets for the same shard
    ev = build_eval_dataset(str(tmp_path / "s-003.tar"), "val", list(CLASSES), b.transform)
    assert len(ev) == 4 and all(torch.equal(ev[i][0], b.val[i][0]) for i in range(4))
    cls = make_shards(tmp_path / "cls", [4, 4], label="cls")
    c = build_data(DataCfg(path=f"{tmp_path}/cls/s-{{000..001}}.tar", val_path=f"{tmp_path}/cls/s-001.tar",
                           augment="none"), SMALL)
    assert c.class_names == ["0", "1", "2"] and [int(t) for t in c.train.targets] == [i % 3 for i in cls[:8]]


@pytest.mark.slow
def test_each_sample_once_per_epoch_across_two_workers_and_a_fixed_order(tmp_path):
    ids = make_shards(tmp_path, [9, 8, 7, 10, 3])  # 4 train shards (34 samples) + val
    _, ds = stream(tmp_path, 5)
    one = make_loader(ds, 4, shuffle=True, seed=3, workers=0)
    two = make_loader(ds, 4, shuffle=True, seed=3, workers=2)
    e0, e0w = ids_of(one), ids_of(two)
    assert sorted(e0) == sorted(e0w) == ids[:34]  # every training sample exactly once per epoch
    assert len(one) == 9 and len(two) == 9 and sum(1 for _ in two) == 9
    assert e0 != list(range(34))  # shuffled
    again = make_loader(ds, 4, shuffle=True, seed=3, workers=2)
    assert ids_of(again) == e0w  # same seed, epoch, workers: the same order
    set_epoch(two, 1)
    e1 = ids_of(two)
    assert sorted(e1) == ids[:34] and e1 != e0w  # another epoch: another order
    assert ids_of(make_loader(ds, 4, shuffle=True, seed=4, workers=0)) != e0  # another seed
    set_epoch(two, 1, skip_batches=3)  # a mid-epoch resume: the rest of the same order, nothing else
    assert ids_of(two) == e1[12:]


def test_ranks_get_disjoint_shards_and_equal_step_counts(tmp_path):
    make_shards(tmp_path, [6, 6, 6, 5, 1])
    _, ds = stream(tmp_path, 5)
    r0, r1 = (make_loader(ds, 2, shuffle=True, seed=0, workers=0, num_replicas=2, rank=r) for r in (0, 1))
    a, b = ids_of(r0), ids_of(r1)
    assert len(r0) == len(r1) == len(a) // 2 == len(b) // 2 and not set(a) & set(b)
    # ranks hold 12 and 11 samples (6+6, 6+5): 6 and 5 batches (a batch of one is dropped); both stop after 5
    assert len(r0) == 5 and len(a) + len(b) == 20


def test_unreadable_sample_is_skipped_or_strict(tmp_path, caplog):
    make_shards(tmp_path, [3])
    with tarfile.open(tmp_path / "s-001.tar", "w") as tar:
        _add(tar, "bad.png", b"not a png")
        _add(tar, "bad.txt", b"ant")
        _add(tar, "good.png", _png(9))
        _add(tar, "good.txt", b"bee")
    b, ds = stream(tmp_path, 2, val_path=str(tmp_path / "s-000.tar"))
    assert len(b.train) == 5 and sorted(ids_of(make_loader(ds, 8, shuffle=True, seed=0, workers=0))) == [0, 1, 2, 9]
    assert "skipping unreadable image" in caplog.text and "bad.png" in caplog.text
    strict = build_data(DataCfg(path=f"{tmp_path}/s-{{000..001}}.tar", val_path=str(tmp_path / "s-000.tar"),
                                augment="none", strict=True), SMALL)
    with pytest.raises(DataError, match=r"cannot read image '.*s-001.tar/bad.png': .*--strict"):
        list(make_loader(strict.train, 8, shuffle=True, seed=0, workers=0))


@pytest.mark.slow
def test_a_run_on_shards_resumes_at_an_epoch_boundary_bitwise(tmp_path):
    from finetune import config
    from finetune.api import train

    make_shards(tmp_path / "d", [40, 40, 24])
    over = {"data.path": f"{tmp_path}/d/s-{{000..002}}.tar", "train.batch_size": 16, "train.precision": "fp32",
            "train.tensorboard": False, "train.report": False, "scheduler.name": "constant"}
    full = train(config.apply_overrides(config.load_recipe("default"), {**over, "train.epochs": 2}),
                 out=tmp_path / "full")
    train(config.apply_overrides(config.load_recipe("default"), {**over, "train.epochs": 1}), out=tmp_path / "half")
    train(None, resume=tmp_path / "half", epochs=2)
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True)["model"] for n in ("full", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_acc"] for r in full.epochs] == [r["val_acc"] for r in
                                                    torch.load(tmp_path / "half" / "last.pt")["metrics"]]
