"""finetune auto (finetune/tools/auto.py): folds, cross-validation, the decision on synthetic candidates, a missing
weights file skipped, and end to end on tiny models (LP-FT; a budget too short for fine-tuning ends at the probe)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from finetune import api
from finetune.run import budget as B
from finetune.tools import auto as A

from helpers import tiny_tree


def test_folds_are_stratified_disjoint_and_cover_every_row():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 7)
    folds = A.folds_of(labels, 5, seed=0)
    rows = sorted(i for f in folds for i in f)
    assert rows == list(range(22))
    for f in folds:  # each class dealt round-robin: 2 of class 0, 1 of class 1, 1-2 of class 2 per fold
        counts = torch.bincount(labels[f], minlength=3).tolist()
        assert counts[0] == 2 and counts[1] == 1 and counts[2] in (1, 2)
    assert A.folds_of(labels, 5, seed=0) == folds and A.folds_of(labels, 5, seed=1) != folds


def _blobs(n_per: int, classes: int, d: int = 16, spread: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), d, generator=g), labels


def test_cross_validation_pools_every_row_once():
    from finetune.config import load_recipe

    sched = load_recipe("linear-probe").scheduler
    feats, labels = _blobs(20, 3)
    heads, knn = A.cross_validate(feats, labels, 3, [(1e-2, 1e-4), (1e-6, 1e-4)], folds=4, epochs=5,
                                  batch_size=16, seed=0, scheduler=sched, knn=(5,))
    assert heads[0].val_acc == 1.0 and knn == {5: 1.0}  # separable: every held-out row right
    assert heads[1].val_loss > 1.09 > heads[0].val_loss  # an LR of 1e-6 barely moves the zero head from ln 3
    noise = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(1))
    heads, _ = A.cross_validate(torch.randn(60, 16), noise, 3, [(1e-2, 1e-4)], folds=4, epochs=5, batch_size=16,
                                seed=0, scheduler=sched)
    assert 0.0 < heads[0].val_acc < 0.6  # random labels: about chance, not the train fit
    assert heads[0].val_acc * 60 == round(heads[0].val_acc * 60)  # a count of rows out of 60


def _cand(model, acc, n=200, ips=10.0, loss=0.5):
    return A.Candidate(model, "default", acc=acc, n=n, images_per_sec=ips, loss=loss)


def test_a_candidate_that_probes_better_wins():
    cands = [_cand("a", 0.70, n=1000), _cand("b", 0.90, n=1000, ips=1.0)]
    d = A.decide(cands, budget_left=None, n_train=100, n_val=50)
    assert d.winner == 1 and d.strategy == "lp-ft"
    assert [c.winner for c in cands] == [False, True] and [c.tied for c in cands] == [False, False]
    assert d.reasons[0] == ("b has the best probe estimate, 90.0% ± 1.9 on 1000 images, ahead of a (70.0% ± 2.8) by "
                            "more than the noise")


def test_a_tie_within_noise_goes_to_the_faster_candidate():
    cands = [_cand("big", 0.91, ips=5.0), _cand("small", 0.90, ips=20.0), A.Candidate("x", "/no.pt",
                                                                                     status="skipped", reason="r")]
    d = A.decide(cands, budget_left=None, n_train=100, n_val=50)
    assert d.winner == 1 and [c.tied for c in cands] == [True, True, False]
    assert d.reasons[0] == ("small (90.0% ± 4.2 on 200 images) is within noise of big; big is 91.0% ± 4.0: a tie, "
                            "broken by cost (20 img/s forward, the fastest of them)")


def test_a_budget_too_small_for_fine_tuning_ends_at_the_probe():
    # a fine-tuning epoch: (100 images x 3 + 50) / 10 img/s = 35 s; LP-FT's 4 of them + 15 s: 155 s
    d = A.decide([_cand("a", 0.8)], budget_left=150.0, n_train=100, n_val=50)
    assert d.strategy == "linear-probe" and d.ft_epoch_seconds == 35.0
    assert d.reasons[1] == ("linear probe: the 2m30s left can't hold LP-FT's 4 fine-tuning epochs (~35s each at 10 "
                            "img/s forward), and a shorter LP-FT is not a measured recipe (on flowers12 one "
                            "fine-tuning epoch ended 2.1 points below the linear probe)")
    d = A.decide([_cand("a", 0.8)], budget_left=160.0, n_train=100, n_val=50)
    assert d.strategy == "lp-ft"
    assert d.reasons[1] == ("LP-FT: the 2m40s left hold the linear-probe epoch and its 4 fine-tuning epochs (~35s "
                            "each, estimated from 10 img/s forward); the run measures its training step and checks")
    d = A.decide([_cand("a", 1.0)], budget_left=None, n_train=100, n_val=50)
    assert d.strategy == "linear-probe"
    assert d.reasons[1] == "linear probe: the probe makes no mistake on 200 images; fine-tuning cannot improve it"


def test_a_missing_weights_file_is_skipped_not_fatal(tmp_path):
    c = A.probe_candidate("resnet18", str(tmp_path / "nope.pt"), "sample", [(1e-3, 1e-4)], cache_dir=None,
                          folds=5, recipe_kw={})
    assert c.status == "skipped" and c.acc is None
    assert c.reason == (f"weights file '{tmp_path / 'nope.pt'}' not found; pass an existing .pth/.pt/.safetensors "
                        "file, a weights name, or --weights none")


def test_no_candidate_is_one_error(tmp_path, cli):
    r = cli("auto", "--data", "sample", "--model", f"resnet18={tmp_path / 'a.pt'}", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == (
        f"Error: no candidate backbone could be probed (resnet18: weights file '{tmp_path / 'a.pt'}' not found); pass "
        "--model NAME=WEIGHTS_FILE,... with weights files you have")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,error", [
    (["--budget", "5x"], "Error: --budget '5x' is not a duration; use e.g. 90s, 20m, 1h30m or seconds"),
    (["--folds", "1"], "Error: --folds must be 0 (the val split) or at least 2, got 1"),
    (["--model", "resnet1"], "Error: unknown model 'resnet1'"),
])
def test_flag_mistakes_are_one_line(cli, args, error):
    r = cli("auto", "--data", "sample", *args)
    assert r.exit_code != 0 and r.stderr.splitlines()[0].startswith(error), r.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """train/val/test of 4 classes at 32 px (a and d share their colour: no probe is perfect on them), and
    ImageNet-shaped weights files of two small timm models."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("auto")
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        tiny_tree(root / "d" / split, classes=("a", "b", "c", "d"), per_class=n)
    for name in ("test_efficientnet", "test_convnext"):
        torch.manual_seed(0)
        save_file(timm.create_model(name, num_classes=1000).state_dict(), str(root / f"{name}.safetensors"))
    return root


