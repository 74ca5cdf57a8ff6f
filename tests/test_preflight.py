"""Ordinary mistakes answer before torch is imported (finetune/config/preflight.py), and model names come from a
name list cached per timm/torchvision version (finetune/config/catalog.py): the same error lines as the checks
that run later, the same `finetune models` rows, no torch, timm or torchvision in the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import catalog, preflight
from finetune.errors import CheckpointError, ConfigError, DataError, ModelError, WeightsError

DATA_MISSING = "Error: data path '{}' does not exist; pass a folder of images, 'sample', or cifar10:ROOT"
WEIGHTS_MISSING = ("Error: weights file '{}' not found; pass an existing .pth/.pt/.safetensors file, a weights name, "
                   "or --weights none")
CKPT_MISSING = ("Error: checkpoint '{}' not found; pass a .pt file from a run directory (runs/<run>/best.pt or "
                "last.pt)")


def _fake(n: int) -> dict:
    return {"timm": {f"net{n}": ["a", "b"], "other": []}, "torchvision": {"resnet18": ["ResNet18_Weights.X"]}}


@pytest.fixture
def fake_libs(monkeypatch, tmp_path):
    """A cache root of its own, fixed versions, and a ``compute`` that counts its calls (no library asked)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(catalog, "versions", lambda: {"timm": "1.2", "torchvision": "0.3"})
    calls: list[str] = []

    def compute(lib):
        calls.append(lib)
        return _fake(1)[lib]

    monkeypatch.setattr(catalog, "compute", compute)
    monkeypatch.setattr(catalog, "_MEMO", {})
    return calls


def test_the_name_list_is_written_once_and_reused(fake_libs, tmp_path):
    assert catalog._cached() == _fake(1)
    path = tmp_path / "cache" / "models" / "names-timm1.2-tv0.3.json"
    assert catalog.cache_file() == path
    assert {k: v for k, v in json.loads(path.read_text()).items() if k != "versions"} == _fake(1)
    assert fake_libs == ["timm", "torchvision"]
    catalog._MEMO.clear()  # a new process: reads the file, asks no library
    assert catalog._cached() == _fake(1)
    assert fake_libs == ["timm", "torchvision"]


def test_a_new_version_lists_again(fake_libs, monkeypatch, tmp_path):
    catalog._cached()
    monkeypatch.setattr(catalog, "versions", lambda: {"timm": "1.3", "torchvision": "0.3"})
    catalog._cached()
    assert fake_libs == ["timm", "torchvision"] * 2
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [
        "names-timm1.2-tv0.3.json", "names-timm1.3-tv0.3.json"]


@pytest.mark.parametrize("text", ["{not json", "", json.dumps({"timm": {"a": "b"}, "torchvision": {}}),
                                  json.dumps([1, 2])])
def test_a_damaged_name_list_is_listed_again_and_rewritten(fake_libs, text):
    path = catalog.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert catalog._cached() == _fake(1)
    assert fake_libs == ["timm", "torchvision"]
    assert {k: v for k, v in json.loads(path.read_text()).items() if k != "versions"} == _fake(1)


