"""Issue #30 items 4 and 10, issue #29 items 5-6: what the report says about a run (facts computed from synthetic
metrics, against hand-computed values), test accuracy leading the header when recorded, the images/s panel on a
log scale with the phases apart, the cheap figures (SVG, and TensorBoard's numpy/PIL confusion image), and the
TensorBoard model graph off by default (``--graph`` turns it on)."""

from __future__ import annotations

import base64

import pytest

from finetune.reporting import report as R
from finetune.reporting import svg
from finetune.training.stats import half_width

from helpers import tiny_tree

pytestmark = pytest.mark.report

LPFT = {"freeze": {"backbone": True, "schedule": [{"epoch": 2, "layers": ["all"], "lr_mult": 0.1}]}}
PROBE = {"freeze": {"backbone": True}}
FULL = {"freeze": {"backbone": False}}


def row(epoch, train, val, seconds=1.0, val_loss=None, ips=None):
    return {"epoch": epoch, "train_acc": train, "val_acc": val, "seconds": seconds, "val_loss": val_loss,
            "train_loss": 1.0, "images_per_sec": ips}


def test_head_epochs_from_the_recipe():
    assert R.head_epochs(LPFT) == 1
    assert R.head_epochs({"freeze": {"backbone": True, "schedule": [{"epoch": 4, "layers": ["all"]},
                                                                    {"epoch": 3, "layers": ["blocks.6"]}]}}) == 2
    assert R.head_epochs(PROBE) is None  # every epoch trains the head alone
    assert R.head_epochs(FULL) == 0 and R.head_epochs({}) == 0


def test_overfitting_is_flagged_with_its_numbers():
    eps = [row(1, 0.90, 0.850), row(2, 0.97, 0.860), row(3, 0.993, 0.867)]
    f = R.findings(eps, {"epoch": 3, "val_acc": 0.867}, FULL, 300)
    h = half_width(0.867, 300)
    assert f["facts"][0] == (f"Val accuracy 86.7% ± {100 * h:.1f} points (95% Wilson interval on 300 images): "
                             f"differences smaller than about {100 * h:.1f} points between epochs or runs are noise.")
    assert f["facts"][1] == ("Overfitting: at the last epoch (3) train accuracy is 99.3% vs val 86.7%, a 12.6-point "
                             "gap (beyond the val noise): the model fits its training images much better than new "
                             "ones.")
    assert f["facts"][2] == ("The best epoch was the last (3 of 3) (+0.7 points over epoch 2): accuracy may still "
                             "be rising, so more epochs may help.")
    assert f["next"].startswith("Regularise: stronger augmentation (`--augment strong`)")
    # a gap inside the val noise is not overfitting
    g = R.findings([row(1, 0.90, 0.88)], {"epoch": 1, "val_acc": 0.88}, FULL, 100)
    assert g["facts"][1] == "No sign of overfitting: train accuracy 90.0% vs val 88.0% at the last epoch (1)."


def test_lp_ft_says_what_fine_tuning_added_and_at_what_cost():
    # issue #30's example: the probe reached 85.7% in 91 s; fine-tuning +1.0 points at 15x the time
    eps = [row(1, 0.80, 0.857, 91.0), row(2, 0.90, 0.860, 455.0), row(3, 0.95, 0.867, 455.0),
           row(4, 0.96, 0.863, 455.0)]
    f = R.findings(eps, {"epoch": 3, "val_acc": 0.867}, LPFT, 300, run_dir="runs/x")
    h = half_width(0.867, 300)
    assert (f"The linear probe (head alone, epoch 1) reached 85.7% in 91.0 s; fine-tuning added +1.0 ± "
            f"{100 * h:.1f} points at 15x the time (22.8 min vs 91.0 s): within the noise, so no measurable gain."
            ) in f["facts"]
    assert f["next"].startswith("The linear probe alone is as accurate within the noise: `--recipe linear-probe`")
    assert "The best epoch was 3 of 4." in f["facts"]
    # a gain beyond the noise is stated without the caveat, and the next step is another one
    eps = [row(1, 0.6, 0.60, 10.0), row(2, 0.8, 0.80, 50.0), row(3, 0.85, 0.85, 50.0)]
    f = R.findings(eps, {"epoch": 3, "val_acc": 0.85}, LPFT, 400, run_dir="runs/x")
    assert ("The linear probe (head alone, epoch 1) reached 60.0% in 10.0 s; fine-tuning added +25.0 ± "
            f"{100 * half_width(0.85, 400):.1f} points at 10x the time (100.0 s vs 10.0 s).") in f["facts"]
    assert f["next"] == ("Train longer: `finetune train --resume runs/x --epochs 6` continues this run to twice "
                         "the epochs.")


