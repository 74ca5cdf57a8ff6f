"""A head-only run whose features are all in the store starts on a stand-in for its backbone (models/stand_in.py,
speedups/backbone_store.py): no model library imported, no image decoded, and everything it writes equal to what the
run with the real model writes (checkpoint tensors bitwise, with their strides; config.yaml byte for byte)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune import config
from finetune.models import build_model
from finetune.models.stand_in import NeedsBackbone, build, describe, is_stand_in, state_names
from finetune.run.runner import train
from finetune.speedups import backbone_store
from finetune.tools import probe as P
from helpers import ROOT, cli_env, tiny_tree

KW = dict(image_size=32, epochs=2, precision="fp32", device="cpu", seed=0)


@pytest.fixture
def data(tmp_path):
    return tiny_tree(tmp_path / "data", per_class=10)


@pytest.fixture
def weights(tmp_path):
    """A 'pretrained' smallcnn weights file (random values, saved by the test)."""
    torch.manual_seed(1)
    path = tmp_path / "smallcnn.pt"
    torch.save(build_model("smallcnn", num_classes=10).model.state_dict(), path)
    return str(path)


def _root() -> Path:
    return Path(os.environ["FINETUNE_CACHE"]) / "backbones"


def _eq(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(u, v) for u, v in zip(a, b))
    return a == b


def _same_checkpoint(a: Path, b: Path) -> None:
    x, y = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert list(x["model"]) == list(y["model"])
    for k in x["model"]:
        assert torch.equal(x["model"][k], y["model"][k]) and x["model"][k].stride() == y["model"][k].stride(), k
    drop = {"model", "metrics"}  # metrics: per-epoch seconds and images/s differ
    assert _eq({k: v for k, v in x.items() if k not in drop}, {k: v for k, v in y.items() if k not in drop})
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_sec")} for r in x["metrics"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "images_per_sec")} for r in y["metrics"]]


def _spy_assemble(monkeypatch, module) -> list[bool]:
    """Record, per call of ``module.assemble``, whether it stood in for the backbone."""
    built: list[bool] = []
    real = module.assemble

    def spy(*a, **k):
        parts = real(*a, **k)
        built.append(is_stand_in(parts.model))
        return parts

    monkeypatch.setattr(module, "assemble", spy)
    return built


class Notes:
    """A reporter that keeps the run's notes and ignores the rest."""

    def __init__(self):
        self.notes: list[str] = []

    def __getattr__(self, name):
        return lambda *a, **k: None

    def note(self, m):
        self.notes.append(m)


def test_stand_in_has_the_models_state_dict_and_parameters():
    bb = build_model("smallcnn", num_classes=3)
    rec = describe(bb.model, bb.head)
    state = bb.model.state_dict()
    assert state_names(rec) == list(state)
    s = build(json.loads(json.dumps(rec)), {k: v.clone() for k, v in state.items()})
    assert is_stand_in(s) and list(s.state_dict()) == list(state)
    assert all(torch.equal(s.state_dict()[k], v) for k, v in state.items())
    assert [n for n, _ in s.named_parameters()] == [n for n, _ in bb.model.named_parameters()]
    assert type(s.get_submodule(bb.head[0])) is nn.Linear and s.has_conv
    with pytest.raises(NeedsBackbone):
        s(torch.zeros(1, 3, 32, 32))


def test_describe_refuses_shared_tensors_and_other_heads():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    m[1].weight = m[0].weight
    assert describe(m, ["1"]) is None
    assert describe(nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 2, 1)), ["1"]) is None
    assert describe(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), ["0", "1"]) is None