def test_an_unwritable_or_disabled_cache_still_answers(fake_libs, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("FINETUNE_CACHE", str(blocker))  # <root>/models cannot be made
    assert catalog._cached() == _fake(1)
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    assert catalog.cache_file() is None
    assert catalog._cached() == _fake(1)
    assert fake_libs == ["timm", "torchvision"] * 2


def test_the_computed_list_is_the_libraries_own():
    import timm
    import torchvision.models as tvm

    tl = catalog.compute("timm")
    assert list(tl) == timm.list_models()
    assert sum(len(t) for t in tl.values()) == len(timm.list_pretrained())
    tv = catalog.compute("torchvision")
    assert list(tv) == tvm.list_models(module=tvm)
    assert tv["resnet18"] == ["ResNet18_Weights.IMAGENET1K_V1"]


def test_data_path_rules():
    from finetune.config import SAMPLE_DIR
    from finetune.data import cifar

    assert preflight.resolve_data_path(" sample ") == SAMPLE_DIR
    assert preflight.resolve_data_path("cifar100:/x") == "cifar100:/x"
    for ok in ("sample", "cifar10:/nowhere", str(SAMPLE_DIR)):
        preflight.check_data(ok)
    assert preflight.CIFAR_FOLDERS == {k: v["folder"] for k, v in cifar.LAYOUT.items()}
    with pytest.raises(DataError, match=r"^--data cifar100 needs a folder: --data cifar100:ROOT \(ROOT holds or will "
                                        r"hold cifar-100-python/\)$"):
        preflight.check_data("cifar100")


def test_weights_and_checkpoint_rules(tmp_path):
    for not_a_file in (None, "none", "Random", "", "DEFAULT", "pretrained", "a1_in1k"):
        assert preflight.weights_file(not_a_file) is None
    f = tmp_path / "w.pt"
    f.write_bytes(b"")
    assert preflight.weights_file(f" {f} ") == f
    with pytest.raises(WeightsError):
        preflight.weights_file(str(tmp_path / "nope.safetensors"))
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"^checkpoint '.*run' not found"):
        preflight.checkpoint_file(run)
    (run / "last.pt").write_bytes(b"")
    assert preflight.checkpoint_file(run) == run / "last.pt"
    assert preflight.checkpoint_file(run / "best.pt") == run / "best.pt"  # restored from last.pt when read


# ----------------------------------------------------------------------------------------------- in a fresh process

