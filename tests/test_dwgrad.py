"""train.autotune (finetune/speedups/depthwise.py): depthwise convs with a bf16 forward and an fp32 backward."""

import copy

import pytest
import torch
from torch import nn

from finetune import config
from finetune.speedups import depthwise as dwgrad


def _layers():
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    return [nn.Conv2d(24, 24, 5, 1, padding=2, groups=24, bias=False),  # a 5x5 depthwise conv
            Conv2dSame(24, 24, 3, 2, groups=24, bias=False),  # timm's TF "same" padding, stride 2 (pads in forward)
            nn.Conv2d(24, 24, 3, 1, padding=1, groups=24, bias=True)]


@pytest.mark.slow
@pytest.mark.parametrize("i", [0, 1, 2])
def test_mixed_layer_forward_is_autocasts_and_backward_is_fp32_of_the_same_inputs(i):
    ref = _layers()[i].to(memory_format=torch.channels_last)
    mixed = copy.deepcopy(ref)
    dwgrad.switch(nn.Sequential(mixed), ["0"])
    assert type(mixed).__name__ == type(ref).__name__ and type(mixed) is not type(ref)
    x = torch.randn(4, 24, 20, 20).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 24, 20 // (2 if i == 1 else 1), 20 // (2 if i == 1 else 1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ref(xa), mixed(xb)
    assert yb.dtype == ya.dtype == torch.bfloat16 and torch.equal(ya, yb)  # the forward: bitwise autocast's
    ya.backward(g.to(ya.dtype))
    yb.backward(g.to(yb.dtype))
    # the reference backward: fp32 autograd of the same conv on the bf16-rounded input and output gradient
    x32 = x.to(torch.bfloat16).float().requires_grad_()
    w32 = ref.weight.detach().clone().requires_grad_()
    ref32 = copy.deepcopy(ref)
    ref32.weight = nn.Parameter(w32)
    ref32.__class__ = type(ref)
    ref32(x32).backward(g.to(torch.bfloat16).float())
    assert torch.allclose(mixed.weight.grad, ref32.weight.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(xb.grad.float(), x32.grad, rtol=1e-5, atol=1e-5)
    if ref.bias is not None:
        assert torch.allclose(mixed.bias.grad, ref32.bias.grad, rtol=1e-5, atol=1e-5)
    # and it is closer to the fp32 gradient than the all-bf16 backward is
    err = lambda t: (t.float() - ref32.weight.grad).abs().max().item()  # noqa: E731
    assert err(mixed.weight.grad) < err(ref.weight.grad)
    # outside training with bf16 autocast the layer is the original: eval, fp32, no_grad
    mixed.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(mixed(x), ref.eval()(x))
    assert set(mixed.state_dict()) == set(ref.state_dict())


def test_tune_switches_where_the_mixed_backward_is_faster_by_the_margin(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 24, 1), nn.Conv2d(24, 24, 1),
                          nn.Conv2d(24, 24, 5, padding=2, groups=24), nn.Conv2d(24, 24, 5, padding=2, groups=24),
                          nn.Conv2d(24, 24, 3, padding=1, groups=24))
    times = {(5, False): 1.0, (5, True): 0.5, (3, False): 1.0, (3, True): 0.95}  # 3x3: 1.05x, under the margin
    monkeypatch.setattr(dwgrad, "_DECIDED", {})
    monkeypatch.setattr(dwgrad, "_time", lambda m, shape, cl, mixed: times[(m.kernel_size[0], mixed)])
    got = dwgrad.tune(model, (32, 3, 16, 16), channels_last=False)
    assert got["layers"] == 3 and got["switched"] == ["3", "4"]  # both 5x5 layers, not the 3x3
    assert all(type(m).__module__ == "torch.nn.modules.conv" and type(m) is nn.Conv2d for m in model)  # untouched
    before = [p.clone() for p in model.parameters()]
    dwgrad.switch(model, got["switched"])
    assert [type(m) is nn.Conv2d for m in model] == [True, True, True, False, False, True]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_real_timing_leaves_weights_grads_and_flags_as_they_were():
    torch.manual_seed(0)
    m = nn.Conv2d(16, 16, 5, padding=2, groups=16)
    m.weight.requires_grad_(False)
    m.bias.grad = torch.ones(16)
    w = m.weight.clone()
    model = nn.Sequential(m)
    got = dwgrad.tune(model, (2, 16, 12, 12), channels_last=True)
    assert got["layers"] == 1 and got["seconds"] > 0
    assert torch.equal(m.weight, w) and m.weight.grad is None and not m.weight.requires_grad
    assert torch.equal(m.bias.grad, torch.ones(16)) and type(m) is nn.Conv2d


