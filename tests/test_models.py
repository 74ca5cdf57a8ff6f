import pytest
import torch

from finetune.errors import ModelError
from finetune.models import build_model, list_models, torchvision_names

SMALLCNN_NAMES = [f"seq.{i}.{k}" for i in (0, 2, 4, 7, 8) for k in ("weight", "bias")]


def test_smallcnn_is_the_tutorial_network():
    bb = build_model("smallcnn", num_classes=4)
    assert [n for n, _ in bb.model.named_parameters()] == SMALLCNN_NAMES
    assert [type(m).__name__ for m in bb.model.seq] == [
        "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten", "Linear", "Linear"]
    assert bb.model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert bb.head == ["seq.8"] and bb.head_parameter_names() == ["seq.8.weight", "seq.8.bias"]
    assert build_model("smallcnn").num_classes == 10


# regnet constructors compute widths with real tensors, so they cannot be built on the meta device; the
# small regnets are built for real below, the large ones share their code.
_META_FAIL = {n for n in torchvision_names() if n.startswith("regnet")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(torchvision_names()) - _META_FAIL))
def test_every_torchvision_model_gets_a_new_head(name):
    with torch.device("meta"):
        bb = build_model(name, num_classes=7)
        s = bb.data_cfg["input_size"][-1]
        out = bb.model.eval()(torch.zeros(2, 3, s, s))
    assert tuple(out.shape) == (2, 7)
    assert bb.num_classes == 7
    head = bb.head_parameter_names()
    assert head and all(bb.model.get_parameter(n).shape[0] == 7 for n in head if n.endswith("weight"))


@pytest.mark.parametrize("name", ["regnet_x_400mf", "regnet_y_400mf"])
def test_regnet_head(name):
    bb = build_model(name, num_classes=3)
    assert bb.model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    assert bb.head == ["fc"]


@pytest.mark.parametrize("name,head,shape", [
    ("resnet18", ["fc"], (5, 512)),
    ("vgg16", ["classifier.6"], (5, 4096)),
    ("efficientnet_b0", ["classifier.1"], (5, 1280)),
    ("vit_b_16", ["heads.head"], (5, 768)),
    ("squeezenet1_0", ["classifier.1"], (5, 512, 1, 1)),
])
def test_torchvision_head_paths(name, head, shape):
    with torch.device("meta"):
        bb = build_model(name, num_classes=5)
    assert bb.head == head
    assert tuple(bb.model.get_parameter(head[0] + ".weight").shape) == shape


def test_resnet18_and_vgg16_real_forward():
    bb = build_model("resnet18", num_classes=2)
    assert bb.model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    assert bb.data_cfg["input_size"] == (3, 224, 224) and bb.data_cfg["resize"] == 256
    with torch.device("meta"):
        vgg = build_model("vgg16", num_classes=2)
    assert vgg.model.classifier[6].out_features == 2


@pytest.mark.parametrize("name", ["timm:test_resnet", "timm:test_vit", "timm:test_efficientnet", "timm:test_convnext"])
def test_timm_models_get_a_new_head(name):
    bb = build_model(name, num_classes=6)
    s = 64
    assert bb.model.eval()(torch.zeros(2, 3, s, s)).shape == (2, 6)
    assert bb.source == "timm" and bb.num_classes == 6
    assert bb.head_parameter_names()
    assert all(bb.model.get_parameter(n).shape[0] == 6 for n in bb.head_parameter_names())


def test_timm_test_resnet_head_and_cfg():
    bb = build_model("timm:test_resnet", num_classes=3)
    assert bb.head == ["fc"] and bb.head_parameter_names() == ["fc.weight", "fc.bias"]
    assert bb.data_cfg["input_size"] == (3, 160, 160) and bb.data_cfg["mean"] == (0.5, 0.5, 0.5)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError) as e:
        build_model("resnet19")
    assert str(e.value).startswith("unknown model 'resnet19' (did you mean 'resnet18'")
    assert str(e.value).endswith("'finetune models' lists the available names")


def test_timm_name_without_prefix_is_pointed_at_timm():
    with pytest.raises(ModelError, match=r"'test_resnet' is a timm model: use 'timm:test_resnet'"):
        build_model("test_resnet")


def test_unknown_timm_model():
    with pytest.raises(ModelError, match=r"^unknown timm model 'test_resnat' \(did you mean 'test_resnet'"):
        build_model("timm:test_resnat")


def test_list_models_pattern_and_weights():
    rows = list_models("resnet1*")
    names = [r["name"] for r in rows]
    assert "resnet18" in names and "timm:resnet18" in names  # unprefixed patterns match every source
    assert "wide_resnet50_2" not in names  # globs match the whole name
    assert all(r["source"] == "timm" for r in list_models("timm:resnet1*"))
    r18 = next(r for r in rows if r["name"] == "resnet18")
    assert r18["weights"] == ["ResNet18_Weights.IMAGENET1K_V1"]
    timm_rows = list_models("timm:resnet18")
    assert any(r["name"] == "timm:resnet18" and "a1_in1k" in r["weights"] for r in timm_rows)
    assert list_models("smallcnn") == [{"source": "smallcnn", "name": "smallcnn", "weights": []}]


@pytest.mark.parametrize("name, weights", [("timm:test_resnet", "none"), ("timm:resnet18", "none"),
                                           ("timm:resnet18", "a1_in1k"), ("resnet18", "default"),
                                           ("smallcnn", "none")])
def test_data_config_comes_from_the_registry_without_a_build(monkeypatch, name, weights):
    """timm's pretrained_cfg / torchvision's Weights.transforms() answer the input config: no model is built (and
    it equals what the built model records)."""
    import timm
    import torchvision.models as tvm

    from finetune.models import data_config

    expected = build_model(name, weights="none").data_cfg if weights != "a1_in1k" else \
        build_model("timm:resnet18.a1_in1k", weights="none").data_cfg

    def no_build(*a, **k):
        raise AssertionError("built a model")

    monkeypatch.setattr(timm, "create_model", no_build)
    monkeypatch.setattr(tvm, "get_model", no_build)
    assert data_config(name, weights) == expected
