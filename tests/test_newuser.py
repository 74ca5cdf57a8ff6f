"""Issue 14 (new-user pass): provenance through resumes, eval = recorded on cached runs, and the small fixes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune import config
from finetune.run.checkpoint import load_checkpoint
from finetune.run.runner import train


def recipe(data=None, **over):
    """``data``: a data folder (the ``mini_sample`` fixture); the bundled sample when None."""
    base = {"train.epochs": 1, "train.batch_size": 64, "train.precision": "fp32", "data.augment": "none",
            "train.graph": False,
            "train.tensorboard": False, **({"data.path": str(data)} if data else {})}
    return config.apply_overrides(config.load_recipe("default"), {**base, **over})


@pytest.mark.slow
def test_resume_keeps_the_weights_identity(tmp_path, mini_sample):
    from finetune.models import build_model

    init = tmp_path / "init.pth"
    torch.save(build_model("smallcnn", num_classes=4).model.state_dict(), init)
    out = tmp_path / "run"
    train(recipe(mini_sample, **{"model.weights": str(init)}), out=out)
    for total in (2, 3):  # any number of resumes
        train(None, resume=out, epochs=total)
        assert config.load_recipe(str(out / "config.yaml")).model.weights == str(init)
        for name in ("last.pt", "best.pt"):
            assert load_checkpoint(out / name)["recipe"]["model"]["weights"] == str(init), (total, name)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [{"freeze.backbone": True}, {"freeze.layers": ["seq.0", "seq.2"]}])
def test_eval_of_a_cached_run_reproduces_the_recorded_val(tmp_path, freeze, mini_sample):
    """The run trains on frozen features in bf16; eval rebuilds the full model: same loss and accuracy."""
    from finetune.api import evaluate_checkpoint

    r = recipe(mini_sample, **{"train.precision": "bf16", "train.epochs": 2, "train.cache_features": "on", **freeze})
    res = train(r, out=tmp_path / "run")
    best = next(e for e in res.epochs if e["epoch"] == res.best_epoch)
    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert ev["accuracy"] == best["val_acc"]
    assert ev["loss"] == best["val_loss"]  # bitwise: same precision, layout and transform


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, mini_sample) -> Path:
    out = tmp_path_factory.mktemp("newuser") / "run"
    train(recipe(mini_sample), out=out)
    return out


@pytest.mark.slow
def test_predict_skips_unreadable_images_and_shows_whole_names(small_run, tmp_path, cli):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree("data/sample/val/cross", folder / "bees_with_a_long_folder_name")
    names = sorted(p.name for p in (folder / "bees_with_a_long_folder_name").iterdir())
    (folder / "bees_with_a_long_folder_name" / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = cli("predict", small_run / "best.pt", folder, "--top-k", "1")
    assert r.exit_code == 0, r.stderr
    bad = folder / "bees_with_a_long_folder_name" / "a_broken.png"
    assert r.stderr == f"warning: skipping unreadable image '{bad}': not an image (unknown format)\n"
    lines = r.stdout.splitlines()
    assert lines[0] == "40 images" and lines[1].split() == ["image", "#1"]
    assert [ln.split()[0] for ln in lines[2:42]] == [f"bees_with_a_long_folder_name/{n}" for n in names]
    r = cli("predict", small_run / "best.pt", folder, "--strict")
    assert r.exit_code == 1 and r.stderr == (f"Error: cannot read image '{bad}': not an image (unknown format) "
                                             "(--strict; without it the file is skipped)\n")
    r = cli("predict", small_run / "best.pt", folder / "bees_with_a_long_folder_name" / names[0], "--csv", "-k", "2")
    rows = r.stdout.splitlines()
    assert rows[0] == "image,label_1,prob_1,label_2,prob_2,low_confidence" and len(rows) == 2
    assert rows[1].startswith(str(folder / "bees_with_a_long_folder_name" / names[0]) + ",")
    r = cli("predict", small_run / "best.pt", folder / "bees_with_a_long_folder_name" / names[0])
    assert r.stdout.splitlines()[0] == "1 image"


def test_gif_files_are_images(tmp_path):
    from PIL import Image

    from finetune.data import list_images, load_image

    Image.new("P", (8, 6), 3).save(tmp_path / "x.gif")
    assert list_images([tmp_path]) == [tmp_path / "x.gif"]
    assert load_image(tmp_path / "x.gif").mode == "RGB"


@pytest.mark.slow
def test_feature_cache_cuts_at_a_block_when_fx_cannot_trace(tmp_path, mini_sample):
    """timm's ViT does not fx-trace; the cache cuts at blocks.4 (the first trainable block) instead."""
    from finetune.cli.progress import RichReporter  # noqa: F401 - the note is what a user reads

    notes = []

    class Notes(__import__("finetune.training.engine", fromlist=["Reporter"]).Reporter):
        def note(self, text):
            notes.append(text)

    over = {"model.name": "timm:test_vit", "model.weights": "none", "data.image_size": 32, "train.epochs": 2,
            "freeze.layers": ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"],
            "freeze.names": ["cls_token", "pos_embed"]}
    cached = train(recipe(mini_sample, **over), out=tmp_path / "cached", reporter=Notes())
    assert notes[0].startswith("frozen-feature cache: the input of 'blocks.4' (48 train / 24 val, [5, 64] each")
    plain = train(recipe(mini_sample, **over, **{"train.cache_features": "off"}), out=tmp_path / "plain")
    assert [e["val_acc"] for e in cached.epochs] == [e["val_acc"] for e in plain.epochs]
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("cached", "plain"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
        if k.startswith(("patch_embed", "blocks.0.")):
            assert torch.equal(a[k], b[k]), k


def test_ctrl_c_while_data_loads_leaves_no_run_dir(tmp_path, monkeypatch):
    import finetune.speedups.feature_cache as Fe
    from finetune.run.runner import Interrupted

    def interrupt(*a, **k):
        raise KeyboardInterrupt  # the user presses Ctrl-C while the frozen features are computed

    monkeypatch.setattr(Fe, "split_features", interrupt)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        train(recipe(**{"freeze.backbone": True}), out=out)
    assert str(e.value) == (f"interrupted before the first checkpoint; removed the new run directory '{out}' "
                            "(nothing to resume); run the same command to start again")
    assert not out.exists()


@pytest.mark.slow
def test_small_cli_fixes(small_run, tmp_path, cli):
    import finetune

    r = cli("train", "--resume", small_run, "--model", "timm:test_resnet")
    assert r.stderr == ("Error: --resume continues a run exactly as it was configured; drop --model (only --epochs "
                        "may change)\n")
    r = cli("export", small_run / "best.pt", "--out", tmp_path / "new" / "dir" / "w.pth", "--format", "state-dict")
    assert r.exit_code == 0, r.stderr
    assert set(torch.load(tmp_path / "new" / "dir" / "w.pth", weights_only=True)) == \
        set(load_checkpoint(small_run / "best.pt")["model"])
    r = cli("models", "zzz")
    assert (r.exit_code, r.stderr) == (1, "Error: no models match 'zzz'; patterns are globs ('resnet*', 'timm:vit_*') "
                                          "or substrings ('efficient')\n")
    assert {"train", "load_recipe", "predict", "sample_data", "__version__"} <= set(dir(finetune))
    assert finetune.sample_data() == (Path(__file__).resolve().parent.parent / "data" / "sample").resolve()


def test_nproc_launch_sets_omp_threads(monkeypatch):
    from finetune.parallel import distributed, signals as stop

    seen = {}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(stop, "run_launcher", lambda cmd, env=None: seen.update(env=env) or 0)
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 8, raising=False) if hasattr(distributed, "os") else None
    assert distributed.launch(2, ["train"]) == 0
    assert seen["env"]["OMP_NUM_THREADS"].isdigit()  # torchrun's banner appears only when it is unset


