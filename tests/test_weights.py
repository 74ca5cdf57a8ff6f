import pytest
import torch

from finetune.errors import WeightsError
from finetune.models import build_model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_dict_round_trip(tmp_path):
    src = build_model("smallcnn", num_classes=4)
    torch.save(src.model.state_dict(), tmp_path / "w.pth")
    dst = build_model("smallcnn", num_classes=4, weights=str(tmp_path / "w.pth"))
    assert _same(src.model, dst.model)
    assert dst.weights == str(tmp_path / "w.pth") and dst.notes == []


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = build_model("timm:test_resnet", num_classes=3)
    save_file(src.model.state_dict(), str(tmp_path / "w.safetensors"))
    dst = build_model("timm:test_resnet", num_classes=3, weights=str(tmp_path / "w.safetensors"))
    assert _same(src.model, dst.model)


def test_module_prefix_and_checkpoint_dict(tmp_path):
    src = build_model("resnet18", num_classes=2)
    sd = {f"module.{k}": v for k, v in src.model.state_dict().items()}
    torch.save({"model": sd, "epoch": 3, "class_names": ["a", "b"]}, tmp_path / "ckpt.pt")
    dst = build_model("resnet18", num_classes=2, weights=str(tmp_path / "ckpt.pt"))
    assert _same(src.model, dst.model)


def test_head_mismatch_loads_without_head(tmp_path):
    src = build_model("resnet18")  # 1000 classes, as an ImageNet file would be
    torch.save(src.model.state_dict(), tmp_path / "imagenet.pth")
    dst = build_model("resnet18", num_classes=5, weights=str(tmp_path / "imagenet.pth"))
    s, d = src.model.state_dict(), dst.model.state_dict()
    assert all(torch.equal(s[k], d[k]) for k in s if not k.startswith("fc."))
    assert d["fc.weight"].shape == (5, 512)
    assert dst.notes == [f"loaded '{tmp_path / 'imagenet.pth'}' without the head (fc.weight [1000, 512], "
                         "fc.bias [1000] does not fit 5 classes); the new head starts at zero"]


def test_other_mismatch_is_an_error_listing_keys(tmp_path):
    torch.save(build_model("resnet18", num_classes=2).model.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError) as e:
        build_model("smallcnn", num_classes=2, weights=str(tmp_path / "r18.pth"))
    msg = str(e.value)
    assert msg.startswith(f"weights file '{tmp_path / 'r18.pth'}' does not fit smallcnn: seq.0.weight: missing "
                          "from file; seq.0.bias: missing from file;")
    assert "(and 126 more)" in msg and msg.endswith("save the weights from the same architecture")


def test_shape_mismatch_outside_head(tmp_path):
    sd = build_model("smallcnn", num_classes=2).model.state_dict()
    sd["seq.7.weight"] = torch.zeros(32, 1024)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"seq.7.weight: \[32, 1024\] in file vs \[64, 1024\] in model"):
        build_model("smallcnn", num_classes=2, weights=str(tmp_path / "bad.pth"))


def test_whole_pickled_model_is_refused(tmp_path):
    torch.save(build_model("smallcnn").model, tmp_path / "whole.pth")
    with pytest.raises(WeightsError, match=r"holds pickled Python objects .* re-save the weights with "
                                           r"torch.save\(model.state_dict\(\), PATH\), or pass --trust-checkpoint"):
        build_model("smallcnn", weights=str(tmp_path / "whole.pth"))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(WeightsError, match=r"^weights file 'nope.pth' not found"):
        build_model("smallcnn", weights="nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot read weights file .*junk.pth': not a PyTorch file or truncated"):
        build_model("smallcnn", weights=str(tmp_path / "junk.pth"))


def test_weights_names_are_validated_without_download():
    with pytest.raises(WeightsError) as e:
        build_model("resnet18", weights="IMAGENET1K_V9")
    assert str(e.value) == ("unknown weights 'IMAGENET1K_V9' for resnet18; valid: DEFAULT, IMAGENET1K_V1, none, "
                            "or a file path")
    with pytest.raises(WeightsError, match="^smallcnn has no pretrained weights named 'IMAGENET1K_V1'"):
        build_model("smallcnn", weights="IMAGENET1K_V1")
    with pytest.raises(WeightsError, match=r"^unknown timm weights 'nope' for resnet18; valid tags: .*a1_in1k"):
        build_model("timm:resnet18", weights="nope")


def test_offline_download_fails_fast_naming_the_file(monkeypatch, tmp_path):
    import time

    from finetune.models import weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "_reachable", lambda host, timeout=3.0: False)
    t = time.monotonic()
    with pytest.raises(WeightsError) as e:
        build_model("resnet18", num_classes=2, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert time.monotonic() - t < 10
    assert str(e.value) == (
        "cannot download ResNet18_Weights.IMAGENET1K_V1 (https://download.pytorch.org/models/resnet18-f37072fd.pth): "
        f"offline or unreachable; place resnet18-f37072fd.pth in {tmp_path}/hub/checkpoints (set TORCH_HOME to "
        "move it) or pass --weights PATH")
    with pytest.raises(WeightsError, match=r"^cannot download timm weights 'test_resnet.r160_in1k': offline"):
        build_model("timm:test_resnet", weights="pretrained")


def test_torchvision_weights_from_torch_home(monkeypatch, tmp_path):
    """A weights file placed where the error says is used without any network access."""
    from finetune.models import weights

    src = build_model("resnet18")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(src.model.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "_reachable", lambda host, timeout=3.0: pytest.fail("must not touch the network"))
    import torchvision.models as tvm

    monkeypatch.setattr(tvm.ResNet18_Weights.IMAGENET1K_V1.value, "file_hash", None, raising=False)
    bb = build_model("resnet18", num_classes=3, weights="DEFAULT")
    assert bb.weights == "ResNet18_Weights.IMAGENET1K_V1"
    s, d = src.model.state_dict(), bb.model.state_dict()
    assert all(torch.equal(s[k], d[k]) for k in s if not k.startswith("fc."))
    assert d["fc.weight"].shape == (3, 512)


def test_compile_and_ddp_prefixes_in_either_order(tmp_path):
    """timm's clean_state_dict semantics: torch.compile's _orig_mod. around or inside DDP's module. is stripped."""
    bb = build_model("smallcnn", num_classes=4)
    sd = {f"_orig_mod.module.{k}": v.clone() + 1 for k, v in bb.model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pth")
    bb2 = build_model("smallcnn", num_classes=4, weights=str(tmp_path / "w.pth"))
    assert all(torch.equal(v, sd[f"_orig_mod.module.{k}"]) for k, v in bb2.model.state_dict().items())
