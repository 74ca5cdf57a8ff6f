"""DDP on the CPU with gloo: 2 processes, smallcnn on the bundled sample's shapes (the ``mini_sample`` fixture: 12 train
/ 6 val images a class; one torchrun launch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import config
from finetune.api import evaluate_checkpoint
from finetune.run.checkpoint import load_checkpoint
from finetune.data.loader import EpochSampler
from finetune.run.runner import train

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--scheduler", "constant", "--augment", "none",
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
def ddp_run(tmp_path_factory, mini_sample):
    """``finetune train --nproc 2``, launched from a folder that has its own ``finetune/`` (a checkout, a user's
    package of that name) as the installed ``finetune`` script is (``python -P``: the launcher itself does not see the
    folder): the workers must import the launcher's finetune, not the folder's (which raises)."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "finetune").mkdir()
    (root / "finetune" / "__init__.py").write_text("raise ImportError('the wrong finetune')\n")
    out = root / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-P", "-m", "finetune", "train", "--nproc", "2", "--data", str(mini_sample),
                        "--out", str(out), *ARGS], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_nproc_from_a_folder_holding_a_finetune_subfolder(ddp_run):
    """The ddp_run launch above ran from a folder holding a ``finetune/`` that raises on import: both workers
    trained (the run finished, last.pt says 2 processes), so they imported the same finetune as the launcher."""
    assert load_checkpoint(ddp_run / "last.pt")["world_size"] == 2
    assert (ddp_run.parent / "finetune" / "__init__.py").read_text().startswith("raise ImportError")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_two_processes_complete_and_eval_matches(ddp_run):
    m = json.loads((ddp_run / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1]
    ck = load_checkpoint(ddp_run / "best.pt")
    assert ck["world_size"] == 2
    assert not any(k.startswith("module.") for k in ck["model"])  # loads in a single process
    res = evaluate_checkpoint(ddp_run / "best.pt", device="cpu")
    assert res["n"] == 24  # the whole val set, once
    assert res["accuracy"] == m["best"]["val_acc"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_two_by_b_equals_one_by_2b(ddp_run, tmp_path, mini_sample):
    r = config.apply_overrides(config.load_recipe("default"), {
        "data.path": str(mini_sample), "train.epochs": 1, "train.batch_size": 16, "train.precision": "fp32",
        "scheduler.name": "constant",
        "data.augment": "none",
        "train.tensorboard": False})
    train(r, out=tmp_path / "single")
    a = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    b = load_checkpoint(ddp_run / "last.pt")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_sync_bn_needs_cuda():
    from finetune.parallel.distributed import sync_batchnorm
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--sync-bn needs CUDA \(PyTorch's SyncBatchNorm runs on GPUs only\)"):
        sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))


def _accumulate_worker(rank: int, init: str, out: str) -> None:
    """One rank of a 2-process gloo job: 4 micro-batches with accumulate=2; counts DDP's all-reduces."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from finetune.training.engine import Step, train_one_epoch
    from finetune.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DDP(build_model("smallcnn", num_classes=3).model)
    calls = []

    def counting(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1])) for _ in range(4)]
    step = Step(torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                accumulate=2)
    train_one_epoch(model, batches, step, epoch=0)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    Path(out, f"{rank}.json").write_text(json.dumps({"allreduces": len(calls), "params": flat.tolist()}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_accumulation_all_reduces_only_on_optimizer_steps(tmp_path):
    """Under DDP, micro-batches that don't step run in no_sync(): 4 micro-batches, accumulate=2 -> 2 all-reduces
    (smallcnn's gradients fit one bucket), and the ranks still end with bitwise equal parameters."""
    from helpers import spawn

    spawn(_accumulate_worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert (r0["allreduces"], r1["allreduces"]) == (2, 2)
    assert r0["params"] == r1["params"]


def _stop_together_worker(rank: int, port: int, out: str) -> None:
    """Rank 1's second batch has a NaN; then rank 1 freezes (sleeps) while rank 0 waits in an all-reduce."""
    import time

    from finetune.parallel import distributed as D
    from finetune.training.engine import NonFiniteLoss, Step, train_one_epoch
    from finetune.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    d = D.from_env()
    D.init(d, torch.device("cpu"), timeout_min=0.15)  # 9 s: a frozen peer is an error, not a 30 min hang
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = D.wrap(build_model("smallcnn", num_classes=3).model, d, torch.device("cpu"))
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1])) for _ in range(4)]
    if rank == 1:
        batches[1][0][0, 0, 0, 0] = float("nan")
    step = Step(torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                reduce=lambda t: D.all_reduce_sum(t, d))
    res: dict = {}
    try:
        train_one_epoch(model, batches, step, epoch=0)
    except NonFiniteLoss as e:
        res["nan"] = str(e)
    if rank == 1:  # frozen: rank 0's next collective must time out, not wait; up to 20 s, or until rank 0 has its
        end = time.monotonic() + 20  # answer (no need to sleep on once it has)
        while time.monotonic() < end and not Path(out, "0.json").exists():
            time.sleep(0.05)
    else:
        t0 = time.monotonic()
        try:
            D.all_reduce_sum(torch.ones(1), d)
            res["timeout"] = None
        except Exception:  # noqa: BLE001 - gloo raises RuntimeError/DistBackendError on a timeout
            res["timeout"] = time.monotonic() - t0
    Path(out, f"{rank}.json").write_text(json.dumps(res))
    # leave without destructors: a process group whose collective timed out can abort() in its C++ teardown
    # ("terminate called without an active exception"), which mp.spawn would report as a failure of the test
    os._exit(0)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_nan_on_one_rank_stops_every_rank_and_a_frozen_rank_times_out(tmp_path):
    """A NaN loss on rank 1 only: both ranks raise NonFiniteLoss at the same step (the finite flag is all-reduced),
    instead of rank 0 waiting for rank 1's gradients forever. A rank that stops answering makes the others' next
    collective fail after train.dist_timeout minutes (here 0.15), not gloo's default 30."""
    import socket

    from helpers import spawn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_stop_together_worker, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r1["nan"] == "loss became nan at epoch 1, step 2"
    assert r0["nan"] == "loss became nan on another process at epoch 1, step 2"
    assert r0["timeout"] is not None and r0["timeout"] < 18


