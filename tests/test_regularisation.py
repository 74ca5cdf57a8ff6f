"""Regularisation timm users expect (the part outside the epoch loop): drop_rate / drop_path_rate passed to timm's
create_model from the recipe or flags, recorded in config.yaml, refused for other sources."""

from __future__ import annotations

import pytest
from torch import nn

from finetune import config
from finetune.models import build_model
from finetune.errors import ModelError

from helpers import tiny_tree


def test_rates_reach_timm_create_model():
    bb = build_model("timm:test_resnet", 3, drop_rate=0.3, drop_path_rate=0.1)
    assert bb.model.drop_rate == 0.3
    probs = [m.drop_prob for m in bb.model.modules() if type(m).__name__ == "DropPath"]
    assert max(probs) == pytest.approx(0.1) and min(probs) > 0  # stochastic depth rising over the blocks
    plain = build_model("timm:test_resnet", 3)
    assert plain.model.drop_rate == 0.0 and not any(type(m).__name__ == "DropPath" for m in plain.model.modules())
    with pytest.raises(ModelError, match=r"^model.drop_rate is passed to timm's create_model; 'resnet18' is not a "
                                         r"timm model \(use timm:<name>, or drop --drop-rate\)$"):
        build_model("resnet18", 3, drop_rate=0.2)


def test_flags_train_with_the_rates_and_record_them(tmp_path, cli):
    data = tiny_tree(tmp_path / "data", per_class=6)
    r = cli("train", "--model", "timm:test_resnet", "--weights", "none", "--data", data, "--image-size", "32",
            "--drop-rate", "0.25", "--drop-path-rate", "0.05", "--epochs", "1", "--batch-size", "8", "--device",
            "cpu", "--precision", "fp32", "--no-tensorboard", "--quiet", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.stderr
    rec = config.load_recipe(str(tmp_path / "run" / "config.yaml"))
    assert (rec.model.drop_rate, rec.model.drop_path_rate) == (0.25, 0.05)
    r = cli("train", "--drop-path-rate", "1.5", "--out", tmp_path / "x")
    assert r.exit_code == 1 and r.stderr == ("Error: --drop-path-rate: model.drop_path_rate must be in [0, 1), got "
                                             "1.5\n")


def test_head_dropout_keeps_the_feature_cache_off_in_auto():
    from finetune.speedups.feature_cache import decide

    cfg = config.apply_overrides(config.load_recipe("linear-probe"), {"model.name": "timm:test_resnet",
                                                                       "model.drop_rate": 0.2})
    bb = build_model("timm:test_resnet", 3, drop_rate=0.2)
    from finetune.training.freeze import apply_freeze

    apply_freeze(bb, cfg.freeze)
    decision, _ = decide(cfg, bb)
    assert not decision.use and "dropout p=0.2 before the classifier (model.drop_rate)" in decision.reason
    assert isinstance(bb.model.fc, nn.Linear)
