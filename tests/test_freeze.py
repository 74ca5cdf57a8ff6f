"""Freeze strategies on resnet18, vgg16, smallcnn and timm:test_resnet; validation texts; the BatchNorm policy."""

import pytest
import torch
from torch import nn

from finetune.config import FreezeCfg, UnfreezeStep
from finetune.errors import FreezeError
from finetune.training.freeze import Strategy, apply_bn_policy, apply_freeze, apply_strategies, frozen_bn_layers, \
    unfreeze_layers
from finetune.models import build_model


def meta(name, n=3):
    """Names and requires_grad only: build without allocating (vgg16 real init costs ~2 s)."""
    with torch.device("meta"):
        return build_model(name, num_classes=n)


def frozen(bb):
    return [n for n, p in bb.model.named_parameters() if not p.requires_grad]


def trainable(bb):
    return [n for n, p in bb.model.named_parameters() if p.requires_grad]


def names(bb):
    return [n for n, _ in bb.model.named_parameters()]


SMALLCNN = ["seq.0.weight", "seq.0.bias", "seq.2.weight", "seq.2.bias", "seq.4.weight", "seq.4.bias",
            "seq.7.weight", "seq.7.bias", "seq.8.weight", "seq.8.bias"]


def test_smallcnn_every_strategy():
    bb = meta("smallcnn")
    assert names(bb) == SMALLCNN
    plan = apply_freeze(bb, FreezeCfg(names=["seq.0", "seq.2"]))  # the tutorial's method 1
    assert frozen(bb) == plan.frozen == SMALLCNN[:4] and plan.trainable == SMALLCNN[4:]
    apply_freeze(bb, FreezeCfg(first=6))  # method 2
    assert frozen(bb) == SMALLCNN[:6]
    apply_freeze(bb, FreezeCfg(layers=["seq.0", "seq.4"]))  # method 3
    assert frozen(bb) == ["seq.0.weight", "seq.0.bias", "seq.4.weight", "seq.4.bias"]
    apply_freeze(bb, FreezeCfg(backbone=True))
    assert trainable(bb) == ["seq.8.weight", "seq.8.bias"]
    apply_freeze(bb, FreezeCfg(names=["*.bias"]))  # a glob matches whole names
    assert frozen(bb) == [n for n in SMALLCNN if n.endswith(".bias")]
    apply_freeze(bb, FreezeCfg())  # starting point: everything trainable
    assert frozen(bb) == []


