"""Data: layouts, label specs, split, transforms, cache equivalence, bad files, loaders, error texts."""

from __future__ import annotations

import io
import logging
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from finetune.config import SAMPLE_DIR, DataCfg
from finetune.data import (DataBundle, build_data, build_eval_dataset, default_workers, eval_transform,
                           is_deterministic, list_images, load_image, make_loader, resolve_data_path, set_epoch,
                           stratified_split, train_transform, transform_config)
from finetune.data import loader as loader_mod
from finetune.errors import DataError, FinetuneError
from finetune.models.smallcnn import DEFAULT_CFG as SMALLCNN

SMALL = dict(SMALLCNN)  # 32x32, resize 32, crop_pct 1.0


# ------------------------------------------------------------------------------------------------- helpers

def write_image(path: Path, size=(12, 10), mode: str = "RGB", fmt: str | None = None) -> Path:
    """A noise image whose pixels depend on the file name (so every file differs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


def tree(root: Path, spec: dict[str, int], size=(12, 10), ext: str = ".png") -> Path:
    """``{"cat": 3}`` -> root/cat/cat_0.png ...; ``{"train/cat": 3}`` works too."""
    for folder, n in spec.items():
        cls = folder.split("/")[-1]
        for i in range(n):
            write_image(root / folder / f"{cls}_{i}{ext}", size)
    return root


def png_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=90)
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def cfg(path, **kw) -> DataCfg:
    return DataCfg(path=str(path), **kw)


@pytest.fixture
def logs():
    """Messages logged on the 'finetune' logger (the CLI may turn propagation off, so attach directly)."""
    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("finetune")
    h, old = H(level=logging.WARNING), log.level
    log.addHandler(h)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(h)
    log.setLevel(old)


def labels_of(ds) -> list[tuple[str, str]]:
    return [(p.name, ds.class_names[t]) for p, t in ds.samples]


# ------------------------------------------------------------------------------------------------- sources

@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "test"])
def test_imagefolder_train_val(tmp_path, val_name):
    tree(tmp_path, {"train/dog": 3, "train/cat": 2, f"{val_name}/cat": 1, f"{val_name}/dog": 1})
    b = build_data(cfg(tmp_path), SMALL)
    assert isinstance(b, DataBundle)
    assert b.class_names == ["cat", "dog"]
    assert labels_of(b.train) == [("cat_0.png", "cat"), ("cat_1.png", "cat"), ("dog_0.png", "dog"),
                                  ("dog_1.png", "dog"), ("dog_2.png", "dog")]
    assert b.train.targets == [0, 0, 1, 1, 1]
    assert labels_of(b.val) == [("cat_0.png", "cat"), ("dog_0.png", "dog")]
    assert all(p.parent.parent.name == val_name for p in b.val.paths)
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert b.skipped == [] and b.cached


def test_sample_data_resolves_to_the_bundled_folder():
    assert resolve_data_path("sample") == SAMPLE_DIR
    assert resolve_data_path("cifar10:/x") == "cifar10:/x"
    b = build_data(DataCfg(path="sample", cache="off"), SMALL)
    assert b.class_names == ["circle", "cross", "square", "triangle"]
    assert (len(b.train), len(b.val)) == (640, 160)


def test_same_classes_and_samples_as_torchvision_imagefolder():
    from torchvision.datasets import ImageFolder

    ours = build_data(DataCfg(path="sample", cache="off"), SMALL)
    theirs = ImageFolder(str(SAMPLE_DIR / "train"))
    assert ours.class_names == theirs.classes
    assert [(str(p), t) for p, t in ours.train.samples] == theirs.samples


def test_prefix_labels_inside_train_and_val_folders(tmp_path):
    for split, names in (("train", ["Not_1.png", "Not_2.png", "s_1.png"]), ("val", ["Not_3.png", "s_2.png"])):
        for n in names:
            write_image(tmp_path / split / n)
    b = build_data(cfg(tmp_path, labels="prefix:Not=NotSing,=Sing"), SMALL)
    assert b.class_names == ["NotSing", "Sing"] and b.train.targets == [0, 0, 1] and b.val.targets == [0, 1]
    ev = build_eval_dataset(str(tmp_path), "val", b.class_names, b.transform, labels="prefix:Not=NotSing,=Sing")
    assert ev.targets == [0, 1]


def test_single_folder_split_is_stratified_and_stable(tmp_path):
    tree(tmp_path, {"a": 10, "b": 5, "c": 2})
    b1 = build_data(cfg(tmp_path, val_split=0.2), SMALL, seed=3)
    b2 = build_data(cfg(tmp_path, val_split=0.2), SMALL, seed=3)
    val = [c for _, c in labels_of(b1.val)]
    assert {c: val.count(c) for c in "abc"} == {"a": 2, "b": 1, "c": 1}  # round(n*0.2), at least 1 per class
    assert len(b1.train) == 13
    assert b1.val.paths == b2.val.paths and b1.train.paths == b2.train.paths
    assert not set(b1.val.paths) & set(b1.train.paths)
    assert "val = 0.2 of each class (seed 3)" in b1.source
    b3 = build_data(cfg(tmp_path, val_split=0.2), SMALL, seed=4)
    assert b3.val.paths != b1.val.paths


def test_split_of_one_class_ignores_the_others():
    a = [(Path(f"a{i}.png"), "a") for i in range(20)]
    b = [(Path(f"b{i}.png"), "b") for i in range(20)]
    _, v1 = stratified_split(a + b, 0.25, seed=0)
    _, v2 = stratified_split(a + b + [(Path("b99.png"), "b")], 0.25, seed=0)
    assert [p for p, c in v1 if c == "a"] == [p for p, c in v2 if c == "a"]
    assert len([1 for _, c in v1 if c == "a"]) == 5
    train, val = stratified_split(a, 0.0, seed=0)
    assert (len(train), val) == (20, [])


def test_val_split_zero_without_val_folder_means_no_val(tmp_path):
    tree(tmp_path, {"a": 2, "b": 2})
    assert build_data(cfg(tmp_path, val_split=0.0), SMALL).val is None


def test_tutorial_prefix_labels(tmp_path):
    for name in ["NotSing_1.png", "NotSing_2.png", "Sing_1.png", "song.png", "Nothing.png"]:
        write_image(tmp_path / name)
    b = build_data(cfg(tmp_path, labels="prefix:Not=NotSing,=Sing", val_split=0.0), SMALL)
    assert b.class_names == ["NotSing", "Sing"]
    assert sorted(labels_of(b.train)) == [("NotSing_1.png", "NotSing"), ("NotSing_2.png", "NotSing"),
                                          ("Nothing.png", "NotSing"), ("Sing_1.png", "Sing"), ("song.png", "Sing")]


def test_prefix_longest_match_wins_and_unlabelled_files_are_left_out(tmp_path, logs):
    for name in ["cat_1.png", "catfish_1.png", "catfish_2.png", "dog_1.png", "zebra.png"]:
        write_image(tmp_path / name)
    b = build_data(cfg(tmp_path, labels="prefix:cat=cat,catfish=fish,dog=dog", val_split=0.0), SMALL)
    assert sorted(labels_of(b.train)) == [("cat_1.png", "cat"), ("catfish_1.png", "fish"),
                                          ("catfish_2.png", "fish"), ("dog_1.png", "dog")]
    assert b.unlabeled == [str(tmp_path / "zebra.png")]
    assert logs == [f"1 images match no data.labels rule and are left out (first: '{tmp_path / 'zebra.png'}')"]


def test_regex_labels_first_group(tmp_path):
    for name in ["cat_001.jpg", "dog_002.jpg", "dog_003.jpg", "cat_004.jpg"]:
        write_image(tmp_path / "photos" / name)
    b = build_data(cfg(tmp_path, labels="regex:^([a-z]+)_", val_split=0.0), SMALL)
    assert b.class_names == ["cat", "dog"]
    assert sorted(labels_of(b.train)) == [("cat_001.jpg", "cat"), ("cat_004.jpg", "cat"),
                                          ("dog_002.jpg", "dog"), ("dog_003.jpg", "dog")]


def test_csv_labels_relative_to_the_root(tmp_path, logs):
    for name in ["x1.png", "x2.png", "x3.png", "x4.png"]:
        write_image(tmp_path / "img" / name)
    (tmp_path / "labels.csv").write_text("path,label\nimg/x1.png,ant\nimg/x2.png,bee\nimg/x3.png, bee \n"
                                         "img/gone.png,ant\n")
    b = build_data(cfg(tmp_path, labels="csv:labels.csv", val_split=0.0), SMALL)  # found inside the root
    assert b.class_names == ["ant", "bee"]
    assert labels_of(b.train) == [("x1.png", "ant"), ("x2.png", "bee"), ("x3.png", "bee")]
    gone = tmp_path / "img" / "gone.png"
    assert b.skipped == [str(gone)]
    assert logs == [f"skipping unreadable image '{gone}': listed in the label file, not found"]


@pytest.mark.parametrize("spec, message", [
    ("folder", "unknown --labels spec 'folder'; use prefix:PFX=LABEL,...  regex:PATTERN  csv:FILE"),
    ("prefix:Not", "bad prefix rule 'Not' in --labels prefix:Not; write PREFIX=LABEL, e.g. "
                   "prefix:Not=NotSing,=Sing (an empty PREFIX is the fallback)"),
    ("regex:([a-z", "bad regular expression in --labels regex:([a-z: unterminated character set at "
                    "position 1"),
])
def test_bad_label_specs(tmp_path, spec, message):
    write_image(tmp_path / "a.png")
    with pytest.raises(DataError) as e:
        build_data(cfg(tmp_path, labels=spec), SMALL)
    assert str(e.value) == message


def test_missing_csv_file(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(DataError) as e:
        build_data(cfg(tmp_path, labels="csv:nope.csv"), SMALL)
    assert str(e.value) == f"label file 'nope.csv' not found (looked in the current folder and in '{tmp_path}')"


# ------------------------------------------------------------------------------------------------- CIFAR

def write_fake_cifar(root: Path, n: int = 3) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for i, f in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [(i + j) % 10 for j in range(n)]}
        (base / f).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))


def test_cifar10_from_torchvision_layout(tmp_path):
    write_fake_cifar(tmp_path)
    b = build_data(DataCfg(path=f"cifar10:{tmp_path}", augment="none"), SMALL)
    assert b.class_names[:3] == ["airplane", "automobile", "bird"] and len(b.class_names) == 10
    assert (len(b.train), len(b.val)) == (15, 3)
    assert b.train.targets[:6] == [0, 1, 2, 1, 2, 3] and b.val.targets == [5, 6, 7]
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())[b"data"][0]
    x, _ = b.train[0]
    expected = (torch.from_numpy(raw.reshape(3, 32, 32)).float() / 255 - 0.5) / 0.5
    assert torch.allclose(x, expected, atol=1e-6)
    ev = build_eval_dataset(f"cifar10:{tmp_path}", "val", b.class_names, b.transform)
    assert ev.targets == [5, 6, 7]


def test_cifar100_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split, labels in (("train", [3, 1]), ("test", [2])):
        data = {"data": np.zeros((len(labels), 3072), np.uint8), "fine_labels": labels, "coarse_labels": labels}
        (base / split).write_bytes(pickle.dumps(data))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"k{i}" for i in range(100)]}))
    b = build_data(DataCfg(path=f"cifar100:{base}"), SMALL)  # ROOT may be the extracted folder itself
    assert len(b.class_names) == 100 and b.train.targets == [3, 1] and b.val.targets == [2]


def test_cifar_missing_offline_is_one_clear_line(tmp_path):
    with pytest.raises(DataError) as e:
        build_data(DataCfg(path=f"cifar10:{tmp_path}"), SMALL)
    assert str(e.value) == (f"CIFAR-10 not found in '{tmp_path}' (missing "
                            f"{tmp_path / 'cifar-10-batches-py' / 'data_batch_1'}); extract cifar-10-python.tar.gz "
                            "there, or pass --download to fetch it")
    with pytest.raises(DataError) as e:
        resolve_data_path("cifar100")
    assert str(e.value) == "--data cifar100 needs a folder: --data cifar100:ROOT (ROOT holds or will hold " \
                           "cifar-100-python/)"


def test_cifar_refuses_pickles_that_run_code(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({"label_names": os.getcwd}))
    with pytest.raises(DataError, match="refusing to load posix.getcwd"):
        build_data(DataCfg(path=f"cifar10:{tmp_path}"), SMALL)


# ------------------------------------------------------------------------------------------------- transforms

def test_transform_config_for_resnet18_matches_torchvision():
    from torchvision.models import ResNet18_Weights

    from finetune.models.tv import data_cfg_from_weights

    tf = transform_config(DataCfg(), data_cfg_from_weights(ResNet18_Weights.DEFAULT))
    assert tf == {"input_size": [3, 224, 224], "size": 224, "resize": 256, "crop_pct": 0.875,
                  "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    img = torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = eval_transform(tf)(img)
    theirs = ResNet18_Weights.DEFAULT.transforms()(img)
    # torchvision's ImageClassification (v1 resize) and v2's uint8 resize kernel round differently: equal up to
    # one uint8 step
    step = 1 / 255 / min(tf["std"])
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().max() <= step * 1.001


def test_transform_config_for_timm_and_smallcnn_and_overrides():
    from finetune.models import build_model

    with torch.device("meta"):
        timm_cfg = build_model("timm:test_vit", 3).data_cfg
    tf = transform_config(DataCfg(), timm_cfg)
    assert tf == {"input_size": [3, 160, 160], "size": 160, "resize": 168, "crop_pct": 0.95,
                  "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert transform_config(DataCfg(image_size=96), timm_cfg)["resize"] == 101  # floor(96 / 0.95), timm's rule
    small = transform_config(DataCfg(), SMALL)
    assert (small["size"], small["resize"], small["crop_pct"]) == (32, 32, 1.0)
    over = transform_config(DataCfg(image_size=48, mean=[0.1, 0.2, 0.3], std=[1, 1, 1]), SMALL)
    assert (over["size"], over["resize"], over["mean"], over["std"]) == (48, 48, [0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    with pytest.raises(DataError) as e:
        transform_config(DataCfg(mean=[0.5, 0.5]), SMALL)
    assert str(e.value) == "data.mean must have 3 values (R, G, B), got 2"


def test_transforms_take_pil_or_uint8_tensor_and_augment_levels():
    tf = transform_config(DataCfg(image_size=16), {**SMALL})
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    t = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    ev = eval_transform(tf)
    assert torch.equal(ev(pil), ev(t)) and ev(t).shape == (3, 16, 16) and ev(t).dtype == torch.float32
    assert type(ev(t)) is torch.Tensor
    assert is_deterministic("none") and not is_deterministic("light") and not is_deterministic("strong")
    assert torch.equal(train_transform(tf, "none")(t), ev(t))
    names = lambda a: [type(s).__name__ for s in train_transform(tf, a).transforms]  # noqa: E731
    assert names("light") == ["ToImage", "AspectCappedResize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip",
                              "ToDtype", "Normalize", "ToPureTensor"]  # 16 px: CIFAR's pad + crop (RRC > 64 px)
    assert names("strong") == ["ToImage", "AspectCappedResize", "RandomResizedCrop", "RandomHorizontalFlip",
                               "TrivialAugmentWide", "ToDtype", "Normalize", "RandomErasing", "ToPureTensor"]
    erase = train_transform(tf, "strong").transforms[7]
    assert (erase.p, erase.scale, erase.ratio, erase.value) == (0.25, (0.02, 0.33), (0.3, 3.3), [0.0])
    assert train_transform(tf, "strong")(t).shape == (3, 16, 16)
    with pytest.raises(DataError) as e:
        train_transform(tf, "heavy")
    assert str(e.value) == "unknown augment 'heavy'; use one of none, light, strong"


# ------------------------------------------------------------------------------------------------- cache

@pytest.mark.parametrize("size, image_size", [((40, 30), 16), ((12, 10), 24)])  # downscaled / kept small
def test_cache_gives_the_same_tensors(tmp_path, size, image_size):
    tree(tmp_path, {"train/a": 3, "train/b": 3, "val/a": 1, "val/b": 1}, size=size, ext=".jpg")
    on = build_data(cfg(tmp_path, cache="on", augment="strong", image_size=image_size), SMALL)
    off = build_data(cfg(tmp_path, cache="off", augment="strong", image_size=image_size), SMALL)
    assert on.cached and not off.cached and on.train.cache is not None and off.train.cache is None
    assert max(on.train.cache[0].shape[-2:]) <= max(size) and min(on.train.cache[0].shape[-2:]) == min(
        min(size), int(image_size / 1.0))
    for i in range(len(on.train)):
        assert torch.equal(on.train[(i, 7 + i)][0], off.train[(i, 7 + i)][0])
    assert all(torch.equal(on.val[i][0], off.val[i][0]) for i in range(len(on.val)))
    batches = [[x for x, _ in make_loader(b.train, 4, shuffle=True, seed=5, workers=0)] for b in (on, off)]
    assert all(torch.equal(a, c) for a, c in zip(*batches))


def test_auto_cache_respects_the_budget(tmp_path):
    tree(tmp_path, {"a": 2, "b": 2})
    assert build_data(cfg(tmp_path, val_split=0), SMALL).cached
    over = build_data(cfg(tmp_path, val_split=0, cache_gb=1e-9), SMALL)  # over the RAM budget: on disk
    assert over.cached and over.cache_kind == "disk"
    assert not build_data(cfg(tmp_path, val_split=0, cache="off"), SMALL).cached


def test_with_transform_shares_the_cache(tmp_path):
    tree(tmp_path, {"a": 2, "b": 2})
    b = build_data(cfg(tmp_path, val_split=0, augment="strong"), SMALL)
    ev = b.train.with_transform(eval_transform(b.transform))
    assert ev.cache is b.train.cache and ev.transform is not b.train.transform
    assert torch.equal(ev[0][0], eval_transform(b.transform)(load_image(b.train.paths[0])))


def test_large_jpeg_decodes_at_reduced_scale_and_predict_matches_eval(tmp_path):
    from finetune.data import decode

    yy, xx = np.mgrid[0:300, 0:400] / 300.0  # a smooth 400x300 photo stand-in
    arr = (127.5 + 120 * np.stack([np.sin(3 * xx), np.cos(2 * yy), np.sin(2 * (xx + yy))], -1)).astype(np.uint8)
    for c in "ab":
        Image.fromarray(arr).save(tmp_path / f"{c}.jpg", quality=95)
        (tmp_path / c).mkdir()
        Image.fromarray(arr).save(tmp_path / c / "x.jpg", quality=95)
    tf = transform_config(DataCfg(), SMALL)  # resize 32: the JPEG decodes at 1/8 scale (50x38), then resizes
    assert load_image(tmp_path / "a.jpg", min_side=32).size == (50, 38)
    assert load_image(tmp_path / "a.jpg").size == (400, 300)
    fast = decode(tmp_path / "a.jpg", tf)
    full = torch.from_numpy(np.array(load_image(tmp_path / "a.jpg"))).permute(2, 0, 1)
    from torchvision.transforms.v2 import functional as F
    full = F.resize(full, [32], antialias=True)
    assert fast.shape == full.shape == (3, 32, 42)
    assert (fast.float() - full.float()).abs().mean() < 2
    b = build_data(cfg(tmp_path, val_split=0, cache="off", augment="none"), SMALL)
    assert torch.equal(b.train[0][0], eval_transform(tf)(decode(tmp_path / "a" / "x.jpg", tf)))


# ------------------------------------------------------------------------------------------------- bad input

def bad_files(root: Path) -> dict[str, str]:
    """Broken files of each kind with an image extension -> the reason in the warning."""
    png, jpg = png_bytes(), jpeg_bytes()
    files = {"a/empty.png": (b"", "empty file"),
             "a/text.jpg": (b"hello, not an image\n", "not an image (unknown format)"),
             "b/truncated.png": (png[: len(png) // 2], None),
             "b/truncated.jpg": (jpg[: len(jpg) // 3], None),
             "b/corrupt.png": (png[:40] + bytes(200), None)}
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {rel: reason for rel, (_, reason) in files.items()}


def test_broken_files_cost_one_warning_each(tmp_path, logs):
    tree(tmp_path, {"a": 3, "b": 3})
    expected = bad_files(tmp_path)
    before = snapshot(tmp_path)
    b = build_data(cfg(tmp_path, val_split=0), SMALL)
    assert len(b.train) == 6 and b.cached
    assert b.skipped == sorted(str(tmp_path / rel) for rel in expected)
    assert len(logs) == 5 and all(m.startswith("skipping unreadable image '") for m in logs)
    for rel, reason in expected.items():
        line = next(m for m in logs if f"'{tmp_path / rel}'" in m)
        if reason:
            assert line == f"skipping unreadable image '{tmp_path / rel}': {reason}"
    assert snapshot(tmp_path) == before  # nothing written inside the data folder


def test_strict_fails_on_the_first_broken_file(tmp_path):
    tree(tmp_path, {"a": 3, "b": 3})
    bad_files(tmp_path)
    with pytest.raises(DataError) as e:
        build_data(cfg(tmp_path, strict=True), SMALL)
    assert str(e.value) == (f"cannot read image '{tmp_path / 'a' / 'empty.png'}': empty file (--strict; remove "
                            "the file, or drop --strict to skip it)")


def test_uncached_truncated_jpeg_is_skipped_when_read(tmp_path, logs):
    tree(tmp_path, {"a": 2, "b": 2}, size=(64, 64), ext=".jpg")
    bad = tmp_path / "a" / "a_1.jpg"
    data = jpeg_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header is fine: only decoding finds out
    b = build_data(cfg(tmp_path, val_split=0, cache="off"), SMALL)
    assert len(b.train) == 4 and b.skipped == []
    i = b.train.paths.index(bad)
    x, y = b.train[i]  # replaced by the next readable sample
    assert y == b.train.targets[i + 1] and logs == [f"skipping unreadable image '{bad}'"]
    b.train[i]
    assert len(logs) == 1  # once per file
    strict = build_data(cfg(tmp_path, val_split=0, cache="off", strict=True), SMALL)
    with pytest.raises(DataError, match=r"^cannot read image '.*a_1\.jpg': .*\(--strict; remove the file"):
        strict.train[i]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_colour_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    base = Image.fromarray(np.full((6, 8, 3), 200, np.uint8))
    if mode == "I;16":
        Image.fromarray(np.full((6, 8), 100 * 256 + 7, np.uint16)).save(path)
    elif mode == "P":
        im = base.convert("P")
        im.info["transparency"] = 0
        im.save(path, transparency=0)
    else:
        base.convert(mode).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (8, 6)
    if mode == "I;16":
        assert np.asarray(im)[0, 0].tolist() == [100, 100, 100]  # scaled from 16 bits, not clipped to white


def test_odd_colour_modes_in_a_dataset(tmp_path):
    for i, mode in enumerate(["L", "RGBA", "P", "CMYK"]):
        ext = ".jpg" if mode == "CMYK" else ".png"
        write_image(tmp_path / ("a" if i % 2 else "b") / f"{mode}{ext}", mode=mode)
    b = build_data(cfg(tmp_path, val_split=0), SMALL)
    assert b.skipped == [] and all(t.shape[0] == 3 for t in b.train.cache)


# ------------------------------------------------------------------------------------------------- errors

def test_missing_path(tmp_path):
    with pytest.raises(DataError) as e:
        build_data(cfg(tmp_path / "nope"), SMALL)
    assert str(e.value) == f"data path '{tmp_path / 'nope'}' does not exist; pass a folder of images, 'sample', " \
                           "or cifar10:ROOT"
    assert isinstance(e.value, FinetuneError)


def test_no_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as e:
        build_data(cfg(tmp_path), SMALL)
    assert str(e.value) == (f"no images found in '{tmp_path}' (looked for .jpg, .jpeg, .png, .ppm, .bmp, .pgm, "
                            ".tif, .tiff, .webp, .gif); pass a folder of class subfolders, or --labels "
                            "(prefix:PFX=LABEL,...  regex:PATTERN  csv:FILE) for one folder of files")


def test_one_class_and_empty_class_folders(tmp_path, logs):
    tree(tmp_path, {"cat": 3})
    (tmp_path / "dog").mkdir()
    with pytest.raises(DataError) as e:
        build_data(cfg(tmp_path), SMALL)
    assert str(e.value) == (f"found 1 class in '{tmp_path}' ('cat'); a classifier needs at least 2: add a subfolder "
                            "per class, or name classes with --labels")
    assert logs == [f"class folder '{tmp_path / 'dog'}' has no images; ignored"]


def test_loose_images_without_class_folders(tmp_path):
    write_image(tmp_path / "NotSing_1.png")
    with pytest.raises(DataError) as e:
        build_data(cfg(tmp_path), SMALL)
    assert str(e.value) == (f"'{tmp_path}' holds images but no class subfolders; put each class in its own "
                            "subfolder, or label files by name with --labels (prefix:PFX=LABEL,...  regex:PATTERN  "
                            "csv:FILE)")


def test_val_classes_that_train_lacks(tmp_path):
    tree(tmp_path, {"train/a": 1, "train/b": 1, "val/a": 1, "val/zebra": 1})
    with pytest.raises(DataError) as e:
        build_data(cfg(tmp_path), SMALL)
    assert str(e.value) == (f"val data '{tmp_path / 'val'}' has classes that train lacks: 'zebra'; add them to "
                            f"'{tmp_path / 'train'}' or remove them from val")


def test_data_path_that_is_a_file(tmp_path):
    f = write_image(tmp_path / "x.png")
    with pytest.raises(DataError) as e:
        build_data(cfg(f), SMALL)
    assert str(e.value) == f"data path '{f}' is a file, not a folder; pass the folder that holds the images"


# ------------------------------------------------------------------------------------------------- eval, predict

def test_build_eval_dataset(tmp_path):
    tree(tmp_path, {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 2})
    tf = transform_config(DataCfg(), SMALL)
    ds = build_eval_dataset(str(tmp_path), "val", ["a", "b", "c"], tf)
    assert ds.targets == [0, 1, 1] and ds.class_names == ["a", "b", "c"]
    assert len(build_eval_dataset(str(tmp_path), "train", ["a", "b"], tf)) == 4
    with pytest.raises(DataError) as e:
        build_eval_dataset(str(tmp_path), "val", ["a", "x"], tf)
    assert str(e.value) == f"'{tmp_path / 'val'}' has classes the checkpoint was not trained on: 'b'; its classes " \
                           "are a, x"
    only_train = tree(tmp_path / "t", {"train/a": 1, "train/b": 1})
    with pytest.raises(DataError) as e:
        build_eval_dataset(str(only_train), "val", ["a", "b"], tf)
    assert str(e.value) == (f"'{only_train}' has no val folder (val, valid, validation, test); pass --split train, "
                            "or a folder of class subfolders to evaluate it whole")


def test_list_images_and_load_image(tmp_path):
    a = write_image(tmp_path / "d" / "x.png")
    b = write_image(tmp_path / "d" / "sub" / "y.JPG")
    (tmp_path / "d" / "._x.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: never listed
    (tmp_path / "d" / "notes.txt").write_text("x")
    assert list_images([tmp_path / "d", a]) == [tmp_path / "d" / "sub" / "y.JPG", a]
    assert b in list_images([str(tmp_path / "d")])
    with pytest.raises(DataError) as e:
        list_images([str(tmp_path / "missing")])
    assert str(e.value) == f"'{tmp_path / 'missing'}' does not exist; pass image files or folders of images"
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_image(tmp_path / "e.png")
    assert str(e.value) == f"cannot read image '{tmp_path / 'e.png'}': empty file"


# ------------------------------------------------------------------------------------------------- loaders

def test_loader_order_is_a_function_of_seed_and_epoch(tmp_path):
    tree(tmp_path, {"a": 5, "b": 5})
    ds = build_data(cfg(tmp_path, val_split=0, augment="light"), SMALL).train

    def epoch_batches(loader):
        return [(x, y) for x, y in loader]

    l1 = make_loader(ds, 4, shuffle=True, seed=1, workers=0)
    e0, e1 = epoch_batches(l1), epoch_batches(l1)  # the sampler counts epochs by itself
    assert [y.tolist() for _, y in e0] != [y.tolist() for _, y in e1]
    l2 = make_loader(ds, 4, shuffle=True, seed=1, workers=0)
    set_epoch(l2, 1)  # resume at epoch 1
    r1 = epoch_batches(l2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, r1))
    seq = make_loader(ds, 4, shuffle=False, seed=0, workers=0, drop_last=True)
    assert [y.tolist() for _, y in seq] == [[0, 0, 0, 0], [0, 1, 1, 1]]


def test_loader_with_a_worker_matches_the_main_process(tmp_path):
    tree(tmp_path, {"a": 4, "b": 4})
    ds = build_data(cfg(tmp_path, val_split=0, augment="strong"), SMALL).train
    main = [x for x, _ in make_loader(ds, 4, shuffle=True, seed=2, workers=0)]
    loader = make_loader(ds, 4, shuffle=True, seed=2, workers=1)
    assert loader.persistent_workers and not loader.pin_memory
    assert all(torch.equal(a, b) for a, b in zip(main, [x for x, _ in loader]))
    assert make_loader(ds, 4, shuffle=False, seed=0, device="cuda", workers=0).pin_memory


class _Threads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.get_num_threads()


def test_workers_run_torch_with_one_thread():
    assert [b.tolist() for b in make_loader(_Threads(), 2, shuffle=False, seed=0, workers=1)] == [[1, 1]]


def test_default_workers(monkeypatch):
    monkeypatch.setattr(loader_mod, "usable_cpus", lambda: 2)
    assert default_workers(10_000, 32) == 0
    monkeypatch.setattr(loader_mod, "usable_cpus", lambda: 16)
    assert default_workers(10_000, 32) == 8 and default_workers(100, 32) == 0
    monkeypatch.setattr(loader_mod, "usable_cpus", lambda: 4)
    assert default_workers(10_000, 32) == 3


# ------------------------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6), val_split=st.floats(0.01, 0.9),
       seed=st.integers(0, 2**31))
def test_split_invariants(sizes, val_split, seed):
    items = [(Path(f"c{c}/{i}.png"), f"c{c}") for c, n in enumerate(sizes) for i in range(n)]
    train, val = stratified_split(items, val_split, seed)
    assert sorted(train + val) == sorted(items)  # a partition
    assert (train, val) == stratified_split(list(reversed(items)), val_split, seed)  # input order is irrelevant
    for c, n in enumerate(sizes):
        n_val = sum(1 for _, k in val if k == f"c{c}")
        assert n_val == (0 if n == 1 else min(n - 1, max(1, round(n * val_split))))


def test_light_augment_small_inputs_pad_and_crop():
    """At <= 64 px, 'light' is CIFAR's pad-4 random crop + flip (a resized 35% crop of 32 px loses the object)."""
    from torchvision.transforms import v2

    from finetune.data.transforms import train_transform

    small = {"input_size": [3, 32, 32], "resize": 32, "crop_pct": 1.0, "interpolation": "bilinear",
             "mean": [0.5] * 3, "std": [0.5] * 3}
    steps = train_transform(small, "light").transforms
    crops = [t for t in steps if isinstance(t, v2.RandomCrop)]
    assert len(crops) == 1 and list(crops[0].padding) == [4, 4, 4, 4] and crops[0].padding_mode == "reflect"
    assert not any(isinstance(t, v2.RandomResizedCrop) for t in steps)
    big = {**small, "input_size": [3, 224, 224], "resize": 256, "crop_pct": 0.875}
    rrc = [t for t in train_transform(big, "light").transforms if isinstance(t, v2.RandomResizedCrop)]
    assert len(rrc) == 1 and rrc[0].scale == (0.35, 1.0)
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert train_transform(small, "light")(img).shape == (3, 32, 32)


