"""Probe lab benchmark: the sweep, the persistent feature cache and k-NN on real weights, in ONE process.

    python benchmarks/probe_bench.py           # flowers12 + ../shared Lite0 (a few minutes on a 2-core CPU)
    python benchmarks/probe_bench.py --quick   # 2 epochs, 4 LRs: a smoke test

Model ``timm:tf_efficientnet_lite0`` with ``../shared/weights/tf_efficientnet_lite0.safetensors``, data
``../shared/data/flowers12`` (720 train / 240 val photos, 12 classes), the ``linear-probe`` recipe's settings
(AdamW, cosine, batch 32, 5 epochs, precision auto, no augmentation), a fresh feature cache in a temp dir.
Measured, in this order, after one unmeasured warm-up pass (imports, kernel set-up, the OS file cache):

1. ``probe`` with ONE head (lr 1e-3, wd 1e-4), empty cache: features computed (the first run's wall time);
2. the same again: features read from the cache (the second run);
3. ``train --recipe linear-probe`` on a second empty cache (first train), then again (second train);
4. ``probe`` with the default 16-head grid (8 LRs x 2 weight decays) vs the 1-head probe, both on cached features:
   the whole command, and the head training alone (``probe.sweep``);
5. the same 16 (lr, wd) heads trained one run at a time with ``finetune.train`` (on cached features);
6. k-NN accuracy (k = 10, 20).

Ratios are from this one run on a shared machine. Writes benchmarks/results/probe_latest.json and prints markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from real import DATA, MODEL, ROOT, SHARED, WEIGHTS  # noqa: E402,F401 - ../shared paths; puts the checkout on sys.path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("finetune").setLevel(logging.WARNING)
    import torch

    from finetune import config
    from finetune.tools import probe as P
    from finetune.run.runner import train

    epochs = 2 if args.quick else 5
    lrs = [1e-3, 1e-2, 1e-1, 3e-1] if args.quick else list(P.DEFAULT_LRS)
    wds = list(P.DEFAULT_WDS)
    tmp = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    common = dict(weights=str(WEIGHTS), data=str(DATA), epochs=epochs)
    res: dict = {"model": MODEL, "data": str(DATA), "epochs": epochs, "threads": torch.get_num_threads(),
                 "grid": len(lrs) * len(wds)}

    def probe_once(name, lr_list, wd_list, cache):
        os.environ["FINETUNE_CACHE"] = str(tmp / cache)
        return timed(lambda: P.probe([MODEL], lrs=lr_list, wds=wd_list, out=tmp / name, knn=[10, 20], **common)[0])

    # warm-up, not measured: imports, oneDNN kernel set-up and the OS file cache would otherwise all land on the
    # first measured run (one backbone pass with the store off)
    os.environ["FINETUNE_CACHE"] = "off"
    res["warmup_s"] = timed(lambda: P.prepare(P.probe_recipe(MODEL, **common)))[1]
    r1, res["probe1_first_s"] = probe_once("p1", [1e-3], [1e-4], "cacheA")
    r2, res["probe1_second_s"] = probe_once("p2", [1e-3], [1e-4], "cacheA")
    assert not r1.from_store and r2.from_store
    res["probe1_val_acc"] = r1.heads[0].val_acc
    res["probe1_features_s"], res["probe1_second_features_s"] = r1.features_seconds, r2.features_seconds
    print(f"probe 1 head: first {res['probe1_first_s']:.1f} s, second {res['probe1_second_s']:.1f} s", file=sys.stderr)

    def lp_train(name, lr=1e-3, wd=1e-4):
        cfg = P.probe_recipe(MODEL, **common)
        cfg = config.apply_overrides(cfg, {"optimizer.lr": lr, "optimizer.weight_decay": wd,
                                           "train.tensorboard": False})
        return timed(lambda: train(cfg, out=tmp / name))

    os.environ["FINETUNE_CACHE"] = str(tmp / "cacheB")
    t1, res["train_first_s"] = lp_train("t1")
    t2, res["train_second_s"] = lp_train("t2")
    res["train_val_acc"] = t1.epochs[-1]["val_acc"]
    print(f"train linear-probe: first {res['train_first_s']:.1f} s, second {res['train_second_s']:.1f} s",
          file=sys.stderr)

    # 16 heads vs 1 head, both on cached features (cacheA holds them)
    r16, res["probe16_s"] = probe_once("p16", lrs, wds, "cacheA")
    r1c, res["probe1_cached_s"] = probe_once("p1c", [1e-3], [1e-4], "cacheA")
    res["sweep16_s"], res["sweep1_s"] = r16.sweep_seconds, r1c.sweep_seconds
    res["knn"] = {str(k): v for k, v in r16.knn.items()}
    res["knn_s"] = r16.knn_seconds
    res["heads"] = [{"lr": h.lr, "wd": h.weight_decay, "val_acc": h.val_acc} for h in r16.heads]
    res["best_sweep"] = r16.heads[r16.best].val_acc
    print(f"probe 16 heads {res['probe16_s']:.1f} s vs 1 head {res['probe1_cached_s']:.1f} s", file=sys.stderr)

    # the same grid, one train run at a time (cacheB holds the features for train)
    os.environ["FINETUNE_CACHE"] = str(tmp / "cacheB")
    single, t_all = [], 0.0
    for h in r16.heads:
        out, s = lp_train(f"one-{h.lr:g}-{h.weight_decay:g}", h.lr, h.weight_decay)
        single.append(out.epochs[-1]["val_acc"])
        t_all += s
    res["one_at_a_time_val_acc"] = single
    res["one_at_a_time_s"] = t_all
    res["best_one_at_a_time"] = max(single)
    res["max_abs_diff_per_head"] = max(abs(a - h.val_acc) for a, h in zip(single, r16.heads))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # ~600 MB of run directories and cached features
    Path(ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "probe_latest.json").write_text(json.dumps(res, indent=1))

    def pct(v):
        return f"{100 * v:.2f}%"

    print("| measured (one run) | value | goal |")
    print("|---|---|---|")
    print(f"| 16-head probe / 1-head probe, whole command, cached features | {res['probe16_s']:.1f} s / "
          f"{res['probe1_cached_s']:.1f} s = {res['probe16_s'] / res['probe1_cached_s']:.2f}x | <= 1.3x |")
    print(f"| 16-head sweep / 1-head sweep, head training alone ({epochs} epochs) | {res['sweep16_s']:.2f} s / "
          f"{res['sweep1_s']:.2f} s = {res['sweep16_s'] / res['sweep1_s']:.2f}x | |")
    print(f"| second probe / first probe (1 head) | {res['probe1_second_s']:.1f} s / {res['probe1_first_s']:.1f} s = "
          f"{100 * res['probe1_second_s'] / res['probe1_first_s']:.1f}% | <= 15% |")
    print(f"| second / first `train --recipe linear-probe` | {res['train_second_s']:.1f} s / "
          f"{res['train_first_s']:.1f} s = {100 * res['train_second_s'] / res['train_first_s']:.1f}% | <= 15% |")
    print(f"| best val acc: sweep / one run at a time ({len(single)} runs, {t_all:.0f} s) | "
          f"{pct(res['best_sweep'])} / {pct(res['best_one_at_a_time'])} (largest per-head difference "
          f"{100 * res['max_abs_diff_per_head']:.2f} points) | sweep >= one-at-a-time - 0.5 |")
    print("| k-NN (cosine, T=0.07) | " + ", ".join(f"k={k}: {pct(v)}" for k, v in res["knn"].items())
          + f" ({res['knn_s']:.2f} s) | reported |")
    print()
    print("| lr | wd | sweep val acc | one run val acc |")
    print("|---|---|---|---|")
    for h, a in zip(res["heads"], single):
        print(f"| {h['lr']:g} | {h['wd']:g} | {pct(h['val_acc'])} | {pct(a)} |")


if __name__ == "__main__":
    main()
