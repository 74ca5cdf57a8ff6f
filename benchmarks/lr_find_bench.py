"""`--lr auto` (the LR range test) vs a manual LR sweep, in ONE process, on real weights and photos.

    python benchmarks/lr_find_bench.py            # flowers12 + ../shared Lite0, linear-probe, seeds 0 1 2
    python benchmarks/lr_find_bench.py --quick    # seed 0, 4 LRs

Model ``timm:tf_efficientnet_lite0`` with ``../shared/weights/tf_efficientnet_lite0.safetensors``, data
``../shared/data/flowers12`` (720 train / 240 val, 12 classes), the ``linear-probe`` recipe (AdamW, cosine, batch 32,
5 epochs, no augmentation: the head trains on cached features). For each seed: ``train --lr auto`` (the range test,
then training with its suggestion) and ``train --lr LR`` for each LR of the sweep; the table gives final-epoch
val accuracy. A fresh feature cache in a temp dir (the first run computes the features; the rest read them).
Writes benchmarks/results/lr_find_latest.json and prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from real import DATA, MODEL, ROOT, SHARED, WEIGHTS  # noqa: E402,F401 - ../shared paths; puts the checkout on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lrfind-bench-"))
    os.environ["FINETUNE_CACHE"] = str(tmp / "cache")
    import finetune
    from finetune.config import apply_overrides

    lrs = [1e-4, 1e-3, 1e-2, 1e-1] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    seeds = [0] if args.quick else [0, 1, 2]
    rows = []
    try:
        for seed in seeds:
            def run(lr, tag, seed=seed):
                r = apply_overrides(finetune.load_recipe("linear-probe"), {
                    "model.name": MODEL, "model.weights": str(WEIGHTS), "data.path": str(DATA),
                    "optimizer.lr": lr, "train.seed": seed, "train.tensorboard": False})
                t0 = time.perf_counter()
                res = finetune.train(r, out=tmp / f"{tag}-s{seed}")
                return {"seed": seed, "lr": lr, "val_acc": res.epochs[-1]["val_acc"],
                        "best_val_acc": res.best_val_acc, "seconds": time.perf_counter() - t0}

            auto = run("auto", "auto")
            found = json.loads((tmp / f"auto-s{seed}" / "lr_find.json").read_text())
            auto["lr"] = float(f"{found['suggestion']:.3g}")
            auto["kind"] = "auto"
            rows.append(auto)
            print(f"seed {seed}: --lr auto -> {auto['lr']:g}: {auto['val_acc']:.2%} ({auto['seconds']:.1f} s)",
                  file=sys.stderr)
            for lr in lrs:
                row = {**run(lr, f"lr{lr:g}"), "kind": "manual"}
                rows.append(row)
                print(f"seed {seed}: --lr {lr:g}: {row['val_acc']:.2%}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find_latest.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| seed | `--lr auto` (picked) | " + " | ".join(f"{lr:g}" for lr in lrs) + " | best manual | auto - best |")
    print("|---" * (len(lrs) + 4) + "|")
    for seed in seeds:
        a = next(r for r in rows if r["seed"] == seed and r["kind"] == "auto")
        m = [r for r in rows if r["seed"] == seed and r["kind"] == "manual"]
        best = max(r["val_acc"] for r in m)
        print(f"| {seed} | {a['val_acc']:.2%} ({a['lr']:.2g}) | " + " | ".join(f"{r['val_acc']:.2%}" for r in m)
              + f" | {best:.2%} | {100 * (a['val_acc'] - best):+.2f} points |")


if __name__ == "__main__":
    main()
