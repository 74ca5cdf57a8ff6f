"""A test split: a run whose data has test/ (apart from val/) evaluates best.pt on it once at the end and stores it
apart in metrics.json; eval --split all reports every split the data has."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune import config
from finetune.run.runner import train

from helpers import tiny_tree


@pytest.fixture(scope="module")
def tvt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tvt") / "data"
    tiny_tree(root / "train", per_class=12)
    tiny_tree(root / "val", per_class=4)
    tiny_tree(root / "test", per_class=5, size=40)  # 15 images, different from val's 12
    return root


def _recipe(data, **over):
    base = {"data.path": str(data), "model.weights": "none", "train.batch_size": 8, "train.precision": "fp32",
            "train.device": "cpu", "train.tensorboard": False, "train.epochs": 2, "data.augment": "none"}
    base.update(over)
    return config.apply_overrides(config.load_recipe("default"), base)


@pytest.fixture(scope="module")
def run(tvt, tmp_path_factory):
    out = tmp_path_factory.mktemp("tvt") / "run"
    return train(_recipe(tvt), out=out)


def test_run_reports_test_accuracy_of_best_once_and_apart(run, cli):
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    test = metrics["test"]
    assert test == run.test and test["checkpoint"] == "best.pt" and test["epoch"] == metrics["best"]["epoch"]
    assert test["n"] == 15 and all("test" not in k for row in metrics["epochs"] for k in row)  # not per epoch
    r = cli("eval", run.run_dir / "best.pt", "--split", "test", "--json", "--device", "cpu")
    ev = json.loads(r.stdout)
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "loss", "n"):
        assert ev[k] == test[k], k
    # selection used val only: best is the epoch with the highest val accuracy, among exact ties the lowest val
    # loss (then the first)
    rows = metrics["epochs"]
    top = max(r["val_acc"] for r in rows)
    want = min((r for r in rows if r["val_acc"] == top), key=lambda r: (r["val_loss"], r["epoch"]))
    assert metrics["best"]["epoch"] == want["epoch"]


def test_eval_split_all_reports_each_split(run, cli):
    r = cli("eval", run.run_dir / "best.pt", "--split", "all", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert list(res) == ["train", "val", "test"] and [res[s]["n"] for s in res] == [36, 12, 15]
    for s in ("train", "val"):
        one = json.loads(cli("eval", run.run_dir / "best.pt", "--split", s, "--json", "--device", "cpu").stdout)
        assert one == res[s]
    r = cli("eval", run.run_dir / "best.pt", "--split", "all", "--device", "cpu")
    heads = [line for line in r.stdout.splitlines() if line.endswith(" images")]
    assert [h.split(" split)")[0].rsplit("(", 1)[1] for h in heads] == ["train", "val", "test"]
    assert heads[2].endswith("(test split): 15 images")


def test_test_folder_doubling_as_val_is_not_reported(tvt, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tvt / "train", data / "train")
    shutil.copytree(tvt / "test", data / "test")  # no val/: training validates on test/
    res = train(_recipe(data, **{"train.epochs": 1}), out=tmp_path / "run")
    assert res.test is None and "test" not in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_the_closing_test_line_gives_the_interval():
    """Issue #30 items 3 and 10: the end of a run with a test split leads with best.pt's test accuracy ± its noise."""
    from finetune.run.holdout import held_out_note

    test = {"epoch": 3, "accuracy": 0.75, "balanced_accuracy": 0.7, "n": 40}
    assert held_out_note(test) == ("test split: best.pt (epoch 3) 75.00% accuracy ± 13.0 (95%), 70.00% balanced, on "
                                   "40 images (evaluated once, after training; never used for selection)")