def test_where_the_best_epoch_fell():
    # early, and the last epoch worse beyond the noise: over-training
    eps = [row(1, 0.7, 0.80, 2.0, 0.5), row(2, 0.8, 0.90, 2.0, 0.3)] + [
        row(e, 0.99, 0.70, 2.0, 0.9) for e in range(3, 11)]
    f = R.findings(eps, {"epoch": 2, "val_acc": 0.90}, FULL, 500)
    assert ("The best epoch was early (2 of 10): the 8 epochs after it (16.0 s) did not beat it; val loss went from "
            "0.300 to 0.900; the last one (70.0%) is worse beyond the noise: over-training.") in f["facts"]
    # early but a plateau (the later epochs within the noise)
    eps = [row(1, 0.7, 0.9667, 0.5)] + [row(e, 0.97, 0.9667, 0.5) for e in range(2, 6)]
    f = R.findings(eps, {"epoch": 1, "val_acc": 0.9667}, PROBE, 240)
    assert ("The best epoch was early (1 of 5): the 4 epochs after it (2.0 s) did not beat it; the last one (96.7%) "
            "is within the noise of it: a plateau.") in f["facts"]
    assert f["next"] == ("Stop sooner: `--early-stop 2` ends a run 2 epochs after its last improvement (here: "
                         "epoch 3 instead of 5); best.pt stays the best epoch either way.")
    # a linear probe that peaked mid-run: fine-tuning is the next step
    eps = [row(1, 0.7, 0.80), row(2, 0.8, 0.85), row(3, 0.82, 0.84)]
    f = R.findings(eps, {"epoch": 2, "val_acc": 0.85}, PROBE, 200)
    assert "The best epoch was 2 of 3." in f["facts"]
    assert f["next"].startswith("Fine-tune: `--recipe lp-ft` also trains the backbone")
    # nothing measured
    assert R.findings([{"epoch": 1, "val_acc": None}], {}, FULL, None)["facts"] == [
        "No val accuracy was recorded, so there is nothing to judge the run by."]


def test_test_split_against_val():
    eps = [row(1, 0.90, 0.911)]
    f = R.findings(eps, {"epoch": 1, "val_acc": 0.911}, FULL, 90, {"accuracy": 0.877, "n": 300, "epoch": 1})
    ht = half_width(0.877, 300)
    assert (f"Test accuracy 87.7% ± {100 * ht:.1f} on 300 held-out images (never used to choose best.pt) vs val "
            "91.1%: within the noise of each other.") in f["facts"]
    f = R.findings([row(1, 0.99, 0.99)], {"epoch": 1, "val_acc": 0.99}, FULL, 1000,
                   {"accuracy": 0.80, "n": 1000, "epoch": 1})
    assert f["facts"][-1].endswith("vs val 99.0%: -19.0 points; the val number flatters the model.")


def test_images_per_second_panel_log_scale_and_phases_apart():
    eps = [row(1, 0.8, 0.85, ips=680.0), row(2, 0.9, 0.86, ips=5.0), row(3, 0.9, 0.87, ips=5.5)]
    doc = R.curves_svg(eps, [(2, "all")], 1)
    assert "images/s (training), log scale" in doc
    assert ">head alone</text>" in doc and ">fine-tuning</text>" in doc
    assert ">1</text>" in doc and ">1000</text>" in doc  # decades on the log axis: 10^0 .. 10^3
    assert ">unfreeze all</text>" in doc
    same = R.curves_svg([row(1, 0.8, 0.85, ips=100.0), row(2, 0.9, 0.86, ips=120.0)], [], 0)
    assert "log scale" not in same and "head alone" not in same


def test_svg_figures_are_text_only_and_escape_names():
    names = ["<b>x</b>", "a$b", "new\nline"]
    doc = R.confusion_svg([[3, 1, 0], [0, 2, 0], [1, 0, 4]], names)
    assert "<script" not in doc and "<b>" not in doc
    assert "&lt;b&gt;x&lt;/b&gt;" in doc and ">a$b</text>" in doc and "new\\nline" in doc
    assert ">0.75</text>" in doc and ">3</text>" in doc  # values in the cells: counts and recall
    assert svg.blues(0) == (247, 251, 255) and svg.blues(1) == (8, 48, 107)
    uri = svg.uri(doc)
    assert uri.startswith("data:image/svg+xml;base64,") and base64.b64decode(uri.split(",", 1)[1]).decode() == doc
    bars = R.freeze_svg([{"module": "stem", "trainable": 0, "unfrozen": 0, "frozen": 12},
                         {"module": "head", "trainable": 7, "unfrozen": 0, "frozen": 0}])
    assert ">stem</text>" in bars and ">trainable</text>" in bars and ">unfrozen</text>" not in bars


def test_tensorboard_confusion_image_is_the_same_heat_map():
    import numpy as np

    m = [[20, 0, 2], [0, 20, 0], [1, 0, 19]]
    img = R.confusion_image(m, ["daisy", "iris", "rose"])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    # the counts map's top-left cell is the largest count: the darkest blue (its centre holds the number; a corner
    # is pure colour); an empty cell is the lightest
    ys, xs = np.nonzero((img == np.array(svg.blues(1.0), dtype=np.uint8)).all(axis=2))
    assert len(ys) > 0
    y0, x0 = ys.min(), xs.min()
    assert tuple(img[y0 + 1, x0 + 1]) == svg.blues(1.0)
    assert (img == np.array(svg.blues(0.0), dtype=np.uint8)).all(axis=2).sum() > 0


@pytest.mark.slow
def test_graph_is_off_by_default_and_the_flag_turns_it_on(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune import config

    assert config.load_recipe("default").train.graph is False
    data = tiny_tree(tmp_path / "data", per_class=6, size=16)
    base = ("train", "--model", "smallcnn", "--weights", "none", "--data", data, "--epochs", "1", "--device", "cpu",
            "--precision", "fp32", "--no-report", "--quiet")
    for name, extra, graph in (("off", (), False), ("on", ("--graph",), True)):
        r = cli(*base, *extra, "--out", tmp_path / name)
        assert r.exit_code == 0, r.stderr
        acc = EventAccumulator(str(tmp_path / name)).Reload()
        assert acc.Tags()["graph"] is graph
        assert "train/first_batch" in acc.Tags()["images"] and "val/confusion_matrix" in acc.Tags()["images"]
        assert "accuracy/val" in acc.Tags()["scalars"]
