"""Scaling on this machine: 1 process vs 2 (DDP, FSDP2) and sharded feature extraction, side by side in one run;
then the bytes each strategy moves per optimizer step (computed from parameter counts, for sizing a cluster).

    python benchmarks/scaling_bench.py [--data ../shared/data/flowers12] [--weights FILE] [--size 128]

Prints markdown tables. Numbers from a shared CPU are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], out: Path, nproc: int) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINETUNE_CACHE": "off"}
    cmd = [sys.executable, "-m", "finetune", "train", *args, "--out", str(out), "--quiet", "--no-tensorboard",
           "--no-report", "--nproc", str(nproc)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0, json.loads((out / "metrics.json").read_text())["epochs"][-1]


def throughput(data: str, weights: str, size: int) -> None:
    base = ["--recipe", "default", "--model", "timm:tf_efficientnet_lite0", "--weights", weights, "--data", data,
            "--image-size", str(size),
            "--epochs", "1", "--augment", "none", "--cache-features", "off", "--precision", "fp32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, extra in [("1 process, batch 32", 1, ["--batch-size", "32"]),
                                   ("2 processes DDP, 16 each", 2, ["--batch-size", "16"]),
                                   ("2 processes FSDP2, 16 each", 2, ["--batch-size", "16", "--strategy", "fsdp"])]:
            secs, row = run(base + extra, Path(tmp) / name.replace(" ", "_").replace(",", ""), nproc)
            rows.append((name, secs, row["images_per_sec"], row["val_acc"]))
        probe = base[:10] + ["--epochs", "1", "--augment", "none", "--precision", "fp32", "--freeze-backbone",
                            "--cache-features", "on", "--batch-size", "32"]
        for name, nproc in [("linear probe, features: 1 process", 1), ("linear probe, features: 2 ranks sharded", 2)]:
            secs, row = run(probe, Path(tmp) / name.replace(" ", "_").replace(",", "").replace(":", ""), nproc)
            rows.append((name, secs, None, row["val_acc"]))
    print(f"\n| Lite0 {size}px, full fine-tune 1 epoch | command s | train img/s | val acc |\n|---|---|---|---|")
    for name, secs, ips, acc in rows:
        print(f"| {name} | {secs:.1f} | {'-' if ips is None else f'{ips:.1f}'} | {acc:.2%} |")


def volume() -> None:
    """Bytes one rank sends per optimizer step with N ranks (ring collectives: (N-1)/N of the buffer per all-gather
    or reduce-scatter, twice that per all-reduce), full fine-tune and head only, fp32 gradients."""
    import timm
    import torchvision

    models = {"resnet18": torchvision.models.resnet18(), "tf_efficientnet_lite0": timm.create_model(
        "tf_efficientnet_lite0"), "vit_base_patch16_224": timm.create_model("vit_base_patch16_224")}
    n = 8
    f = (n - 1) / n
    print("\n| model | params | DDP full FT | FSDP2 full FT (fp32 / bf16 params) | DDP head only | FSDP2 head only |"
          "\n|---|---|---|---|---|---|")
    for name, m in models.items():
        p = sum(t.numel() for t in m.parameters())
        head = sum(t.numel() for t in m.get_classifier().parameters()) if hasattr(m, "get_classifier") else \
            sum(t.numel() for t in m.fc.parameters())
        mb = 1e6
        ddp = 2 * f * 4 * p / mb
        # forward all-gather + backward all-gather (units resharded after forward) + gradient reduce-scatter (fp32)
        fsdp32 = (2 * f * 4 * p + f * 4 * p) / mb
        fsdp16 = (2 * f * 2 * p + f * 4 * p) / mb
        # head only: DDP all-reduces the head; FSDP still all-gathers every frozen unit in forward (no backward)
        print(f"| {name} | {p / 1e6:.1f} M | {ddp:.0f} MB | {fsdp32:.0f} / {fsdp16:.0f} MB | "
              f"{2 * f * 4 * head / mb:.2f} MB | {(f * 4 * p + 2 * f * 4 * head) / mb:.0f} MB |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flowers12"))
    ap.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--volume-only", action="store_true")
    a = ap.parse_args()
    if not a.volume_only:
        throughput(a.data, a.weights, a.size)
    volume()


if __name__ == "__main__":
    main()
