"""The LR range test (finetune lr-find, --lr auto): the suggestion lands in the range of LRs that train well on a
synthetic problem where that range is measured by a sweep, the valley rule on a known curve, and the CLI's outputs
(curve files; --lr auto records the suggestion in config.yaml and trains with it)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from finetune.data import make_loader
from finetune.speedups.feature_cache import FeatureDataset
from finetune.run.lr_find import LRFind, _longest_descent, range_test, smooth, suggest, valley

from helpers import tiny_tree


def _blobs(scale: float, n: int = 768, d: int = 32, classes: int = 4):
    """Overlapping Gaussian classes (the loss has a floor), features multiplied by ``scale``: the best SGD LR
    moves by ~scale^-2, so a fixed LR cannot be right for both scales."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, d, generator=g) * 0.25
    y = torch.randint(0, classes, (n,), generator=g)
    return (centers[y] + torch.randn(n, d, generator=g)) * scale, y


def _fit(x, y, lr: float, epochs: int = 3) -> float:
    """Train loss after ``epochs`` of SGD (momentum 0.9, batch 32) from a fixed init: what an LR achieves."""
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 4)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = make_loader(FeatureDataset(x, y), 32, shuffle=True, seed=0, workers=0)
    for ep in range(epochs):
        loader.sampler.set_epoch(ep)
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        v = nn.functional.cross_entropy(model(x), y).item()
    return v if math.isfinite(v) else math.inf


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_suggestion_lands_in_the_measured_good_range(scale):
    x, y = _blobs(scale)
    grid = [10 ** (e / 2) for e in range(-12, 3)]  # 1e-6 .. 10, half a decade apart
    final = {lr: _fit(x, y, lr) for lr in grid}
    start, best = _fit(x, y, 0.0, epochs=0), min(final.values())
    # good: the LR gets at least 3/4 of the loss reduction the best LR of the sweep gets in the same budget
    good = [lr for lr, v in final.items() if v <= best + 0.25 * (start - best)]
    torch.manual_seed(0)
    model = nn.Linear(32, 4)
    found = range_test(model, make_loader(FeatureDataset(x, y), 32, shuffle=True, seed=0, workers=0),
                       torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), nn.CrossEntropyLoss(), steps=100)
    assert min(good) <= found.suggestion <= max(good), (found.suggestion, good)
    assert not found.flat and found.rule == "valley"
    assert set(found.suggestions) == {"valley", "steep", "minimum"}
    assert found.suggestions["valley"] == {"lr": found.suggestion, "index": found.index}
    assert found.losses == smooth(found.raw_losses, 100) and len(found.raw_losses) == len(found.lrs)
    assert found.lrs[0] == pytest.approx(1e-7) and len(found.lrs) == len(found.losses) <= 100
    if scale == 10.0:  # diverges before 10: the test stops (the smoothed loss passed 4x its minimum)
        assert found.stopped.startswith("loss diverged") and len(found.lrs) < 100


def test_valley_picks_inside_the_longest_descent():
    lrs = [10 ** (-7 + i * 0.1) for i in range(80)]
    # flat, a noisy bump, then a clean descent from step 30 to 60, then divergence
    losses = [2.0] * 20 + [2.0, 2.1, 1.95, 2.05, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0] + \
             [2.0 - 0.05 * i for i in range(1, 31)] + [0.5 + 0.3 * i for i in range(20)]
    i = valley(lrs, losses)
    # minimum 0.5 at step 59; the top 2.1 (step 21); the plateau ends at the last point >= 2.1 - 5% of 1.6 = 2.02:
    # step 23 (2.05); the bottom starts at the first point <= 0.5 + 2% of 1.6: step 59. From 23 to 59 the longest
    # decreasing subsequence is 2.05, 2.0 (step 24), steps 30..59: 32 long, ending at 59, so fastai's start =
    # 59 - 32 = 27 and the pick is start + 32/3 + 32/6 (floored) = 27 + 10 + 5
    assert i == 42 and 30 <= i < 60


