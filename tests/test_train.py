"""End-to-end training on the bundled sample's shapes (32 px, smallcnn / timm:test_resnet, 1-3 epochs): the
``mini_sample`` fixture, 12 train / 6 val images of each of its 4 classes."""

import json

import pytest
import torch

from finetune import config
from finetune.files import _umask
from finetune.run.checkpoint import load_checkpoint
from finetune.training.engine import Reporter
from finetune.run.runner import Interrupted, train


def recipe(data, **over):
    base = {"data.path": str(data), "train.epochs": 2, "train.batch_size": 64, "train.precision": "fp32",
            "train.graph": False, "data.augment": "none"}
    return config.apply_overrides(config.load_recipe("default"), {**base, **over})


@pytest.fixture(scope="module")
def run(tmp_path_factory, mini_sample):
    out = tmp_path_factory.mktemp("runs") / "r"
    res = train(recipe(mini_sample, **{"train.graph": True}), out=out)
    return out, res


@pytest.mark.slow
def test_run_directory_contents(run):
    out, res = run
    files = sorted(p.name for p in out.iterdir())
    assert {"config.yaml", "metrics.json", "last.pt", "best.pt", "hparams"} <= set(files)
    assert any(f.startswith("events.out.tfevents") for f in files)
    m = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert set(m["epochs"][0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "lrs",
                                   "seconds", "images_per_sec", "val_f1", "val_balanced_acc"}
    assert m["epochs"][0]["lr"] == 0.02 and m["epochs"][0]["lrs"] == {"all": 0.02}  # cosine: update 0 = base LR
    best = max(m["epochs"], key=lambda e: e["val_acc"])
    assert m["best"] == {"epoch": best["epoch"], "val_acc": best["val_acc"]}
    rerun = config.load_recipe(str(out / "config.yaml"))  # the resolved config is a valid recipe
    assert (rerun.model.num_classes, rerun.train.device, rerun.train.precision) == (4, "auto", "fp32")
    text = (out / "config.yaml").read_text()
    assert "#   device: cpu\n#   precision: fp32\n#   channels_last: True\n#   processes: 1\n" in text


@pytest.mark.slow
def test_checkpoint_is_self_contained(run):
    out, _ = run
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["class_names"] == ["circle", "cross", "square", "triangle"]
    assert ck["model_name"] == "smallcnn" and ck["num_classes"] == 4
    assert set(ck["model"]) == {f"seq.{i}.{k}" for i in (0, 2, 4, 7, 8) for k in ("weight", "bias")}
    assert ck["transform"]["input_size"] == [3, 32, 32]
    assert {"plan", "epoch", "recipe", "metrics"} <= set(ck)
    assert "optimizer" not in ck and "scaler" not in ck  # best.pt = weights + metadata; last.pt resumes
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["optimizer"]["state"] and set(last) - set(ck) == {"optimizer", "scaler"}


@pytest.mark.slow
def test_eval_reproduces_recorded_val_acc(run, cli, mini_sample):
    out, _ = run
    m = json.loads((out / "metrics.json").read_text())
    r = cli("eval", out / "best.pt", "--data", mini_sample, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["accuracy"] == m["best"]["val_acc"]
    assert doc["n"] == 24 and sum(map(sum, doc["confusion"])) == 24
    assert set(doc["per_class"]) == {"circle", "cross", "square", "triangle"}
    assert doc["accuracy"] == sum(doc["confusion"][i][i] for i in range(4)) / 24


@pytest.mark.slow
def test_tensorboard_scalars_read_back(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    acc = EventAccumulator(str(out)).Reload()
    tags = acc.Tags()
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "images_per_sec"} <= set(tags["scalars"])
    m = json.loads((out / "metrics.json").read_text())
    vals = [e.value for e in acc.Scalars("accuracy/val")]
    assert [e.step for e in acc.Scalars("accuracy/val")] == [1, 2]
    assert vals == pytest.approx([e["val_acc"] for e in m["epochs"]])
    assert "train/first_batch" in tags["images"]
    assert acc.Graph() is not None


@pytest.mark.slow
def test_predict_json(run, cli):
    out, _ = run
    r = cli("predict", out / "best.pt", "data/sample/val/circle/circle_0000.png", "data/sample/val/cross",
            "--top-k", "2", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 41
    assert rows[0]["path"].endswith("circle_0000.png")
    assert [len(x["top"]) for x in rows] == [2] * 41
    for x in rows:
        assert x["top"][0]["prob"] >= x["top"][1]["prob"] and x["top"][0]["label"] in ("circle", "cross", "square",
                                                                                        "triangle")


@pytest.mark.slow
def test_frozen_parameters_are_bitwise_unchanged(tmp_path, mini_sample):
    from finetune.models import build_model

    torch.manual_seed(0)
    init = build_model("smallcnn", num_classes=4).model.state_dict()
    torch.save(init, tmp_path / "init.pth")
    r = recipe(mini_sample, **{"model.weights": str(tmp_path / "init.pth"), "freeze.layers": ["seq.0", "seq.2"],
                  "train.epochs": 1})
    train(r, out=tmp_path / "run")
    after = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    for k in ("seq.0.weight", "seq.0.bias", "seq.2.weight", "seq.2.bias"):
        assert torch.equal(after[k], init[k]), k
    assert not torch.equal(after["seq.8.weight"], init["seq.8.weight"])


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, mini_sample):
    r = recipe(mini_sample, **{
        "train.epochs": 3, "train.batch_size": 16, "model.name": "timm:test_resnet", "model.weights": "none",
        "data.image_size": 32, "freeze.layers": ["conv1", "bn1", "layer1"], "freeze.schedule": [
            {"epoch": 2, "layers": ["layer1"], "lr_mult": 0.5}], "optimizer.name": "adamw",
        "optimizer.lr": 0.003, "optimizer.weight_decay": 0.01, "data.augment": "light"})
    full = train(r, out=tmp_path / "full")

    class Interrupt(Reporter):
        def epoch_end(self, row):
            if row["epoch"] == 1:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C after epoch 1 was saved

    with pytest.raises(Interrupted, match=r"^interrupted; the last checkpoint is in .*: continue with finetune "
                                          r"train --resume "):
        train(r, out=tmp_path / "part", reporter=Interrupt())
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    res = train(None, resume=tmp_path / "part")
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "last.pt")
    assert b["epoch"] == 3 and res.epochs[-1]["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [e["val_acc"] for e in full.epochs] == [e["val_acc"] for e in res.epochs]


@pytest.mark.slow
def test_out_dir_rules(tmp_path, cli, mini_sample):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("train", "--epochs", "1", "--out", out, "--quiet")
    assert r.exit_code == 1
    assert r.stderr == (f"Error: output directory '{out}' already exists and is not empty (and is not a finetune "
                        "run); choose another --out\n")
    r = cli("train", "--epochs", "1", "--out", out, "--overwrite", "--quiet")
    assert r.exit_code == 1 and "is not a finetune run (no .finetune-run marker); refusing to delete it" in r.stderr
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    r = cli("train", "--epochs", "1", "--data", mini_sample, "--out", out, "--quiet", "--no-tensorboard")
    assert r.exit_code == 0 and oct((out / "best.pt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    r = cli("train", "--epochs", "1", "--out", out, "--quiet")
    assert r.stderr == (f"Error: output directory '{out}' already exists and is not empty; pass --overwrite to "
                        "replace it, --resume to continue it, or choose another --out\n")


@pytest.mark.slow
def test_train_cli_quiet_prints_nothing(tmp_path, cli, mini_sample):
    r = cli("train", "--epochs", "1", "--data", mini_sample, "--out", tmp_path / "q", "--quiet", "--no-tensorboard")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    assert (tmp_path / "q" / "best.pt").is_file()
    assert not any(p.name.startswith("events") for p in (tmp_path / "q").iterdir())


@pytest.mark.slow
def test_train_cli_summary_table(tmp_path, cli, mini_sample):
    r = cli("train", "--epochs", "1", "--data", mini_sample, "--out", tmp_path / "s", "--precision", "fp32")
    assert r.exit_code == 0, r.stderr
    assert "epoch 1/1  train loss" in r.stderr and "precision: fp32" in r.stderr
    assert "train loss" in r.stdout and "best: epoch 1" in r.stdout


def test_resume_rejects_other_flags(tmp_path, cli):
    r = cli("train", "--resume", tmp_path, "--lr", "0.1")
    assert r.exit_code == 1
    assert r.stderr == ("Error: --resume continues a run exactly as it was configured; drop --lr (only --epochs "
                        "may change)\n")
    r = cli("train", "--resume", tmp_path)
    assert r.stderr == (f"Error: cannot resume: '{tmp_path / 'last.pt'}' not found; --resume takes a run directory "
                        "that holds last.pt\n")
