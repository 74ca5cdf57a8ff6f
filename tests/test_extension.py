"""Extension points (issue 28 item 3): a backbone source and a freeze kind are each one registration, made here,
outside the package, with no edit to it; then a run trains with both, ``inspect`` shows the plan, and removing
them restores the registries. Every registered source also keeps the contract the registry relies on."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from finetune import api, config
from finetune.errors import FreezeError, ModelError, WeightsError
from finetune.models import Backbone, BackboneSource, build_model, data_config, list_models, parse_name, \
    register_source, registered_sources, unregister_source
from finetune.models.weights import WeightsSpec
from finetune.training import freeze as F
from helpers import tiny_tree

TOY_CFG = {"input_size": (3, 16, 16), "resize": 16, "crop_pct": 1.0, "interpolation": "bilinear",
           "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


class TinyNet(nn.Module):
    """Two convolutions and a linear head: six parameter tensors."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


BUILT: list[dict[str, torch.Tensor]] = []  # the state each real (not meta) build started from


def toy_parse(arch: str) -> str:
    if arch != "tiny":
        raise ModelError(f"unknown toy model '{arch}'; the toy source has 'tiny'")
    return arch


def toy_build(arch: str, num_classes: int | None, spec: WeightsSpec) -> Backbone:
    model = TinyNet(num_classes or 5)
    if not any(p.is_meta for p in model.parameters()):
        BUILT.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return Backbone(model, f"toy:{arch}", "toy", arch, num_classes or 5, ["fc"], data_cfg=dict(TOY_CFG))


def toy_weights(value: str, arch: str) -> WeightsSpec:
    if value.lower() in ("default", "pretrained"):
        return WeightsSpec("none", "none")
    raise WeightsError(f"the toy source has no weights named '{value}'")


TOY = BackboneSource(toy_parse, toy_build, lambda arch, spec: dict(TOY_CFG), lambda: {"tiny": []}, toy_weights)


def every_other_check(value):
    if isinstance(value, bool) or value not in (0, 1):
        raise FreezeError(f"every_other takes 0 (freeze tensors 0, 2, 4, ...) or 1 (1, 3, 5, ...), got {value!r}")
    return value


EVERY_OTHER = F.FreezeKind(
    "every_other", lambda bb, start: [n for i, (n, _) in enumerate(bb.model.named_parameters()) if i % 2 == start],
    lambda start: f"freeze every other tensor from #{start}", check=every_other_check)


@pytest.fixture
def toy():
    """The toy source and freeze kind, registered for one test and removed after it (even when it fails)."""
    before, kinds_before = registered_sources(), F.freeze_kinds()
    register_source("toy", TOY)
    F.register_freeze_kind(EVERY_OTHER)
    BUILT.clear()
    yield
    unregister_source("toy")
    F.unregister_freeze_kind("every_other")
    assert registered_sources() == before and F.freeze_kinds() == kinds_before


def toy_recipe(tmp_path, every_other=0):
    r = config.Recipe()
    r.model.name = "toy:tiny"
    r.data.path = str(tiny_tree(tmp_path / "data", per_class=6, size=16))
    r.data.augment = "none"
    r.freeze.kinds = {"every_other": every_other}
    r.optimizer.lr = 0.1
    r.train.epochs, r.train.batch_size, r.train.device, r.train.precision = 1, 6, "cpu", "fp32"
    r.train.tensorboard = r.train.graph = r.train.report = False
    r.train.cache_features = "off"
    return r


def test_a_toy_source_and_freeze_kind_train_without_editing_the_package(toy, tmp_path):
    res = api.train(toy_recipe(tmp_path), out=tmp_path / "run")
    start = BUILT[0]
    model, ckpt = api.load_model(res.run_dir / "last.pt")
    assert isinstance(model, TinyNet) and ckpt["model_name"] == "toy:tiny"
    names = [n for n, _ in model.named_parameters()]
    after = model.state_dict()
    frozen, trained = names[0::2], names[1::2]
    assert frozen == ["conv1.weight", "conv2.weight", "fc.weight"]
    for n in frozen:
        assert torch.equal(after[n], start[n]), n  # bitwise unchanged
    for n in trained:
        assert not torch.equal(after[n], start[n]), n
    assert "freeze every other tensor from #0" in ckpt["plan"]["steps"]
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert saved["freeze"]["kinds"] == {"every_other": 0} and saved["model"]["name"] == "toy:tiny"


