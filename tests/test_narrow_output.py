"""Issue #30: every output mode readable at 80 columns or piped (rich's default width there): probe's commands on
one line each, eval's per-class numbers never elided, cache list's model and data path whole."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.cli import render

FLOWERS = ["bluebell", "buttercup", "colts_foot", "cowslip", "crocus", "daffodil", "daisy", "dandelion",
           "fritillary", "iris", "pansy", "[bold]x"]


@pytest.fixture
def width(monkeypatch):
    def set_width(w: int) -> None:
        monkeypatch.setattr(render.console, "_width", w)

    return set_width


def _printed(fn, *args) -> str:
    with render.console.capture() as c:
        fn(*args)
    return c.get()


def _eval_result(names: list[str]) -> dict:
    conf = [[20 if i == j else 0 for j in range(len(names))] for i in range(len(names))]
    conf[0][1] = 3
    per_class = {n: 20 / 23 if i == 0 else 1.0 for i, n in enumerate(names)}
    per_class[names[-2]] = None
    return {"checkpoint": "runs/lp1/best.pt", "epoch": 3, "data": "/d/flowers", "n": 20 * len(names) + 3,
            "accuracy": 0.9, "top5": 1.0, "balanced_accuracy": 0.9, "macro_f1": 0.9, "loss": 0.3,
            "class_names": names, "confusion": conf, "per_class": per_class}


HEADER = ("runs/lp1/best.pt (epoch 3) on /d/flowers (val split): 243 images\n"
          "accuracy 90.00% ± 3.8 (95%, 243 images)   top-5 100.00%   balanced accuracy 90.00%   macro-F1 90.00%   "
          "loss 0.3000\n")


def test_eval_at_80_columns_lists_per_class_accuracy_instead_of_an_elided_matrix(width):
    from finetune.cli.eval_cmd import _show

    width(80)
    assert _printed(_show, _eval_result(FLOWERS), "val") == HEADER + (
        "per-class accuracy (n: the class's images in this split)\n"
        "class         accuracy   n    class         accuracy   n\n"
        "bluebell         87.0%  23    daisy           100.0%  20\n"
        "buttercup       100.0%  20    dandelion       100.0%  20\n"
        "colts_foot      100.0%  20    fritillary      100.0%  20\n"
        "cowslip         100.0%  20    iris            100.0%  20\n"
        "crocus          100.0%  20    pansy       no samples  20\n"
        "daffodil        100.0%  20    [bold]x         100.0%  20\n"
        "confusion matrix: --json, or --report FILE (too wide for 80 columns)\n")
    width(40)  # two entries a line do not fit: one
    lines = _printed(_show, _eval_result(FLOWERS), "val").splitlines()
    assert lines[3:6] == ["class         accuracy   n", "bluebell         87.0%  23", "buttercup       100.0%  20"]
    assert lines[-1] == "confusion matrix: --json, or --report FILE (too wide for 40 columns)" and len(lines) == 17


def test_eval_shows_the_whole_matrix_where_it_fits(width):
    from finetune.cli.eval_cmd import _show

    width(200)
    out = _printed(_show, _eval_result(FLOWERS), "val")
    assert out.startswith(HEADER) and "…" not in out and "per-class accuracy" not in out
    row = next(x for x in out.splitlines() if "bluebell " in x and "87.0%" in x)
    assert row.split("│")[1:-1] == [" bluebell   ", *[f"{v:>{len(n[:10]) + 2}}" for v, n in
                                                       zip(["20 ", "3 "] + ["0 "] * 10, FLOWERS)], "      87.0% "]
    width(80)  # three short classes fit 80 columns: the matrix, every name whole
    small = _printed(_show, _eval_result(["cat", "dog", "eel"]), "val")
    assert "│ cat   │  20 │   3 │   0 │      87.0% │" in small and "no samples" in small and "…" not in small


def _probe_result(run_dir: str) -> SimpleNamespace:
    head = SimpleNamespace(lr=1e-3, weight_decay=1e-4, val_acc=0.95, val_loss=0.2, train_loss=0.1, within_noise=True)
    return SimpleNamespace(model="timm:tf_efficientnet_lite0", weights="default", train_images=720, val_images=240,
                           feature_dim=1280, from_store=False, features_seconds=3.0, sweep_seconds=1.0, heads=[head],
                           best=0, top=0, val_acc_pm=0.027, knn={10: 0.9}, run_dir=run_dir)


def test_probe_prints_its_commands_unwrapped_without_trailing_spaces(width):
    from finetune.cli.probe_cmd import render as show

    width(80)
    d = "runs/2026-01-02-030405-probe-with-a-long-name"
    lines = _printed(show, [_probe_result(d)]).splitlines()
    assert lines[-1] == (f"best head -> {d}/best.pt  (finetune eval {d}/best.pt; fine-tune from it: finetune train "
                         f"--model timm:tf_efficientnet_lite0 --weights {d}/best.pt ...)")
    assert lines[-4:-1] == ["val: 240 images, ± 2.7 points (95%) at the top; ≈: within noise of the top (1 of 1 heads)",
                            "best: the lowest val loss of them, and the top accuracy",
                            "k-NN (cosine): k=10: 90.00% ± 3.8"]
    assert lines[-4] == lines[-4].rstrip()  # the lines under the table: exact, so no trailing spaces (the table
    # itself, its title included, is rich's as before)


def test_cache_list_at_80_columns_keeps_model_and_data_whole(width, monkeypatch, cli):
    from finetune.speedups import feature_store as featstore

    data = "/work/shared/data/flowers12-a-long-folder-name/train"
    meta = {"model": "timm:tf_efficientnet_lite0", "weights": "default", "data": data, "split_of_data": "train",
            "images": 720, "shape": [720, 1280], "precision": "fp32"}
    e = SimpleNamespace(key="ab" * 32, meta=meta, bytes=3_700_000, last_used=time.time(), temp=False,
                        writer_alive=None, path=Path("/c/ab"))
    monkeypatch.setattr(featstore, "entries", lambda cache_dir=None, temp=False: [e])
    width(80)
    r = cli("cache", "list")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "timm:tf_efficientnet_lite0" in r.stdout and "…" not in r.stdout and max(len(x) for x in lines[1:-2]) == 80
    assert data in "".join(x.split("│")[2].strip() for x in lines if x.startswith("│"))  # folded, whole
    assert lines[-2:] == ["columns left out to fit 80: key, precision, features, split, last used; --json has them",
                          "1 entries, 3.5 MB"]
    width(300)
    r = cli("cache", "list")
    assert "abababababab" in r.stdout and "columns left out" not in r.stdout and data in r.stdout
