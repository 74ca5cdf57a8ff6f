"""torchrun / DistributedDataParallel helpers.

``finetune train`` under ``torchrun`` reads RANK, WORLD_SIZE and LOCAL_RANK from the environment, initialises
the process group (nccl on CUDA, gloo on CPU), shards the data with finetune's own seeded ``EpochSampler`` (no
DistributedSampler: every rank draws the single-process order and takes ``order[rank::world_size]``; val is not
padded), wraps the model in DDP (accumulation steps that don't step run in ``no_sync()``) and all-reduces
metrics, so reported accuracy covers the whole val set exactly once. Only rank 0 prints, writes TensorBoard and
saves checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from finetune.errors import ConfigError
from finetune.parallel import signals as stop, launcher


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The process's place in a torchrun job (a single process when not under torchrun)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init(d: Dist, device: torch.device, timeout_min: float = 10.0) -> torch.device:
    """Initialise the process group once; on CUDA each process takes the GPU of its local rank. A collective that
    waits longer than ``timeout_min`` minutes (a frozen or dead peer) raises instead of hanging for gloo's or
    nccl's default 30 minutes (``train.dist_timeout``)."""
    if not d.enabled:
        return device
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: die with it (nothing keeps writing the run)
        from finetune.parallel.signals import die_with_parent

        die_with_parent()
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
        device = torch.device("cuda", d.local_rank)
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_min))
    if device.type == "cpu":  # N processes on one machine share its cores: don't oversubscribe them
        local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return device


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """The module to train: DDP over ``model`` in a distributed run (call again after an unfreeze, since DDP
    registers the parameters that require grad when it is built), else ``model`` itself. Frozen parameters are
    never synchronised; unused-parameter search stays off (every trainable parameter gets a gradient)."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)  # buffers (BN statistics) follow rank 0 at every forward


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over all processes' batches); PyTorch implements it for CUDA only."""

    if device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only); drop it on the CPU")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    """Wait for every rank; skipped once a stop was requested (SIGTERM/Ctrl-C: the other ranks are stopping too, at
    other points of their loop, and would never reach it)."""

    if d.enabled and not stop.requested():
        dist.barrier()


def broadcast_object(obj, d: Dist, src: int = 0):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def launch(nproc: int, args: list[str], nodes: tuple[int, int, str | None] = (1, 0, None)) -> int:
    """Run ``python -m finetune ARGS`` as ``nproc`` torchrun processes on this machine; returns the exit code, or
    raises the workers' user error (:class:`finetune.parallel.launcher.WorkerError`: one line, shown once).

    ``nodes`` = (nnodes, node_rank, master HOST[:PORT]): this machine is one of several, which meet at a c10d
    rendezvous on the master (``torchrun --nnodes ... --rdzv-backend c10d --rdzv-endpoint HOST:PORT``)."""
    import sys

    nnodes, node_rank, master = nodes
    where = ["--standalone"] if nnodes == 1 else [
        f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={master if ':' in str(master) else f'{master}:29500'}"]
    # torchrun (quiet: finetune.parallel.launcher.agent) runs `python -m finetune ARGS` nproc times
    cmd = [sys.executable, "-m", "finetune.parallel.launcher", *where, f"--nproc_per_node={nproc}",
           "-m", "finetune", *args]
    # torchrun prints a banner about OMP_NUM_THREADS when it is unset; each process sets its own thread count
    # (init() splits the cores), so give it the same split and no banner
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")
           or str(max(1, (os.cpu_count() or 1) // nproc))}
    # the workers import the finetune this process runs, not a `finetune/` folder in the working directory
    # (`python -m` would put the working directory first on sys.path): PYTHONSAFEPATH drops it (3.11+), and the
    # package's own parent goes first on PYTHONPATH, unless it is site-packages (there it is found anyway, and
    # putting it before the standard library could let a backport shadow a stdlib module)
    import site
    from pathlib import Path

    here = str(Path(__file__).resolve().parents[2])
    sites = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if here not in sites:
        env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONSAFEPATH"] = "1"
    # torchrun and its workers never outlive this process; a user error in the workers is raised here, once
    return launcher.run(cmd, env)


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr")


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` and the other launch flags (the child processes must not
    launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in LAUNCH_FLAGS:
            skip = True
            continue
        if a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            continue
        out.append(a)
    return out
