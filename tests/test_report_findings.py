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
    # +0.7 points on 300 images is inside the noise: flat, not rising (issue #30 item 4 follow-up)
    assert f["facts"][2] == ("The best epoch was the last (3 of 3) (+0.7 points over epoch 2): accuracy has been flat "
                             "within the noise since epoch 1 (85.0%), so more epochs are unlikely to help.")
    assert f["next"] == ("Regularise: stronger augmentation (`--augment strong`), `--label-smoothing 0.1`, more weight "
                         "decay (`--weight-decay`; this run had 0), or fewer trainable layers.")
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
    assert f["next"].startswith("Fine-tune: `--recipe lp-ft`")  # no val loss rise: nothing to stop sooner for
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


# ------------------------------------------------------------------ the advice must be right (issue #30 item 4)

def probe_rows(accs, last_loss=0.3):
    """A ``finetune probe`` run's metrics: one row per epoch of the best head, no train accuracy, no seconds, the
    val loss of the last epoch only (probe.py ``_write_run``)."""
    return [{"epoch": e, "train_loss": None, "train_acc": None, "val_loss": last_loss if e == len(accs) else None,
             "val_acc": a, "seconds": None, "images_per_sec": None} for e, a in enumerate(accs, 1)]


def test_lp_ft_gain_within_noise_is_not_called_a_rising_trend():
    # the walkthrough's LP-FT: fine-tuning +0.4 points, within the noise, and best at the last of 2 epochs
    eps = [row(1, 0.88, 0.900, 20.0, 0.40), row(2, 0.93, 0.904, 300.0, 0.38)]
    f = R.findings(eps, {"epoch": 2, "val_acc": 0.904}, LPFT, 500, run_dir="runs/lpft")
    hw = 100 * half_width(0.904, 500)
    assert (f"The linear probe (head alone, epoch 1) reached 90.0% in 20.0 s; fine-tuning added +0.4 ± {hw:.1f} "
            "points at 15x the time (5.0 min vs 20.0 s): within the noise, so no measurable gain.") in f["facts"]
    assert ("The best epoch was the last (2 of 2) (+0.4 points over epoch 1): accuracy has been flat within the "
            "noise since epoch 1 (90.0%), so more epochs are unlikely to help.") in f["facts"]
    assert not any("rising" in x for x in f["facts"])
    assert f["next"] == ("The linear probe alone is as accurate within the noise: `--recipe linear-probe` gets it in "
                         "a fraction of the time; to make fine-tuning pay, try a lower LR (`--lr`).")


def test_probe_run_one_image_gain_on_a_flat_line_is_not_train_longer():
    # 240 val images: 225, 232, 232, 232, 233 right; the last epoch is one image (+0.4 points) above epoch 4
    eps = probe_rows([225 / 240, 232 / 240, 232 / 240, 232 / 240, 233 / 240])
    f = R.findings(eps, {"epoch": 5, "val_acc": 233 / 240}, PROBE, 240, run_dir="runs/probe1")
    assert ("The best epoch was the last (5 of 5) (+0.4 points over epoch 4): accuracy has been flat within the "
            "noise since epoch 2 (96.7%), so more epochs are unlikely to help.") in f["facts"]
    assert "Train longer" not in f["next"] and not any("may still be rising" in x for x in f["facts"])
    assert f["next"].startswith("Fine-tune: `--recipe lp-ft` also trains the backbone")
    # a dip just before the last epoch: an earlier epoch within the noise still rules out "rising"
    f = R.findings([row(1, 0.9, 0.90), row(2, 0.8, 0.70), row(3, 0.92, 0.91)], {"epoch": 3}, FULL, 400)
    assert ("The best epoch was the last (3 of 3) (+21.0 points over epoch 2), but epoch 1 was already within the "
            "noise of it (90.0%): more epochs are unlikely to help.") in f["facts"]
    assert "Train longer" not in f["next"]
    # a last epoch level with the one before (caltech's probe: 91.4% at epochs 4 and 5 of 1010 images)
    eps = probe_rows([0.8703, 0.9040, 0.9099, 0.9139, 0.9139])
    assert R.findings(eps, {"epoch": 5}, PROBE, 1010)["facts"][1] == (
        "The best epoch was the last (5 of 5) (level with epoch 4): accuracy has been flat within the noise since "
        "epoch 2 (90.4%), so more epochs are unlikely to help.")


def test_a_rise_beyond_the_noise_says_train_longer():
    eps = [row(1, 0.62, 0.60), row(2, 0.71, 0.70), row(3, 0.81, 0.80)]
    f = R.findings(eps, {"epoch": 3, "val_acc": 0.80}, FULL, 400, run_dir="runs/r")
    assert ("The best epoch was the last (3 of 3) (+10.0 points over the best epoch before it, 2: beyond the noise): "
            "accuracy may still be rising, so more epochs may help.") in f["facts"]
    assert f["next"] == ("Train longer: `finetune train --resume runs/r --epochs 6` continues this run to twice "
                         "the epochs.")


