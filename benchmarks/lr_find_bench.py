"""The LR range test (``lr-find``, ``--lr auto``) against LR sweeps, on real weights and photos, in ONE process.

    python benchmarks/lr_find_bench.py --sweep    # lr-find's 3 suggestions vs a probe sweep: 3 data sets x Lite0/Lite1
    python benchmarks/lr_find_bench.py --sweep --table benchmarks/results/lr_find_sweep_latest.json  # reprint only
    python benchmarks/lr_find_bench.py            # --lr auto vs train --lr LR: flowers12 + Lite0, seeds 0 1 2
    python benchmarks/lr_find_bench.py --quick    # the same, seed 0, 4 LRs

``--sweep``: for each data set (flowers12; caltech101-small; caltech101 5-shot = its first 5 train photos per class
with all val photos; caltech101 1-in-10 = every 10th class of it in alphabetical order, 11 classes; the last two
as symlinks under $TMPDIR) and backbone (``timm:tf_efficientnet_lite0``,
``timm:tf_efficientnet_lite1`` with the ../shared weights): ``lr_find`` on the ``linear-probe`` recipe, then
``finetune probe``'s sweep (the same recipe and cached features: AdamW, cosine, batch 32, 5 epochs, the recipe's
weight decay) over 1e-5 .. 1 half a decade apart. The sweep's best LR is probe's pick (the top val accuracy; among
heads within noise of it, the lowest val loss); "in" means the suggestion lies within the decade centred on it
(a factor sqrt(10) either way). Curves and sweeps go to benchmarks/results/lr_find_sweep_latest.json; ``--table``
re-applies the current rules to saved curves (the rules are functions of the curve alone). Features are cached in
$FINETUNE_CACHE when set (else a temp dir): a few minutes per backbone on caltech101-small on 2 CPU cores.

The default mode:

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
import math
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
    ap.add_argument("--sweep", action="store_true", help="lr-find vs probe sweeps over 3 data sets x 2 backbones")
    ap.add_argument("--table", type=Path, help="with --sweep: reprint the table from this saved results file")
    ap.add_argument("--seeds", default="0,1,2", help="with --sweep: lr-find's seeds (batch order; the first in the "
                                                      "main columns)")
    args = ap.parse_args()
    if args.sweep:
        return sweep_mode(args.table, [int(x) for x in args.seeds.split(",")])
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



SWEEP_LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
MODELS = ["timm:tf_efficientnet_lite0", "timm:tf_efficientnet_lite1"]


def caltech11(root: Path) -> Path:
    """Every 10th class of caltech101-small (alphabetical: Faces, beaver, ceiling_fan, ..., 11 classes), as
    symlinks: few classes, saturated accuracy (where a sweep's best LR is decided by one val image)."""
    src = SHARED / "data" / "caltech101-small"
    classes = sorted(p.name for p in (src / "train").iterdir())[::10]
    for split in ("train", "val"):
        for c in classes:
            link = root / split / c
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(src / split / c, target_is_directory=True)
    return root


def caltech_5shot(root: Path) -> Path:
    """caltech101-small with 5 train photos per class (the first 5 by name; 505 in all) and all 1010 val photos,
    as symlinks: the few-shot, many-class regime (16 steps per epoch instead of 64)."""
    src = SHARED / "data" / "caltech101-small"
    for split, keep in (("train", 5), ("val", None)):
        for c in sorted(p.name for p in (src / split).iterdir()):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted((src / split / c).iterdir())[:keep]:
                link = root / split / c / f.name
                if not link.exists():
                    link.symlink_to(f)
    return root


def sweep_mode(table: Path | None, seeds: list[int]) -> None:
    out = ROOT / "benchmarks" / "results" / "lr_find_sweep_latest.json"
    if table is not None:
        return print_sweep(json.loads(table.read_text()))
    tmp = Path(tempfile.mkdtemp(prefix="lrfind-sweep-"))
    os.environ.setdefault("FINETUNE_CACHE", str(tmp / "cache"))
    import finetune
    from finetune.config import apply_overrides
    from finetune.run.lr_find import lr_find
    from finetune.tools.probe import probe

    keep = Path(tempfile.gettempdir())  # the symlinked sets stay put: a stable path keeps their cached features
    sets = {"flowers12": SHARED / "data" / "flowers12", "caltech101-small": SHARED / "data" / "caltech101-small",
            "caltech101 5-shot": caltech_5shot(keep / "finetune-bench-caltech5shot"),
            "caltech101 1-in-10": caltech11(keep / "finetune-bench-caltech10")}
    rows = []
    try:
        for dname, dpath in sets.items():
            for model in MODELS:
                weights = SHARED / "weights" / f"{model.split(':')[1]}.safetensors"
                def recipe(seed, model=model, weights=weights, dpath=dpath):
                    return apply_overrides(finetune.load_recipe("linear-probe"), {
                        "model.name": model, "model.weights": str(weights), "data.path": str(dpath),
                        "train.seed": seed, "train.tensorboard": False})

                r = recipe(seeds[0])
                t0 = time.perf_counter()
                found = lr_find(r)
                t1 = time.perf_counter()
                more = {seed: lr_find(recipe(seed)).raw_losses for seed in seeds[1:]}
                t1b = time.perf_counter()
                res = probe([model], weights=str(weights), data=str(dpath), lrs=SWEEP_LRS,
                            wds=[r.optimizer.weight_decay], knn=[], write=False)[0]
                t2 = time.perf_counter()
                rows.append({"data": dname, "model": model, "classes": len(res.classes), "seed": seeds[0],
                             "other_seeds": {str(k): v for k, v in more.items()},
                             "train_images": res.train_images, "val_images": res.val_images,
                             "lrs": found.lrs, "raw_losses": found.raw_losses, "stopped": found.stopped,
                             "suggestions": found.suggestions, "lr_find_seconds": t1 - t0,
                             "probe_seconds": t2 - t1b, "best": res.best, "val_acc_pm": res.val_acc_pm,
                             "sweep": [{"lr": h.lr, "val_acc": h.val_acc, "val_loss": h.val_loss,
                                        "within_noise": h.within_noise} for h in res.heads]})
                print(f"{dname} {model}: lr-find {t1 - t0:.0f} s, probe {t2 - t1b:.0f} s", file=sys.stderr)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1) + "\n")  # after each: a long run keeps what it measured
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_sweep(rows)