def test_inspect_shows_the_toy_kinds_plan(toy, tmp_path, cli):
    path = tmp_path / "toy.yaml"
    r = toy_recipe(tmp_path, every_other=1)
    path.write_text(yaml.safe_dump({"model": {"name": "toy:tiny", "num_classes": 3},
                                    "data": {"path": r.data.path}, "freeze": {"kinds": {"every_other": 1}}}))
    out = cli("inspect", "--recipe", path, "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["plan"]["steps"] == ["freeze every other tensor from #1"]
    assert [(p["name"], p["trainable"]) for p in doc["parameters"]][:3] == \
        [("conv1.weight", True), ("conv1.bias", False), ("conv2.weight", True)]
    table = cli("inspect", "--recipe", path)
    assert table.exit_code == 0 and "steps: freeze every other tensor from #1" in table.stdout


def test_a_registered_kinds_value_is_checked_by_the_kind_and_named_by_its_key(toy, tmp_path):
    bb = build_model("toy:tiny", 3)
    cfg = config.FreezeCfg(kinds={"every_other": 2})
    with pytest.raises(FreezeError, match=r"every_other takes 0 .* got 2") as e:
        F.apply_freeze(bb, cfg)
    assert e.value.key == "freeze.kinds.every_other"
    with pytest.raises(FreezeError, match=r"unknown freeze kind 'every_othr' \(did you mean 'every_other'"):
        F.apply_freeze(bb, config.FreezeCfg(kinds={"every_othr": 0}))
    with pytest.raises(FreezeError, match="it has its own key, freeze.names"):
        F.apply_freeze(bb, config.FreezeCfg(kinds={"names": ["conv1"]}))
    plan = F.apply_freeze(bb, config.FreezeCfg(kinds={"every_other": 0}, unfreeze=["fc"]))  # unfreeze still last
    assert plan.frozen == ["conv1.weight", "conv2.weight"]
    assert plan.steps == ["freeze every other tensor from #0", "unfreeze fc"]


def test_the_toy_source_answers_like_the_built_in_ones(toy):
    assert parse_name("toy:tiny") == ("toy", "tiny")
    assert data_config("toy:tiny") == TOY_CFG
    assert list_models("toy:*") == [{"source": "toy", "name": "toy:tiny", "weights": []}]
    assert "toy:tiny" in [r["name"] for r in list_models("tiny")]  # a bare pattern matches every source
    with pytest.raises(ModelError, match="unknown toy model 'tinny'"):
        parse_name("toy:tinny")
    with pytest.raises(ModelError, match=r"'tiny' is a toy model: use 'toy:tiny'"):
        parse_name("tiny")
    with pytest.raises(WeightsError, match="no weights named 'IMAGENET1K_V1'"):
        build_model("toy:tiny", 3, weights="IMAGENET1K_V1")
    with pytest.raises(ModelError, match="is not a timm model"):  # a source without rates refuses them
        build_model("toy:tiny", 3, drop_rate=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register_source("toy", TOY)


def test_unregistering_restores_the_registries():
    assert "toy" not in registered_sources() and "every_other" not in F.freeze_kinds()
    assert list(F.freeze_kinds()) == list(F.KINDS)
    with pytest.raises(ModelError):
        parse_name("toy:tiny")
    with pytest.raises(FreezeError, match="unknown freeze kind 'every_other'"):
        F.strategies_from_cfg(config.FreezeCfg(kinds={"every_other": 0}))


CHEAP = {"smallcnn": "smallcnn", "torchvision": "resnet18", "timm": "test_resnet"}  # no downloads, < 1 s each


@pytest.mark.parametrize("prefix", list(registered_sources()))
def test_every_registered_source_keeps_the_contract(prefix):
    """Each source lists names, parses its own, builds with weights "none" and a 3-class head, and answers the
    data config the built model records."""
    src = registered_sources()[prefix]
    listed = src.list()
    assert listed and all(isinstance(w, list) for w in listed.values())
    arch = CHEAP.get(prefix, next(iter(listed)))
    assert arch in listed and src.parse(arch) == arch
    name = arch if src.bare is not None and src.bare(arch) else f"{prefix}:{arch}"
    assert parse_name(name) == (prefix, arch)
    bb = build_model(name, num_classes=3, weights="none")
    assert (bb.source, bb.arch, bb.name, bb.num_classes, bb.weights) == (prefix, arch, name, 3, "none")
    assert bb.head_parameter_names() and bb.model(torch.zeros(1, *bb.data_cfg["input_size"])).shape == (1, 3)
    assert data_config(name) == bb.data_cfg


def test_the_extension_points_are_on_the_front_door():
    from finetune.models import sources
    from finetune.training import freeze

    assert (api.register_source, api.unregister_source, api.BackboneSource) == (
        sources.register_source, sources.unregister_source, sources.BackboneSource)
    assert (api.register_freeze_kind, api.unregister_freeze_kind, api.FreezeKind) == (
        freeze.register_freeze_kind, freeze.unregister_freeze_kind, freeze.FreezeKind)