_SCRIPT = r"""
import json, sys
from typer.testing import CliRunner
from finetune.cli.app import app
from finetune.config import catalog

out = {"cases": [], "resolve": {}}
runner = CliRunner()
for args in json.loads(sys.argv[1]):
    r = runner.invoke(app, args)
    lines = r.stderr.strip().splitlines()
    out["cases"].append({"args": args, "code": r.exit_code, "line": lines[-1] if lines else "",
                         "stdout": r.stdout, "torch": sorted({"torch", "timm", "torchvision"} & set(sys.modules))})
for name in json.loads(sys.argv[2]):
    try:
        out["resolve"][name] = list(catalog.resolve(name))
    except Exception as e:
        out["resolve"][name] = f"{type(e).__name__}: {e}"
out["torch"] = sorted({"torch", "timm", "torchvision"} & set(sys.modules))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def names_cache(tmp_path_factory):
    """A cache root with the name list of the installed libraries (filled here, where they are imported)."""
    root = tmp_path_factory.mktemp("names-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FINETUNE_CACHE", str(root))
    mp.setattr(catalog, "_MEMO", {})
    try:
        catalog._cached()
    finally:
        mp.undo()
    return root


def _fresh(cases: list[list[str]], names: list[str], cache: Path, cwd: Path) -> dict:
    import os

    env = {**os.environ, "FINETUNE_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases), json.dumps(names)], capture_output=True,
                       text=True, env=env, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _expected_model_error(name: str) -> str:
    """The error the model registry itself (torch, timm and torchvision loaded) gives for ``name``."""
    from finetune.models import parse_name

    with pytest.raises(ModelError) as e:
        parse_name(name)
    return f"Error: {e.value}"


BAD_NAMES = ["resnet99", "timm:resnet99", "timm:resnet99.a1_in1k", "tf_efficientnet_lite0", "torchvision:nope",
             "smallcnn:big", "resnet_18", "timm:vit_base_patch16_225"]
GOOD_NAMES = ["smallcnn", "resnet18", "torchvision:resnet18", "timm:resnet18", "timm:resnet18.a1_in1k",
              " timm:test_resnet ", "timm:resnet18.no_such_tag"]


@pytest.mark.subprocess
def test_mistakes_answer_before_torch_is_imported(names_cache, tmp_path):
    from finetune.models import parse_name

    a_file = tmp_path / "photo.jpg"
    a_file.write_bytes(b"")
    run_dir = tmp_path / "emptyrun"
    run_dir.mkdir()
    nope, npt = str(tmp_path / "nope"), str(tmp_path / "nope.pt")
    shards = str(tmp_path / "s-{000..002}.tar")
    cases = {
        ("train", "--data", nope): DATA_MISSING.format(nope),
        ("train", "--data", str(a_file)): f"Error: data path '{a_file}' is a file, not a folder; pass the folder "
                                          "that holds the images",
        ("train", "--data", "cifar10"): "Error: --data cifar10 needs a folder: --data cifar10:ROOT (ROOT holds or "
                                        "will hold cifar-10-batches-py/)",
        ("train", "--data", shards): f"Error: shard '{tmp_path}/s-000.tar' does not exist (3 of the 3 shards of "
                                     f"'{shards}' are missing); check the pattern (brace ranges like "
                                     "train-{000..099}.tar)",
        ("train", "--model", "timm:tf_efficientnet_lite0", "--weights", npt): WEIGHTS_MISSING.format(npt),
        ("train", "--model", "resnet99", "--data", nope): _expected_model_error("resnet99"),  # the name first
        ("lr-find", "--data", nope): DATA_MISSING.format(nope),
        ("probe", "--model", "resnet18", "--data", nope): DATA_MISSING.format(nope),
        ("probe", "--model", "resnet18,resnet99"): _expected_model_error("resnet99"),
        ("probe", "--model", "smallcnn", "--weights", npt): WEIGHTS_MISSING.format(npt),
        ("inspect", "resnet99"): _expected_model_error("resnet99"),
        ("inspect", "resnet18", "--weights", npt): WEIGHTS_MISSING.format(npt),
        ("eval", npt): CKPT_MISSING.format(npt),
        ("eval", str(run_dir)): CKPT_MISSING.format(run_dir),
        ("eval", npt, "--split", "all"): CKPT_MISSING.format(npt),
        ("predict", npt, str(a_file)): CKPT_MISSING.format(npt),
        ("export", npt): CKPT_MISSING.format(npt),
        ("export", npt, "--format", "torchscript"): CKPT_MISSING.format(npt),
    }
    cases.update({("train", "--model", n): _expected_model_error(n) for n in BAD_NAMES})
    out = _fresh([list(c) for c in cases], BAD_NAMES + GOOD_NAMES, names_cache, tmp_path)
    got = {tuple(c["args"]): (c["code"], c["line"], c["torch"]) for c in out["cases"]}
    assert got == {c: (1, line, []) for c, line in cases.items()}
    for name in GOOD_NAMES:  # and what resolves, resolves to the same (source, arch)
        assert out["resolve"][name] == list(parse_name(name))
    assert out["torch"] == []
    assert sorted(tmp_path.iterdir()) == sorted([a_file, run_dir])  # no run directory made (cwd is tmp_path)


@pytest.mark.subprocess
def test_finetune_models_lists_the_same_rows_without_torch(names_cache, tmp_path):
    from finetune.models import list_models

    patterns = ["resnet1*", "timm:vit_tiny*", "efficientnet_b0", "smallcnn", "torchvision:*"]
    cases = [["models", p, "--json"] for p in patterns] + [["models", "--pretrained", "--json"], ["models", "zzz"]]
    out = _fresh(cases, [], names_cache, tmp_path)
    for p, c in zip(patterns, out["cases"]):
        assert (c["code"], json.loads(c["stdout"]), c["torch"]) == (0, list_models(p), [])
    assert json.loads(out["cases"][-2]["stdout"]) == list_models(pretrained_only=True)
    assert out["cases"][-1]["line"] == ("Error: no models match 'zzz'; patterns are globs ('resnet*', 'timm:vit_*') or "
                                        "substrings ('efficient')")
    assert out["torch"] == []


RUN_EXISTS = ("Error: output directory '{}' already exists and is not empty; pass --overwrite to replace it, --resume "
              "to continue it, or choose another --out")


@pytest.mark.subprocess
def test_cheap_mistakes_of_predict_probe_train_report_and_eval_answer_before_torch(names_cache, tmp_path):
    """Issue #29: a missing image, a bad --lrs/--wds/--knn, an existing run in --out, a missing run directory, a
    .safetensors file given as a checkpoint: one error line each, torch never imported."""
    run = tmp_path / "run"
    run.mkdir()
    for name in (".finetune-run", "config.yaml", "last.pt", "best.pt"):
        (run / name).write_bytes(b"")
    nope, w = str(tmp_path / "nope.jpg"), tmp_path / "w.safetensors"
    w.write_bytes(b"")
    probe = ["probe", "--model", "smallcnn"]
    cases = {
        ("predict", str(run / "best.pt"), str(run), nope): f"Error: '{nope}' does not exist; pass image files or "
                                                           "folders of images",
        (*probe, "--lrs", "1e-3,abc"): "Error: --lrs '1e-3,abc' is not a comma-separated list of numbers (e.g. "
                                       "1e-3,3e-3)",
        (*probe, "--lrs", "0"): "Error: --lrs '0': give positive numbers, e.g. 1e-3,3e-3",
        (*probe, "--wds", "-1"): "Error: --wds '-1': give positive numbers (or 0), e.g. 1e-3,3e-3",
        (*probe, "--knn", "x"): "Error: --knn 'x' is not a comma-separated list of integers (e.g. 10,20); 0 turns "
                                "k-NN off",
        (*probe, "--knn", "-1"): "Error: --knn '-1': k must be positive (0 turns k-NN off)",
        ("train", "--out", str(run)): RUN_EXISTS.format(run),
        ("report", str(tmp_path / "nope")): f"Error: run directory '{tmp_path / 'nope'}' not found; pass a folder "
                                            "written by finetune train (see finetune runs)",
        ("eval", str(w)): f"Error: '{w}' is a .safetensors weights file, not a finetune checkpoint; pass a run's "
                          f"best.pt or last.pt (runs/<run>/best.pt), or train from these weights: finetune train "
                          f"--model MODEL --weights {w}",
        ("predict", str(w), str(run)): f"Error: '{w}' is a .safetensors weights file, not a finetune checkpoint; "
                                       "pass a run's best.pt or last.pt (runs/<run>/best.pt), or train from these "
                                       f"weights: finetune train --model MODEL --weights {w}",
    }
    out = _fresh([list(c) for c in cases], [], names_cache, tmp_path)
    got = {tuple(c["args"]): (c["code"], c["line"], c["torch"]) for c in out["cases"]}
    assert got == {c: (1, line, []) for c, line in cases.items()}
    assert out["torch"] == []


def test_the_out_check_says_what_prepare_run_dir_says(tmp_path):
    """The torch-free --out check and the run's own (finetune/run/checkpoint.py) refuse the same directories with
    the same words; what --overwrite may empty is left to the run's."""
    from finetune.errors import FinetuneError
    from finetune.run import checkpoint as ck

    assert (preflight.RUN_MARKER, preflight.RUN_LOCK) == (ck.MARKER, ck.LOCK)
    layouts = {"done": [ck.MARKER, "config.yaml", "last.pt"], "no-ckpt": [ck.MARKER, "config.yaml"],
               "old": ["config.yaml", "last.pt"], "foreign": ["notes.txt"], "a-file": None}
    for name, files in layouts.items():
        d = tmp_path / name
        if files is None:
            d.write_text("x")
        else:
            d.mkdir()
            for f in files:
                (d / f).write_bytes(b"")
        with pytest.raises(FinetuneError) as early:
            preflight.out_dir(d, overwrite=False)
        with pytest.raises(FinetuneError) as late:
            ck.prepare_run_dir(d, overwrite=False)
        assert str(early.value) == str(late.value), name
        preflight.out_dir(d, overwrite=True)  # --overwrite: decided by the run, under its lock
    for fine in (tmp_path / "new", tmp_path / "empty", tmp_path / "locked", None):
        if fine is not None and fine.name != "new":
            fine.mkdir()
        if fine is not None and fine.name == "locked":
            (fine / ck.LOCK).write_bytes(b"")
        preflight.out_dir(fine, overwrite=False)


