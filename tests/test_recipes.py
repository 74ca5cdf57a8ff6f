"""Every shipped recipe: loads, validates, previews (inspect --recipe) and trains one step on tiny inputs."""

import json

import pytest
import torch
from torch import nn

from finetune import config
from finetune.training.freeze import apply_bn_policy, apply_freeze
from finetune.models import build_model
from finetune.training.optim import build_optimizer, unfreeze_step

RECIPES = config.recipe_names()


def test_the_issue_recipes_ship():
    assert {"default", "linear-probe", "full-finetune", "resnet18-freeze-early", "vgg16-freeze-features", "first-n",
            "gradual-unfreeze", "lp-ft"} <= set(RECIPES)


def step(bb, opt, bn):
    """Two real training steps on random 32x32 tensors: train(), BN policy, CE loss, backward, optimizer step.
    Two, because a new head starts at zero: the first step's gradient reaches only the head."""
    for _ in range(2):
        bb.model.train()
        apply_bn_policy(bb.model, bn)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        opt.zero_grad()
        nn.CrossEntropyLoss()(bb.model(x), y).backward()
        opt.step()


def snapshot(bb):
    return {k: v.clone() for k, v in bb.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_previews_and_trains(name, cli):
    r = config.apply_overrides(config.load_recipe(name), {"model.weights": "none", "model.num_classes": 3,
                                                           "data.image_size": 32})
    assert r.name == name and r.description and r.train.epochs > 0 and r.train.batch_size > 0

    preview = cli("inspect", "--recipe", name, "--num-classes", 3, "--json")
    assert preview.exit_code == 0, preview.stderr
    doc = json.loads(preview.stdout)
    assert doc["model"] == r.model.name

    torch.manual_seed(0)
    bb = build_model(r.model.name, num_classes=3, weights="none")
    plan = apply_freeze(bb, r.freeze)
    assert [p["name"] for p in doc["parameters"] if not p["trainable"]] == plan.frozen
    assert doc["plan"]["summary"] == plan.summary() and doc["plan"]["bn"] == r.freeze.bn

    opt = build_optimizer(bb, r.optimizer)
    before = snapshot(bb)
    step(bb, opt, r.freeze.bn)
    after = dict(bb.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in plan.frozen)
    assert all(not torch.equal(before[n], after[n]) for n in plan.trainable)
    if r.freeze.bn == "frozen":  # BN buffers inside frozen layers did not move either
        for m in bb.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                assert not m.training

    for s in r.freeze.schedule:  # the engine calls this at the start of epoch s.epoch
        n_groups = len(opt.param_groups)
        new = unfreeze_step(bb, opt, s, r.optimizer)
        assert new and len(opt.param_groups) > n_groups
        assert all(g["base_lr"] == pytest.approx(r.optimizer.lr * s.lr_mult) for g in opt.param_groups[n_groups:])
        before = snapshot(bb)
        step(bb, opt, r.freeze.bn)
        params = dict(bb.model.named_parameters())
        assert all(not torch.equal(before[n], params[n]) for n in new)
