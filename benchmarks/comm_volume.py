"""Bytes each process sends per optimizer step under DDP and FSDP, counted from the models themselves (random
init, nothing downloaded), for a full fine-tune and a linear probe; and what that costs at a few link speeds.

    python benchmarks/comm_volume.py [--num-classes 10] [--nproc 2,8,64] [--markdown]

Counting (ring algorithms, what NCCL and gloo use for large tensors; per process, per optimizer step, sent bytes;
received is the same):
- DDP: one all-reduce of the trainable gradients (fp32: 4 bytes each; frozen parameters have no gradient and are
  not reduced): ``2 (N-1)/N x 4 x trainable``. DDP overlaps it with the backward pass (bucket by bucket).
- FSDP (FULL_SHARD, ``fully_shard`` per block, bf16 ``param_dtype``, fp32 ``reduce_dtype``): the parameters are
  all-gathered for the forward and again for the backward (resharded after the forward), ``2 x (N-1)/N x 2 x
  params`` (a linear probe: only the forward gather, no backward through the frozen blocks: ``(N-1)/N x 2 x
  params``), plus a reduce-scatter of the trainable gradients in fp32, ``(N-1)/N x 4 x trainable``. It moves more
  bytes than DDP and buys memory: each process holds 1/N of the parameters, gradients and optimizer state.
- The "time" columns divide the bytes by a link's bus bandwidth: NVLink (H100/H200 SXM, ~360 GB/s effective for
  all-reduce), PCIe 4 x16 (~20 GB/s), 100 Gb/s Ethernet/InfiniBand between nodes (~11 GB/s). They are lower bounds
  on the communication time and upper bounds on what it adds to a step when nothing overlaps it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ["resnet18", "timm:tf_efficientnet_lite0", "timm:vit_base_patch16_224"]
LINKS = {"NVLink": 360e9, "PCIe4": 20e9, "100GbE": 11e9}


def counts(name: str, num_classes: int) -> dict[str, int]:
    """Total parameters and the trainable ones of a full fine-tune and of a linear probe (head only)."""
    from finetune.training.freeze import apply_freeze
    from finetune.config import FreezeCfg
    from finetune.models import build_model

    bb = build_model(name, num_classes=num_classes, weights="none")
    total = sum(p.numel() for p in bb.model.parameters())
    apply_freeze(bb, FreezeCfg(backbone=True))
    head = sum(p.numel() for p in bb.model.parameters() if p.requires_grad)
    return {"total": total, "full": total, "probe": head}


def volume(c: dict[str, int], mode: str, strategy: str, n: int) -> float:
    """Bytes one process sends per optimizer step (see the module docstring)."""
    f = (n - 1) / n
    trainable = c[mode]
    if strategy == "ddp":
        return 2 * f * 4 * trainable
    gathers = 2 if mode == "full" else 1
    return gathers * f * 2 * c["total"] + f * 4 * trainable


def human(b: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b:.0f} B"


def ms(b: float, bw: float) -> str:
    t = b / bw * 1e3
    return f"{t:.2f}" if t < 10 else f"{t:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--nproc", default="2,8,64")
    a = ap.parse_args()
    ns = [int(x) for x in a.nproc.split(",")]
    print("| model | params | fine-tune | strategy | " + " | ".join(f"N={n}: sent/step" for n in ns)
          + " | " + " | ".join(f"ms @ {k} (N={ns[-1]})" for k in LINKS) + " |")
    print("|---" * (4 + len(ns) + len(LINKS)) + "|")
    for name in MODELS:
        c = counts(name, a.num_classes)
        for mode, label in (("full", "full"), ("probe", f"linear probe ({c['probe']:,} trainable)")):
            for strategy in ("ddp", "fsdp"):
                vols = [volume(c, mode, strategy, n) for n in ns]
                print(f"| {name} | {c['total'] / 1e6:.1f} M | {label} | {strategy.upper()} | "
                      + " | ".join(human(v) for v in vols) + " | "
                      + " | ".join(ms(vols[-1], bw) for bw in LINKS.values()) + " |")


if __name__ == "__main__":
    main()
