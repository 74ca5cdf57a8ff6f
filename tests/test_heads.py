"""New heads on pretrained weights start neutral on every family: zero weights and bias, so the initial loss is
exactly ln(C). (Pretrained downloads are impossible in tests: a weights file saved by the test stands for them.)"""

import math

import pytest
import torch
from torch import nn

from finetune.models import build_model


def _initial_loss(bb, size: int, classes: int) -> float:
    torch.manual_seed(0)
    x = torch.randn(4, 3, size, size) * 3  # any input: large activations must not matter
    y = torch.arange(4) % classes
    bb.model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(bb.model(x), y).item()


@pytest.mark.parametrize("name,size", [
    ("smallcnn", 32), ("resnet18", 32), ("mobilenet_v3_small", 32), ("squeezenet1_0", 64), ("efficientnet_b0", 32),
    ("timm:test_resnet", 32), ("timm:tf_efficientnet_lite0", 32), ("timm:test_vit", 160), ("timm:convnext_atto", 32),
])
@pytest.mark.parametrize("classes", [2, 7])
def test_new_head_is_neutral(name, size, classes, tmp_path):
    torch.manual_seed(0)
    src = build_model(name, num_classes=None, weights="none")  # the source's own class count, like a hub file
    path = tmp_path / "w.pth"
    torch.save(src.model.state_dict(), path)
    bb = build_model(name, num_classes=classes, weights=str(path))
    head = [bb.model.get_parameter(n) for n in bb.head_parameter_names()]
    assert head and all(float(p.detach().abs().max()) == 0.0 for p in head)
    assert math.isclose(_initial_loss(bb, size, classes), math.log(classes), abs_tol=1e-5)


def test_random_init_keeps_the_source_init():
    """From scratch every layer is random: the head keeps its source's init (a zero last layer slows the start)."""
    torch.manual_seed(0)
    for name in ("smallcnn", "resnet18", "timm:test_resnet"):
        bb = build_model(name, num_classes=3, weights="none")
        w = bb.model.get_parameter(bb.head_parameter_names()[0])
        assert float(w.detach().abs().max()) > 0, name


def test_head_replaced_after_loading_pretrained_file(tmp_path):
    """A 1000-class 'pretrained' file: the backbone loads bit for bit, the new 3-class head starts at zero."""
    torch.manual_seed(1)
    src = build_model("timm:test_resnet", num_classes=None, weights="none")
    for p in src.model.parameters():  # a file whose every value differs from any init
        p.data.normal_()
    path = tmp_path / "w.pth"
    torch.save(src.model.state_dict(), path)
    bb = build_model("timm:test_resnet", num_classes=3, weights=str(path))
    sd = src.model.state_dict()
    for n, t in bb.model.state_dict().items():
        if n.startswith("fc."):
            assert float(t.abs().max()) == 0.0
        else:
            assert torch.equal(t, sd[n]), n
    assert math.isclose(_initial_loss(bb, 32, 3), math.log(3), abs_tol=1e-5)


def test_matching_head_in_file_is_kept(tmp_path):
    """Same class count in the file: its head loads (nothing is zeroed after loading)."""
    src = build_model("smallcnn", num_classes=4, weights="none")
    with torch.no_grad():
        src.model.seq[8].weight.normal_()
    path = tmp_path / "w.pth"
    torch.save(src.model.state_dict(), path)
    bb = build_model("smallcnn", num_classes=4, weights=str(path))
    assert torch.equal(bb.model.seq[8].weight, src.model.seq[8].weight)