def test_stages_resolve_per_architecture():
    from finetune.training.freeze import model_stages
    from finetune.models import build_model_shapes

    def mods(name):
        return ["+".join(s.modules) for s in model_stages(build_model_shapes(name, 3))]

    assert mods("resnet18") == mods("timm:test_resnet") == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]
    assert mods("smallcnn") == ["seq.0", "seq.2", "seq.4", "seq.7"]
    assert mods("timm:test_efficientnet") == ["conv_stem+bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
                                              "blocks.4+conv_head+bn2"]
    assert mods("timm:test_vit")[0] == "cls_token+pos_embed+patch_embed" and mods("timm:test_vit")[-1] == \
        "blocks.5+norm"
    assert mods("efficientnet_b0") == [f"features.{i}" for i in range(9)]
    assert mods("vgg16")[-3:] == ["features.28", "classifier.0", "classifier.3"]


@pytest.mark.slow
def test_stage_addresses_in_plans_and_the_gradual_unfreeze_recipe_on_timm(tmp_path, cli, mini_sample):
    from finetune.training.freeze import apply_freeze
    from finetune.models import build_model

    bb = build_model("timm:test_efficientnet", 4)
    plan = apply_freeze(bb, config.FreezeCfg(stages=-2))
    assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "") for n in plan.trainable} \
        == {"blocks.3", "blocks.4", "conv_head", "bn2", "classifier"}
    r = cli("train", "--recipe", "gradual-unfreeze", "--model", "timm:test_efficientnet", "--weights", "none",
            "--image-size", "32", "--epochs", "2", "--batch-size", "64", "--precision", "fp32",
            "--no-tensorboard", "--data", mini_sample, "--out", tmp_path / "g")
    assert r.exit_code == 0, r.stderr
    assert "epoch 2: unfroze stage:-1 (" in r.stderr
    doc = json.loads(cli("inspect", "timm:test_resnet", "--stages", "-1", "--json").stdout)
    assert [s["modules"] for s in doc["stages"]][-1] == ["layer4"] and doc["stages"][-1]["from_head"] == -1
    assert doc["trainable"] == sum(p["numel"] for p in doc["parameters"] if p["name"].startswith(("layer4", "fc")))


