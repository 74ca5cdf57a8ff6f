"""Benchmark copies of the shared photo sets with a held-out TEST split, for `finetune auto` vs fastai's fine_tune.

    python benchmarks/auto_data.py [--out /tmp/auto-data] [--sets flowers12,caltech101-small] [--force]

For each set, writes <out>/<set>/{train,val,test}/<class>/<file> as symlinks to the original image files (nothing is
copied, so ../shared stays the only copy of the photos):

- test  = the original val/ folder (never used for any choice: report it once at the end);
- val   = the first K images per class, sorted by file name, from the original train/
          (flowers12: K = 15 of 60; caltech101-small: K = 5 of 20);
- train = the rest of the original train/ (flowers12: 45 per class; caltech101-small: 15 per class).

The split is a pure function of the file names, so every run (and both sides of a comparison) sees the same files.
`finetune train --data <out>/flowers12` then trains on train, selects on val and evaluates best.pt once on test
(docs/evaluate-predict.md, "A held-out test split"); benchmarks/fastai_peer.py reads the same folders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from real import SHARED

K_VAL = {"flowers12": 15, "caltech101-small": 5}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def make_set(name: str, out: Path, k: int, force: bool = False) -> dict[str, int]:
    """Write the split of one set; return the image count per split (train/val/test)."""
    src = SHARED / "data" / name
    if not (src / "train").is_dir() or not (src / "val").is_dir():
        raise SystemExit(f"Error: {src} has no train/ and val/ folders; is ../shared (or /work/shared) there?")
    dst = out / name
    if dst.exists():
        if not force:
            counts = {s: sum(1 for _ in (dst / s).rglob("*") if _.is_file()) for s in ("train", "val", "test")}
            print(f"{dst}: exists, kept ({counts}); --force rewrites it")
            return counts
        shutil.rmtree(dst)
    counts = {"train": 0, "val": 0, "test": 0}
    classes = sorted(d.name for d in (src / "train").iterdir() if d.is_dir())
    test_classes = sorted(d.name for d in (src / "val").iterdir() if d.is_dir())
    if classes != test_classes:
        raise SystemExit(f"Error: {src}: train/ and val/ have different class folders")
    for cls in classes:
        train = _images(src / "train" / cls)
        if len(train) <= k:
            raise SystemExit(f"Error: {src}/train/{cls} has {len(train)} images, needs more than K={k}")
        for i, p in enumerate(train):
            split = "val" if i < k else "train"
            _link(p, dst / split / cls / p.name)
            counts[split] += 1
        for p in _images(src / "val" / cls):
            _link(p, dst / "test" / cls / p.name)
            counts["test"] += 1
    print(f"{dst}: {len(classes)} classes, train {counts['train']}, val {counts['val']}, test {counts['test']} "
          f"(val = first {k} per class of the original train/, test = the original val/)")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/auto-data", help="folder to write the sets into (default /tmp/auto-data)")
    ap.add_argument("--sets", default=",".join(K_VAL), help="comma-separated: " + ", ".join(K_VAL))
    ap.add_argument("--force", action="store_true", help="rewrite a set that already exists")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        if name not in K_VAL:
            raise SystemExit(f"Error: unknown set {name!r}; choose from {', '.join(K_VAL)}")
        make_set(name, out, K_VAL[name], force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