# ------------------------------------------------------------------------------------------------- symlinks


def _keys(ds) -> set[tuple[int, int]]:
    return {(os.stat(p).st_dev, os.stat(p).st_ino) for p, _ in ds.samples}


def test_a_symlink_loop_is_listed_once_and_never_leaks_val_into_train(tmp_path, caplog):
    """``a/loop -> .`` (and a link to an ancestor such as ``/``) is not followed: each image counts once (16, not
    hundreds), and no file is in both train and val."""
    root = tree(tmp_path / "d", {"a": 8, "b": 8})
    os.symlink(".", root / "a" / "loop")
    os.symlink("/", root / "b" / "everything")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        b = build_data(cfg(root, val_split=0.25, cache="off"), SMALL)
    assert (len(b.train), len(b.val)) == (12, 4)
    assert not _keys(b.train) & _keys(b.val)
    msgs = [r.getMessage() for r in caplog.records]
    assert f"not following directory symlink '{root / 'a' / 'loop'}': it points to '{root / 'a'}', which holds it " \
        "(a loop)" in msgs
    assert f"not following directory symlink '{root / 'b' / 'everything'}': it points to '/', which holds it " \
        "(a loop)" in msgs


def test_a_linked_class_folder_is_followed(tmp_path):
    """A directory symlink to elsewhere (a class folder kept on another disk) is followed, as torchvision does."""
    tree(tmp_path / "elsewhere", {"cats": 3})
    root = tree(tmp_path / "d", {"dogs": 3})
    os.symlink(tmp_path / "elsewhere" / "cats", root / "cats")
    b = build_data(cfg(root, val_split=0.0, cache="off"), SMALL)
    assert b.class_names == ["cats", "dogs"] and len(b.train) == 6


