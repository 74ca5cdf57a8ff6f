"""Measure the run report on real data: a linear probe of timm tf_efficientnet_lite0 (real weights) on flowers12,
then: seconds to write report.html after the run, its size (as written, and with 32 thumbnails), the TensorBoard
pictures' cost per evaluation, and what headless Chromium sees (console errors, undecoded images).

    python benchmarks/report_bench.py [--weights ../shared/weights/tf_efficientnet_lite0.safetensors]
                                      [--data ../shared/data/flowers12] [--out /tmp/report-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=str(ROOT.parent / "shared/weights/tf_efficientnet_lite0.safetensors"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12"))
    ap.add_argument("--out", default="/tmp/report-bench")
    ap.add_argument("--recipe", default="linear-probe")
    args = ap.parse_args()

    import finetune
    from finetune.reporting import report as R

    timings: dict[str, list[float]] = {"report": [], "tensorboard": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[name].append(time.perf_counter() - t0)
        return wrapper

    R.write_run_report = timed("report", R.write_run_report)
    R.log_tensorboard = timed("tensorboard", R.log_tensorboard)
    r = finetune.load_recipe(args.recipe)
    r.model.name, r.model.weights, r.data.path = "timm:tf_efficientnet_lite0", args.weights, args.data
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = finetune.train(r, out=out / "run")
    total = time.perf_counter() - t0
    run = res.run_dir
    html = run / "report.html"
    numbers = json.loads((run / "report.json").read_text())
    ev = numbers["eval"]
    # the same report with 32 thumbnails (all mistakes, then the most uncertain correct ones)
    R.N_UNSURE = max(0, 32 - len(ev["wrong"]))
    R.write_run_report(run, out / "report32.html")
    n32 = len(json.loads((run / "report.json").read_text())["eval"]["wrong"]) + R.N_UNSURE
    from browser import open_page

    page = open_page(html, out / "report.png")
    page32 = open_page(out / "report32.html", out / "report32.png")
    print(json.dumps({
        "run_seconds": round(total, 1), "best_val_acc": res.best_val_acc,
        "report_seconds_after_run": round(timings["report"][0], 2),
        "tensorboard_seconds_per_eval": [round(x, 2) for x in timings["tensorboard"]],
        "report_bytes": html.stat().st_size, "thumbnails": len(ev["wrong"]) + len(ev["unsure"]),
        "report32_bytes": (out / "report32.html").stat().st_size, "report32_thumbnails": n32,
        "chromium_errors": len(page["errors"]) + len(page32["errors"]),
        "undecoded_images": sum(i["w"] == 0 for p in (page, page32) for i in p["images"]),
        "images": [len(page["images"]), len(page32["images"])],
        "confused_pairs": ev["confused_pairs"], "mistakes": ev["n_wrong_total"],
    }, indent=1))


if __name__ == "__main__":
    main()