def test_freeze_errors_from_a_recipe_say_so(tmp_path, cli):
    (tmp_path / "r.yaml").write_text("freeze:\n  backbone: true\n  schedule:\n    - {epoch: 2, layers: [layer4]}\n")
    r = cli("train", "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "o")
    assert r.stderr == (f"Error: recipe {tmp_path / 'r.yaml'}, freeze.schedule[0]: unfreeze layer 'layer4' matches "
                        "no module of smallcnn; see 'finetune inspect smallcnn --modules'\n")
    r = cli("train", "--recipe", tmp_path / "r.yaml", "--stages", "9", "--out", tmp_path / "o")
    assert r.stderr == ("Error: freeze stages 9 is out of range: smallcnn has 4 stages (0..3, or -4..-1 counted from "
                        "the head); see 'finetune inspect smallcnn'\n")


@pytest.mark.slow
def test_epochs_count_from_1_everywhere(tmp_path, cli, mini_sample):
    r = cli("train", "--freeze-backbone", "--unfreeze", "all@2:0.5", "--epochs", "2", "--precision", "fp32",
            "--no-tensorboard", "--data", mini_sample, "--out", tmp_path / "e")
    assert r.exit_code == 0, r.stderr
    assert "epoch 2: unfroze all (8 tensors, lr x 0.5)" in r.stderr
    ck = load_checkpoint(tmp_path / "e" / "last.pt")
    assert ck["epoch"] == 2 and ck["recipe"]["freeze"]["schedule"][0]["epoch"] == 2
    assert [m["epoch"] for m in ck["metrics"]] == [1, 2]
    r = cli("train", "--unfreeze", "all@0", "--out", tmp_path / "z")
    assert r.stderr == ("Error: --unfreeze: freeze.schedule[0].epoch must be at least 1 (epochs count from 1, as the "
                        "logs do), got 0\n")


def test_model_override_is_recorded_and_inspect_previews_the_datas_head(tmp_path, cli, mini_sample):
    r = cli("train", "--recipe", "linear-probe", "--model", "smallcnn", "--weights", "none", "--image-size", "32",
            "--epochs", "1", "--precision", "fp32", "--no-tensorboard", "--quiet", "--data", mini_sample, "--out",
            tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    rec = config.load_recipe(str(tmp_path / "o" / "config.yaml"))
    assert rec.name == "linear-probe (model overridden)"
    assert rec.description.endswith(" -- model overridden: smallcnn instead of resnet18")
    doc = json.loads(cli("inspect", "--recipe", "linear-probe", "--json").stdout)
    assert next(p for p in doc["parameters"] if p["name"] == "fc.weight")["shape"] == [4, 512]  # sample: 4 classes


@pytest.mark.slow
def test_warnings_for_random_frozen_layers_and_no_op_unfreezes(tmp_path, cli, mini_sample):
    r = cli("train", "--freeze-layers", "seq.0", "--unfreeze", "seq.8", "--epochs", "1", "--precision", "fp32",
            "--no-tensorboard", "--quiet", "--data", mini_sample, "--out", tmp_path / "w")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines() == [
        "warning: unfreeze seq.8 changes nothing: those parameters are already trainable",
        "warning: 2 parameter tensors are frozen at random init (weights: none): they will stay random; pass "
        "--weights (pretrained or a file) or drop the freeze plan"]


def test_help_is_whole_at_80_columns(cli):
    for cmd in ("train", "eval", "predict", "inspect", "export", "models"):
        out = cli(cmd, "--help").stdout
        assert "<bool>" not in out and "…" not in out, cmd
        assert max(len(line) for line in out.splitlines()) <= 80, cmd
    out = cli("train", "--help").stdout
    assert "--freeze-backbone / --no-freeze-backbone" in out
    out = cli("eval", "--help").stdout
    for flag in ("--labels", "--precision", "--device", "--batch-size", "val | train | test"):
        assert flag in out, flag


@pytest.mark.slow
def test_eval_split_test_precision_and_labels(small_run, tmp_path, cli):
    import shutil

    root = tmp_path / "d"
    for split in ("train", "val", "test"):
        shutil.copytree("data/sample/val", root / split)
    shutil.rmtree(root / "test" / "square")
    r = cli("eval", small_run / "best.pt", "--data", root, "--split", "test", "--precision", "fp32", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n"] == 120 and sum(map(sum, doc["confusion"])) == 120
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(Path("data/sample/val/cross").iterdir())[:5] + sorted(Path("data/sample/val/circle").iterdir())[:3]:
        shutil.copy(p, flat / p.name)
    r = cli("eval", small_run / "best.pt", "--data", flat, "--labels", "prefix:cross=cross,circle=circle", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 8
    r = cli("eval", small_run / "best.pt", "--data", root / "val", "--split", "test")
    assert r.stderr == f"Error: '{root / 'val'}' has no test folder; --split test takes ROOT/test/<class>/...\n"