def test_one_file_is_never_in_both_train_and_val(tmp_path, caplog):
    """val/a/x.png a symlink (or hard link) to train/a/x.png: it stays in val only, with one warning."""
    root = tree(tmp_path / "d", {"train/a": 4, "train/b": 4, "val/a": 1, "val/b": 1})
    os.symlink(root / "train" / "a" / "a_0.png", root / "val" / "a" / "same.png")
    os.link(root / "train" / "b" / "b_0.png", root / "val" / "b" / "hard.png")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        b = build_data(cfg(root, cache="off"), SMALL)
    assert (len(b.train), len(b.val)) == (6, 4)
    assert not _keys(b.train) & _keys(b.val)
    assert "2 files are in both train and val (the same file under two names: a symlink, a hard link or a " \
        f"duplicate path; first: '{root / 'train' / 'a' / 'a_0.png'}'); they are used for val only" in \
        [r.getMessage() for r in caplog.records]


def test_a_training_batch_of_one_image_is_dropped():
    """BatchNorm in train mode cannot normalise a batch of one (``Expected more than 1 value per channel``): a
    training loader whose last batch would hold one image drops it (that image is drawn elsewhere in other epochs);
    evaluation keeps every image, and other remainders are kept."""
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.arange(17).float(), torch.zeros(17, dtype=torch.long))
    sizes = lambda loader: [len(x) for x, _ in loader]  # noqa: E731
    assert sizes(make_loader(ds, 8, shuffle=True, seed=0, workers=0)) == [8, 8]
    assert sizes(make_loader(ds, 8, shuffle=False, seed=0, workers=0)) == [8, 8, 1]
    assert sizes(make_loader(ds, 6, shuffle=True, seed=0, workers=0)) == [6, 6, 5]
    # under DDP each rank's shard counts: 2 ranks x 9 (padded) with batch 4 -> 4, 4, (1 dropped)
    assert sizes(make_loader(ds, 4, shuffle=True, seed=0, workers=0, num_replicas=2, rank=1)) == [4, 4]


