"""Small shared helpers for tests: tiny image trees and running the CLI in a subprocess of this worktree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_tree(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 12, size: int = 32) -> Path:
    """Write ``per_class`` random-noise PNGs (``size`` px) per class folder under ``root``; returns ``root``.

    Each class has its own mean colour so a model can learn something; the content is fixed by the class index.
    """
    import numpy as np
    from PIL import Image

    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(c)
        for i in range(per_class):
            px = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
            px[..., c % 3] += 120
            Image.fromarray(px).save(d / f"{name}_{i:03d}.png")
    return root


def sample_subset(root: Path, train: int = 12, val: int = 6) -> Path:
    """Copy the first ``train`` / ``val`` images of each class of the bundled sample (data/sample: 160 / 40 per
    class) to ``root``/train and ``root``/val; returns ``root``. The same shapes and class names at a fraction of the
    images: a test whose property does not depend on the data trains in a fraction of the time."""
    import shutil

    for split, n in (("train", train), ("val", val)):
        for d in sorted((ROOT / "data" / "sample" / split).iterdir()):
            (root / split / d.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(d.iterdir())[:n]:
                shutil.copyfile(f, root / split / d.name / f.name)
    return root


def spawn(fn, args: tuple = (), nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn(fn, args=args, nprocs=nprocs)`` (``fn(rank, *args)`` in each of ``nprocs`` real
    processes; an exception or a non-zero exit in one fails the call), with the processes forked from a fork server
    that imported torch, finetune and ``fn``'s module once: a spawned interpreter spends seconds importing torch
    before it runs anything, and each rank of each test paid it. The server imports only (no torch op has run in
    it: no thread pool for ``fork`` to break, as in tests/forkserver.py); each child takes this process's
    environment and working directory at the call, as a spawned one would (the server's are those of its start)."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "finetune.run.runner",
                                            "finetune.parallel.distributed", "finetune.models", "helpers",
                                            fn.__module__])
    mp.start_processes(_as_spawned, args=(fn, dict(os.environ), os.getcwd(), args), nprocs=nprocs, join=True,
                       start_method="forkserver")


def _as_spawned(rank: int, fn, env: dict[str, str], cwd: str, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fn(rank, *args)


def cli_env() -> dict[str, str]:
    """The environment for ``python -m finetune`` so that it imports this worktree's package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def finetune_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "finetune", *[str(a) for a in args]]


def run_cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (a real process: real exit code, real stderr, real tracebacks)."""
    return subprocess.run(finetune_cmd(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