def _models(tiny, *extra):
    return ",".join([f"timm:test_efficientnet={tiny / 'test_efficientnet.safetensors'}",
                     f"timm:test_convnext={tiny / 'test_convnext.safetensors'}", *extra])


@pytest.mark.slow
def test_auto_end_to_end_writes_a_run_with_its_decision(tiny, tmp_path, cli):
    out = tmp_path / "run"
    r = cli("auto", "--data", tiny / "d", "--model", _models(tiny, f"resnet18={tmp_path / 'gone.pt'}"), "--out", out,
            "--folds", "3", "--image-size", "32", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == json.loads((out / "auto.json").read_text())
    assert [c["status"] for c in doc["candidates"]] == ["ok", "ok", "skipped"]
    assert doc["candidates"][2]["reason"].startswith(f"weights file '{tmp_path / 'gone.pt'}' not found")
    assert doc["estimate"] == "3-fold cross-validation over the 64 train+val images"
    assert doc["data"] == {"train": 48, "val": 16, "test": 16, "classes": 4}
    w = doc["candidates"][doc["winner"]]
    assert w["winner"] and doc["strategy"] == "lp-ft" and doc["epochs"] == 5
    assert w["n"] == 64 and w["ci"][0] <= w["acc"] < 1.0 and w["acc"] <= w["ci"][1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 16  # the test split evaluated once
    rec = yaml.safe_load((out / "recipe.yaml").read_text())
    assert rec["model"]["name"] == w["model"] and rec["train"]["epochs"] == 5
    assert rec["freeze"]["schedule"][0]["epoch"] == 2  # LP-FT
    assert (out / "recipe.yaml").read_text().startswith(f"# made by finetune auto: {w['model']}, lp-ft\n")


@pytest.mark.slow
def test_a_budget_too_short_for_fine_tuning_trains_the_linear_probe(tiny, tmp_path, monkeypatch):
    """The decision expects LP-FT to fit, the run measures a training step of 0.01 img/s: one of its 5 epochs fits,
    so auto trains the probe's head as the linear-probe recipe, and says why."""
    monkeypatch.setattr(B, "measure", lambda *a, **k: B.Throughput(1e6, 0.01, 8, 0.0))
    res = api.auto(_models(tiny), data=str(tiny / "d"), budget="10m", out=tmp_path / "run", folds=2, image_size=32)
    assert res.decision.strategy == "linear-probe"
    assert res.decision.reasons[-1].startswith("linear probe after all: the run measured its training step and only "
                                               "1 epoch fit the ")
    w = res.candidates[res.decision.winner]
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["optimizer"]["lr"] == w.lr and cfg["optimizer"]["weight_decay"] == w.weight_decay
    assert cfg["freeze"]["backbone"] is True and cfg["freeze"]["schedule"] == []
    assert w.method == "2-fold cross-validation over the 64 train+val images" and w.n == 64
    doc = json.loads((tmp_path / "run" / "auto.json").read_text())
    assert doc["strategy"] == "linear-probe" and doc["epochs"] == 5
