"""Where a training epoch's time goes: torch.profiler over ``finetune.train`` (one process, CPU).

    python benchmarks/profile_epoch.py [--model resnet18] [--per-class 10] [--epochs 2]

A full fine-tune (nothing frozen, so the full model runs every step; ``augment: light``, the default) of resnet18
(random init, saved to a file: no download) on ``--per-class`` train images per class of ../shared/data/flowers12
(else the bundled sample), batch 32, finetune's defaults (bf16 autocast + channels_last on a CPU with native bf16,
the decoded-image cache, fused SGD). The LAST epoch is profiled (the first one fills the decoded-image cache).
Prints the top operators by self CPU time and the share of the epoch spent waiting for the next batch
(``DataLoader.__next__``: decoding/augmenting when the loader runs in this process), in backward operators and in
the optimizer step (the profiler's own autograd / ``Optimizer.step`` events).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import finetune  # noqa: E402
from finetune.run.callbacks import Callback  # noqa: E402
from finetune.config import apply_overrides, load_recipe  # noqa: E402


class ProfileLastEpoch(Callback):
    """Starts the profiler when the last epoch starts and stops it when that epoch ends."""

    def __init__(self, epochs: int):
        self.epochs, self.prof, self.wall = epochs, None, None

    def on_epoch_start(self, st, epoch, phase):
        if epoch == self.epochs - 1:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            self.prof.__enter__()

    def on_epoch_end(self, st, row):
        if self.prof is not None and self.wall is None:
            self.prof.__exit__(None, None, None)
            self.wall = row


def subset(root: Path, k: int, tmp: Path) -> Path:
    for split, n in (("train", k), ("val", max(1, k // 3))):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            (tmp / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                (tmp / split / cls.name / f.name).symlink_to(f.resolve())
    return tmp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    logging.getLogger("finetune").setLevel(logging.ERROR)
    os.environ["FINETUNE_CACHE"] = "off"
    tmp = Path(tempfile.mkdtemp(prefix="ftprof-"))
    shared = REPO.parent / "shared" / "data" / "flowers12"
    root = subset(shared, args.per_class, tmp / "data") if shared.is_dir() else REPO / "data" / "sample"
    classes = len([p for p in (root / "train").iterdir() if p.is_dir()])
    torch.manual_seed(0)
    w = tmp / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=classes).state_dict(), w)
    r = apply_overrides(load_recipe("default"), {
        "model.name": "resnet18", "model.weights": str(w), "data.path": str(root), "data.image_size": 224,
        "optimizer.name": "sgd", "scheduler.name": "constant", "scheduler.warmup_epochs": 0.0,
        "train.epochs": args.epochs, "train.batch_size": 32, "train.tensorboard": False, "train.graph": False,
        "train.report": False})
    cb = ProfileLastEpoch(args.epochs)
    res = finetune.train(r, out=tmp / "run", overwrite=True, callbacks=[cb])
    ev = cb.prof.key_averages()
    row = res.epochs[-1]
    epoch_us = row["seconds"] * 1e6  # the training pass alone (validation follows it inside the profiled span)
    total = sum(e.self_cpu_time_total for e in ev)

    def incl(pred) -> float:
        return sum(e.cpu_time_total for e in ev if pred(e.key))

    data_us = incl(lambda k: k.startswith("enumerate(DataLoader)"))
    opt_us = incl(lambda k: k.startswith("Optimizer.step#"))
    back_us = sum(e.self_cpu_time_total for e in ev if e.key.endswith("_backward") or "Backward" in e.key)
    print(f"resnet18 224 px, full fine-tune, batch 32, {row.get('images_per_sec', 0):.1f} img/s in the profiled "
          f"epoch ({row['seconds']:.1f} s for the train pass; the last of {args.epochs} epochs profiled); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rest = epoch_us - data_us - opt_us
    print(f"train pass {epoch_us / 1e6:.2f} s: waiting for batches (DataLoader.__next__, in this process) "
          f"{data_us / 1e6:.2f} s = {100 * data_us / epoch_us:.1f}%; optimizer step {opt_us / 1e6:.2f} s = "
          f"{100 * opt_us / epoch_us:.1f}%; forward + backward + the rest {rest / 1e6:.2f} s = "
          f"{100 * rest / epoch_us:.1f}% (backward operators' own time {back_us / 1e6:.2f} s over train + val)")
    print()
    print("| operator | self CPU s | share of all self CPU time | calls |")
    print("|---|---|---|---|")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {100 * e.self_cpu_time_total / total:.1f}% | "
              f"{e.count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
