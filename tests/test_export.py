"""finetune export --format onnx|torchscript: the exported graph computes what the checkpoint's model computes
(onnxruntime; torch.jit.load), for any batch size, and its sidecar JSON holds the eval transform and opset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finetune import config
from finetune.api import load_model
from finetune.run.checkpoint import load_checkpoint
from finetune.run.runner import train

from helpers import tiny_tree


@pytest.fixture(scope="module", params=["smallcnn", "timm:test_resnet"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = tiny_tree(root / "data", per_class=6)
    over = {"data.path": str(data), "model.name": request.param, "model.weights": "none", "train.epochs": 1,
            "train.batch_size": 8, "train.precision": "fp32", "train.device": "cpu", "train.tensorboard": False,
            "data.image_size": 32}
    train(config.apply_overrides(config.load_recipe("default"), over), out=root / "run")
    return root / "run"


def _reference(run, x):
    model, _ = load_model(run / "best.pt")
    with torch.inference_mode():
        return model(x.contiguous(memory_format=torch.channels_last)).float().numpy()


@pytest.mark.slow
def test_onnx_matches_pytorch_with_dynamic_batch(run, cli):
    import onnx
    import onnxruntime as ort

    r = cli("export", run / "best.pt", "--format", "onnx")
    dest, side = run / "best.onnx", run / "best.onnx.json"
    assert r.exit_code == 0 and r.stdout == f"{dest}\n{side}\n", r.stderr
    meta = json.loads(side.read_text())
    ckpt = load_checkpoint(run / "best.pt")
    assert meta["opset"] == 18 and meta["transform"] == ckpt["transform"]
    assert meta["class_names"] == ["a", "b", "c"] and meta["input"]["shape"] == ["batch", 3, 32, 32]
    proto = onnx.load(str(dest))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [18]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["finetune.class_names"]) == ["a", "b", "c"]
    sess = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == ["batch", 3, 32, 32]
    for n in (1, 5):  # exported with a batch of 2: other batch sizes run too
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, _reference(run, x), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch(run, cli, tmp_path):
    r = cli("export", run / "best.pt", "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert r.exit_code == 0 and r.stdout == f"{tmp_path / 'm.pt'}\n{tmp_path / 'm.pt.json'}\n", r.stderr
    ts = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = ts(x).numpy()
    np.testing.assert_allclose(got, _reference(run, x), rtol=1e-4, atol=1e-5)
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    assert meta["format"] == "torchscript" and "opset" not in meta and meta["num_classes"] == 3

    before = (tmp_path / "m.pt").read_bytes()
    r = cli("export", run / "best.pt", "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert r.exit_code == 1 and r.stderr == (f"Error: '{tmp_path / 'm.pt'}' already exists; pass --overwrite to "
                                             "replace it or choose another --out\n")
    assert (tmp_path / "m.pt").read_bytes() == before


def test_onnx_without_the_extra_is_one_line(run, cli, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if `pip install finetune` without [onnx]
    r = cli("export", run / "best.pt", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.exit_code == 1 and r.stderr == ("Error: --format onnx needs the packages onnx and onnxscript "
                                             "(onnxscript is missing); install them with pip install "
                                             "'finetune[onnx]'\n")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_full_disk_during_export_is_one_line_and_keeps_the_old_file(run, cli, tmp_path, monkeypatch, fmt):
    """Issue 13: a full disk while exporting (the graph or the weights) is one error line; the file that was there
    stays whole and no temp file is left behind."""
    import os

    out = tmp_path / "m.bin"
    out.write_bytes(b"previous export")
    real = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".m.bin."):
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    r = cli("export", run / "best.pt", "--format", fmt, "--out", out, "--overwrite")
    assert r.exit_code == 1 and r.stderr == f"Error: cannot write '{out}': No space left on device\n"
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def test_a_killed_exports_temp_files_are_removed_by_the_next_write(run, cli, tmp_path):
    """Issue 13: a kill during an export leaves `.NAME.XXXX.tmp` (the atomic write's temp file); the next write of
    that file removes it (and only the temp files of that name)."""
    (tmp_path / ".m.pt.ab12cd34.tmp").write_bytes(b"torn")
    (tmp_path / ".other.pt.ab12cd34.tmp").write_bytes(b"someone else's")
    r = cli("export", run / "best.pt", "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.ab12cd34.tmp", "m.pt", "m.pt.json"]