def test_probe_rerun_uses_the_stand_in_and_writes_the_same_run(data, weights, tmp_path, monkeypatch):
    first = P.probe(["smallcnn"], weights=weights, data=str(data), out=tmp_path / "p1", **KW)[0]
    assert not first.from_store and len(list(_root().iterdir())) == 2  # the entry and its data-config index
    built = _spy_assemble(monkeypatch, P)
    again = P.probe(["smallcnn"], weights=weights, data=str(data), out=tmp_path / "p2", **KW)[0]
    assert built == [True] and again.from_store
    shutil.rmtree(_root())  # the same rerun with the real model
    ref = P.probe(["smallcnn"], weights=weights, data=str(data), out=tmp_path / "p3", **KW)[0]
    assert built == [True, False] and ref.from_store
    assert [h.val_accs for h in again.heads] == [h.val_accs for h in ref.heads]
    for f in ("best.pt", "last.pt"):
        _same_checkpoint(tmp_path / "p2" / f, tmp_path / "p3" / f)
    assert (tmp_path / "p2" / "config.yaml").read_bytes() == (tmp_path / "p3" / "config.yaml").read_bytes()


def test_features_not_stored_build_the_real_model(data, weights, tmp_path, monkeypatch):
    """A kept backbone but other data: the stand-in finds no features, the real model computes them."""
    P.probe(["smallcnn"], weights=weights, data=str(data), out=tmp_path / "p1", **KW)
    other = tiny_tree(tmp_path / "other", per_class=9)
    built = []
    real = P.assemble
    monkeypatch.setattr(P, "assemble", lambda *a, **k: (built.append(k.get("stand_in")), real(*a, **k))[1])
    r = P.probe(["smallcnn"], weights=weights, data=str(other), out=tmp_path / "p2", **KW)[0]
    assert built == [True, False] and not r.from_store and r.train_images + r.val_images == 27


@pytest.mark.parametrize("damage", ["record", "state", "tensor-name"])
def test_a_damaged_entry_is_a_miss(data, weights, tmp_path, damage):
    P.probe(["smallcnn"], weights=weights, data=str(data), out=tmp_path / "p1", **KW)
    entry = next(p for p in _root().iterdir() if p.is_dir())
    if damage == "record":
        (entry / "record.json").write_text("{not json")
    elif damage == "state":
        (entry / "state.safetensors").write_bytes(b"\0" * 100)
    else:
        rec = json.loads((entry / "record.json").read_text())
        rec["module_record"]["modules"][1]["params"] = ["evil"]
        (entry / "record.json").write_text(json.dumps(rec))
    cfg = P.probe_recipe("smallcnn", weights=weights, data=str(data), **KW)
    assert backbone_store.load(cfg, 3) is None
    r = P.probe(["smallcnn"], weights=weights, data=str(data), out=tmp_path / "p2", **KW)[0]
    assert r.from_store and r.heads


def test_linear_probe_train_on_the_stand_in_equals_the_real_model(data, weights, tmp_path, monkeypatch):
    import finetune.run.runner as R

    cfg = config.apply_overrides(config.load_recipe("linear-probe"), {
        "model.name": "smallcnn", "model.weights": weights, "data.path": str(data), "data.image_size": 32,
        "train.epochs": 2, "train.precision": "fp32", "train.device": "cpu", "train.graph": False})
    built = _spy_assemble(monkeypatch, R)
    train(cfg, out=tmp_path / "r1")  # computes the features, keeps the backbone
    rep = Notes()
    train(cfg, out=tmp_path / "r2", reporter=rep)
    assert any("read from the feature cache" in n for n in rep.notes)
    shutil.rmtree(_root())
    train(cfg, out=tmp_path / "r3")
    for f in ("best.pt", "last.pt"):
        _same_checkpoint(tmp_path / "r2" / f, tmp_path / "r3" / f)
    assert (tmp_path / "r2" / "config.yaml").read_bytes() == (tmp_path / "r3" / "config.yaml").read_bytes()
    assert built == [False, True, False]  # r1 and r3 build the model; r2 stands in for it
    assert R.head_only_on_stored_features(cfg, R.dist_.from_env())
    for key, v in (("train.graph", True), ("train.ema", True), ("freeze.backbone", False), ("data.augment", "light"),
                   ("model.weights", "none"), ("train.cache_features", "off")):
        assert not R.head_only_on_stored_features(config.apply_overrides(cfg, {key: v}), R.dist_.from_env()), key