def test_resnet18_strategies():
    bb = meta("resnet18")
    all_names = names(bb)
    plan = apply_freeze(bb, FreezeCfg(layers=["conv1", "bn1", "layer1", "layer2"]))
    assert plan.frozen == [n for n in all_names if n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    assert len(plan.frozen) == 30 and plan.trainable[0] == "layer3.0.conv1.weight"
    assert [p.requires_grad for p in bb.model.parameters()] == [i >= 30 for i in range(62)]
    apply_freeze(bb, FreezeCfg(first=15))
    assert frozen(bb) == all_names[:15] and frozen(bb)[-1] == "layer1.1.bn2.bias"
    apply_freeze(bb, FreezeCfg(names=["bn"]))
    assert frozen(bb) == [n for n in all_names if "bn" in n] and len(frozen(bb)) == 34
    apply_freeze(bb, FreezeCfg(backbone=True))
    assert trainable(bb) == ["fc.weight", "fc.bias"]
    apply_freeze(bb, FreezeCfg(backbone=True, unfreeze=["layer4", "conv1"]))  # module paths, not substrings
    assert trainable(bb) == ["conv1.weight"] + [n for n in all_names if n.startswith("layer4.")] + ["fc.weight",
                                                                                                   "fc.bias"]
    apply_freeze(bb, FreezeCfg(backbone=True, unfreeze=["bn1.bias"]))  # not a module: a name pattern
    assert trainable(bb) == [n for n in all_names if "bn1.bias" in n] + ["fc.weight", "fc.bias"]
    assert len(trainable(bb)) == 11
    apply_freeze(bb, FreezeCfg(layers=["layer*.0"]))  # a glob over module names
    assert frozen(bb) == [n for n in all_names if n.split(".")[1:2] == ["0"]]


def test_vgg16_strategies():
    bb = meta("vgg16")
    plan = apply_freeze(bb, FreezeCfg(layers=["features"]))
    assert plan.frozen == [n for n in names(bb) if n.startswith("features.")] and len(plan.frozen) == 26
    assert plan.trainable == ["classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias",
                              "classifier.6.weight", "classifier.6.bias"]
    apply_freeze(bb, FreezeCfg(layers=["features.0"]))
    assert frozen(bb) == ["features.0.weight", "features.0.bias"]
    apply_freeze(bb, FreezeCfg(backbone=True))
    assert trainable(bb) == ["classifier.6.weight", "classifier.6.bias"]
    apply_freeze(bb, FreezeCfg(first=26, names=["classifier.0"]))  # strategies compose: a union of frozen sets
    assert trainable(bb) == ["classifier.3.weight", "classifier.3.bias", "classifier.6.weight", "classifier.6.bias"]


def test_timm_test_resnet_strategies():
    bb = meta("timm:test_resnet")
    assert bb.head == ["fc"]
    apply_freeze(bb, FreezeCfg(layers=["conv1", "bn1"]))
    assert frozen(bb) == ["conv1.0.weight", "conv1.1.weight", "conv1.1.bias", "conv1.3.weight", "conv1.4.weight",
                          "conv1.4.bias", "conv1.6.weight", "bn1.weight", "bn1.bias"]
    apply_freeze(bb, FreezeCfg(backbone=True, unfreeze=["layer4"]))
    assert trainable(bb) == [n for n in names(bb) if n.startswith("layer4.")] + ["fc.weight", "fc.bias"]
    apply_freeze(bb, FreezeCfg(first=len(names(bb)), unfreeze=["all"]))
    assert frozen(bb) == []


def test_strategies_apply_in_order():
    bb = meta("smallcnn")
    plan = apply_strategies(bb, [Strategy("unfreeze", ["all"]), Strategy("first", 4), Strategy("unfreeze", ["seq.2"]),
                                 Strategy("names", ["seq.7.bias"])])
    assert plan.frozen == ["seq.0.weight", "seq.0.bias", "seq.7.bias"]
    assert plan.steps == ["unfreeze all", "freeze first 4", "unfreeze seq.2", "freeze names seq.7.bias"]


def test_plan_summary_and_dict():
    bb = meta("resnet18")
    plan = apply_freeze(bb, FreezeCfg(layers=["conv1", "layer1"], bn="train"))
    rows = plan.summary()
    assert [r["module"] for r in rows] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert rows[0] == {"module": "conv1", "tensors": 1, "params": 9408, "trainable": 0, "frozen": 9408}
    assert rows[1] == {"module": "bn1", "tensors": 2, "params": 128, "trainable": 128, "frozen": 0}
    assert rows[6] == {"module": "fc", "tensors": 2, "params": 1539, "trainable": 1539, "frozen": 0}
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in bb.model.parameters())
    d = plan.to_dict()
    assert d["bn"] == "train" and d["frozen"] == plan.frozen and d["steps"] == ["freeze layers conv1,layer1"]


@pytest.mark.parametrize("cfg, message", [
    (FreezeCfg(layers=["layr1"]), "freeze layer 'layr1' matches no module of resnet18 (did you mean 'layer1', "
                                  "'layer4.1', 'layer3.1'?); see 'finetune inspect resnet18 --modules'"),
    (FreezeCfg(layers=["relu"]), "freeze layer 'relu' (ReLU) has no parameters in resnet18"),
    (FreezeCfg(names=["layer9"]), "freeze name 'layer9' matches no parameter of resnet18 (did you mean 'layer4', "
                                  "'layer3', 'layer2'?); see 'finetune inspect resnet18'"),
    (FreezeCfg(first=63), "freeze first N must be between 0 and 62 (the number of parameter tensors in resnet18), "
                          "got 63"),
    (FreezeCfg(first=-1), "freeze first N must be between 0 and 62 (the number of parameter tensors in resnet18), "
                          "got -1"),
    (FreezeCfg(first=62), "the freeze plan leaves nothing to train: all 62 parameter tensors of resnet18 are frozen; "
                          "unfreeze something (e.g. --unfreeze fc)"),
    (FreezeCfg(backbone=True, unfreeze=["fcc"]), "unfreeze 'fcc' matches no module or parameter of resnet18 (did you "
                                                 "mean 'fc'?); see 'finetune inspect resnet18 --modules'"),
    (FreezeCfg(backbone=True, schedule=[UnfreezeStep(2, ["layer44"])]),
     "unfreeze layer 'layer44' matches no module of resnet18 (did you mean 'layer4', 'layer4.1', 'layer4.0'?); "
     "see 'finetune inspect resnet18 --modules'"),
    (FreezeCfg(bn="frozn"),
     "BatchNorm policy must be one of frozen, eval, train, got 'frozn' (did you mean 'frozen'?)"),
])
def test_errors(cfg, message):
    bb = meta("resnet18")
    apply_freeze(bb, FreezeCfg(names=["fc"]))
    with pytest.raises(FreezeError) as e:
        apply_freeze(bb, cfg)
    assert str(e.value) == message
    if not cfg.schedule:  # selection is checked before anything changes
        assert frozen(bb) == ["fc.weight", "fc.bias"]


