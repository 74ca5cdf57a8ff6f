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
from finetune.run.lr_find import range_test, valley

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
    assert found.lrs[0] == pytest.approx(1e-7) and len(found.lrs) == len(found.losses) <= 100
    if scale == 10.0:  # diverges before 10: the test stops (the smoothed loss passed 4x its minimum)
        assert found.stopped.startswith("loss diverged") and len(found.lrs) < 100


def test_valley_picks_inside_the_longest_descent():
    lrs = [10 ** (-7 + i * 0.1) for i in range(80)]
    # flat, a noisy bump, then a clean descent from step 30 to 60, then divergence
    losses = [2.0] * 20 + [2.0, 2.1, 1.95, 2.05, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0] + \
             [2.0 - 0.05 * i for i in range(1, 31)] + [0.5 + 0.3 * i for i in range(20)]
    i = valley(lrs, losses)
    # the longest decreasing subsequence: 2.1 (step 21), 2.05, 2.0 (23, 24), then steps 30..59: 33 long, ends at 59,
    # so fastai's start = 59 - 33 = 26, and the pick is start + 33/3 + 33/6 (floored) = 26 + 11 + 5
    assert i == 42 and 30 <= i < 60


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_tree(tmp_path_factory.mktemp("lrf") / "data", per_class=16)


PROBE = ("--recipe", "linear-probe", "--model", "timm:test_resnet", "--weights", "none", "--image-size", "32",
         "--device", "cpu", "--precision", "fp32", "--batch-size", "8")


def test_lr_find_cli_prints_the_suggestion_and_writes_the_curve(data, tmp_path, cli):
    r = cli("lr-find", "--data", data, *PROBE, "--out", tmp_path / "lf")
    assert r.exit_code == 0, r.stderr
    found = json.loads((tmp_path / "lf" / "lr_find.json").read_text())
    assert r.stdout.splitlines()[0] == (f"suggested lr: {found['suggestion']:.3g} (valley rule; "
                                        f"{len(found['lrs'])} steps on cached features, lr 1.0e-07 -> "
                                        f"{found['lrs'][-1]:.1e}"
                                        + (f"; stopped early: {found['stopped']})" if found["stopped"] else ")"))
    assert found["info"]["on_cached_features"] is True and found["info"]["optimizer"] == "adamw"
    assert found["suggestion"] == found["lrs"][found["index"]]
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
