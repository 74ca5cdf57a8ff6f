"""Reliability round 3 (issue 27), rows 14, 15, 16, 18, 19: the disk image cache ties its index to its data file;
autotune.json survives damage and concurrent writers; SIGTERM in probe / lr-find / export behaves as Ctrl-C; export
never replaces a run's own files; weights stored as int64/complex and PIL's decompression-bomb warning give one
line naming the file."""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.config import DataCfg
from finetune.data import build as build_mod
from finetune.data import build_data
from helpers import ROOT, cli_env, tiny_tree
from test_data import SMALL

# ------------------------------------------------------------------------------------------ row 14: disk cache


def _reader(reverse: bool):
    """A sequential ``read_all`` (files in order, or reversed): two fills with different offsets per file."""
    def read_all(paths, fn):
        return {p: fn(p) for p in (reversed(list(paths)) if reverse else paths)}, {}

    return read_all


def test_disk_cache_index_from_another_fill_is_refilled_with_one_warning(tmp_path, monkeypatch, caplog):
    root = tiny_tree(tmp_path / "d", per_class=4)
    keep = tmp_path / "cache"
    cfg = DataCfg(path=str(root), image_size=16, cache="disk", cache_dir=str(keep), val_split=0)
    monkeypatch.setattr(build_mod, "read_all", _reader(False))
    build_data(cfg, SMALL)
    index = next(keep.glob("*.json"))
    first_index = index.read_text()
    index.unlink()  # a second fill (another run) writes the data file again, in another order ...
    monkeypatch.setattr(build_mod, "read_all", _reader(True))
    build_data(cfg, SMALL)
    assert json.loads(index.read_text())["slots"] != json.loads(first_index)["slots"]
    index.write_text(first_index)  # ... and the first run's index lands last: paired with the other fill's data
    ram = build_data(DataCfg(path=str(root), image_size=16, cache="ram", val_split=0), SMALL)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        disk = build_data(cfg, SMALL)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    data_file = next(keep.glob("*.bin"))
    assert warnings == [f"the image cache '{data_file}' does not match its index (the data file comes from another "
                        "fill); decoding the images again"]
    assert len(disk.train) == len(ram.train) == 12
    assert all(torch.equal(disk.train.cache[i], ram.train.cache[i]) for i in range(12))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune"):  # the refilled cache is whole again: no warning
        again = build_data(cfg, SMALL)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert all(torch.equal(again.train.cache[i], ram.train.cache[i]) for i in range(12))


def test_disk_cache_truncated_or_damaged_index_is_refilled(tmp_path, monkeypatch, caplog):
    root = tiny_tree(tmp_path / "d", per_class=2)
    keep = tmp_path / "cache"
    cfg = DataCfg(path=str(root), image_size=16, cache="disk", cache_dir=str(keep), val_split=0)
    build_data(cfg, SMALL)
    data_file, index = next(keep.glob("*.bin")), next(keep.glob("*.json"))
    size = data_file.stat().st_size
    with open(data_file, "r+b") as f:
        f.truncate(size - 100)
    ram = build_data(DataCfg(path=str(root), image_size=16, cache="ram", val_split=0), SMALL)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        disk = build_data(cfg, SMALL)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"the image cache '{data_file}' does not match its index (the data file has {size - 100:,} bytes, the "
        f"index expects {size:,}); decoding the images again"]
    assert data_file.stat().st_size == size and all(torch.equal(disk.train.cache[i], ram.train.cache[i])
                                                    for i in range(6))
    index.write_text('{"slots": [1, 2')  # a torn index: no traceback, refilled
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune"):
        disk = build_data(cfg, SMALL)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"the image cache '{data_file}' does not match its index (the index cannot be read); decoding the images "
        "again"]
    assert all(torch.equal(disk.train.cache[i], ram.train.cache[i]) for i in range(6))


# ------------------------------------------------------------------------------------------ row 15: autotune.json


def _fake_tune(keys: list[str], pause: float = 0.0):
    def tune(model, shape, channels_last):
        from finetune.speedups import depthwise as dwgrad

        time.sleep(pause)  # (both processes have read the file before either writes)
        for k in keys:
            dwgrad._DECIDED[k] = True
        return {"layers": len(keys), "switched": [], "seconds": 0.0}

    return tune


@pytest.mark.parametrize("content", ["[" * 100000 + "]" * 100000, "[1, 2]", '"text"', '{"M": [1]}', "{not json"],
                         ids=["deep", "list", "string", "wrong-entry", "torn"])
def test_autotune_json_of_the_wrong_shape_is_treated_as_empty_and_rewritten(tmp_path, monkeypatch, content):
    from finetune.speedups import depthwise as dwgrad

    path = tmp_path / "autotune.json"
    path.write_text(content.replace('"M"', json.dumps(dwgrad._machine())))
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(dwgrad, "_DECIDED", {})
    monkeypatch.setattr(dwgrad, "tune", _fake_tune(["layer a"]))
    dwgrad._tune_remembered(torch.nn.Identity(), (1, 3, 8, 8), False)
    assert json.loads(path.read_text()) == {dwgrad._machine(): {"layer a": True}}


