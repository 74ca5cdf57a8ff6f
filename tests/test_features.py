"""Frozen-feature cache: cached and uncached runs train the same head; eligibility rules (32 px, tiny models)."""

import pytest
import torch
from torch import nn

from finetune import config
from finetune.speedups import feature_cache as features
from finetune.training.engine import Reporter
from finetune.errors import ConfigError
from finetune.models import build_model
from finetune.run.runner import train


class Capture(Reporter):
    def __init__(self):
        self.info, self.notes = {}, []

    def start(self, info):
        self.info = info

    def note(self, message):
        self.notes.append(message)


def recipe(data=None, **over):
    """``data``: a data folder (``mini_sample``: the bundled sample's shapes, 12 train / 6 val a class); the whole
    bundled sample when None."""
    base = {"train.epochs": 2, "train.batch_size": 64, "train.precision": "fp32", "train.tensorboard": False,
            "data.image_size": 32, "data.augment": "none", "freeze.backbone": True, "optimizer.lr": 0.05,
            **({"data.path": str(data)} if data else {})}
    return config.apply_overrides(config.load_recipe("default"), {**base, **over})


def run(tmp_path, name, data, **over):
    cap = Capture()
    res = train(recipe(data, **over), out=tmp_path / name, reporter=cap)
    ckpt = torch.load(tmp_path / name / "last.pt", weights_only=True)
    return res, ckpt, cap


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smallcnn", "timm:test_resnet"])
def test_cached_and_uncached_runs_train_the_same_head(tmp_path, model, mini_sample):
    over = {"model.name": model, "model.weights": "none"}
    res_on, ck_on, cap_on = run(tmp_path, "cached", mini_sample, **over)
    res_off, ck_off, cap_off = run(tmp_path, "plain", mini_sample, **over, **{"train.cache_features": "off"})
    assert cap_on.info["feature_cache"] == "used" and cap_off.info["feature_cache"] == "off"
    assert any(n.startswith("frozen-feature cache: the input of") for n in cap_on.notes)
    assert [e["val_acc"] for e in res_on.epochs] == [e["val_acc"] for e in res_off.epochs]
    assert res_on.epochs[-1]["train_loss"] == pytest.approx(res_off.epochs[-1]["train_loss"], rel=1e-4)
    # checkpoints hold the FULL model with the usual keys: frozen tensors bitwise equal, the head allclose
    assert ck_on["model"].keys() == ck_off["model"].keys()
    head = set(ck_on["trainable"])
    for k in ck_on["model"]:
        if k in head:
            assert torch.allclose(ck_on["model"][k], ck_off["model"][k], atol=1e-5), k
        else:
            assert torch.equal(ck_on["model"][k], ck_off["model"][k]), k
    assert not torch.equal(ck_on["model"][sorted(head)[0]], build_model(model, 4).model.state_dict()[sorted(head)[0]])


@pytest.mark.slow
def test_trailing_block_is_cached_too(tmp_path, mini_sample):
    """smallcnn with its convs frozen: the features are the flattened conv output, seq.7 and seq.8 train on them."""
    over = {"freeze.backbone": False, "freeze.layers": ["seq.0", "seq.2", "seq.4"]}
    res_on, ck_on, cap_on = run(tmp_path, "cached", mini_sample, **over)
    res_off, ck_off, _ = run(tmp_path, "plain", mini_sample, **over, **{"train.cache_features": "off"})
    assert any(n.startswith("frozen-feature cache: the input of 'seq.7' (48 train / 24 val, [1024] each")
               for n in cap_on.notes)
    assert [e["val_acc"] for e in res_on.epochs] == [e["val_acc"] for e in res_off.epochs]
    for k, v in ck_on["model"].items():
        assert torch.allclose(v, ck_off["model"][k], atol=1e-5), k