def test_probe_flag_parsing_is_torch_free_and_reexported():
    from finetune import api
    from finetune.tools import probe

    assert probe.parse_floats is preflight.parse_floats and api.parse_ints is preflight.parse_ints
    assert preflight.parse_floats(" 1e-3, 3e-2 ,", "lrs", ()) == [1e-3, 3e-2]
    assert preflight.parse_floats(None, "wds", (1e-4,)) == [1e-4] and preflight.parse_floats("0", "wds", ()) == [0.0]
    assert preflight.parse_ints("0,10,20", (5,)) == [10, 20] and preflight.parse_ints("", (5,)) == [5]
    with pytest.raises(Exception, match=r"^--lrs 'nan': give positive numbers, e\.g\. 1e-3,3e-3$"):
        preflight.parse_floats("nan", "lrs", ())


# ----------------------------------------------------------------------------------------------- --model NAME=WEIGHTS

EXAMPLE = "--model timm:tf_efficientnet_lite0=/w/lite0.safetensors,resnet18"


def test_model_list_parses_per_model_weights():
    """Issue #31: ``--model name=PATH|tag,...``; a model without ``=`` takes --weights; the library's forms agree."""
    assert preflight.parse_models("timm:tf_efficientnet_lite0=/w/lite0.safetensors, timm:x = /w/x.pt ,resnet18,",
                                  "default") == [("timm:tf_efficientnet_lite0", "/w/lite0.safetensors"),
                                                 ("timm:x", "/w/x.pt"), ("resnet18", "default")]
    assert preflight.parse_models("resnet18,resnet50=IMAGENET1K_V2", "none") == [("resnet18", "none"),
                                                                                ("resnet50", "IMAGENET1K_V2")]
    assert preflight.parse_models("a=b=c.pt") == [("a", "b=c.pt")]  # the first '=' splits: a name never has one
    pairs = [("smallcnn", "/w/a.pt"), ("resnet18", "default")]
    assert preflight.model_pairs(["smallcnn=/w/a.pt", "resnet18"], "default") == pairs
    assert preflight.model_pairs(pairs, "none") == pairs
    assert preflight.model_pairs(dict(pairs)) == pairs
    assert preflight.model_pairs("smallcnn=/w/a.pt,resnet18") == pairs
    assert preflight.model_pairs(["smallcnn", "resnet18"], "none") == [("smallcnn", "none"), ("resnet18", "none")]
    # one model with two weights files: two candidates
    assert preflight.parse_models("smallcnn=a.pt,smallcnn=b.pt,smallcnn", "none") == [
        ("smallcnn", "a.pt"), ("smallcnn", "b.pt"), ("smallcnn", "none")]