def _child(cache: str, keys: list[str]) -> None:
    import os

    from finetune.speedups import depthwise as dwgrad

    os.environ["FINETUNE_CACHE"] = cache
    dwgrad._DECIDED.clear()
    dwgrad.tune = _fake_tune(keys, pause=0.5)
    dwgrad._tune_remembered(torch.nn.Identity(), (1, 3, 8, 8), False)


def test_autotune_json_two_concurrent_runs_keep_both_entries(tmp_path):
    from finetune.speedups import depthwise as dwgrad

    (tmp_path / "autotune.json").write_text(json.dumps({"other machine": {"x": False}}))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(str(tmp_path), [f"{name} {i}" for i in range(3)]))
             for name in ("first", "second")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads((tmp_path / "autotune.json").read_text()) == {
        "other machine": {"x": False},
        dwgrad._machine(): {f"{name} {i}": True for name in ("first", "second") for i in range(3)}}


# ------------------------------------------------------------------------------------------ row 16: SIGTERM

# Runs the CLI with one function replaced by one that writes MARK and waits: the test sends SIGTERM then.
WRAPPER = r"""
import importlib, pathlib, sys, time
mod, attr, mark = sys.argv[1:4]
m = importlib.import_module(mod)
real = getattr(m, attr)

def wait():
    pathlib.Path(mark).write_text("ready")
    time.sleep(120)

if attr == "save":  # the feature store: hold inside the write, with its temp entry on disk
    def patched(root, key, meta, batches, n, *rest, **kw):
        def slow():
            for b in batches():
                yield b
                wait()
        return real(root, key, meta, slow, n, *rest, **kw)
elif attr == "_jit_save":  # export: hold inside the atomic write, half the file written
    def patched(traced, f):
        f.write(b"partial")
        wait()
else:
    def patched(*a, **k):
        wait()
setattr(m, attr, patched)
from finetune.cli.app import main
sys.argv = ["finetune", *sys.argv[4:]]
main()
"""

SMALLCNN = ("--model", "smallcnn", "--weights", "none", "--image-size", "32", "--device", "cpu", "--batch-size", "8")


def _sigterm_mid(tmp_path, target: str, *args) -> subprocess.CompletedProcess:
    mark = tmp_path / "ready"
    mod, attr = target.rsplit(".", 1)
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, mod, attr, str(mark), *map(str, args)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while not mark.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert mark.exists(), proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_mid_probe_exits_130_with_one_line_and_leaves_no_temp_feature_dir(tmp_path):
    import os

    data = tiny_tree(tmp_path / "data", per_class=6)
    run, cache = tmp_path / "run", Path(os.environ["FINETUNE_CACHE"])
    r = _sigterm_mid(tmp_path, "finetune.speedups.feature_store.save", "probe", "--data", data, "--val-split", "0.3",
                     "--out", run, "--quiet", *SMALLCNN)
    assert r.returncode == 130, r.stderr  # Ctrl-C's code, not death by signal (-15)
    assert r.stderr.splitlines() == ["Stopped; nothing was written"]
    assert r.stdout == ""
    assert [p.name for p in cache.rglob("*") if ".tmp" in p.name] == []  # the store's temp entry is gone
    assert not run.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from finetune import config
    from finetune.run.runner import train

    root = tmp_path_factory.mktemp("r3")
    data = tiny_tree(root / "data", per_class=4)
    over = {"data.path": str(data), "model.name": "smallcnn", "model.weights": "none", "train.epochs": 1,
            "train.batch_size": 8, "train.precision": "fp32", "train.device": "cpu", "train.tensorboard": False,
            "data.image_size": 32}
    train(config.apply_overrides(config.load_recipe("default"), over), out=root / "run")
    return root / "run"


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_mid_export_exits_130_and_leaves_no_partial_file(trained, tmp_path):
    out = tmp_path / "exp" / "model.torchscript.pt"
    r = _sigterm_mid(tmp_path, "finetune.tools.export._jit_save", "export", trained / "best.pt", "--format",
                     "torchscript",
                     "--out", out)
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines() == ["Stopped; nothing was written"] and r.stdout == ""
    assert sorted(p.name for p in out.parent.iterdir()) == []


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_mid_lr_find_exits_130_and_writes_nothing(tmp_path):
    data = tiny_tree(tmp_path / "data", per_class=4)
    out = tmp_path / "lr"
    r = _sigterm_mid(tmp_path, "finetune.run.lr_find.range_test", "lr-find", "--data", data, "--out", out, "--quiet",
                     "--precision", "fp32", *SMALLCNN)
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines() == ["Stopped; nothing was written"] and r.stdout == ""
    assert not out.exists()