@pytest.mark.slow
def test_unfreeze_schedule_uses_the_cache_until_the_first_unfreeze(tmp_path):
    """On 48 train images and the sample's whole val set (160: the 0.02 below is 3 images)."""
    from helpers import sample_subset

    data = sample_subset(tmp_path / "data", train=12, val=40)
    sched = {"freeze.schedule": [{"epoch": 2, "layers": ["all"], "lr_mult": 0.5}], "optimizer.lr": 0.02}
    res_on, ck_on, cap_on = run(tmp_path, "cached", data, **sched)
    res_off, ck_off, _ = run(tmp_path, "plain", data, **sched, **{"train.cache_features": "off"})
    assert any("until the unfreeze at epoch 2" in n for n in cap_on.notes)
    assert res_on.epochs[0]["val_acc"] == res_off.epochs[0]["val_acc"]
    # after the unfreeze the full model trains (every tensor moved) and stays close to the uncached run
    assert len(ck_on["trainable"]) == len(ck_on["model"])
    for k, v in ck_on["model"].items():
        assert torch.allclose(v, ck_off["model"][k], atol=1e-3), k
    assert abs(res_on.epochs[-1]["val_acc"] - res_off.epochs[-1]["val_acc"]) <= 0.02


@pytest.mark.slow
def test_cache_on_with_random_augment_uses_the_eval_transform_and_says_so(tmp_path, mini_sample):
    _, _, cap = run(tmp_path, "on", mini_sample, **{"data.augment": "light", "train.cache_features": "on",
                                                    "train.epochs": 1})
    assert cap.info["feature_cache"] == "used"
    note = next(n for n in cap.notes if n.startswith("frozen-feature cache"))
    # library use: the setting by its recipe key (the CLI names --cache-features; test_messages.py)
    assert note.endswith("; augment light is random; the cache uses the eval transform (cache_features: on; with "
                         "train.cache_features='auto' this run would train without the cache)")


def decide(model="smallcnn", **over):
    cfg = recipe(**over)
    bb = build_model(model, 4)
    from finetune.training.freeze import apply_freeze

    apply_freeze(bb, cfg.freeze)
    return features.decide(cfg, bb, 0, torch.randn(2, 3, 32, 32))[0]


def test_auto_caches_only_when_it_is_the_same_computation():
    assert decide().use
    d = decide(**{"data.augment": "light"})
    assert not d.use and d.reason == ("not used: augment light is random; the cache uses the eval transform "
                                      "(--cache-features on forces it)")
    d = decide("timm:test_resnet", **{"freeze.bn": "train"})
    assert not d.use and "BatchNorm with --bn train" in d.reason
    assert decide(**{"freeze.schedule": [{"epoch": 1, "layers": ["all"]}]}).reason == \
        "not used: the unfreeze schedule starts at epoch 1"
    assert decide(**{"train.cache_features": "off"}).reason == "off"


def test_cache_on_where_more_than_the_head_trains_is_an_error():
    with pytest.raises(ConfigError, match="--cache-features on needs frozen layers, but the whole model trains"):
        decide(**{"freeze.backbone": False, "train.cache_features": "on"})
    assert decide(**{"freeze.backbone": False}).reason == "not used: nothing is frozen"


def test_split_reproduces_the_model_and_spots_dropout():
    bb = build_model("timm:test_resnet", 4)
    for n, p in bb.model.named_parameters():
        p.requires_grad_(n.startswith(bb.head[0]))
    split = features.split_frozen_prefix(bb)
    x = torch.randn(3, 3, 32, 32)
    assert split is not None and features.check_split(split, bb.model, x)
    feats, labels = features.compute_features(split.frozen, torch.utils.data.TensorDataset(x, torch.arange(3)),
                                              batch_size=2)
    assert feats.dtype == torch.float32 and not feats.is_inference() and labels.tolist() == [0, 1, 2]
    bb.model.eval()
    with torch.no_grad():
        assert torch.allclose(split.trainable(feats), bb.model(x), atol=1e-5)
    assert features.train_mode_effects(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.2)), "frozen") == \
        ["1 (Dropout p=0.2)"]


def test_cli_flags_reach_the_recipe(cli):
    r = cli("train", "--cache-features", "sometimes", "--quiet")
    assert r.exit_code != 0 and "train.cache_features" in r.stderr
