"""The speed benchmark on a CUDA GPU: finetune against the model-only ceiling, with and without torch.compile.

    python benchmarks/gpu_bench.py [--out benchmarks/results/gpu.md]   # on a machine with an NVIDIA GPU
    python benchmarks/gpu_bench.py --dry-run                           # the same code paths, on the CPU, tiny

Runs in one process: ``torch.backends.cudnn.benchmark = True``, bf16 autocast (fp16 where the card has no bf16),
channels_last; data are generated (an ImageFolder of random 256 px PNGs in a temporary folder: nothing to
download, nothing outside the repository to read), so the numbers measure the machine, not a data set.

Rows, per model (resnet18 and timm's tf_efficientnet_lite0, random init):

- model-only train step (forward + backward + SGD) and forward, eager and ``torch.compile``;
- ``finetune train`` (full fine-tune, 2 epochs, batch 64, pinned memory and non-blocking copies, the decoded-image
  cache, loader workers by finetune's rule), its second epoch's images/s from ``metrics.json``, eager and
  ``--compile``, as a fraction of the model-only step;
- ``finetune eval`` of that run's checkpoint (``--fast-inference`` auto and off): images/s of the whole call.

Writes a markdown table headed by the card's name (``torch.cuda.get_device_name``), torch/CUDA versions and the
date. ``--dry-run`` runs the rows on the CPU with 8 images per class at 64 px and 1-step timings (the table says
so), without the torch.compile rows (minutes of compiling on a CPU), to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import finetune  # noqa: E402
from finetune.config import apply_overrides, load_recipe  # noqa: E402


def make_data(root: Path, classes: int, per_class: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            d = root / split / f"c{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(c * 1000 + (split == "val"))
            for i in range(n):
                img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // 2 + np.uint8(c * 10)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def models() -> dict:
    import timm
    import torchvision

    return {"resnet18": (lambda: torchvision.models.resnet18(num_classes=12), "resnet18"),
            "tf_efficientnet_lite0": (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=12),
                                      "timm:tf_efficientnet_lite0")}


def ceiling_rows(name, make, device, size, batch, precision, quick) -> list[dict]:
    from bench import model_only

    rows = []
    kw = dict(size=size, classes=12, precision=precision, device=device, min_s=0.0 if quick else 3.0,
              min_steps=1 if quick else 20)
    for comp in (False, True)[:1 if quick else 2]:
        t0 = time.perf_counter()
        tr = model_only(make, train=True, batch=batch, compile_=comp, **kw)
        fw = model_only(make, train=False, batch=batch, compile_=comp, **kw)
        rows.append({"model": name, "what": f"model-only{' + torch.compile' if comp else ''}", "train_ips": tr,
                     "fwd_ips": fw, "wall_s": time.perf_counter() - t0})
    return rows


def finetune_rows(name, spec, data, device, size, batch, tmp, quick) -> list[dict]:
    rows = []
    for comp in (False, True)[:1 if quick else 2]:
        out = tmp / f"{name}-{'compiled' if comp else 'eager'}"
        r = apply_overrides(load_recipe("default"), {
            "model.name": spec, "model.weights": "none", "data.path": str(data), "data.image_size": size,
            "data.augment": "light", "optimizer.name": "sgd", "scheduler.name": "constant",
            "scheduler.warmup_epochs": 0.0, "train.epochs": 2, "train.batch_size": batch, "train.device": device,
            "train.compile": comp, "train.tensorboard": False, "train.graph": False, "train.report": False})
        t0 = time.perf_counter()
        res = finetune.train(r, out=out, overwrite=True)
        rows.append({"model": name, "what": f"finetune train{' --compile' if comp else ''} (epoch 2)",
                     "train_ips": res.epochs[-1]["images_per_sec"], "wall_s": time.perf_counter() - t0,
                     "val_acc": res.epochs[-1]["val_acc"]})
        if comp:
            continue
        for fast in ("auto", "off"):
            t0 = time.perf_counter()
            ev = finetune.evaluate_checkpoint(out / "last.pt", device=device, batch_size=batch, fast_inference=fast)
            secs = time.perf_counter() - t0
            rows.append({"model": name, "what": f"finetune eval --fast-inference {fast} (whole call)",
                         "fwd_ips": ev["n"] / secs, "wall_s": secs, "val_acc": ev["accuracy"]})
    return rows


def render(rows: list[dict], head: str) -> str:
    lines = [head, "", "| model | what | train img/s | of model-only step | forward img/s | wall s |",
             "|---|---|---|---|---|---|"]
    ceil = {r["model"]: r["train_ips"] for r in rows if r["what"] == "model-only"}
    for r in rows:
        tr = r.get("train_ips")
        frac = f"{tr / ceil[r['model']]:.2f}x" if tr and r["what"].startswith("finetune") else "-"
        fw = r.get("fwd_ips")
        lines.append(f"| {r['model']} | {r['what']} | {f'{tr:.1f}' if tr else '-'} | {frac} | "
                     f"{f'{fw:.1f}' if fw else '-'} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script without a GPU")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.md"))
    args = ap.parse_args(argv)
    logging.getLogger("finetune").setLevel(logging.ERROR)
    os.environ["FINETUNE_CACHE"] = "off"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    torch.backends.cudnn.benchmark = True
    precision = "bf16" if device == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    size, batch, per_class = (64, 8, 8) if args.dry_run else (224, 64, 64)
    tmp = Path(tempfile.mkdtemp(prefix="ftgpu-"))
    data = make_data(tmp / "data", 12, per_class, size + size // 8)
    card = "CPU (dry run: tiny sizes, timings mean nothing)" if args.dry_run else torch.cuda.get_device_name(0)
    head = (f"{card}; torch {torch.__version__}, CUDA {torch.version.cuda}, {precision} autocast, channels_last, "
            f"cudnn.benchmark, batch {batch}, {size} px, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    rows: list[dict] = []
    for name, (make, spec) in models().items():
        rows += ceiling_rows(name, make, device, size, batch, precision, args.dry_run)
        rows += finetune_rows(name, spec, data, device, size, batch, tmp, args.dry_run)
        print(render(rows, head), file=sys.stderr, flush=True)
    table = render(rows, head)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