def _png_header(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims ``w`` x ``h`` pixels (PIL refuses it when opening, before decoding anything)."""
    import struct

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_skipped_with_a_warning(tmp_path, caplog):
    """A 30000x30000 PNG (900 megapixels) among the training images: skipped with one warning, like any unreadable
    image, instead of aborting the run with PIL's DecompressionBombError."""
    root = tree(tmp_path / "d", {"a": 3, "b": 3})
    bomb = _png_header(root / "a" / "huge.png", 30000, 30000)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        b = build_data(cfg(root, val_split=0.0, cache="off"), SMALL)
    assert len(b.train) == 6 and bomb not in [p for p, _ in b.train.samples]
    assert [str(p) for p in b.skipped] == [str(bomb)]
    assert any(f"'{bomb}': image too large (900,000,000 pixels; the limit is 178,956,970)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_csv_paths_outside_the_data_folder_need_allow_outside(tmp_path):
    root = tree(tmp_path / "d", {"a": 2, "b": 2})
    write_image(tmp_path / "elsewhere" / "far.png")
    (root / "labels.csv").write_text("a/a_0.png,a\na/a_1.png,a\nb/b_0.png,b\nb/b_1.png,b\n../elsewhere/far.png,b\n")
    with pytest.raises(DataError, match=r"1 row point outside the data folder .* \(row 5: '../elsewhere/far.png'\)"):
        build_data(cfg(root, labels="csv:labels.csv", val_split=0.0, cache="off"), SMALL)
    b = build_data(cfg(root, labels="csv:labels.csv", val_split=0.0, cache="off", allow_outside=True), SMALL)
    assert len(b.train) == 5 and tmp_path / "d" / ".." / "elsewhere" / "far.png" in b.train.paths


@pytest.mark.parametrize("content,why", [
    ([1, 2, 3], "not a mapping (got list)"),
    ({b"labels": [0, 1, 2]}, "no 'data' entry"),
    ({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, "'data' is not N images of 3x32x32 bytes"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, "3 images but 2 labels"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 10]}, "label 10 is not a class index (0..9)"),
])
def test_malformed_cifar_files_are_one_clear_line(tmp_path, content, why):
    write_fake_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps(content))
    with pytest.raises(DataError) as e:
        build_data(DataCfg(path=f"cifar10:{tmp_path}"), SMALL)
    assert str(e.value) == f"CIFAR file '{bad}' is malformed: {why}; re-extract cifar-10-python.tar.gz"


