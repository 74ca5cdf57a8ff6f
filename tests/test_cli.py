import json
import subprocess
import sys

import pytest
import torch


def test_inspect_json_resnet18(cli):
    r = cli("inspect", "resnet18", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"] == "resnet18"
    assert len(doc["parameters"]) == 62
    assert doc["total"] == 11_689_512 and doc["trainable"] == 11_689_512 and doc["frozen"] == 0
    assert doc["parameters"][0] == {"index": 0, "name": "conv1.weight", "shape": [64, 3, 7, 7], "numel": 9408,
                                    "trainable": True}
    assert doc["parameters"][-1]["name"] == "fc.bias"


def test_inspect_json_vgg16(cli):
    doc = json.loads(cli("inspect", "vgg16", "--json").stdout)
    assert len(doc["parameters"]) == 32 and doc["total"] == 138_357_544
    two = json.loads(cli("inspect", "vgg16", "--num-classes", "2", "--json").stdout)
    assert two["total"] == 138_357_544 - 4096 * 998 - 998
    assert two["parameters"][-2] == {"index": 30, "name": "classifier.6.weight", "shape": [2, 4096],
                                     "numel": 8192, "trainable": True}


def test_inspect_table_and_modules(cli):
    r = cli("inspect", "vgg16", "--num-classes", "2", "--modules")
    assert r.exit_code == 0
    out = r.stdout
    assert "classifier.6.weight" in out and "(2, 4096)" in out
    assert "tensors: 32   parameters: 134,268,738   trainable: 134,268,738   frozen: 0" in out
    assert "features.0  Conv2d  1,792" in out and "classifier.6  Linear  8,194" in out


def test_inspect_smallcnn_table(cli):
    out = cli("inspect", "smallcnn", "-n", "4").stdout
    assert "seq.8.weight  (head)" in out and "tensors: 10   parameters: 145,188" in out


def test_inspect_loads_weights_file(cli, tmp_path):
    from finetune.models import build_model

    bb = build_model("smallcnn", num_classes=4)
    torch.save(bb.model.state_dict(), tmp_path / "w.pth")
    r = cli("inspect", "smallcnn", "--weights", tmp_path / "w.pth", "--num-classes", "3", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["parameters"][8]["shape"] == [3, 64]
    assert r.stderr.strip() == (f"warning: loaded '{tmp_path / 'w.pth'}' without the head (seq.8.weight [4, 64], "
                                "seq.8.bias [4] does not fit 3 classes); the new head starts at zero")


def test_unknown_model_error(cli):
    r = cli("inspect", "resnet19")
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr.startswith("Error: unknown model 'resnet19' (did you mean 'resnet18'")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_usage_error_is_one_line_exit_2(cli):
    r = cli("inspect", "resnet18", "--num-classes", "two")
    assert r.exit_code == 2
    # the middle is typer's wording, which changes between versions; the frame is ours
    assert r.stderr.startswith("Error: Invalid value for '--num-classes' / '-n': ")
    assert r.stderr.endswith(" (see 'finetune inspect --help')\n") and r.stderr.count("\n") == 1
    r = cli("nosuchcommand")
    assert r.exit_code == 2 and r.stderr == "Error: No such command 'nosuchcommand'. (see 'finetune --help')\n"


def test_bad_weights_error(cli, tmp_path):
    r = cli("inspect", "smallcnn", "--weights", tmp_path / "missing.pth")
    assert r.exit_code == 1
    assert r.stderr == (f"Error: weights file '{tmp_path / 'missing.pth'}' not found; pass an existing "
                        ".pth/.pt/.safetensors file, a weights name, or --weights none\n")


def test_models_listing(cli):
    r = cli("models", "resnet1*", "--json")
    rows = json.loads(r.stdout)
    assert {"source": "torchvision", "name": "resnet18", "weights": ["ResNet18_Weights.IMAGENET1K_V1"]} in rows
    table = cli("models", "timm:test_res*").stdout
    assert "timm:test_resnet" in table and "r160_in1k" in table


def test_recipes_listing(cli):
    r = cli("recipes")
    assert r.exit_code == 0
    assert r.stdout.startswith("default")
    r = cli("recipes", "defualt")
    assert r.exit_code == 1 and r.stderr.startswith("Error: unknown recipe 'defualt' (did you mean 'default'?)")


@pytest.mark.subprocess
@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["train", "--help"], ["models", "--help"],
                                  ["recipes"], ["recipes", "--help"], ["probe", "--help"], ["cache", "--help"],
                                  ["cache", "list", "--help"], ["report", "--help"], ["runs", "--help"],
                                  ["compare", "--help"], ["eval", "--help"]])