def test_model_list_mistakes_name_the_fix():
    cases = {
        "": "--model is empty; name one or more backbones: --model resnet18,timm:convnext_tiny",
        " , ": "--model is empty; name one or more backbones: --model resnet18,timm:convnext_tiny",
        "=/w/a.pt": f"--model '=/w/a.pt' has a model without a name (before '='); write NAME=WEIGHTS, e.g. {EXAMPLE}",
        "resnet18, =x": f"--model 'resnet18, =x' has a model without a name (before '='); write NAME=WEIGHTS, e.g. "
                        f"{EXAMPLE}",
        "resnet18=": "--model 'resnet18=': 'resnet18=' has no weights after '='; write resnet18=PATH (a file, a tag, "
                     "or default), or drop the '=' to use --weights",
        "a=/w/x,y.pt": f"--model 'y.pt' looks like a weights file, not a model name; give each model its file as "
                       f"NAME=PATH (paths with a comma are not supported in --model: rename the file), e.g. {EXAMPLE}",
        "resnet18,/w/r.pth": f"--model '/w/r.pth' looks like a weights file, not a model name; give each model its "
                             "file as NAME=PATH (paths with a comma are not supported in --model: rename the file), "
                             f"e.g. {EXAMPLE}",
        "smallcnn,smallcnn": "--model names a backbone twice: smallcnn,smallcnn",
        "smallcnn=none,smallcnn": "--model names a backbone twice: smallcnn=none,smallcnn",  # --weights none
        "smallcnn=a.pt,smallcnn=./a.pt": "--model names a backbone twice: smallcnn=a.pt,smallcnn=./a.pt",
    }
    for text, line in cases.items():
        with pytest.raises(ConfigError) as e:
            preflight.parse_models(text, "none")
        assert str(e.value) == line, text
    with pytest.raises(ConfigError, match=r"^--model names a backbone twice: smallcnn=x\.pt,smallcnn=x\.pt$"):
        preflight.model_pairs([("smallcnn", "x.pt"), ("smallcnn", "x.pt")])
    with pytest.raises(ConfigError, match=r"^--model is empty"):
        preflight.model_pairs([])