def test_an_extreme_aspect_ratio_is_cropped_to_16_to_1_before_the_resize():
    """A 100000x1 PNG used to become a 3,200,000x32 image before its 32 px crop (750 MB in predict): the resize now
    sees at most 16:1 (its centre, where the crops come from); images up to 16:1 are resized exactly as before."""
    from torchvision.transforms import v2

    from finetune.data.transforms import pre_resize

    tf = transform_config(DataCfg(image_size=32), {**SMALL})
    r = int(tf["resize"])
    wide = torch.zeros(3, 1, 100_000, dtype=torch.uint8)
    assert tuple(pre_resize(tf)(wide).shape) == (3, r, 16 * r)
    assert tuple(pre_resize(tf)(wide.transpose(1, 2)).shape) == (3, 16 * r, r)
    assert eval_transform(tf)(wide).shape == (3, 32, 32)
    plain = v2.Resize(r, interpolation=v2.InterpolationMode(tf["interpolation"]), antialias=True)
    for h, w in ((20, 24), (10, 160), (300, 19)):  # up to 16:1: bitwise the plain resize
        x = torch.from_numpy(np.random.default_rng(h).integers(0, 256, (3, h, w), dtype=np.uint8))
        assert torch.equal(pre_resize(tf)(x), plain(x))