def test_fast_paths_import_neither_torch_nor_timm(args):
    code = ("import sys\nfrom finetune.cli.app import app\n"
            "try:\n    app(%r)\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = [m for m in ('torch', 'timm', 'torchvision', 'matplotlib') if m in sys.modules]\n"
            "assert not bad, bad\n") % (args,)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_command_has_help(cli):
    from finetune.cli.app import app

    for cmd in app.registered_commands:
        r = cli(cmd.name, "--help")
        assert r.exit_code == 0 and "Usage: finetune " + cmd.name in r.stdout
        assert cmd.help and len(cmd.help) > 20



def test_version(cli):
    from finetune import __version__

    r = cli("--version")
    assert r.exit_code == 0 and r.stdout == f"finetune {__version__}\n"


def test_value_errors_name_the_flag(cli, tmp_path):
    r = cli("train", "--epochs", "0", "--out", tmp_path / "x")
    assert r.exit_code == 1
    assert r.stderr == "Error: --epochs: train.epochs must be greater than 0, got 0\n"
    r = cli("train", "--model", "smallcnn", "--scheduler", "cosin", "--out", tmp_path / "y")
    assert r.stderr == ("Error: --scheduler: scheduler.name must be one of constant, step, cosine, onecycle, got "
                        "'cosin' (did you mean 'cosine'?)\n")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _smallcnn_weights(path):
    from finetune.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("smallcnn", num_classes=4).model.state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("extra,expected", [
    ((), "lp-ft"),                                         # pretrained weights, no recipe: LP-FT
    (("--freeze-backbone",), "smallcnn-cli"),              # a freeze plan of the user's own: generic defaults
])
def test_model_without_recipe_picks_lp_ft_for_pretrained_weights(cli, tmp_path, extra, expected, mini_sample):
    import yaml

    w = _smallcnn_weights(tmp_path / "w.pth")
    out = tmp_path / "run"
    r = cli("train", "--model", "smallcnn", "--weights", w, "--data", mini_sample, "--epochs", 2, "--batch-size", 64,
            "--precision", "fp32", "--no-tensorboard", "--out", out, *extra)
    assert r.exit_code == 0, r.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["name"] == expected
    assert f"recipe: {expected} (" in r.stderr
    if expected == "lp-ft":
        assert "frozen-feature cache: the input of 'seq.8'" in r.stderr and "until the unfreeze at epoch 2" in r.stderr
        assert "epoch 2: unfroze all (8 tensors, lr x 0.1)" in r.stderr


def test_model_without_recipe_random_init_uses_generic_defaults():
    from finetune.cli.train_cmd import _base_recipe

    assert _base_recipe(None, "resnet18", {"model.weights": "none"}).name == "resnet18-cli"
    assert _base_recipe(None, "smallcnn", {"model.weights": "default"}).name == "smallcnn-cli"  # no pretrained smallcnn
    assert _base_recipe(None, "resnet18", {"model.weights": "default"}).name == "lp-ft"
    assert _base_recipe(None, "resnet18", {"model.weights": "default", "freeze.bn": "train"}).name == "lp-ft"
    assert _base_recipe(None, None, {}).name == "default"


@pytest.mark.slow
def test_loop_flags_reach_the_recipe(cli, tmp_path, mini_sample):
    """Issue 17: the monitor/top-k, EMA, mixup/cutmix and per-step logging keys are also train flags, recorded in
    config.yaml; a bad value names the flag."""
    import yaml

    out = tmp_path / "run"
    r = cli("train", "--epochs", "1", "--model", "smallcnn", "--weights", "none", "--device", "cpu", "--quiet",
            "--no-report", "--monitor", "val_f1", "--monitor-mode", "max", "--save-top-k", "2", "--ema",
            "--ema-decay", "0.9", "--mixup", "0.2", "--cutmix", "0.5", "--log-every", "3", "--strategy", "fsdp",
            "--data", mini_sample, "--out", out)
    assert r.exit_code == 0, r.stderr
    t = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert {k: t[k] for k in ("monitor", "monitor_mode", "save_top_k", "ema", "ema_decay", "mixup", "cutmix",
                              "log_every")} == {"monitor": "val_f1", "monitor_mode": "max", "save_top_k": 2,
                                                "ema": True, "ema_decay": 0.9, "mixup": 0.2, "cutmix": 0.5,
                                                "log_every": 3}
    assert t["strategy"] == "fsdp"  # recorded; one process has nothing to shard (tests/test_fsdp.py runs two)
    assert (out / "best_ema.pt").is_file()
    r = cli("train", "--monitor", "val_top1", "--out", tmp_path / "x")
    assert r.exit_code == 1 and r.stderr == ("Error: --monitor: train.monitor must be one of val_acc, val_loss, "
                                             "val_f1, got 'val_top1' (did you mean 'val_f1', 'val_loss'?)\n")
    r = cli("train", "--ema-decay", "1", "--out", tmp_path / "y")
    assert r.exit_code == 1 and r.stderr == "Error: --ema-decay: train.ema_decay must be in (0, 1), got 1.0\n"