def _shallow_then_steep():
    """The issue's curve: a new head starts at zero, so the loss falls from the first step, but by 1e-4 a step for
    50 steps (a plateau on the plot), then 0.05 a step for 30 steps, then diverges; 100 steps over 1e-7..10."""
    lrs = [1e-7 * 1e8 ** (i / 99) for i in range(100)]
    losses = ([2.5 - 1e-4 * i for i in range(50)] + [2.495 - 0.05 * (i - 49) for i in range(50, 80)]
              + [1.0 + 0.2 * (i - 79) for i in range(80, 100)])
    return lrs, losses


def test_valley_ignores_a_long_shallow_start():
    lrs, losses = _shallow_then_steep()
    # minimum 0.995 at step 79, top 2.5 (step 0): the plateau ends at the last point >= 2.5 - 5% of 1.505 = 2.42475,
    # step 50 (2.445); steps 50..79 fall: 30 long, fastai's start 79 - 30 = 49, pick 49 + 10 + 5 = 64
    assert valley(lrs, losses) == 64 and losses[64] == pytest.approx(1.745)
    # fastai's own valley counts the plateau as descent: 80 long from step 0, start -1, pick -1 + 26 + 13 = 38,
    # on the plateau, 1.3 decades before the loss starts to fall: the "marker at the top of the descent"
    start, end = _longest_descent(losses)
    assert (start, end) == (-1, 79) and start + int((end - start) / 3) + int((end - start) / 6) == 38


def test_valley_ends_where_the_loss_reaches_the_bottom():
    lrs, losses = _shallow_then_steep()
    losses[80:93] = [0.995 - 0.001 * (i - 79) for i in range(80, 93)]  # a floor drifting down to 0.982 at step 92
    # the bottom starts at the first point <= 0.982 + 2% of 1.518: step 79 (0.995), so the pick stays at 64; running
    # to the minimum (fastai's end) would give steps 50..92, 43 long, start 49, pick 49 + 14 + 7 = 70
    assert valley(lrs, losses) == 64
    start, end = _longest_descent(losses[50:93])
    assert 50 + start + int((end - start) / 3) + int((end - start) / 6) == 70


def test_the_three_rules_on_a_constructed_curve():
    lrs, losses = _shallow_then_steep()
    losses[70] -= 0.03  # one steeper step into 70 (and a shallower one out of it): steep picks step 69
    found = suggest(lrs, losses)
    # trimmed to steps 10..94 as fastai trims; the valley as above; the minimum (0.995 at 79) / 10 -> nearest step
    # 79 - 99/8 = 66.6: step 67
    assert found == {"valley": {"lr": lrs[64], "index": 64}, "steep": {"lr": lrs[69], "index": 69},
                     "minimum": {"lr": pytest.approx(lrs[79] / 10), "index": 67}}
    assert lrs[64] == pytest.approx(1e-7 * 1e8 ** (64 / 99))


def test_valley_of_a_curve_that_never_falls_is_its_first_step():
    assert valley([1e-3, 1e-2, 1e-1], [1.0, 1.0, 1.2]) == 0 and valley([1e-3], [1.0]) == 0


def test_smooth_is_a_centred_moving_average():
    out = smooth([0.0] * 4 + [9.0] + [0.0] * 5, 100)  # 4 steps each side at 100 steps, fewer at the ends
    assert out == pytest.approx([9 / 5, 9 / 6, 9 / 7, 9 / 8, 9 / 9, 9 / 9, 9 / 8, 9 / 7, 9 / 6, 0.0])
    assert smooth([1.0, 3.0, 5.0], 25) == pytest.approx([2.0, 3.0, 4.0])  # 25 steps: 1 each side


def test_legend_and_alternatives_name_all_three_rules():
    f = LRFind([1e-3, 1e-2], [1.0, 0.5], 1e-2, 1, suggestions={
        "valley": {"lr": 1e-2, "index": 1}, "steep": {"lr": 1e-3, "index": 0}, "minimum": {"lr": 2e-3, "index": 0}})
    assert f.legend() == ["valley: 1.00e-02 (suggested)", "steep: 1.00e-03", "minimum/10: 2.00e-03"]
    assert f.alternatives() == "steep 0.001, minimum/10 0.002"
    assert f.png()[:8] == b"\x89PNG\r\n\x1a\n"