def test_dist_timeout_is_a_positive_number_of_minutes():
    from finetune.config import Recipe, apply_overrides
    from finetune.errors import ConfigError

    assert Recipe().train.dist_timeout == 10.0
    with pytest.raises(ConfigError, match=r"^train.dist_timeout must be greater than 0, got 0"):
        apply_overrides(Recipe(), {"train.dist_timeout": 0})


class _Stop(Exception):
    """Raised on both ranks right after a mid-epoch save: the run stops there, as a kill would."""


def _midepoch_worker(rank: int, port: int, data: str, out: str) -> None:
    """One rank: an uninterrupted 1-epoch run A; run B stopped right after its mid-epoch save at batch 2, then
    resumed. Rank 0 records both runs' metrics rows and B's saved partial sums."""
    from finetune import config
    from finetune.run import midepoch
    from finetune.run.runner import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    r = config.apply_overrides(config.load_recipe("default"), {
        "data.path": data, "model.weights": "none", "data.image_size": 32, "train.epochs": 1, "train.batch_size": 4,
        "train.precision": "fp32", "train.device": "cpu", "train.tensorboard": False, "train.report": False,
        "train.save_every_steps": 1, "train.seed": 7})
    train(r, out=Path(out) / "A")
    real = midepoch.saver

    def stopping_saver(*a, **k):
        on_step = real(*a, **k)

        def wrapped(progress):
            on_step(progress)
            if progress["batches"] == 2:
                raise _Stop
        return wrapped

    midepoch.saver = stopping_saver
    with pytest.raises(_Stop):
        train(r, out=Path(out) / "B")
    midepoch.saver = real
    saved = load_checkpoint(Path(out) / "B" / "last.pt")["partial"]
    train(None, resume=Path(out) / "B")
    if rank == 0:
        rows = {k: json.loads((Path(out) / k / "metrics.json").read_text())["epochs"] for k in "AB"}
        Path(out, "result.json").write_text(json.dumps({**rows, "ranks": saved["ranks"]}))
    os._exit(0)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_ddp_mid_epoch_resume_restores_every_ranks_own_sums(tmp_path):
    """2 gloo processes: an epoch stopped after its mid-epoch save at batch 2 and resumed reports exactly the
    uninterrupted epoch's train loss and accuracy (each rank continues from its own saved sums; before, every rank
    restarted from rank 0's, and the epoch counted rank 0's first batches twice and rank 1's never)."""
    import socket

    from helpers import spawn, tiny_tree

    data = tiny_tree(tmp_path / "data", per_class=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_midepoch_worker, args=(port, str(data), str(tmp_path)), nprocs=2)
    res = json.loads((tmp_path / "result.json").read_text())
    assert [r[2] for r in res["ranks"]] == [8, 8]  # 2 batches of 4 on each rank
    assert res["ranks"][0] != res["ranks"][1]  # two shards, two different sums
    a, b = res["A"][0], res["B"][0]
    assert (b["train_loss"], b["train_acc"]) == (a["train_loss"], a["train_acc"])
    assert (b["val_loss"], b["val_acc"]) == (a["val_loss"], a["val_acc"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = {"train.epochs": 1, "train.batch_size": 32, "train.precision": "fp32", "scheduler.name": "constant",
         "data.augment": "none", "train.tensorboard": False, "freeze.backbone": True, "train.cache_features": "on"}


def _sharded_features_worker(rank: int, port: int, out: str, data: str) -> None:
    """One rank of a 2-process run on cached features, run twice (the second reads the store): counts the images
    whose features this rank computes."""
    import finetune.speedups.feature_store as S

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    seen: list[list[int]] = [[], []]
    real = S.stream_features

    def counting(*a, **kw):
        for f, y in real(*a, **kw):
            seen[-1].append(len(f))
            yield f, y

    S.stream_features = counting
    recipe = config.apply_overrides(config.load_recipe("default"), {**PROBE, "data.path": data})
    seen.clear()
    for run in ("a", "b"):
        seen.append([])
        train(recipe, out=Path(out) / run)
    Path(out, f"{rank}.json").write_text(json.dumps([sum(s) for s in seen]))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_sharded_feature_extraction_computes_each_image_once(tmp_path, monkeypatch, mini_sample):
    """2 processes on cached features: each rank computes its shard (48 train + 24 val images, once across
    ranks, not once per rank); a second run finds them in the store on both ranks (0 computed); the head equals a
    single process's (same per-process batch: every rank trains the head on all the features)."""
    from helpers import spawn

    spawn(_sharded_features_worker, args=(_free_port(), str(tmp_path), str(mini_sample)), nprocs=2)
    counts = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert counts == [[36, 0], [36, 0]]  # 24 train + 12 val images per rank; then all from the store
    monkeypatch.setenv("FINETUNE_CACHE", "off")  # computed afresh here, by one process
    train(config.apply_overrides(config.load_recipe("default"), {**PROBE, "data.path": str(mini_sample)}),
          out=tmp_path / "one")
    one = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    for run in ("a", "b"):
        two = load_checkpoint(tmp_path / run / "last.pt")["model"]
        assert two.keys() == one.keys()
        for k in one:
            assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6), (run, k)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_two_nodes_equal_nproc_2(ddp_run, tmp_path, mini_sample):
    """Multi-node as documented in the README: two torchrun launchers ("nodes" on 127.0.0.1, one process each; one
    started as plain torchrun, one by ``finetune train --nnodes 2 --node-rank 1 --master-addr``) meeting at a c10d
    rendezvous finish the same run as ``--nproc 2``: weights within 1e-5 (each "node" has 1 local
    process, so it takes both cores where --nproc 2 gives each process one: other conv kernels' summation order)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
    port = _free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "0",
                "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m",
                "finetune", "train"]
    thin = [sys.executable, "-m", "finetune", "train", "--nnodes", "2", "--node-rank", "1", "--master-addr",
            f"127.0.0.1:{port}"]  # the convenience flags launch the same torchrun command
    nodes = [subprocess.Popen([*cmd, "--data", str(mini_sample), "--out", str(out), *ARGS], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in (torchrun, thin)]
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    a = load_checkpoint(ddp_run / "last.pt")
    b = load_checkpoint(out / "last.pt")
    assert b["world_size"] == 2
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff < 1e-5, diff
    rows = [json.loads((d / "metrics.json").read_text())["epochs"][0] for d in (ddp_run, out)]
    assert rows[1]["train_loss"] == pytest.approx(rows[0]["train_loss"], rel=1e-5)
    assert rows[1]["val_acc"] == rows[0]["val_acc"]


def test_node_flags_become_a_c10d_rendezvous_and_are_not_passed_on(monkeypatch):
    from finetune.parallel import distributed, launcher

    seen = {}
    monkeypatch.setattr(launcher, "run", lambda cmd, env=None: seen.update(cmd=cmd) or 0)
    argv = ["train", "--nproc", "2", "--nnodes=2", "--node-rank", "1", "--master-addr", "node0", "--out", "r"]
    assert distributed.strip_nproc(argv) == ["train", "--out", "r"]
    assert distributed.launch(2, ["train"], (2, 1, "node0")) == 0
    assert seen["cmd"][1:] == ["-m", "finetune.parallel.launcher", "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d",
                               "--rdzv-endpoint=node0:29500", "--nproc_per_node=2", "-m", "finetune", "train"]
    distributed.launch(2, ["train"])
    assert seen["cmd"][3:5] == ["--standalone", "--nproc_per_node=2"]
