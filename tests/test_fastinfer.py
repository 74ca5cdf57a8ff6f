"""Fast frozen inference (finetune/models/fold.py): a conv+BN-folded copy for features, eval and predict.

The copy matches the eager model within a stated tolerance, the model itself (the one that trains and is saved) is
never changed, and a fold that would change the result is refused."""

from __future__ import annotations


import pytest
import torch
import torchvision
from torch import nn

import finetune
from helpers import tiny_tree
from finetune.config import apply_overrides, load_recipe
from finetune.models.fold import FastInference, folded_copy, mode_of

CL = torch.channels_last


def _with_stats(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine values, so that folding has something to fold (fresh BN is identity)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resnet18_folds_all_20_pairs_within_1e5_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _with_stats(torchvision.models.resnet18(num_classes=5))
    before, grads = _state(model), [p.requires_grad for p in model.parameters()]
    x = torch.randn(3, 3, 32, 32)
    fast, n = folded_copy(model, x)
    assert n == 20  # conv1/bn1, 16 block convs, 3 downsample convs
    assert fast is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    with torch.inference_mode():
        ref, out = model(x), fast(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5  # fp32: the fold is exact up to rounding
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise untouched
    assert [p.requires_grad for p in model.parameters()] == grads


def test_timm_batchnormact_keeps_its_activation_and_tf_same_padding_folds():
    import timm

    torch.manual_seed(0)
    model = _with_stats(timm.create_model("tf_efficientnet_lite0", num_classes=4)).to(memory_format=CL)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    fast, n = folded_copy(model, x)
    assert n == 49  # every BatchNormAct2d follows a conv (5 of them Conv2dSame)
    assert sum(isinstance(m, nn.ReLU6) for m in fast.modules()) == sum(isinstance(m, nn.ReLU6)
                                                                        for m in model.modules())
    with torch.inference_mode():
        ref, out = model(x), fast(x)
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):  # under the run's bf16: bf16 noise, not more
            eager16, fast16 = model(x).float(), FastInference(model, "auto")(x).float()
    # random BN statistics in 49 layers amplify bf16 rounding; folded bf16 is no further from fp32 than eager bf16
    # (x2 slack: the roundings differ)
    assert float((fast16 - ref).abs().max()) <= 2 * float((eager16 - ref).abs().max())


class _Shared(nn.Module):
    """A conv output that feeds its BatchNorm AND a residual add: folding it would change the add's input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_fold_that_changes_the_result_is_refused_and_the_model_runs():
    model = _with_stats(_Shared())
    fast, n = folded_copy(model, torch.randn(2, 3, 16, 16))
    assert (fast, n) == (model, 0)
    run = FastInference(model, "auto")
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(run(x), model(x))
    assert run.folded == 0


def test_off_and_training_mode_run_the_model_itself():
    model = _with_stats(torchvision.models.resnet18(num_classes=3))
    x = torch.randn(2, 3, 32, 32)
    off = FastInference(model, "off")
    off(x)
    assert off.run is model
    model.train()
    tr = FastInference(model, "auto")
    with torch.no_grad():
        tr(x)
    assert tr.run is model  # train-mode BatchNorm uses batch statistics: nothing to fold


def test_mode_of_a_checkpoint():
    assert mode_of({"recipe": {"train": {"fast_inference": "auto"}}}) == "auto"
    assert mode_of({"recipe": {"train": {}}}) == "off"  # older checkpoints: their val ran eagerly
    assert mode_of({}, "off") == "off"


def _run(tmp_path, fast: str, name: str, **over):
    data = tmp_path / "d"
    if not data.is_dir():
        tiny_tree(data, per_class=8)
    r = apply_overrides(load_recipe("default"), {
        "model.name": "timm:test_resnet", "model.weights": "none", "data.path": str(data), "data.image_size": 32,
        "data.val_split": 0.5,
        "data.augment": "none", "train.epochs": 1, "train.batch_size": 8, "train.precision": "fp32",
        "train.device": "cpu", "train.tensorboard": False, "train.report": False, "train.graph": False,
        "train.fast_inference": fast, **over})
    return finetune.train(r, out=tmp_path / name)


def test_training_with_fast_val_saves_bitwise_the_same_model_and_eval_reproduces_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    a, b = _run(tmp_path, "auto", "a"), _run(tmp_path, "off", "b")
    sa = torch.load(a.run_dir / "last.pt", weights_only=True)["model"]
    sb = torch.load(b.run_dir / "last.pt", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = a.epochs[-1], b.epochs[-1]
    assert ea["val_acc"] == eb["val_acc"]
    assert ea["val_loss"] == pytest.approx(eb["val_loss"], rel=1e-4)
    # the checkpoint's own setting (auto), at the run's batch size: bitwise what training recorded
    res = finetune.evaluate_checkpoint(a.run_dir / "last.pt", batch_size=8)
    assert (res["accuracy"], res["loss"]) == (ea["val_acc"], ea["val_loss"])
    off = finetune.evaluate_checkpoint(a.run_dir / "last.pt", fast_inference="off", batch_size=8)
    assert off["loss"] == pytest.approx(res["loss"], rel=1e-4)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 5e-2)])
def test_features_with_folding_match_eager_ones(precision, tol):
    import timm

    from finetune.speedups.feature_cache import compute_features

    torch.manual_seed(0)
    frozen = _with_stats(timm.create_model("test_resnet", num_classes=0)).to(memory_format=CL)
    before = _state(frozen)
    kw = dict(batch_size=8, precision=precision, channels_last=True, workers=0)
    fa, ya = compute_features(frozen, _Images(20), fast="auto", **kw)
    fo, yo = compute_features(frozen, _Images(20), fast="off", **kw)
    assert torch.equal(ya, yo) and fa.shape == fo.shape == (20, frozen.num_features)
    assert float((fa - fo).abs().max() / fo.abs().max()) <= tol
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())


def test_train_flag_is_recorded_and_eval_follows_the_checkpoint(cli, tmp_path):
    import yaml

    data = tiny_tree(tmp_path / "d", per_class=4)
    out = tmp_path / "run"
    r = cli("train", "--data", data, "--epochs", 1, "--batch-size", 8, "--precision", "fp32", "--no-tensorboard",
            "--no-report", "--fast-inference", "off", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["fast_inference"] == "off"
    from finetune.run.checkpoint import load_checkpoint

    assert mode_of(load_checkpoint(out / "last.pt")) == "off"


def test_a_block_cut_cache_with_batchnormact_validates_on_the_folded_copy(tmp_path, monkeypatch):
    """timm's TF-padding EfficientNets (fx cannot trace them): the feature cache cuts at a block (blocks.2 here) and
    validation runs the trainable rest
    fed with cached features; the folded copy replaces each BatchNormAct2d by its activation, so module names the
    cut held in eval mode (``blocks.0.0.bn1.act``) are gone in the copy: it used to fail there with a KeyError."""
    monkeypatch.setenv("FINETUNE_CACHE", "off")
    frozen = {"model.name": "timm:tf_efficientnet_lite0", "freeze.layers": ["conv_stem", "bn1", "blocks.0",
                                                                            "blocks.1"]}
    notes = []

    from finetune.training.engine import Reporter

    class Notes(Reporter):
        def start(self, info):
            notes.append(info["feature_cache"])

    data = tmp_path / "d"
    tiny_tree(data, per_class=8)
    r = apply_overrides(load_recipe("default"), {
        "data.path": str(data), "data.image_size": 32, "data.val_split": 0.5, "data.augment": "none",
        "train.epochs": 1, "train.batch_size": 8, "train.precision": "fp32", "train.tensorboard": False,
        "train.report": False, "train.graph": False, "train.fast_inference": "auto", "model.weights": "none",
        **frozen})
    run = finetune.train(r, out=tmp_path / "auto", reporter=Notes())
    assert notes and notes[0].startswith("used"), notes
    # the val pass on the folded copy of the cut model = the full model evaluated eagerly from the checkpoint
    e = run.epochs[-1]
    res = finetune.evaluate_checkpoint(run.run_dir / "last.pt", fast_inference="off", batch_size=8)
    # rel 1e-3: the folded convs round differently, and a random-init Lite0's logits are large (loss ~29), so the
    # difference depends on the thread count's summation order (1.4e-4 with 2 threads); a wrong cut is off by far more
    assert res["accuracy"] == e["val_acc"] and res["loss"] == pytest.approx(e["val_loss"], rel=1e-3)