@pytest.mark.subprocess
def test_cached_probe_imports_neither_timm_nor_torchvision(data, tmp_path):
    """The point of it: a timm backbone's cached rerun imports no timm and no torchvision (both import
    torch._dynamo), and decodes no image."""
    torch.manual_seed(0)
    w = tmp_path / "resnet10t.pt"
    torch.save(build_model("timm:resnet10t", num_classes=5).model.state_dict(), w)
    code = f"""
import sys
from finetune.tools import probe as P
import finetune.data.datasets as DS
decoded = []
real = DS.decode
DS.decode = lambda *a, **k: (decoded.append(1), real(*a, **k))[1]
r = P.probe(["timm:resnet10t"], weights={str(w)!r}, data={str(data)!r}, out={str(tmp_path / 'out')!r} + sys.argv[1],
            image_size=32, epochs=1, precision="fp32", device="cpu", seed=0)[0]
print(r.from_store, "timm" in sys.modules, "torchvision" in sys.modules, len(decoded))
"""
    env = {**cli_env(), "FINETUNE_CACHE": str(tmp_path / "cache")}
    outs = [subprocess.run([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300) for i in (1, 2)]
    assert [o.returncode for o in outs] == [0, 0], outs[1].stderr[-2000:]
    assert outs[0].stdout.split()[:3] == ["False", "True", "True"]
    assert outs[1].stdout.split() == ["True", "False", "False", "0"]


def test_cache_clear_removes_kept_backbones(data, weights, tmp_path, cli):
    P.probe(["smallcnn"], weights=weights, data=str(data), out=tmp_path / "p1", **KW)
    entry = next(p for p in _root().iterdir() if p.is_dir())
    size = sum(f.stat().st_size for f in entry.iterdir())
    assert cli("cache", "clear", "--older-than", "1d").stdout.startswith("removed 0 entries (0 B)")
    assert entry.is_dir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (_root() / ("f" * 64)).symlink_to(outside)  # a link in the store is never followed
    r = cli("cache", "clear")
    assert r.stdout.startswith("removed 2 entries and 1 kept backbones (") and not entry.exists()
    assert (outside / "keep.txt").read_text() == "mine"
    assert size > 10_000  # the smallcnn's tensors


def test_feature_extraction_says_how_far_it_got(monkeypatch, caplog):
    """The first run of a probe on a few thousand photos computed features for minutes in silence: a line after 10 s,
    then every FINETUNE_PROGRESS_SECONDS, none once done."""
    import logging

    from finetune.speedups import feature_store as FS

    clock = iter([0.0, 5.0, 12.0, 30.0, 43.0, 80.0])
    monkeypatch.setattr(FS.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("FINETUNE_PROGRESS_SECONDS", "30")
    with caplog.at_level(logging.INFO, logger="finetune"):
        p = FS.Progress(500)  # t0 = 0
        for _ in range(5):
            p.step(100)  # at 5, 12, 30, 43, 80 s
    assert [r.getMessage() for r in caplog.records] == [
        "frozen features: 200/500 images (40%), 16.7 img/s, about 18 s left",
        "frozen features: 400/500 images (80%), 9.3 img/s, about 11 s left"]


def test_lr_find_on_the_stand_in_equals_the_real_model(data, weights, monkeypatch):
    import finetune.run.assemble as A
    from finetune.run.lr_find import lr_find

    cfg = config.apply_overrides(config.load_recipe("linear-probe"), {
        "model.name": "smallcnn", "model.weights": weights, "data.path": str(data), "data.image_size": 32,
        "train.precision": "fp32", "train.device": "cpu"})
    built = []
    real = A.backbone_store.load
    monkeypatch.setattr(A.backbone_store, "load", lambda *a, **k: (lambda r: (built.append(r is not None), r)[1])(
        real(*a, **k)))
    lr_find(cfg, steps=20)  # computes the features, keeps the backbone
    again = lr_find(cfg, steps=20)
    shutil.rmtree(_root())
    ref = lr_find(cfg, steps=20)
    assert built == [False, True, False]
    assert again.lrs == ref.lrs and again.losses == ref.losses and again.suggestion == ref.suggestion