def test_the_plot_marks_all_three_suggestions_on_the_curve():
    """Issue #30 item 1: fastai's alternatives (steep, minimum/10) are marked on the plot beside the valley, each on
    the smoothed curve at its LR, named in the legend; the suggested LR also as a dashed vertical line."""
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    f = LRFind(lrs, [2.0, 1.5, 0.5, 0.4], 1e-2, 2, raw_losses=[2.1, 1.4, 0.6, 0.3], suggestions={
        "valley": {"lr": 1e-2, "index": 2}, "steep": {"lr": 1e-3, "index": 1}, "minimum": {"lr": 1e-2, "index": 2}})
    ax = f.figure().axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "loss per step", "smoothed", "valley: 1.00e-02 (suggested)", "steep: 1.00e-03", "minimum/10: 1.00e-02"]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    marks = {k: (list(lines[k].get_xdata()), list(lines[k].get_ydata()), lines[k].get_marker()) for k in f.legend()}
    assert marks == {"valley: 1.00e-02 (suggested)": ([1e-2], [0.5], "o"), "steep: 1.00e-03": ([1e-3], [1.5], "^"),
                     "minimum/10: 1.00e-02": ([1e-2], [0.5], "s")}
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [1e-2, 1e-2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_tree(tmp_path_factory.mktemp("lrf") / "data", per_class=16)


PROBE = ("--recipe", "linear-probe", "--model", "timm:test_resnet", "--weights", "none", "--image-size", "32",
         "--device", "cpu", "--precision", "fp32", "--batch-size", "8")


def test_lr_find_cli_prints_the_suggestion_and_writes_the_curve(data, tmp_path, cli):
    r = cli("lr-find", "--data", data, *PROBE, "--out", tmp_path / "lf")
    assert r.exit_code == 0, r.stderr
    found = json.loads((tmp_path / "lf" / "lr_find.json").read_text())
    sg = found["suggestions"]
    assert r.stdout.splitlines()[0] == (f"suggested lr: {found['suggestion']:.3g} (valley rule; steep "
                                        f"{sg['steep']['lr']:.2g}, minimum/10 {sg['minimum']['lr']:.2g}; "
                                        f"{len(found['lrs'])} steps on cached features, lr 1.0e-07 -> "
                                        f"{found['lrs'][-1]:.1e}"
                                        + (f"; stopped early: {found['stopped']})" if found["stopped"] else ")"))
    assert found["info"]["on_cached_features"] is True and found["info"]["optimizer"] == "adamw"
    assert found["suggestion"] == found["lrs"][found["index"]]
    assert sorted(sg) == ["minimum", "steep", "valley"]
    assert sg["valley"] == {"lr": found["suggestion"], "index": found["index"]}
    assert sg["steep"]["lr"] == found["lrs"][sg["steep"]["index"]]
    assert len(found["raw_losses"]) == len(found["lrs"])
    assert (tmp_path / "lf" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r2 = cli("lr-find", "--data", data, *PROBE, "--out", tmp_path / "lf")
    assert r2.exit_code == 1 and r2.stderr == (f"Error: '{tmp_path / 'lf' / 'lr_find.png'}' already exists; pass "
                                               "--overwrite to replace it or choose another --out\n")


@pytest.mark.slow
def test_train_lr_auto_records_and_uses_the_suggestion(data, tmp_path, cli):
    r = cli("train", "--data", data, *PROBE, "--lr", "auto", "--epochs", "1", "--out", tmp_path / "run",
            "--no-tensorboard", "--quiet")
    assert r.exit_code == 0, r.stderr
    found = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    lr = float(f"{found['suggestion']:.3g}")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(text)["optimizer"]["lr"] == lr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"][0]["lr"] == pytest.approx(lr)  # the first update trains at the base LR
    assert (tmp_path / "run" / "lr_find.png").is_file()
    r = cli("train", "--recipe", tmp_path / "run" / "config.yaml", "--out", tmp_path / "run", "--overwrite",
            "--quiet", "--no-tensorboard")  # the run dir with the curve files is still a run: --overwrite works
    assert r.exit_code == 0, r.stderr
