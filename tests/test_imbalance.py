"""Imbalanced data: --class-weights (inverse frequency into CrossEntropyLoss), --sampler balanced (deterministic per
(seed, epoch), exact on a mid-epoch resume), balanced accuracy and macro-F1 beside accuracy in eval and metrics.json."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from finetune import config
from finetune.run.checkpoint import load_checkpoint
from finetune.data.loader import EpochSampler
from finetune.training.engine import Reporter
from finetune.training.imbalance import class_weights, loss_fn, sample_weights
from finetune.training.metrics import confusion_metrics
from finetune.run.runner import Interrupted, train

from helpers import tiny_tree


def test_balanced_accuracy_and_macro_f1_from_a_confusion_matrix():
    cm = [[8, 2, 0],   # class 0: recall 0.8, precision 8/9
          [1, 0, 1],   # class 1: recall 0, precision 0 -> F1 0
          [0, 0, 4]]   # class 2: recall 1, precision 4/5
    m = confusion_metrics(cm)
    assert m["balanced_accuracy"] == pytest.approx((0.8 + 0.0 + 1.0) / 3, abs=1e-15)
    f0 = 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8)
    f2 = 2 * 0.8 * 1.0 / 1.8
    assert m["macro_f1"] == pytest.approx((f0 + 0 + f2) / 3, abs=1e-15)
    # a class absent from the data and never predicted is left out (as scikit-learn's labels=None does)
    assert confusion_metrics([[5, 0, 0], [0, 5, 0], [0, 0, 0]]) == {"balanced_accuracy": 1.0, "macro_f1": 1.0}


def test_class_weights_auto_file_and_loss(tmp_path):
    targets = [0] * 6 + [1] * 2  # n = 8, C = 2: w = n / (C n_c)
    assert class_weights("auto", targets, ["a", "b"]) == [8 / 12, 8 / 4]
    assert class_weights("none", targets, ["a", "b"]) is None
    (tmp_path / "w.json").write_text('{"b": 3, "a": 0.5}')
    assert class_weights(str(tmp_path / "w.json"), targets, ["a", "b"]) == [0.5, 3.0]
    (tmp_path / "w.yaml").write_text("- 1\n- 4\n")
    assert class_weights(str(tmp_path / "w.yaml"), targets, ["a", "b"]) == [1.0, 4.0]
    cfg = config.apply_overrides(config.Recipe(), {"train.class_weights": "auto"})
    fn = loss_fn(cfg, targets, ["a", "b"])
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 1])
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = torch.tensor([8 / 12, 8 / 4])[y]
    assert torch.allclose(fn(logits, y), (per * w).sum() / w.sum())


def test_balanced_sampler_is_balanced_deterministic_and_skips_exactly():
    targets = [0] * 90 + [1] * 10
    w = sample_weights("balanced", targets, 2)
    assert sample_weights("random", targets, 2) is None
    s = EpochSampler(100, shuffle=True, seed=3, keyed=True, weights=w)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 100 and len(s) == 100
    s.set_epoch(2)
    assert list(s) == full  # a function of (seed, epoch)
    s.set_epoch(2, start=37)
    assert list(s) == full[37:]  # a resume mid-epoch continues the same draw (indices and augmentation seeds)
    counts = Counter()
    for e in range(40):
        s.set_epoch(e)
        counts.update(targets[i] for i, _ in s)
    assert abs(counts[1] / (counts[0] + counts[1]) - 0.5) < 0.03  # 4000 draws: the minority class ~half the time
    other = EpochSampler(100, shuffle=True, seed=4, keyed=True, weights=w)
    other.set_epoch(2)
    assert list(other) != full


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    root = tmp_path_factory.mktemp("imb") / "data"
    tiny_tree(root / "train", classes=("a",), per_class=24)
    tiny_tree(root / "train", classes=("a", "b", "c"), per_class=6)  # a keeps 24 (same names, rewritten)
    tiny_tree(root / "val", classes=("a", "b", "c"), per_class=4)
    return root


def _recipe(data, **over):
    base = {"data.path": str(data), "model.weights": "none", "train.batch_size": 8, "train.precision": "fp32",
            "train.device": "cpu", "train.tensorboard": False, "train.seed": 2, "data.augment": "light",
            "train.epochs": 2, "data.sampler": "balanced", "train.save_every_steps": 2}
    base.update(over)
    return config.apply_overrides(config.load_recipe("default"), base)


def test_balanced_run_resumes_bitwise_and_reports_the_metrics(skewed, tmp_path, cli):
    full = train(_recipe(skewed), out=tmp_path / "full")

    class Stop(Reporter):
        n = 0

        def batch(self, i, batches, loss, acc, ips):
            Stop.n += 1
            if Stop.n == 3:  # mid-epoch 1, after the save at step 2
                raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(_recipe(skewed), out=tmp_path / "part", reporter=Stop())
    assert load_checkpoint(tmp_path / "part" / "last.pt")["partial"]["batches"] == 2
    train(None, resume=tmp_path / "part")
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    row = json.loads((tmp_path / "full" / "metrics.json").read_text())["epochs"][-1]
    r = cli("eval", tmp_path / "full" / "last.pt", "--json", "--device", "cpu")
    res = json.loads(r.stdout)
    assert res["accuracy"] == row["val_acc"]
    assert res["balanced_accuracy"] == row["val_balanced_acc"] == confusion_metrics(res["confusion"])[
        "balanced_accuracy"]
    assert res["macro_f1"] == row["val_f1"] == confusion_metrics(res["confusion"])["macro_f1"]
    assert full.epochs[-1]["val_f1"] == row["val_f1"]


def test_class_weights_flag_changes_the_loss_and_is_recorded(skewed, tmp_path, cli):
    fast = ("--data", skewed, "--model", "smallcnn", "--weights", "none", "--epochs", "1", "--batch-size", "8",
            "--precision", "fp32", "--device", "cpu", "--no-tensorboard", "--quiet", "--augment", "none")
    assert cli("train", *fast, "--out", tmp_path / "plain").exit_code == 0
    r = cli("train", *fast, "--class-weights", "auto", "--out", tmp_path / "w")
    assert r.exit_code == 0, r.stderr
    assert config.load_recipe(str(tmp_path / "w" / "config.yaml")).train.class_weights == "auto"
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["epochs"][0]["train_loss"]
    weighted = json.loads((tmp_path / "w" / "metrics.json").read_text())["epochs"][0]["train_loss"]
    assert plain != weighted
