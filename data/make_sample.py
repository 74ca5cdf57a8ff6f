"""Generate data/sample deterministically: small photos of shapes on cluttered backgrounds.

    python data/make_sample.py            # writes data/sample/{train,val}/<class>/*.png

Four classes (circle, cross, square, triangle); each image is 32x32 RGB with a random-coloured shape of random
size, position and rotation on a noisy gradient background with a few distractor lines. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "cross", "square", "triangle")
SIZE = 32
SCALE = 4  # draw at 4x and downsample, for anti-aliased edges


def _polygon(cx, cy, r, n, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def draw(label: str, rng: np.random.Generator) -> Image.Image:
    s = SIZE * SCALE
    # background: a random two-colour gradient plus noise
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, s)[:, None, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    bg = (c0 * (1 - t) + c1 * t) * np.ones((s, s, 1))
    img = Image.fromarray(bg.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 3)):  # distractor lines
        pts = [tuple(rng.integers(0, s, 2).tolist()) for _ in range(2)]
        d.line(pts, fill=tuple(rng.integers(0, 256, 3).tolist()), width=int(rng.integers(2, 5)))
    # the shape, in a colour far enough from the local background to be visible
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - (c0 + c1) / 2).sum() > 150:
            break
    fill = tuple(colour.tolist())
    r = rng.uniform(0.26, 0.44) * s
    cx, cy = rng.uniform(r, s - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if label == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif label == "square":
        d.polygon(_polygon(cx, cy, r * 1.1, 4, angle), fill=fill)
    elif label == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.15, 3, angle), fill=fill)
    else:  # cross: two rotated bars
        w = r * 0.32
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            d.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                       (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fill)
    img = img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 8, (SIZE, SIZE, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "sample"))
    ap.add_argument("--train", type=int, default=160, help="train images per class")
    ap.add_argument("--val", type=int, default=40, help="val images per class")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    for split, n, offset in (("train", args.train, 0), ("val", args.val, 1_000_000)):
        for ci, label in enumerate(CLASSES):
            folder = out / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([args.seed, offset, ci, i])
                draw(label, rng).save(folder / f"{label}_{i:04d}.png", optimize=True)
    print(f"wrote {out}: {len(CLASSES)} classes, {args.train}/{args.val} train/val images per class")


if __name__ == "__main__":
    main()