def test_applies_only_to_cpu_bf16_without_compile_or_fsdp():
    r = config.load_recipe("default")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dwgrad.applies(r, cpu, "bf16", fsdp=False)
    assert not dwgrad.applies(r, cpu, "fp32", fsdp=False)
    assert not dwgrad.applies(r, cuda, "bf16", fsdp=False)
    assert not dwgrad.applies(r, cpu, "bf16", fsdp=True)
    assert not dwgrad.applies(config.apply_overrides(r, {"train.compile": True}), cpu, "bf16", fsdp=False)
    assert not dwgrad.applies(config.apply_overrides(r, {"train.autotune": "off"}), cpu, "bf16", fsdp=False)


@pytest.mark.slow
def test_a_resume_switches_what_the_run_switched_without_timing_again(tmp_path, monkeypatch, mini_sample):
    """timm's test_efficientnet has 2 depthwise convs; the decisions are in last.pt and a resume takes them (on
    ``mini_sample``: 3 bf16 steps an epoch)."""
    from finetune.run.runner import train

    calls = []
    real = dwgrad.tune

    def fake(model, shape, cl):
        calls.append(shape)
        out = real(model, shape, cl)
        return {**out, "switched": [n for n, m in model.named_modules() if dwgrad.is_depthwise(m)][:1]}

    monkeypatch.setattr(dwgrad, "tune", fake)
    r = config.apply_overrides(config.load_recipe("default"), {
        "data.path": str(mini_sample), "model.name": "timm:test_efficientnet", "model.weights": "none",
        "train.epochs": 1, "train.batch_size": 16, "train.precision": "bf16", "data.image_size": 32,
        "data.augment": "none", "train.tensorboard": False, "train.report": False, "train.cache_features": "off"})
    train(r, out=tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["autotune"]
    assert calls == [(16, 3, 32, 32)] and saved["switched"] == ["blocks.3.0.conv_dw"] and saved["layers"] == 2
    assert "autotune: 1 of 2 depthwise convs" in (tmp_path / "run" / "config.yaml").read_text()
    assert "autotune" not in torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    seen = []
    monkeypatch.setattr(dwgrad, "switch", lambda model, names: seen.append(list(names)))
    train(None, resume=tmp_path / "run", epochs=2)
    assert calls == [(16, 3, 32, 32)] and seen == [saved["switched"]]  # no new timing; the run's layers


def test_decisions_are_remembered_on_disk_per_machine(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(dwgrad, "_DECIDED", {})
    monkeypatch.setattr(dwgrad, "_time", lambda m, shape, cl, mixed: 0.5 if mixed else 1.0)
    model = nn.Sequential(nn.Conv2d(3, 24, 1), nn.Conv2d(24, 24, 5, padding=2, groups=24))
    assert dwgrad._tune_remembered(model, (4, 3, 8, 8), False)["switched"] == ["1"]
    disk = json.loads((tmp_path / "autotune.json").read_text())
    assert list(disk) == [dwgrad._machine()]
    assert disk[dwgrad._machine()] == {"in [4, 24, 8, 8] w [24, 1, 5, 5] s [1, 1] p [2, 2] d [1, 1] Conv2d bias": True}
    monkeypatch.setattr(dwgrad, "_DECIDED", {})  # a new process: the file answers, nothing is timed

    def no_timing(*a):
        raise AssertionError("timed again")

    monkeypatch.setattr(dwgrad, "_time", no_timing)
    assert dwgrad._tune_remembered(model, (4, 3, 8, 8), False)["switched"] == ["1"]