def test_stop_sooner_only_after_val_loss_rose_and_not_for_a_run_of_seconds():
    # the walkthrough's linear probe: 3 s, best at epoch 1 (an old run's tie), val loss still falling
    losses = [1.16, 0.90, 0.75, 0.62, 0.54]
    eps = [row(e, 0.97, 0.9667, 0.6, vl) for e, vl in enumerate(losses, 1)]
    f = R.findings(eps, {"epoch": 1, "val_acc": 0.9667}, PROBE, 240)
    assert ("The best epoch was early (1 of 5): the 4 epochs after it (2.4 s) did not beat it; the last one (96.7%) "
            "is within the noise of it, and val loss kept falling (1.160 to 0.540): a plateau in accuracy, not "
            "over-training.") in f["facts"]
    assert "Stop sooner" not in f["next"] and f["next"].startswith("Fine-tune: `--recipe lp-ft`")
    # val loss rose after the best epoch: over-training; told to stop sooner when the run costs minutes ...
    eps = [row(1, 0.80, 0.85, 100.0, 0.40), row(2, 0.90, 0.86, 100.0, 0.35)] + [
        row(e, 0.88, 0.855, 100.0, 0.50) for e in range(3, 7)]
    f = R.findings(eps, {"epoch": 2, "val_acc": 0.86}, FULL, 400)
    assert ("The best epoch was early (2 of 6): the 4 epochs after it (6.7 min) did not beat it; val loss went from "
            "0.350 to 0.500; the last one (85.5%) is within the noise of it: over-training.") in f["facts"]
    assert f["next"] == ("Stop sooner: `--early-stop 2` ends a run 2 epochs after its last improvement (here: "
                         "epoch 4 instead of 6); best.pt stays the best epoch either way.")
    # ... but not when the whole run took seconds (nothing to save)
    cheap = [dict(r, seconds=2.0) for r in eps]
    assert "Stop sooner" not in R.findings(cheap, {"epoch": 2, "val_acc": 0.86}, FULL, 400)["next"]


def test_regularise_advice_fits_a_head_only_run():
    # caltech's linear probe: train 99% vs val 90%; only the head trains, on cached features
    recipe = {**PROBE, "optimizer": {"name": "adamw", "weight_decay": 1e-4}, "data": {"augment": "none"}}
    eps = [row(1, 0.95, 0.89, 1.0, 0.5), row(2, 0.98, 0.90, 1.0, 0.45), row(3, 0.99, 0.90, 1.0, 0.44)]
    f = R.findings(eps, {"epoch": 2, "val_acc": 0.90}, recipe, 500)
    assert f["facts"][1].startswith("Overfitting: at the last epoch (3)")
    assert f["next"] == ("Regularise the head (the only part that trains): more weight decay (`--weight-decay 0.01`; "
                         "this run had 0.0001), `--label-smoothing 0.1`, or let `finetune probe --wds 1e-3,1e-2,1e-1` "
                         "pick the LR and weight decay in one pass of cached features.")
    assert "--augment" not in f["next"] and "fewer trainable layers" not in f["next"]
    # fine-tuning that already augments strongly and smooths labels is not told to do either again
    full = {**FULL, "optimizer": {"weight_decay": 0.05}, "data": {"augment": "strong"},
            "train": {"label_smoothing": 0.1}}
    assert R.findings(eps, {"epoch": 2, "val_acc": 0.90}, full, 500)["next"] == (
        "Regularise: more weight decay (`--weight-decay`; this run had 0.05), or fewer trainable layers.")


def test_best_epoch_without_a_record_follows_trains_tie_rule():
    # equal best accuracy: train keeps the epoch with the lower val loss (runner.py _tie_with_lower_loss)
    eps = [row(1, 0.8, 0.90, 1.0, 0.50), row(2, 0.9, 0.95, 1.0, 0.50), row(3, 0.9, 0.95, 1.0, 0.40),
           row(4, 0.9, 0.95, 1.0, 0.45)]
    assert "The best epoch was 3 of 4." in R.findings(eps, {}, FULL, 400)["facts"]
    assert R.findings(eps, {"epoch": 3, "val_acc": 0.95}, FULL, 400)["facts"][2] == "The best epoch was 3 of 4."
    # without val losses the first epoch at the best accuracy stays
    bare = [dict(r, val_loss=None) for r in eps]
    assert R.findings(bare, {}, FULL, 400)["facts"][2].startswith("The best epoch was early (2 of 4)")


def test_a_steady_rise_of_small_steps_is_a_trend_not_flat():
    """+2 points an epoch on 240 images: each step within the noise, three in a row more than it: 'rising'. One image
    more at each of three epochs on a plateau stays 'flat'."""
    eps = [row(e, 0.5 + 0.02 * e, 0.78 + 0.02 * e) for e in range(1, 6)]  # 80% .. 88%
    f = R.findings(eps, {"epoch": 5, "val_acc": 0.88}, FULL, 240, run_dir="runs/r")
    assert ("The best epoch was the last (5 of 5) (+2.0 points over epoch 4): accuracy rose at each of the last 3 "
            "epochs, +6.0 points since epoch 2 (each step within the noise, together more than it), so more epochs "
            "may help.") in f["facts"]
    assert f["next"].startswith("Train longer: `finetune train --resume runs/r --epochs 10`")
    eps = probe_rows([229 / 240, 230 / 240, 231 / 240, 232 / 240, 233 / 240])
    f = R.findings(eps, {"epoch": 5, "val_acc": 233 / 240}, PROBE, 240, run_dir="runs/p")
    assert any("flat within the noise since epoch 1" in x for x in f["facts"]) and "Train longer" not in f["next"]