def test_unfreeze_layers_returns_newly_trainable():
    bb = meta("resnet18")
    apply_freeze(bb, FreezeCfg(backbone=True, unfreeze=["layer4.1"]))
    new = unfreeze_layers(bb, ["layer4"])
    assert new == [n for n in names(bb) if n.startswith("layer4.0.")]
    assert unfreeze_layers(bb, ["layer4"]) == []
    assert unfreeze_layers(bb, ["all"]) == [n for n in names(bb) if n.split(".")[0] in
                                            ("conv1", "bn1", "layer1", "layer2", "layer3")]
    with pytest.raises(FreezeError, match=r"^unfreeze layer 'layer5' matches no module of resnet18"):
        unfreeze_layers(bb, ["layer5"])


# ---------------------------------------------------------------------------------------------- BatchNorm

def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def train_steps(bb, bn, steps=3, size=32):
    """What the engine does: train() then the BN policy, then forward/backward/step on the trainable params."""
    opt = torch.optim.SGD([p for p in bb.model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        bb.model.train()
        apply_bn_policy(bb.model, bn)
        x = torch.randn(4, 3, size, size, generator=g) * 3 + 1  # far from N(0, 1): stats would move a lot
        loss = nn.functional.cross_entropy(bb.model(x), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def features(bb, x):
    """The frozen part's output: everything before the head."""
    bb.model.eval()
    with torch.no_grad():
        if bb.source == "timm":
            return bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
        return nn.Sequential(*list(bb.model.children())[:-1])(x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "timm:test_resnet"])
def test_frozen_backbone_bn_stats_and_outputs_do_not_move(name):
    torch.manual_seed(0)
    bb = build_model(name, num_classes=3)
    apply_freeze(bb, FreezeCfg(backbone=True))
    x = torch.randn(2, 3, 32, 32)
    before, feats = bn_state(bb.model), features(bb, x)
    head = bb.model.fc.weight.clone()
    train_steps(bb, "frozen")
    assert bb.model.training and not any(m.training for m in bb.model.modules()
                                         if isinstance(m, nn.modules.batchnorm._BatchNorm))
    after = bn_state(bb.model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bb.model.modules())
    assert before.keys() == after.keys() and len(before) == 3 * n_bn and n_bn >= 15
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(features(bb, x), feats)
    assert not torch.equal(bb.model.fc.weight, head)  # the head did train


def test_bn_train_policy_updates_stats():
    """The contrast that shows the test above can fail: with bn=train the same steps move the statistics."""
    torch.manual_seed(0)
    bb = build_model("timm:test_resnet", num_classes=3)
    apply_freeze(bb, FreezeCfg(backbone=True, bn="train"))
    before = bn_state(bb.model)
    train_steps(bb, "train", steps=1)
    assert not torch.equal(before["bn1.running_mean"], bb.model.bn1.running_mean)
    assert bb.model.bn1.training


def test_bn_eval_policy_keeps_every_statistic_while_bn_scale_and_shift_train():
    """bn=eval: nothing frozen, yet every BatchNorm normalises with (and keeps) its running statistics, bitwise;
    its weight and bias still learn. The same model under bn=frozen moves the statistics (nothing is frozen)."""
    for bn, stats_move in (("eval", False), ("frozen", True)):
        torch.manual_seed(0)
        bb = build_model("resnet18", num_classes=3)
        apply_freeze(bb, FreezeCfg(bn=bn))
        before, gamma = bn_state(bb.model), bb.model.layer1[0].bn1.weight.clone()
        train_steps(bb, bn, steps=2)
        after = bn_state(bb.model)
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert bool(moved) == stats_move and (len(moved) == len(before) or not moved)
        assert not torch.equal(bb.model.layer1[0].bn1.weight, gamma)  # the affine parameters trained
        assert bb.model.training and any(m.training for m in bb.model.modules()
                                         if isinstance(m, nn.modules.batchnorm._BatchNorm)) == stats_move


def test_partly_frozen_model_keeps_only_frozen_bn_fixed():
    torch.manual_seed(0)
    bb = build_model("resnet18", num_classes=3)
    apply_freeze(bb, FreezeCfg(layers=["conv1", "bn1", "layer1", "layer2"]))
    assert frozen_bn_layers(bb.model) == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2",
                                          "layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn1",
                                          "layer2.1.bn2"]
    before = bn_state(bb.model)
    train_steps(bb, "frozen", steps=1)
    after = bn_state(bb.model)
    for k in before:
        moved = not torch.equal(before[k], after[k])
        assert moved == k.startswith(("layer3", "layer4")), k


def test_bn_without_affine_follows_its_parent():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    model[0].requires_grad_(False)
    assert frozen_bn_layers(model) == ["1"]
    model.train()
    apply_bn_policy(model, "frozen")
    assert not model[1].training
    model[0].weight.requires_grad_(True)
    assert frozen_bn_layers(model) == []
