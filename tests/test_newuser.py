"""Issue 14 (new-user pass): provenance through resumes, eval = recorded on cached runs, and the small fixes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune import config
from finetune.checkpoint import load_checkpoint
from finetune.runner import train


def recipe(**over):
    base = {"train.epochs": 1, "train.batch_size": 64, "train.precision": "fp32", "train.graph": False,
            "train.tensorboard": False}
    return config.apply_overrides(config.load_recipe("default"), {**base, **over})


def test_resume_keeps_the_weights_identity(tmp_path):
    from finetune.models import build_model

    init = tmp_path / "init.pth"
    torch.save(build_model("smallcnn", num_classes=4).model.state_dict(), init)
    out = tmp_path / "run"
    train(recipe(**{"model.weights": str(init)}), out=out)
    for total in (2, 3):  # any number of resumes
        train(None, resume=out, epochs=total)
        assert config.load_recipe(str(out / "config.yaml")).model.weights == str(init)
        for name in ("last.pt", "best.pt"):
            assert load_checkpoint(out / name)["recipe"]["model"]["weights"] == str(init), (total, name)


@pytest.mark.parametrize("freeze", [{"freeze.backbone": True}, {"freeze.layers": ["seq.0", "seq.2"]}])
def test_eval_of_a_cached_run_reproduces_the_recorded_val(tmp_path, freeze):
    """The run trains on frozen features in bf16; eval rebuilds the full model: same loss and accuracy."""
    from finetune.api import evaluate_checkpoint

    r = recipe(**{"train.precision": "bf16", "train.epochs": 2, "train.cache_features": "on", **freeze})
    res = train(r, out=tmp_path / "run")
    best = next(e for e in res.epochs if e["epoch"] == res.best_epoch)
    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert ev["accuracy"] == best["val_acc"]
    assert ev["loss"] == best["val_loss"]  # bitwise: same precision, layout and transform
