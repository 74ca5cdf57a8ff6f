"""FSDP2 (--strategy fsdp) on the CPU with gloo: 2 processes, timm's test_resnet with its stem, layer1 and part of
layer2 frozen (one spawn, six short runs on the ``mini_sample`` fixture); last.pt as DCP shards (the default) and
consolidated (full)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from finetune import config
from finetune.run.checkpoint import load_checkpoint
from finetune.errors import ConfigError

FROZEN = ["conv1", "bn1", "layer1", "layer2.0.conv1", "layer2.0.bn1"]


def _recipe(data: str, weights: str, strategy: str, epochs: int, precision: str = "fp32", fmt: str = "auto"):
    # 48 train images / (2 processes x 8) = 3 optimizer steps per epoch
    return config.apply_overrides(config.load_recipe("default"), {
        "data.path": data, "model.name": "timm:test_resnet", "model.weights": weights, "freeze.layers": FROZEN,
        "train.epochs": epochs, "train.batch_size": 8, "train.precision": precision, "scheduler.name": "constant",
        "data.augment": "none", "data.image_size": 32, "train.tensorboard": False, "train.report": False,
        "train.cache_features": "off", "train.strategy": strategy,
        "train.checkpoint_format": fmt})


def _worker(rank: int, port: int, out: str, weights: str, data: str) -> None:
    from finetune.run.runner import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    o = Path(out)
    train(_recipe(data, weights, "ddp", 1), out=o / "ddp")
    train(_recipe(data, weights, "fsdp", 1), out=o / "fsdp")
    if rank == 0:  # the resume below overwrites fsdp/last.pt
        shutil.copytree(o / "fsdp", o / "fsdp-epoch1", ignore=shutil.ignore_patterns(".lock"))
    # with TensorBoard (its model graph is a forward on rank 0 alone: skipped under FSDP, else this run would hang
    # for train.dist_timeout and fail)
    train(config.apply_overrides(_recipe(data, weights, "fsdp", 2), {"train.tensorboard": True,
                                                                     "train.dist_timeout": 0.5}), out=o / "fsdp2")
    train(None, resume=o / "fsdp", epochs=2)
    for strategy in ("ddp", "fsdp"):  # bf16: FSDP's MixedPrecisionPolicy (BatchNorm kept fp32) vs DDP's autocast
        train(_recipe(data, weights, strategy, 1, "bf16", "full"), out=o / f"{strategy}-bf16")  # full: one last.pt
    units = None
    if rank == 0:
        from finetune.models import build_model
        from finetune.parallel.strategy import units

        bb = build_model("timm:test_resnet", num_classes=4, weights="none")
        for n, p in bb.model.named_parameters():
            p.requires_grad_(not any(n.startswith(f + ".") for f in FROZEN))
        units = units(bb.model)
    Path(out, f"{rank}.json").write_text(json.dumps(units))


def _reshard_worker(rank: int, port: int, run: str, out: str) -> None:
    """3 processes load the 2 ranks' shards into a model FSDP-sharded 3 ways (uneven: the 4-row head is split 2/2/0)
    and gather it back: rank 0 saves what came out."""
    import torch.distributed as dist

    from finetune.training import optim as O
    from finetune.parallel import sharded, strategy
    from finetune.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=3)
    bb = build_model("timm:test_resnet", num_classes=4, weights="none")
    for n, p in bb.model.named_parameters():
        p.requires_grad_(not any(n.startswith(f + ".") for f in FROZEN))
    opt = O.build_optimizer(bb, config.load_recipe("default").optimizer)
    strategy.shard(bb.model, opt, "fp32")
    sharded.load_into(bb.model, opt, Path(run), torch.load(Path(run) / "last.pt", weights_only=True)["sharded"])
    msd, osd = strategy.gather(bb.model, opt)
    if rank == 0:
        torch.save({"model": msd, "optimizer": osd}, out)
    dist.destroy_process_group()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_fsdp_matches_ddp_keeps_frozen_weights_and_resumes_exactly(tmp_path, mini_sample):
    import socket

    from finetune.models import build_model
    from helpers import spawn

    torch.manual_seed(0)
    init = build_model("timm:test_resnet", num_classes=4, weights="none").model.state_dict()
    torch.save(init, tmp_path / "init.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_worker, args=(port, str(tmp_path), str(tmp_path / "init.pt"), str(mini_sample)), nprocs=2)
    # per-block units from the model's layerN; layer2 is partly frozen, so its children are units of their own
    assert json.loads((tmp_path / "0.json").read_text()) == [
        "layer1", "layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2", "layer2.0.downsample",
        "layer3", "layer4"]
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    raw = torch.load(tmp_path / "fsdp-epoch1" / "last.pt", weights_only=True)
    # sharded last.pt: the metadata, no weights, and the DCP folder of its epoch (each rank wrote its shard)
    assert raw["model"] == {} and raw["optimizer"] is None
    assert raw["sharded"] == {"path": "shards/e0001", "format": "torch.distributed.checkpoint", "world_size": 2}
    assert sorted(p.name for p in (tmp_path / "fsdp-epoch1" / "shards" / "e0001").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    fsdp = torch.load(tmp_path / "fsdp-epoch1" / "best.pt", weights_only=True)  # consolidated: plain tensors
    assert ddp["world_size"] == fsdp["world_size"] == 2
    assert fsdp["model"].keys() == init.keys()
    assert all(type(t) is torch.Tensor for t in fsdp["model"].values())
    shards = load_checkpoint(tmp_path / "fsdp-epoch1" / "last.pt")["model"]  # eval/export of last.pt: read whole
    assert shards.keys() == init.keys() and all(torch.equal(shards[k], fsdp["model"][k]) for k in init)
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
    # the optimizer state, read from the 2 ranks' shards into one process (DCP resharding), equals DDP's
    from finetune.training import optim as O
    from finetune.parallel import sharded

    bb = build_model("timm:test_resnet", num_classes=4, weights="none")
    for n, p in bb.model.named_parameters():
        p.requires_grad_(not any(n.startswith(f + ".") for f in FROZEN))
    opt = O.build_optimizer(bb, config.load_recipe("default").optimizer)
    sharded.load_into(bb.model, opt, tmp_path / "fsdp-epoch1", raw["sharded"])
    so, do = opt.state_dict(), ddp["optimizer"]
    assert [g["params"] for g in so["param_groups"]] == [g["params"] for g in do["param_groups"]]
    assert so["state"].keys() == do["state"].keys() and len(so["state"]) == 29  # trainable tensors
    for i in do["state"]:
        assert torch.allclose(so["state"][i]["momentum_buffer"], do["state"][i]["momentum_buffer"], rtol=1e-4,
                              atol=1e-6), i
    assert all(torch.equal(bb.model.state_dict()[k], fsdp["model"][k]) for k in init)
    # and into 3 processes, FSDP-sharded 3 ways (DCP reshards 2 -> 3): gathered back, bitwise the same state
    spawn(_reshard_worker, args=(_port(), str(tmp_path / "fsdp-epoch1"), str(tmp_path / "w3.pt")), nprocs=3)
    w3 = torch.load(tmp_path / "w3.pt", weights_only=True)
    assert all(torch.equal(w3["model"][k], fsdp["model"][k]) for k in init)
    assert w3["optimizer"]["state"].keys() == so["state"].keys()
    assert all(torch.equal(w3["optimizer"]["state"][i]["momentum_buffer"], so["state"][i]["momentum_buffer"])
               for i in so["state"])
    # checkpoint_format full (the bf16 runs): one consolidated last.pt, the optimizer in Optimizer.state_dict form
    fb = torch.load(tmp_path / "fsdp-bf16" / "last.pt", weights_only=True)
    db = torch.load(tmp_path / "ddp-bf16" / "last.pt", weights_only=True)
    assert "sharded" not in fb and not (tmp_path / "fsdp-bf16" / "shards").exists()
    assert len(fb["optimizer"]["state"]) == 29 and fb["model"].keys() == init.keys()
    # bf16: FSDP computes in bf16 from fp32 shards (the checkpoint stays fp32); DDP's autocast rounds alike
    assert {t.dtype for t in fb["model"].values()} == {torch.float32, torch.int64}
    assert fb["metrics"][0]["train_loss"] == pytest.approx(db["metrics"][0]["train_loss"], rel=1e-4)
    assert fb["metrics"][0]["train_loss"] != pytest.approx(fsdp["metrics"][0]["train_loss"], rel=1e-6)  # bf16 ran
    # resume (same world size) continues exactly: bitwise the uninterrupted 2-epoch run; only the last shards stay
    a = load_checkpoint(tmp_path / "fsdp" / "last.pt")
    b = load_checkpoint(tmp_path / "fsdp2" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["sharded"]["path"] == "shards/e0002"
    assert [p.name for p in (tmp_path / "fsdp" / "shards").iterdir()] == ["e0002"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [e["val_acc"] for e in a["metrics"]] == [e["val_acc"] for e in b["metrics"]]
    # another world size: the 2 ranks' shards resume in one process as DDP's consolidated last.pt does (same
    # numbers); shards a kill left uncommitted (no last.pt names them) are removed on resume
    from finetune.run.runner import train

    (tmp_path / "fsdp-epoch1" / "shards" / "e0002").mkdir()
    (tmp_path / "fsdp-epoch1" / "shards" / "e0002" / "__0_0.distcp").write_bytes(b"torn")
    for run in ("ddp", "fsdp-epoch1"):
        train(None, resume=tmp_path / run, epochs=2)
    a = load_checkpoint(tmp_path / "fsdp-epoch1" / "last.pt")
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert a["world_size"] == b["world_size"] == 1
    assert "sharded" not in a and not (tmp_path / "fsdp-epoch1" / "shards").exists()  # 1 process: one file
    for k in b["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("key,value,what", [
    ("train.ema", True, "--ema"), ("train.save_every_steps", 2, "--save-every-steps"),
    ("train.cache_features", "on", "--cache-features on"),
    ("freeze.schedule", [{"epoch": 2, "layers": ["all"]}], "an unfreeze schedule (freeze.schedule; the lp-ft recipe, "
     "which --model with pretrained weights picks when no --recipe or freeze flag is given, has one: pass --recipe "
     "default or a freeze flag)")])
def test_fsdp_refuses_what_it_does_not_support(key, value, what):
    from finetune.parallel.strategy import check

    r = config.apply_overrides(config.load_recipe("default"), {"train.strategy": "fsdp", key: value})
    with pytest.raises(ConfigError) as e:
        check(r, "fp32")
    assert str(e.value) == f"--strategy fsdp does not support {what}; drop it, or use --strategy ddp"
