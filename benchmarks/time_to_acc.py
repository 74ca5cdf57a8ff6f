"""Time to accuracy: wall seconds until val accuracy first reaches a target, finetune vs timm's train.py vs a hand loop.

    python benchmarks/time_to_acc.py [--epochs 5] [--target 0.9] [--timm-train PATH/train.py]

All start from the same real ImageNet weights (../shared/weights/tf_efficientnet_lite0.safetensors, timm's
``tf_efficientnet_lite0``) on ../shared/data/flowers12 (720 train / 240 val photos, 12 classes), in one run of this
script, one after the other (never side by side):

- finetune's default for a pretrained model (the ``lp-ft`` recipe: head on cached features for 1 epoch, then
  everything at 0.1x LR), the ``linear-probe`` recipe and the ``full-finetune`` recipe (everything trains from the
  first step, as in timm's run: the like-for-like row for wall time at equal epochs), through ``finetune.train``;
  the wall clock starts before the call (data set construction, model build and the feature pass included) and is
  read at every epoch end by a listener.
- timm's ``train.py`` (not in timm's sdist on PyPI: ``pip download --no-deps timm==<version> --no-binary :all:``
  holds only the package and tests; take it from the GitHub repository at the installed version), run as a
  subprocess with its best CPU flags: ``--device cpu --amp --amp-dtype bfloat16 --channels-last --pretrained
  --pretrained-path W --num-classes 12``, batch 32, ``-j 0`` (no loader processes on 2 cores) and its defaults
  otherwise (SGD, cosine, warm-up, its default augmentation, label smoothing 0.1). Its epoch ends are read from
  the ``summary.csv`` it writes after every epoch; the clock starts at the subprocess start (interpreter start-up
  included).
- the hand loop of ``benchmarks/bench.py`` (``lite0_hand``: everything trains, bf16 + channels_last, SGD 0.01).

Prints a markdown table: per contender, val accuracy per epoch, seconds to the target (or "not reached in N
epochs") and seconds for all epochs; writes benchmarks/results/time_to_acc.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import finetune  # noqa: E402
from finetune.run.callbacks import Callback  # noqa: E402
from finetune.config import apply_overrides, load_recipe  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"
DATA = REPO.parent / "shared" / "data" / "flowers12"
MODEL = "tf_efficientnet_lite0"


class EpochClock(Callback):
    """Wall seconds since ``t0`` and val accuracy at every epoch end."""

    def __init__(self, t0: float):
        self.t0, self.rows = t0, []

    def on_epoch_end(self, run, row):
        self.rows.append({"epoch": row["epoch"], "val_acc": row["val_acc"], "wall_s": time.perf_counter() - self.t0})


def run_finetune(recipe: str, epochs: int, tmp: Path) -> list[dict]:
    over = {"model.name": f"timm:{MODEL}", "model.weights": str(WEIGHTS), "data.path": str(DATA),
            "train.epochs": epochs, "train.tensorboard": False, "train.graph": False, "train.report": False}
    t0 = time.perf_counter()
    clock = EpochClock(t0)
    finetune.train(apply_overrides(load_recipe(recipe), over), out=tmp / recipe, overwrite=True, callbacks=[clock])
    return clock.rows


def run_timm(train_py: Path, epochs: int, tmp: Path) -> list[dict]:
    out = tmp / "timm"
    cmd = [sys.executable, str(train_py), str(DATA), "--train-split", "train", "--val-split", "val",
           "--model", MODEL, "--pretrained", "--pretrained-path", str(WEIGHTS), "--num-classes", "12",
           "--device", "cpu", "--amp", "--amp-dtype", "bfloat16", "--channels-last", "-b", "32", "-j", "0",
           "--epochs", str(epochs), "--output", str(out), "--experiment", "run", "--log-interval", "1000"]
    print("[timm] " + " ".join(cmd), file=sys.stderr, flush=True)
    rows: list[dict] = []
    summary = out / "run" / "summary.csv"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp))
    log = []
    for line in proc.stdout:  # every line is a chance to see a new summary row, as soon as timm writes it
        log.append(line)
        _read_summary(summary, rows, t0)
    proc.wait()
    _read_summary(summary, rows, t0)
    if proc.returncode != 0:
        raise RuntimeError("timm train.py failed:\n" + "".join(log[-30:]))
    return rows


def _read_summary(path: Path, rows: list[dict], t0: float) -> None:
    if not path.is_file():
        return
    with open(path) as f:
        got = list(csv.DictReader(f))
    for r in got[len(rows):]:
        rows.append({"epoch": int(r["epoch"]) + 1, "val_acc": float(r["eval_top1"]) / 100,
                     "wall_s": time.perf_counter() - t0})


def run_hand(epochs: int) -> list[dict]:
    from bench import lite0_hand

    res = lite0_hand(WEIGHTS, DATA, epochs, head_only=False, bf16=True)
    return [{"epoch": i + 1, **e} for i, e in enumerate(res["per_epoch"])]


def first_at(rows: list[dict], target: float) -> float | None:
    return next((r["wall_s"] for r in rows if r["val_acc"] >= target), None)


def render(info: dict) -> str:
    t = info["target"]
    lines = [f"EfficientNet-Lite0 (ImageNet weights) on flowers12, target val acc {100 * t:.0f}%, {info['epochs']} "
             f"epochs each, {info['machine']}; {info['note']}", "",
             f"| run | val acc per epoch | s to {100 * t:.0f}% | s for all epochs | s per epoch after the first |",
             "|---|---|---|---|---|"]
    for name, rows in info["runs"].items():
        if not rows:
            lines.append(f"| {name} | failed | - | - | - |")
            continue
        hit = first_at(rows, t)
        per = (rows[-1]["wall_s"] - rows[0]["wall_s"]) / max(len(rows) - 1, 1)
        accs = " ".join(f"{100 * r['val_acc']:.1f}" for r in rows)
        reached = f"{hit:.1f}" if hit is not None else f"not reached in {len(rows)} epochs"
        lines.append(f"| {name} | {accs} | {reached} | "
                     f"{rows[-1]['wall_s']:.1f} | {per:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--timm-train", default=None, help="timm's train.py (skipped when not given)")
    ap.add_argument("--only", default="lp-ft,linear-probe,full-finetune,timm,hand")
    ap.add_argument("--note", default="", help="a line about the machine's load, printed with the table")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "time_to_acc.json"))
    args = ap.parse_args(argv)
    if not (WEIGHTS.is_file() and DATA.is_dir()):
        print(f"needs {WEIGHTS} and {DATA}", file=sys.stderr)
        return 2
    logging.getLogger("finetune").setLevel(logging.ERROR)
    os.environ["FINETUNE_CACHE"] = "off"  # every run computes its features: no run profits from an earlier one
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="ftta-"))
    only = args.only.split(",")
    info = {"target": args.target, "epochs": args.epochs, "note": args.note, "runs": {},
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}"}
    todo = [("finetune default (lp-ft)", "lp-ft", lambda: run_finetune("lp-ft", args.epochs, tmp)),
            ("finetune linear-probe", "linear-probe", lambda: run_finetune("linear-probe", args.epochs, tmp)),
            ("finetune full-finetune", "full-finetune", lambda: run_finetune("full-finetune", args.epochs, tmp)),
            ("timm train.py (bf16, channels_last)", "timm",
             lambda: run_timm(Path(args.timm_train), args.epochs, tmp) if args.timm_train else []),
            ("hand loop (bf16, channels_last)", "hand", lambda: run_hand(args.epochs))]
    for name, key, fn in todo:
        if key not in only or (key == "timm" and not args.timm_train):
            continue
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            info["runs"][name] = fn()
        except Exception as e:  # noqa: BLE001 - one contender failing must not lose the others' numbers
            print(f"[{name}] failed: {e}", file=sys.stderr, flush=True)
            info["runs"][name] = []
        print(f"[{name}] {info['runs'][name]}", file=sys.stderr, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=2))
    print(render(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
