"""DDP on the CPU with gloo: 2 processes, smallcnn on the bundled data (one torchrun launch, ~20 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import config
from finetune.api import evaluate_checkpoint
from finetune.checkpoint import load_checkpoint
from finetune.data.loader import EpochSampler
from finetune.runner import train

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--epochs", "1", "--batch-size", "32", "--precision", "fp32", "--scheduler", "constant", "--augment", "none",
        "--no-tensorboard", "--quiet"]


def test_sharded_order_is_the_single_process_order():
    one = list(EpochSampler(10, shuffle=True, seed=3))
    shards = [list(EpochSampler(10, shuffle=True, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(s) for s in shards] == [5, 5]
    assert [x for pair in zip(*shards) for x in pair] == one  # rank r takes order[r::2]
    odd = [list(EpochSampler(5, shuffle=False, num_replicas=2, rank=r, pad=False)) for r in (0, 1)]
    assert odd == [[0, 2, 4], [1, 3]]  # evaluation: every sample exactly once
    padded = [list(EpochSampler(5, shuffle=True, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 3


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "finetune", "train", "--nproc", "2", "--out", str(out), *ARGS],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_processes_complete_and_eval_matches(ddp_run):
    m = json.loads((ddp_run / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1]
    ck = load_checkpoint(ddp_run / "best.pt")
    assert ck["world_size"] == 2
    assert not any(k.startswith("module.") for k in ck["model"])  # loads in a single process
    res = evaluate_checkpoint(ddp_run / "best.pt", device="cpu")
    assert res["n"] == 160  # the whole val set, once
    assert res["accuracy"] == m["best"]["val_acc"]


def test_two_by_b_equals_one_by_2b(ddp_run, tmp_path):
    r = config.apply_overrides(config.load_recipe("default"), {
        "train.epochs": 1, "train.batch_size": 64, "train.precision": "fp32", "scheduler.name": "constant",
        "data.augment": "none",
        "train.tensorboard": False})
    train(r, out=tmp_path / "single")
    a = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    b = load_checkpoint(ddp_run / "last.pt")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_sync_bn_needs_cuda():
    from finetune.distributed import sync_batchnorm
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--sync-bn needs CUDA \(PyTorch's SyncBatchNorm runs on GPUs only\)"):
        sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))
