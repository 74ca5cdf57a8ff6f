"""Peak RSS of one training epoch as the data grows: 1x and 8x a synthetic image set, through the RAM cache (the
contrast: it holds every decoded image), the disk cache (pread), the disk cache read through numpy.memmap (the
alternative we did not pick) and the streamed tar shards.

    python benchmarks/ram_bench.py [--n 100] [--scales 1,8] [--modes ram,disk,mmap,shards] [--what train|loader]

``--what train``: each (mode, scale) trains 1 epoch of ``timm:test_resnet`` (random init, 112 px crops from 128 px
pre-crop images, batch 32, fp32, 0 loader workers) in a fresh subprocess, which reports its own peak RSS
(``ru_maxrss``) and the epoch's seconds. ``--what loader``: the same data path at 224 px (256 px pre-crop: 256 KB
per decoded image) without a model: one augmented pass over the train loader, so larger sets run in seconds.
Images: 320x240 JPEGs (quality 90), 4 classes, made once under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_images(folder: Path, n: int) -> Path:
    """``n`` JPEGs in 4 class folders (smooth colour fields plus noise: they compress like photos, ~20 KB)."""
    import numpy as np
    from PIL import Image

    if (folder / "done").is_file():
        return folder
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    for i in range(n):
        c = i % 4
        a, b, ph = rng.uniform(0.01, 0.05, 3)
        base = 127 + 100 * np.sin(a * xx + b * yy + ph * 50)[..., None] * np.array([1, 0.6, 0.3])[[c % 3, 1, 2]]
        px = np.clip(base + rng.normal(0, 12, (240, 320, 3)), 0, 255).astype(np.uint8)
        d = folder / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(d / f"{i:06d}.jpg", quality=90)
    (folder / "done").write_text("ok")
    return folder


def make_shards(images: Path, folder: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from finetune.data.shards import write_shards

    if not (folder / "done").is_file():
        paths = write_shards(images, str(folder / "train-%03d.tar"), per_shard=200)
        (folder / "done").write_text(str(len(paths)))
    n = int((folder / "done").read_text())
    return f"{folder}/train-{{000..{n - 1:03d}}}.tar"


def child(mode: str, data: str, run_dir: str, cache_dir: str, what: str) -> None:
    """One epoch in this process (``what``: ``train``, or ``loader``: one pass over the augmented train loader, no
    model); prints a JSON line with the peak RSS."""
    sys.path.insert(0, str(ROOT))
    from finetune import config
    from finetune.api import train

    if mode == "mmap":  # the disk cache, read through a numpy.memmap instead of pread
        import numpy as np
        import torch

        from finetune.data import diskcache

        def getitem(self, i):
            mm = getattr(self.store, "_mm", None)
            if mm is None:
                mm = self.store._mm = np.memmap(self.store.data_path, dtype=np.uint8, mode="r")
            c, h, w = (int(v) for v in self.shapes[i])
            o = int(self.offsets[i])
            return torch.from_numpy(np.array(mm[o:o + c * h * w])).view(c, h, w)

        diskcache.DiskImages.__getitem__ = getitem
    over = {"model.name": "timm:test_resnet", "model.weights": "none", "data.path": data, "data.image_size": 112,
            "data.augment": "light", "data.workers": 0, "data.val_split": 0.0, "train.epochs": 1,
            "train.batch_size": 32, "train.precision": "fp32", "train.tensorboard": False, "train.report": False,
            "train.cache_features": "off", "optimizer.lr": 0.01}
    if mode != "shards":
        over["data.cache"] = "ram" if mode == "ram" else "disk"
    if mode == "mmap":
        over["data.cache_dir"] = cache_dir  # kept: the memmap opens it by name
    t0 = time.perf_counter()
    if what == "loader":
        loader_pass(config.apply_overrides(config.Recipe(), {**over, "data.image_size": 224}), run_dir, t0)
        return
    res = train(config.apply_overrides(config.Recipe(), over), out=run_dir, overwrite=True)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "epoch_s": res.epochs[0]["seconds"], "total_s": time.perf_counter() - t0,
                      "images": res.epochs[0].get("images_per_sec", 0) * res.epochs[0]["seconds"]}))


def loader_pass(recipe, run_dir: str, t0: float) -> None:
    import shutil

    from finetune.data import build_data, make_loader
    from finetune.models import data_config

    shutil.rmtree(run_dir, ignore_errors=True)
    Path(run_dir).mkdir(parents=True)
    b = build_data(recipe.data, data_config(recipe.model.name, "none"), scratch=Path(run_dir))
    t1 = time.perf_counter()
    n = sum(len(y) for _, y in make_loader(b.train, 32, shuffle=True, seed=0, workers=0))
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "epoch_s": time.perf_counter() - t1, "total_s": time.perf_counter() - t0, "images": n}))


def speed(images: Path, reps: int = 3) -> None:
    """RAM cache vs disk cache side by side in one process, same images: reading every cached image, and one
    augmented pass over the loader (224 px crops of 256 px pre-crop images), alternating, ``reps`` times."""
    sys.path.insert(0, str(ROOT))
    import tempfile

    from finetune.config import DataCfg
    from finetune.data import build_data, make_loader
    from finetune.models import data_config

    dc = data_config("timm:test_resnet", "none")
    with tempfile.TemporaryDirectory() as tmp:
        b = {m: build_data(DataCfg(path=str(images), cache=m, image_size=224, val_split=0.0), dc,
                           scratch=Path(tmp)) for m in ("ram", "disk")}
        for r in range(reps):
            for m, bundle in b.items():
                t = time.perf_counter()
                for i in range(len(bundle.train)):
                    bundle.train.cache[i]
                read = time.perf_counter() - t
                t = time.perf_counter()
                n = sum(len(y) for _, y in make_loader(bundle.train, 32, shuffle=True, seed=r, workers=0))
                print(f"rep {r} {m}: read all {len(bundle.train)} cached images {read * 1e3:.0f} ms "
                      f"({read / len(bundle.train) * 1e6:.0f} us each); loader pass {time.perf_counter() - t:.2f} s"
                      f" ({n} images)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="images at 1x")
    ap.add_argument("--scales", default="1,8")
    ap.add_argument("--modes", default="ram,disk,mmap,shards")
    ap.add_argument("--out", default="/tmp/finetune-ram-bench")
    ap.add_argument("--what", default="train", choices=["train", "loader", "speed"],
                    help="train: 1 epoch at 112 px; loader: one augmented pass over the data at 224 px, no model")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    out = Path(a.out)
    if a.what == "speed":
        speed(make_images(out / "images-1x", a.n))
        return
    rows = []
    for scale in (int(s) for s in a.scales.split(",")):
        images = make_images(out / f"images-{scale}x", a.n * scale)
        for mode in a.modes.split(","):
            data = make_shards(images, out / f"shards-{scale}x") if mode == "shards" else str(images)
            cache = out / f"cache-{scale}x"
            cmd = [sys.executable, __file__, "--child", mode, data, str(out / f"run-{mode}-{scale}x"), str(cache),
                   a.what]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{mode} {scale}x failed")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append({"mode": mode, "scale": scale, **r})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| mode | 1x RSS (MB) | 8x RSS (MB) | ratio | 1x epoch (s) | 8x epoch (s) |")
    print("|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        r = {x["scale"]: x for x in rows if x["mode"] == mode}
        lo, hi = r[min(r)], r[max(r)]
        print(f"| {mode} | {lo['maxrss_mb']:.0f} | {hi['maxrss_mb']:.0f} | {hi['maxrss_mb'] / lo['maxrss_mb']:.2f} "
              f"| {lo['epoch_s']:.1f} | {hi['epoch_s']:.1f} |")


if __name__ == "__main__":
    main()
