"""FSDP2 (--strategy fsdp) on the CPU with gloo: 2 processes, timm's test_resnet with its stem, layer1 and part of
layer2 frozen (one spawn, four short runs, ~30 s)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from finetune import config
from finetune.errors import ConfigError

FROZEN = ["conv1", "bn1", "layer1", "layer2.0.conv1", "layer2.0.bn1"]


def _recipe(weights: str, strategy: str, epochs: int, precision: str = "fp32"):
    # 800 train images / (2 processes x 134) = 3 optimizer steps per epoch
    return config.apply_overrides(config.load_recipe("default"), {
        "model.name": "timm:test_resnet", "model.weights": weights, "freeze.layers": FROZEN,
        "train.epochs": epochs, "train.batch_size": 134, "train.precision": precision, "scheduler.name": "constant",
        "data.augment": "none", "data.image_size": 32, "train.tensorboard": False, "train.report": False,
        "train.cache_features": "off", "train.strategy": strategy})


def _worker(rank: int, port: int, out: str, weights: str) -> None:
    from finetune.runner import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    o = Path(out)
    train(_recipe(weights, "ddp", 1), out=o / "ddp")
    train(_recipe(weights, "fsdp", 1), out=o / "fsdp")
    if rank == 0:  # the resume below overwrites fsdp/last.pt
        shutil.copytree(o / "fsdp", o / "fsdp-epoch1", ignore=shutil.ignore_patterns(".lock"))
    # with TensorBoard (its model graph is a forward on rank 0 alone: skipped under FSDP, else this run would hang
    # for train.dist_timeout and fail)
    train(config.apply_overrides(_recipe(weights, "fsdp", 2), {"train.tensorboard": True, "train.dist_timeout": 0.5}),
          out=o / "fsdp2")
    train(None, resume=o / "fsdp", epochs=2)
    for strategy in ("ddp", "fsdp"):  # bf16: FSDP's MixedPrecisionPolicy (BatchNorm kept fp32) vs DDP's autocast
        train(_recipe(weights, strategy, 1, "bf16"), out=o / f"{strategy}-bf16")
    units = None
    if rank == 0:
        from finetune.models import build_model
        from finetune.strategy import units

        bb = build_model("timm:test_resnet", num_classes=4, weights="none")
        for n, p in bb.model.named_parameters():
            p.requires_grad_(not any(n.startswith(f + ".") for f in FROZEN))
        units = units(bb.model)
    Path(out, f"{rank}.json").write_text(json.dumps(units))


def test_fsdp_matches_ddp_keeps_frozen_weights_and_resumes_exactly(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from finetune.models import build_model

    torch.manual_seed(0)
    init = build_model("timm:test_resnet", num_classes=4, weights="none").model.state_dict()
    torch.save(init, tmp_path / "init.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path), str(tmp_path / "init.pt")), nprocs=2, join=True)
    # per-block units from the model's layerN; layer2 is partly frozen, so its children are units of their own
    assert json.loads((tmp_path / "0.json").read_text()) == [
        "layer1", "layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2", "layer2.0.downsample",
        "layer3", "layer4"]
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    fsdp = torch.load(tmp_path / "fsdp-epoch1" / "last.pt", weights_only=True)  # consolidated: plain tensors
    assert ddp["world_size"] == fsdp["world_size"] == 2
    assert fsdp["model"].keys() == init.keys()
    assert all(type(t) is torch.Tensor for t in fsdp["model"].values())
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["epochs"][0]["train_loss"] == pytest.approx(
        json.loads((tmp_path / "fsdp" / "metrics.json").read_text())["epochs"][0]["train_loss"], rel=1e-5)
    moved = 0
    for k, t in init.items():
        assert torch.allclose(fsdp["model"][k], ddp["model"][k], rtol=1e-4, atol=1e-6), k
        if any(k.startswith(f + ".") for f in FROZEN):
            assert torch.equal(fsdp["model"][k], t), k  # frozen (and frozen BN statistics): bitwise the initial
        elif k.startswith("fc."):
            continue  # the new head: not the file's
        else:
            moved += not torch.equal(fsdp["model"][k], t)
    assert moved > 20  # the trainable blocks did train
    # the optimizer state is in Optimizer.state_dict form and equals DDP's (gathered from the shards)
    so, do = fsdp["optimizer"], ddp["optimizer"]
    assert [g["params"] for g in so["param_groups"]] == [g["params"] for g in do["param_groups"]]
    assert so["state"].keys() == do["state"].keys() and len(so["state"]) == 29  # trainable tensors
    for i in do["state"]:
        assert torch.allclose(so["state"][i]["momentum_buffer"], do["state"][i]["momentum_buffer"], rtol=1e-4,
                              atol=1e-6), i
    # bf16: FSDP computes in bf16 from fp32 shards (the checkpoint stays fp32); DDP's autocast rounds alike
    fb = torch.load(tmp_path / "fsdp-bf16" / "last.pt", weights_only=True)
    db = torch.load(tmp_path / "ddp-bf16" / "last.pt", weights_only=True)
    assert {t.dtype for t in fb["model"].values()} == {torch.float32, torch.int64}
    assert fb["metrics"][0]["train_loss"] == pytest.approx(db["metrics"][0]["train_loss"], rel=1e-4)
    assert fb["metrics"][0]["train_loss"] != pytest.approx(fsdp["metrics"][0]["train_loss"], rel=1e-6)  # bf16 ran
    # resume (same world size) continues exactly: bitwise the uninterrupted 2-epoch run
    a = torch.load(tmp_path / "fsdp" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "fsdp2" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [e["val_acc"] for e in a["metrics"]] == [e["val_acc"] for e in b["metrics"]]
    # another world size: the consolidated checkpoint resumes in one process as DDP's does (same numbers)
    from finetune.runner import train

    for run in ("ddp", "fsdp-epoch1"):
        train(None, resume=tmp_path / run, epochs=2)
    a = torch.load(tmp_path / "fsdp-epoch1" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert a["world_size"] == b["world_size"] == 1
    for k in b["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("key,value,what", [
    ("train.ema", True, "--ema"), ("train.save_every_steps", 2, "--save-every-steps"),
    ("train.cache_features", "on", "--cache-features on"),
    ("freeze.schedule", [{"epoch": 2, "layers": ["all"]}], "an unfreeze schedule (freeze.schedule; the lp-ft recipe, "
     "which --model with pretrained weights picks when no --recipe or freeze flag is given, has one: pass --recipe "
     "default or a freeze flag)")])
def test_fsdp_refuses_what_it_does_not_support(key, value, what):
    from finetune.strategy import check

    r = config.apply_overrides(config.load_recipe("default"), {"train.strategy": "fsdp", key: value})
    with pytest.raises(ConfigError) as e:
        check(r, "fp32")
    assert str(e.value) == f"--strategy fsdp does not support {what}; drop it, or use --strategy ddp"
