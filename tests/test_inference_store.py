"""predict of a checkpoint it has predicted twice before runs the stored inference graph: the same rows bitwise,
no timm, torchvision or torch._dynamo imported; a damaged, foreign or refused entry is a miss (the model is built);
cache clear removes graphs and marks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finetune import api
from finetune.tools import probe as P
from helpers import tiny_tree


@pytest.fixture
def run(tmp_path):
    data = tmp_path / "data"
    tiny_tree(data / "train", per_class=6, size=40)
    tiny_tree(data / "val", per_class=2, size=40)
    P.probe(["timm:test_efficientnet"], data=str(data), lrs=[1e-2], wds=[0.0], out=tmp_path / "run", weights="none",
            image_size=32, epochs=1, precision="fp32", device="cpu", seed=0)
    return tmp_path / "run" / "best.pt", data / "val"


def _entries():
    root = os.path.join(os.environ["FINETUNE_CACHE"], "inference")
    if not os.path.isdir(root):
        return []
    return sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)) and not e.startswith("."))


def _rows(ckpt, images):
    return api.predict(ckpt, images, top_k=3, batch_size=4, device="cpu", min_confidence="auto")


def test_second_predict_runs_the_stored_graph_with_the_same_rows(run, monkeypatch):
    ckpt, images = run
    first = _rows(ckpt, images)
    assert len(first) == 6 and _entries() == []  # 6 val images: batches of 4 and 2; the first leaves a mark
    assert _rows(ckpt, images) == first and len(_entries()) == 1  # the second keeps the graph
    import finetune.run.restore

    def no_build(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(finetune.run.restore, "restore_model", no_build)
    assert _rows(ckpt, images) == first  # every probability bitwise equal, the low-confidence marks too
    assert api.predict(ckpt, sorted(images.rglob("*.png"))[0], top_k=3, device="cpu") == \
        {k: v for k, v in first[0].items() if k not in ("low_confidence", "min_confidence")} | {
            "path": str(sorted(images.rglob("*.png"))[0]), "name": str(sorted(images.rglob("*.png"))[0])}


@pytest.mark.subprocess
def test_a_stored_graph_predicts_without_timm_torchvision_or_dynamo(run):
    ckpt, images = run
    first = _rows(ckpt, images)
    assert _rows(ckpt, images) == first and len(_entries()) == 1
    code = ("import json, sys; from finetune import api; rows = api.predict(sys.argv[1], sys.argv[2], top_k=3, "
            "batch_size=4, device='cpu', min_confidence='auto'); print(json.dumps([rows, sorted(m for m in "
            "('timm', 'torchvision', 'torch._dynamo') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt), str(images)], capture_output=True, text=True,
                         check=True, env=os.environ.copy())
    rows, imported = json.loads(out.stdout)
    assert imported == [] and rows == json.loads(json.dumps(first))


@pytest.mark.parametrize("damage", ["garbage", "refused-op", "foreign-op", "missing-tensors", "format",
                                    "dangling-reference", "unknown-kind", "op-fails", "wrong-shape", "strides"])
def test_a_damaged_or_refused_entry_is_a_miss(run, monkeypatch, damage):
    ckpt, images = run
    first = _rows(ckpt, images)
    _rows(ckpt, images)
    (entry,) = _entries()
    d = os.path.join(os.environ["FINETUNE_CACHE"], "inference", entry)
    doc = json.load(open(os.path.join(d, "graph.json")))
    if damage == "garbage":
        open(os.path.join(d, "graph.json"), "w").write("{not json")
    elif damage in ("refused-op", "foreign-op"):
        doc["nodes"][0]["op"] = "aten.from_file.default" if damage == "refused-op" else "prims.add.default"
        json.dump(doc, open(os.path.join(d, "graph.json"), "w"))
    elif damage == "missing-tensors":
        os.remove(os.path.join(d, "tensors.safetensors"))
    elif damage in ("dangling-reference", "unknown-kind", "op-fails", "wrong-shape", "strides"):
        if damage == "strides":  # a stride that would allocate far more than the tensor holds
            name = next(iter(doc["strides"]))
            doc["strides"][name] = [10 ** 12] * len(doc["strides"][name])
        elif damage == "dangling-reference":
            doc["nodes"][0]["args"][0] = {"node": "defined_nowhere"}
        elif damage == "unknown-kind":
            doc["nodes"][0]["args"][0] = {"code": "import os"}
        elif damage == "op-fails":  # passes the load checks, fails when run: the model answers instead
            doc["nodes"][0]["args"] = []
        else:
            doc["output"] = doc["nodes"][0]["name"]  # a feature map, not [batch, classes]
        json.dump(doc, open(os.path.join(d, "graph.json"), "w"))
    else:
        json.dump({**doc, "format": 99}, open(os.path.join(d, "graph.json"), "w"))
    import finetune.run.restore

    built = []
    real = finetune.run.restore.restore_model
    monkeypatch.setattr(finetune.run.restore, "restore_model", lambda *a, **k: built.append(1) or real(*a, **k))
    assert _rows(ckpt, images) == first and built == [1]


def test_no_entry_without_a_cache_and_one_mark_per_checkpoint(run, monkeypatch):
    ckpt, images = run
    cache = os.environ["FINETUNE_CACHE"]
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    first = _rows(ckpt, images)
    _rows(ckpt, images)
    monkeypatch.setenv("FINETUNE_CACHE", cache)
    assert _entries() == [] and not os.path.exists(os.path.join(cache, "inference"))
    assert _rows(ckpt, images) == first and _entries() == []
    ckpt.write_bytes(ckpt.read_bytes())  # the same bytes (a copy, a touch): the same key
    assert _rows(ckpt, images) == first and len(_entries()) == 1
    assert os.listdir(os.path.join(cache, "inference")) == _entries()  # the mark went with the entry


def test_cache_clear_removes_graphs_and_marks(run, cli):
    ckpt, images = run
    _rows(ckpt, images)
    _rows(ckpt, images)
    P.probe(["timm:test_efficientnet"], data=str(images.parent), lrs=[1e-3], wds=[0.0], out=ckpt.parent.parent / "b",
            weights="none", image_size=32, epochs=1, precision="fp32", device="cpu", seed=0)
    _rows(ckpt.parent.parent / "b" / "best.pt", images)  # a mark only
    root = os.path.join(os.environ["FINETUNE_CACHE"], "inference")
    assert len(_entries()) == 1 and len(os.listdir(root)) == 2
    r = cli("cache", "clear", "--older-than", "1d")
    assert r.exit_code == 0 and len(os.listdir(root)) == 2  # both recent: kept
    r = cli("cache", "clear")
    assert r.exit_code == 0, r.stderr
    assert "and 1 inference graphs" in r.stdout and os.listdir(root) == []
