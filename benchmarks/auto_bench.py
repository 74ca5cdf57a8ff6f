"""finetune auto against the choices picked in hindsight and against fastai, on real photos with a test split.

For each data set (train/val/test folders; ``benchmarks/auto_data.py`` makes them from ../shared/data), with the real
ImageNet EfficientNet-Lite0 and Lite1 weights (../shared/weights):

1. ``finetune auto --model lite0=W0,lite1=W1 --budget B`` with an empty feature cache (the feature passes count);
2. in hindsight, each backbone's linear probe (``train --recipe linear-probe``) and, with ``--lpft``, its default
   LP-FT (``train --model X --weights W``, 5 epochs), each with its own wall time;
3. with ``--fastai``, fastai's ``vision_learner(...).fine_tune()`` on the same backbones and weights, sized to auto's
   wall time (``benchmarks/fastai_peer.py``).

Every accuracy is best.pt's (or fastai's final model's) on the test split, which nothing selected on; ± is the half
width of the 95% Wilson interval. Prints a markdown table; ``--json FILE`` keeps the rows.

    python benchmarks/auto_data.py --out /tmp/auto-data
    python benchmarks/auto_bench.py --data /tmp/auto-data/flowers12 --budget 12m --lpft --fastai
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights"
MODELS = {"lite0": ("timm:tf_efficientnet_lite0", WEIGHTS / "tf_efficientnet_lite0.safetensors"),
          "lite1": ("timm:tf_efficientnet_lite1", WEIGHTS / "tf_efficientnet_lite1.safetensors")}


def finetune(*args, env=None) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "finetune", *map(str, args), "--quiet"], check=True, env=env, cwd=ROOT)
    return time.monotonic() - t0


def test_acc(run: Path) -> tuple[float | None, int | None]:
    m = json.loads((run / "metrics.json").read_text())
    t = m.get("test") or {}
    return t.get("accuracy"), t.get("n")


def pm(acc, n) -> str:
    sys.path.insert(0, str(ROOT))
    from finetune.training.stats import pm_text

    return "-" if acc is None else f"{100 * acc:.1f}% {pm_text(acc, n)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--budget", default="12m")
    ap.add_argument("--out", default="/tmp/auto-bench")
    ap.add_argument("--lpft", action="store_true", help="also each backbone's default LP-FT (slow on a CPU)")
    ap.add_argument("--fastai", action="store_true", help="also fastai's fine_tune in auto's wall time")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    name = Path(a.data).name
    out = Path(a.out) / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "FINETUNE_CACHE": str(out / "cache")}  # empty: auto pays for its feature passes
    rows = []
    models = ",".join(f"{m}={w}" for m, w in MODELS.values())
    wall = finetune("auto", "--data", a.data, "--model", models, "--budget", a.budget, "--out", out / "auto", env=env)
    doc = json.loads((out / "auto" / "auto.json").read_text())
    w = doc["candidates"][doc["winner"]]
    rows.append({"run": f"auto --budget {a.budget}", "choice": f"{w['model']}, {doc['strategy']}, {doc['epochs']} ep",
                 "test": test_acc(out / "auto"), "seconds": wall})
    for key, (model, weights) in MODELS.items():
        s = finetune("train", "--recipe", "linear-probe", "--model", model, "--weights", weights, "--data", a.data,
                     "--out", out / f"lp-{key}", env=env)
        rows.append({"run": f"linear probe {key}", "choice": "linear-probe recipe", "test": test_acc(out / f"lp-{key}"),
                     "seconds": s})
        if a.lpft:
            s = finetune("train", "--model", model, "--weights", weights, "--data", a.data, "--out",
                         out / f"lpft-{key}", env=env)
            rows.append({"run": f"LP-FT {key}", "choice": "lp-ft recipe, 5 ep", "test": test_acc(out / f"lpft-{key}"),
                         "seconds": s})
    if a.fastai:
        for key, (model, weights) in MODELS.items():
            res = out / f"fastai-{key}.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "fastai_peer.py"), "--data", a.data, "--model",
                   model.split(":", 1)[1], "--weights", str(weights), "--wall-seconds", str(int(wall)), "--json",
                   str(res)]
            t0 = time.monotonic()
            subprocess.run(cmd, check=True, cwd=ROOT)
            r = json.loads(res.read_text())
            r = r[-1] if isinstance(r, list) else r
            rows.append({"run": f"fastai fine_tune {key}", "choice": f"{r.get('epochs')} ep in {int(wall)} s",
                         "test": (r.get("test_acc"), r.get("test_n")), "seconds": time.monotonic() - t0})
    print(f"\n{name} (budget {a.budget}; test accuracy of the selected model, 95% interval)\n")
    print("| run | what | test acc | wall s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['choice']} | {pm(*r['test'])} | {r['seconds']:.0f} |")
    print("\nauto's candidates:")
    for c in doc["candidates"]:
        print(f"  {c['model']}: {c.get('status')} {pm(c.get('acc'), c.get('n'))} ({c.get('n')} images), "
              f"{c.get('images_per_sec') or 0:.3g} img/s, {c.get('seconds', 0):.0f} s")
    for r in doc["reasons"]:
        print(f"  - {r}")
    print(f"  stages: {doc['stages']}, total {doc['seconds']:.0f} s of {doc['budget_seconds']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "auto": doc}, indent=1))


if __name__ == "__main__":
    main()
