"""Throughput of 1 process vs 2 (``--nproc 2``, DDP over gloo) on this machine, same global batch, alternating.

    python benchmarks/nproc_bench.py [--model resnet18] [--image-size 64] [--reps 2]

Each run trains 1 epoch (plus a warm-up epoch, not counted) of ``--model`` (random init) on the bundled sample
data (512 train images), fp32; 1 process with ``--batch-size 32``, 2 processes with 16 each. Reported: the
training images/s of the timed epoch (``metrics.json``; under DDP the images of both ranks over rank 0's time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(nproc: int, model: str, size: int, out: Path, threads: int | None = None) -> float:
    cmd = [sys.executable, "-m", "finetune", "train", "--model", model, "--weights", "none", "--data", "sample",
           "--image-size", str(size), "--epochs", "2", "--batch-size", str(32 // nproc), "--precision", "fp32",
           "--device", "cpu", "--no-tensorboard", "--no-report", "--cache-features", "off", "--quiet",
           "--out", str(out), "--overwrite", "--nproc", str(nproc)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    row = json.loads((out / "metrics.json").read_text())["epochs"][-1]
    return row["images_per_sec"]  # under DDP the images of all ranks (summed) over rank 0's time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--one-thread", action="store_true",
                    help="also 1 process with OMP_NUM_THREADS=1 (tells thread contention from the 2nd process)")
    a = ap.parse_args()
    res: dict[str, list[float]] = {}
    kinds = [("1 process", 1, None), ("2 processes", 2, None)] + [("1 process, 1 thread", 1, 1)] * a.one_thread
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.reps):
            for name, n, threads in kinds:
                res.setdefault(name, []).append(run(n, a.model, a.image_size, Path(tmp) / f"run{n}", threads))
                print(f"rep {r} {name}: {res[name][-1]:.1f} images/s", flush=True)
    best = {k: max(v) for k, v in res.items()}
    base = best["1 process"]
    print(f"{a.model} {a.image_size}px, best of {a.reps}, {os.cpu_count()} cores: "
          + ", ".join(f"{k} {v:.1f} img/s (x{v / base:.2f})" for k, v in best.items()))


if __name__ == "__main__":
    main()
