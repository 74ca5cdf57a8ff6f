"""Start-up budget: every ``finetune`` command timed as a whole process, beside the import floor (issue #29).

    python benchmarks/latency.py                  # everything (~15 min on an idle 2-core CPU)
    python benchmarks/latency.py --quick --runs 2 # no first-train / tutorial rows (~5 min idle, 15 loaded)
    python benchmarks/latency.py --out latency.md # also write the markdown table to a file

What a user waits for is the process, not a function: each row is the wall time of ``subprocess.run`` of
``python -m finetune ...`` (this interpreter, ``PYTHONPATH`` = this checkout), from fork to exit, output captured.
Beside them, in the same run, the **import floor**: ``python -c "import torch"`` (what any command that touches a
tensor pays), and a second reference, ``python -c "import torch, torch._dynamo"``: building any ``torch.optim``
optimizer and importing torchvision pull in ``torch._dynamo``, so a command that trains or uses torchvision pays
that too unless it avoids them. The fast commands and both floors are run interleaved, round after round, so
load from other jobs falls on all of them alike; the table gives the min (the least disturbed run: the goals are
judged on it) and the median of the runs.

Set-up (not timed in the table; its times go to stderr): a temp dir holds FINETUNE_CACHE (never ~/.cache) and
the run dirs; one ``finetune train --recipe linear-probe`` of ``timm:tf_efficientnet_lite0`` on the data makes
RUN (whose ``best.pt`` predict and eval restore) and puts the features in the store; one ``finetune probe`` and one
``finetune models 'resnet*'`` warm whatever they cache, and two ``predict`` runs of RUN/best.pt (timed: the second
keeps the checkpoint's inference graph) make the predict row the steady state. Rows:

- ``--help``, ``recipes``, ``models 'resnet*'``, ``runs DIR``, ``cache list``;
- three mistakes (a missing ``--data``, an unknown recipe, a missing weights file): each must exit non-zero with an
  ``Error:`` line; the time is the time to that exit;
- ``inspect timm:tf_efficientnet_lite0``, ``predict RUN/best.pt`` one image (the 3rd run on), ``eval RUN/best.pt``;
- a cached ``probe`` and a cached linear-probe ``train`` (the set-up's command, a new ``--out`` each time);
- unless ``--quick``: a first linear-probe ``train`` (a fresh FINETUNE_CACHE each time, so the features are
  computed) and the hand-written tutorial loop of the same 5 epochs (:data:`TUTORIAL`, its own process), and the
  ratio tutorial / first train (goal >= 10x).

Goals are issue #29's (2 cores, one run). Numbers from a loaded machine are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "timm:tf_efficientnet_lite0"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flowers12"
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"
FLOOR = "python -c 'import torch'"
FLOOR_DYNAMO = "python -c 'import torch, torch._dynamo'"
TARGET_RATIO = 10.0

# The loop a tutorial user writes for a linear probe of Lite0 (the PyTorch transfer-learning tutorial's shape):
# timm's model with a new classifier, the pretrained file minus its classifier, everything but the classifier
# frozen, the backbone in eval mode, SGD on the head, an ImageFolder with the eval transform decoded every epoch,
# val accuracy after each epoch under no_grad. argv: DATA WEIGHTS EPOCHS. Prints "val_acc <last>".
TUTORIAL = r'''
import sys
import timm
import torch
from safetensors.torch import load_file
from torchvision import datasets, transforms

data, weights, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
train_ds = datasets.ImageFolder(f"{data}/train")
val_ds = datasets.ImageFolder(f"{data}/val")
model = timm.create_model("tf_efficientnet_lite0", num_classes=len(train_ds.classes))
state = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier.")}
missing, unexpected = model.load_state_dict(state, strict=False)
assert sorted(missing) == ["classifier.bias", "classifier.weight"] and not unexpected, (missing, unexpected)
for p in model.parameters():
    p.requires_grad = False
for p in model.classifier.parameters():
    p.requires_grad = True
cfg = model.pretrained_cfg
tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                         transforms.Normalize(cfg["mean"], cfg["std"])])
train_ds.transform = tf
val_ds.transform = tf
train_loader = torch.utils.data.DataLoader(train_ds, batch_size=32, shuffle=True)
val_loader = torch.utils.data.DataLoader(val_ds, batch_size=32)
opt = torch.optim.SGD(model.classifier.parameters(), lr=0.01, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()
model.eval()  # the frozen backbone keeps its BatchNorm statistics; the head has no train-mode behaviour
for epoch in range(epochs):
    for x, y in train_loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    print(f"epoch {epoch + 1} val_acc {correct / total:.4f}", flush=True)
print(f"val_acc {correct / total:.4f}")
'''


@dataclass
class Row:
    """One timed command: its argv, how many runs, the goal, and what a successful run looks like."""

    name: str
    argv: list[str]
    runs: int
    goal: tuple[str, float] | None = None  # ("abs", s) | ("floor", s above the torch floor) | ("ratio", x)
    mistake: bool = False  # must exit non-zero with an "Error:" line
    env: dict | None = None
    fresh: object = None  # callable(i) -> (argv, env) for a run that needs its own dir / cache
    times: list[float] = field(default_factory=list)
    failure: str | None = None
    last_out: str = ""


def run_once(row: Row, i: int, base_env: dict, cwd: Path) -> None:
    argv, env = row.argv, row.env or base_env
    if row.fresh is not None:
        argv, env = row.fresh(i)
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    out = r.stdout + r.stderr
    row.last_out = out
    error_line = any(line.startswith("Error:") for line in out.splitlines())
    if row.mistake and (r.returncode == 0 or not error_line):
        row.failure = f"no Error line (rc {r.returncode})"
    elif not row.mistake and r.returncode != 0:
        row.failure = f"FAILED (rc {r.returncode})"
    if row.failure:
        print(f"latency: {row.name}: {row.failure}\n{out[-2000:]}", file=sys.stderr)
    row.times.append(dt)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def goal_text(goal: tuple[str, float] | None) -> str:
    if goal is None:
        return ""
    kind, v = goal
    return {"abs": f"<= {v:g} s", "floor": f"<= floor + {v:g} s", "ratio": f">= {v:g}x faster than tutorial"}[kind]


def goal_met(goal: tuple[str, float], lo: float, floor: float, ratio: float | None) -> bool:
    """Judged on the min: ``abs`` lo <= v; ``floor`` lo <= floor + v; ``ratio`` tutorial/first >= v."""
    kind, v = goal
    if kind == "abs":
        return lo <= v
    if kind == "floor":
        return lo <= floor + v
    return ratio is not None and ratio >= v


def table(rows: list[Row], floor: float, ratio: float | None) -> str:
    lines = ["| command | runs | min s | median s | min - floor | goal | met? |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if not r.times:
            continue
        lo, med = min(r.times), statistics.median(r.times)
        met = ""
        if r.failure:
            met = r.failure
        elif r.goal:
            met = "yes" if goal_met(r.goal, lo, floor, ratio) else "**no**"
        lines.append(f"| `{r.name}` | {len(r.times)} | {fmt(lo)} | {fmt(med)} | {lo - floor:+.2f} | "
                     f"{goal_text(r.goal)} | {met} |")
    return "\n".join(lines)


def pick_image(data: Path) -> Path:
    for split in ("val", "train"):
        d = data / split
        if d.is_dir():
            for cls in sorted(p for p in d.iterdir() if p.is_dir()):
                imgs = sorted(p for p in cls.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                if imgs:
                    return imgs[0]
    raise SystemExit(f"latency: no image found under {data}/val or {data}/train")


def setup_step(what: str, argv: list[str], env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"latency: set-up step '{what}' failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    print(f"latency: set-up {what}: {dt:.1f} s", file=sys.stderr)
    return dt


def last_val_acc(run_dir: Path) -> float | None:
    """The last epoch's val accuracy from RUN/metrics.json (the tutorial loop reports its last epoch too)."""
    import json

    try:
        eps = json.loads((run_dir / "metrics.json").read_text()).get("epochs") or []
    except (OSError, ValueError, AttributeError):
        return None
    acc = eps[-1].get("val_acc") if eps and isinstance(eps[-1], dict) else None
    return float(acc) if isinstance(acc, (int, float)) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="benchmarks/latency.py",
        description="Time each finetune command as a whole process beside the 'import torch' floor (issue #29).")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder with train/ and val/ "
                    "(default ../shared/data/flowers12 beside the checkout)")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                    help="Lite0 weights file (default ../shared/weights/tf_efficientnet_lite0.safetensors)")
    ap.add_argument("--runs", type=int, default=5,
                    help="runs of each fast command and of the floors (default 5); the commands that build a "
                         "model get min(N, 3), the first train and the tutorial loop --first-runs")
    ap.add_argument("--first-runs", type=int, default=1,
                    help="runs of the first linear-probe train and of the tutorial loop (default 1; ~30-60 s each)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the first train and the tutorial loop (5)")
    ap.add_argument("--quick", action="store_true", help="skip the first-train and tutorial rows")
    ap.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        ap.error(f"--data {args.data}: no train/ folder there (an image folder with train/ and val/)")
    if not args.weights.is_file():
        ap.error(f"--weights {args.weights}: no such file")
    if args.runs < 1 or args.first_runs < 1:
        ap.error("--runs and --first-runs must be >= 1")
    data, weights = args.data.resolve(), args.weights.resolve()
    py = sys.executable
    ft = [py, "-m", "finetune"]
    tmp = Path(tempfile.mkdtemp(prefix="finetune-latency-"))
    try:
        return bench(args, data, weights, py, ft, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench(args, data: Path, weights: Path, py: str, ft: list[str], tmp: Path) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["FINETUNE_CACHE"] = str(tmp / "cache")
    env.setdefault("HF_HUB_OFFLINE", "1")
    runs_dir = tmp / "runs"
    run = runs_dir / "lp"
    image = pick_image(data)
    load0 = os.getloadavg()[0]

    lp = ft + ["train", "--recipe", "linear-probe", "--model", MODEL, "--weights", str(weights), "--data", str(data)]
    probe = ft + ["probe", "--model", MODEL, "--weights", str(weights), "--data", str(data)]
    setup_s = setup_step("first linear-probe train (makes RUN, fills the feature store)",
                         lp + ["--out", str(run)], env, tmp)
    setup_step("probe (warm)", probe + ["--out", str(tmp / "probe-warm"), "--overwrite"], env, tmp)
    setup_step("models 'resnet*' (warm)", ft + ["models", "resnet*"], env, tmp)
    # predict keeps a checkpoint's inference graph at its second run (docs/evaluate-predict.md): the table's row is
    # every later one; the first two are timed here and named in the header.
    pred = ft + ["predict", str(run / "best.pt"), str(image)]
    pred_s = [setup_step(f"predict #{i} of RUN/best.pt", pred, env, tmp) for i in (1, 2)]

    fast, model_runs = args.runs, min(args.runs, 3)
    floor = Row(FLOOR, [py, "-c", "import torch"], fast)
    floor_dyn = Row(FLOOR_DYNAMO, [py, "-c", "import torch, torch._dynamo"], fast)
    rows = [
        floor, floor_dyn,
        Row("finetune --help", ft + ["--help"], fast, ("abs", 0.5)),
        Row("finetune recipes", ft + ["recipes"], fast, ("abs", 0.5)),
        Row("finetune models 'resnet*'", ft + ["models", "resnet*"], fast, ("abs", 1.0)),
        Row("finetune runs DIR", ft + ["runs", str(runs_dir)], fast, ("abs", 0.5)),
        Row("finetune cache list", ft + ["cache", "list"], fast, ("abs", 0.5)),
        Row("finetune train --data /nonexistent", ft + ["train", "--data", "/nonexistent"], fast, ("abs", 0.5),
            mistake=True),
        Row("finetune train --recipe nope", ft + ["train", "--recipe", "nope"], fast, ("abs", 0.5), mistake=True),
        Row(f"finetune train --model {MODEL} --weights /nonexistent.safetensors",
            ft + ["train", "--model", MODEL, "--weights", "/nonexistent.safetensors"], fast, ("abs", 0.5),
            mistake=True),
        Row(f"finetune inspect {MODEL}", ft + ["inspect", MODEL], model_runs),
        Row("finetune predict RUN/best.pt one.jpg (3rd and later)", pred, model_runs, ("floor", 1.5)),
        Row("finetune eval RUN/best.pt", ft + ["eval", str(run / "best.pt")], model_runs),
        Row("finetune probe (cached features)", probe, model_runs, ("floor", 1.5),
            fresh=lambda i: (probe + ["--out", str(tmp / f"probe-{i}"), "--overwrite"], env)),
        Row("finetune train --recipe linear-probe (cached features)", lp, model_runs, ("floor", 2.5),
            fresh=lambda i: (lp + ["--out", str(runs_dir / f"cached-{i}"), "--overwrite"], env)),
    ]
    # Interleaved rounds: round i runs every row that still wants a run, so load falls on all rows alike.
    for i in range(fast):
        for r in rows:
            if i < r.runs:
                run_once(r, i, env, tmp)
        print(f"latency: round {i + 1}/{fast} done", file=sys.stderr)

    ratio = first_acc = tut_acc = None
    if not args.quick:
        ep = ["--epochs", str(args.epochs)]

        def first(i):
            e = dict(env, FINETUNE_CACHE=str(tmp / f"cache-first-{i}"))
            return lp + ep + ["--out", str(runs_dir / f"first-{i}"), "--overwrite"], e

        first_row = Row("finetune train --recipe linear-probe (first: features computed)", lp, args.first_runs,
                        ("ratio", TARGET_RATIO), fresh=first)
        tut_row = Row(f"tutorial loop (timm + ImageFolder, SGD on the head, {args.epochs} epochs)",
                      [py, "-c", TUTORIAL, str(data), str(weights), str(args.epochs)], args.first_runs)
        for i in range(args.first_runs):
            run_once(first_row, i, env, tmp)
            run_once(tut_row, i, env, tmp)
        rows += [first_row, tut_row]
        if not first_row.failure and not tut_row.failure:
            ratio = min(tut_row.times) / min(first_row.times)
        first_acc = last_val_acc(runs_dir / "first-0")
        for line in tut_row.last_out.splitlines():
            if line.startswith("val_acc "):
                tut_acc = float(line.split()[1])

    f0, fd = min(floor.times), min(floor_dyn.times)
    import importlib.metadata as md

    def ver(p: str) -> str:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "-"

    head = [f"Start-up latency, {platform.node() or 'this machine'}: {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, torch {ver('torch')}, torchvision {ver('torchvision')}, timm {ver('timm')}; "
            f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. "
            f"Import floor (min): `import torch` {f0:.2f} s, `import torch, torch._dynamo` {fd:.2f} s. "
            f"Set-up first linear-probe train: {setup_s:.1f} s; the first two predicts of RUN/best.pt (the second "
            f"keeps its inference graph): {pred_s[0]:.1f} s, {pred_s[1]:.1f} s."]
    text = "\n".join(head) + "\n\n" + table(rows, f0, ratio) + "\n"
    if not args.quick:
        acc = lambda a: "-" if a is None else f"{100 * a:.1f}%"  # noqa: E731
        text += (f"\nTutorial loop / first linear-probe train (min wall times): "
                 f"**{'-' if ratio is None else f'{ratio:.1f}x'}** (goal >= {TARGET_RATIO:g}x); val accuracy "
                 f"finetune {acc(first_acc)}, tutorial {acc(tut_acc)} (last epoch of each).\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    failed = [r.name for r in rows if r.failure]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