@pytest.mark.subprocess
def test_per_model_weights_mistakes_answer_before_torch(names_cache, tmp_path):
    """Each model's weights file is checked (the same words as --weights) before torch loads; names come first."""
    a = tmp_path / "a.pt"
    a.write_bytes(b"")
    npt, nst = str(tmp_path / "nope.pt"), str(tmp_path / "nope.safetensors")
    cases = {
        ("probe", "--model", f"smallcnn={npt},resnet18"): WEIGHTS_MISSING.format(npt),
        ("probe", "--model", f"smallcnn={a},smallcnn={nst}"): WEIGHTS_MISSING.format(nst),
        ("probe", "--model", f"smallcnn,resnet18={npt}", "--weights", str(a)): WEIGHTS_MISSING.format(npt),
        ("probe", "--model", f"smallcnn={npt},resnet99=x"): _expected_model_error("resnet99"),  # the names first
        ("probe", "--model", f"smallcnn={a}", "--data", str(tmp_path / "no")): DATA_MISSING.format(tmp_path / "no"),
        ("probe", "--model", "smallcnn="): "Error: --model 'smallcnn=': 'smallcnn=' has no weights after '='; write "
                                           "smallcnn=PATH (a file, a tag, or default), or drop the '=' to use "
                                           "--weights",
        ("probe", "--model", "=x.pt"): f"Error: --model '=x.pt' has a model without a name (before '='); write "
                                       f"NAME=WEIGHTS, e.g. {EXAMPLE}",
        ("probe", "--model", f"smallcnn={tmp_path}/w,1.pt"): "Error: --model '1.pt' looks like a weights file, not a "
                                                             "model name; give each model its file as NAME=PATH "
                                                             "(paths with a comma are not supported in --model: "
                                                             f"rename the file), e.g. {EXAMPLE}",
        ("probe", "--model", f"smallcnn={a},smallcnn={a}"): f"Error: --model names a backbone twice: smallcnn={a},"
                                                            f"smallcnn={a}",
    }
    out = _fresh([list(c) for c in cases], [], names_cache, tmp_path)
    got = {tuple(c["args"]): (c["code"], c["line"], c["torch"]) for c in out["cases"]}
    assert got == {c: (1, line, []) for c, line in cases.items()}
    assert out["torch"] == [] and sorted(tmp_path.iterdir()) == [a]
