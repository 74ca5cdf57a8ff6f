"""EMA and mixup/cutmix on real weights and photos: what they do to the default fine-tune, in ONE process.

    python benchmarks/regularization_bench.py            # 5 settings, seed 0
    python benchmarks/regularization_bench.py --seeds 0 1

Model ``timm:tf_efficientnet_lite0`` with ``../shared/weights/tf_efficientnet_lite0.safetensors``, data
``../shared/data/flowers12`` (720 train / 240 val, 12 classes), the ``lp-ft`` recipe (the default for a pretrained
model: epoch 1 the head on cached features, epochs 2-5 everything at 0.1x LR; AdamW 1e-3, cosine, batch 32, light
augmentation). Settings: the recipe as shipped; + ``train.ema`` (timm ModelEmaV3, decay 0.999 and 0.99); + mixup
0.2; + mixup 0.8 / cutmix 1.0 (timm's ImageNet recipe). Reports final-epoch and best val accuracy, the EMA's
accuracy (final / best), and wall time. One val image is 0.42 points: differences of one or two images are noise.
Writes benchmarks/results/regularization_latest.json and prints markdown.
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

SETTINGS = {
    "lp-ft as shipped": {},
    "+ ema 0.999": {"train.ema": True, "train.ema_decay": 0.999},
    "+ ema 0.99": {"train.ema": True, "train.ema_decay": 0.99},
    "+ mixup 0.2": {"train.mixup": 0.2},
    "+ mixup 0.8 + cutmix 1.0": {"train.mixup": 0.8, "train.cutmix": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="reg-bench-"))
    os.environ["FINETUNE_CACHE"] = str(tmp / "cache")
    import finetune
    from finetune.config import apply_overrides

    rows = []
    try:
        for seed in args.seeds:
            for i, (name, over) in enumerate(SETTINGS.items()):
                if args.only and name not in args.only:
                    continue
                r = apply_overrides(finetune.load_recipe("lp-ft"), {
                    "model.name": MODEL, "model.weights": str(WEIGHTS), "data.path": str(DATA),
                    "train.seed": seed, "train.tensorboard": False, "train.report": False, **over})
                t0 = time.perf_counter()
                res = finetune.train(r, out=tmp / f"run{i}-s{seed}")
                last = res.epochs[-1]
                ema = [e["ema_val_acc"] for e in res.epochs if e.get("ema_val_acc") is not None]
                row = {"setting": name, "seed": seed, "val_acc": last["val_acc"], "best_val_acc": res.best_val_acc,
                       "ema_val_acc": ema[-1] if ema else None, "best_ema_val_acc": max(ema) if ema else None,
                       "epochs": [e["val_acc"] for e in res.epochs], "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"seed {seed} {name}: {row}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "regularization_latest.json").write_text(json.dumps(rows, indent=2) + "\n")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    print("| setting | seed | val acc per epoch | final | best | EMA final / best | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['seed']} | {' / '.join(f'{100 * v:.1f}' for v in r['epochs'])} | "
              f"{pct(r['val_acc'])} | {pct(r['best_val_acc'])} | {pct(r['ema_val_acc'])} / "
              f"{pct(r['best_ema_val_acc'])} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