# ------------------------------------------------------------------------------------------ row 18: export


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors", "state-dict"])
@pytest.mark.parametrize("name", ["last.pt", "best.pt", "metrics.json", "epoch003.pt", "best_ema.pt",
                                  "report.html", "config.yaml"])
def test_export_refuses_to_overwrite_a_file_the_run_owns(trained, cli, fmt, name):
    dest = trained / name
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    r = cli("export", trained / "best.pt", "--format", fmt, "--out", dest, "--overwrite")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [f"Error: refusing to write the export to '{dest}': '{name}' is a file of the "
                                     f"run directory '{trained}'; choose another --out (a name the run does not "
                                     "use)"]
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before  # nothing replaced/added


def test_export_refuses_a_sidecar_on_a_run_file_and_still_exports_elsewhere(trained, cli, tmp_path):
    dest = trained / "metrics"  # the graph's sidecar would be RUN/metrics.json
    r = cli("export", trained / "best.pt", "--format", "torchscript", "--out", dest, "--overwrite")
    assert r.exit_code == 1 and not dest.exists()
    assert r.stderr.splitlines() == [f"Error: refusing to write the export to '{trained / 'metrics.json'}': "
                                     f"'metrics.json' is a file of the run directory '{trained}'; choose another "
                                     "--out (a name the run does not use)"]
    r = cli("export", trained / "best.pt", "--format", "safetensors", "--out", trained / "weights.safetensors")
    assert r.exit_code == 0 and r.stdout == f"{trained / 'weights.safetensors'}\n"
    (trained / "weights.safetensors").unlink()


# ------------------------------------------------------------------------------------------ row 19: dtypes, PIL


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_weights_file_with_a_float_parameter_stored_as_int_or_complex_is_one_error(tmp_path, dtype):
    from finetune.errors import WeightsError
    from finetune.models import build_model

    sd = build_model("timm:test_resnet", num_classes=3, weights="none").model.state_dict()
    sd["conv1.0.weight"] = (sd["conv1.0.weight"] * 10).to(dtype)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(WeightsError) as e:
        build_model("timm:test_resnet", num_classes=3, weights=str(tmp_path / "w.pth"))
    kind = str(dtype).replace("torch.", "")
    assert str(e.value) == (
        f"weights file '{tmp_path / 'w.pth'}': 'conv1.0.weight' is stored as {kind} but float32 in the model "
        f"(loading would cast it silently{', dropping the imaginary part' if dtype.is_complex else ''}); save the "
        "weights as floating point (e.g. {k: v.float() for k, v in state_dict.items()})")


def test_weights_file_integer_buffers_and_half_precision_still_load(tmp_path):
    from finetune.models import build_model

    src = build_model("timm:test_resnet", num_classes=3, weights="none").model.state_dict()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in src.items()}
    assert sd["conv1.1.num_batches_tracked"].dtype == torch.int64
    torch.save(sd, tmp_path / "w.pth")
    got = build_model("timm:test_resnet", num_classes=3, weights=str(tmp_path / "w.pth")).model.state_dict()
    assert all(torch.equal(got[k], sd[k].to(got[k].dtype)) for k in sd)


def test_pil_decompression_bomb_warning_becomes_one_line_naming_the_file(tmp_path, monkeypatch, caplog, capsys):
    import warnings

    from PIL import Image

    from finetune.data import images

    path = tiny_tree(tmp_path / "d", classes=("a",), per_class=1, size=32) / "a" / "a_000.png"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,024 pixels: over the limit, under twice it
    monkeypatch.setattr(images, "_warned", set())
    with warnings.catch_warnings(record=True) as raw, caplog.at_level(logging.WARNING, logger="finetune"):
        warnings.simplefilter("always")
        assert images.image_size(path) == (32, 32)
        assert images.load_image(path).size == (32, 32)
    assert [str(w.message) for w in raw] == []  # PIL's own warning does not leak
    assert [r.getMessage() for r in caplog.records] == [
        f"image '{path}' is very large (1,024 pixels; PIL's limit is 1,000): a possible decompression bomb; it is "
        "read anyway (set FINETUNE_MAX_IMAGE_PIXELS=N to change the limit)"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: PIL refuses; one error with the fix
    with pytest.raises(images.DataError) as e:
        images.load_image(path)
    assert str(e.value) == (f"cannot read image '{path}': image too large (1,024 pixels; the limit is 1,000), a "
                            "possible decompression bomb; if you trust the file, raise PIL's limit with "
                            "FINETUNE_MAX_IMAGE_PIXELS=N (pixels; 0: none) or downscale the image")


def test_pil_pixel_limit_from_the_environment(monkeypatch):
    from PIL import Image

    from finetune.data import images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv("FINETUNE_MAX_IMAGE_PIXELS", "5000")
    images._pixel_limit()
    assert Image.MAX_IMAGE_PIXELS == 5000
    monkeypatch.setenv("FINETUNE_MAX_IMAGE_PIXELS", "0")
    images._pixel_limit()
    assert Image.MAX_IMAGE_PIXELS is None