def fastai_valley(lrs: list[float], raw: list[float], beta: float = 0.98) -> float:
    """What fastai's own rule (and this project's before issue 30) suggests on the same steps: the valley of the
    bias-corrected exponential moving average, trimmed as fastai trims."""
    from finetune.run.lr_find import _longest_descent

    ema, avg = [], 0.0
    for k, v in enumerate(raw):
        avg = beta * avg + (1 - beta) * v
        ema.append(avg / (1 - beta ** (k + 1)))
    lo, hi = len(lrs) // 10, max(len(lrs) - 5, len(lrs) // 10 + 2)
    start, end = _longest_descent(ema[lo:hi])
    sections = (end - start) / 3
    return lrs[lo + max(0, start + int(sections) + int(sections / 2))]


def print_sweep(rows: list[dict]) -> None:
    """Two markdown tables: the rules' suggestions against the sweep's best decade, and the sweep itself."""
    from finetune.run.lr_find import smooth, suggest

    def fmt(lr: float) -> str:
        return f"{lr:.1e}".replace("e-0", "e-").replace("e+0", "e")

    print("| data (classes, train/val) | model | **valley** (suggested) | steep | minimum/10 | fastai's valley "
          "(before) | sweep's best LR: val acc | valley in its decade? | sweep at the LR nearest valley "
          "| valley, other seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    hits = hits_more = n_more = 0
    for r in rows:
        sg = suggest(r["lrs"], smooth(r["raw_losses"], 100))  # the current rules on the saved curve
        sw = r["sweep"]
        best = sw[r["best"]]
        lo, hi = best["lr"] / 10 ** 0.5, best["lr"] * 10 ** 0.5

        def mark(lr: float, lo: float = lo, hi: float = hi) -> str:
            return fmt(lr) + (" ✓" if lo <= lr <= hi else " ✗")

        v = sg["valley"]["lr"]
        near = min(sw, key=lambda h: abs(math.log(h["lr"] / v)))
        hits += lo <= v <= hi
        print(f"| {r['data']} ({r['classes']}, {r['train_images']}/{r['val_images']}) | {r['model'].split('_')[-1]} "
              f"| **{mark(v)}** | {mark(sg['steep']['lr'])} | {mark(sg['minimum']['lr'])} "
              f"| {mark(fastai_valley(r['lrs'], r['raw_losses']))} | {fmt(best['lr'])}: {best['val_acc']:.1%} "
              f"± {r['val_acc_pm']:.1%} | {'yes' if lo <= v <= hi else 'no'} | {fmt(near['lr'])}: "
              f"{near['val_acc']:.1%} ({100 * (near['val_acc'] - best['val_acc']):+.1f} points) | "
              + ", ".join(mark(suggest(r["lrs"], smooth(raw, 100))["valley"]["lr"])
                          for raw in r.get("other_seeds", {}).values()) + " |")
        more = [suggest(r["lrs"], smooth(raw, 100))["valley"]["lr"] for raw in r.get("other_seeds", {}).values()]
        hits_more += sum(lo <= x <= hi for x in more)
        n_more += len(more)
    print(f"\nvalley within the best decade: {hits} of {len(rows)} (first seed), {hits_more} of {n_more} (the "
          "other seeds)\n")
    lrs = [h["lr"] for h in rows[0]["sweep"]]
    print("| data | model | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
    print("|---|---|" + "---|" * len(lrs))
    for r in rows:
        cells = [f"**{h['val_acc']:.1%}**" if i == r["best"] else f"{h['val_acc']:.1%}"
                 for i, h in enumerate(r["sweep"])]
        print(f"| {r['data']} | {r['model'].split('_')[-1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
