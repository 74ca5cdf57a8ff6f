"""Runs side by side: ``finetune runs [DIR]`` lists the run directories under DIR, ``finetune compare A B ...``
shows how their configurations differ and what they reached (``--html``: curves overlaid, figures inline).

Reads only ``config.yaml``, ``metrics.json`` and the run marker: no torch, no checkpoint is opened, so listing a
folder of hundreds of runs takes a moment.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError

MARKER = ".finetune-run"  # finetune.checkpoint.MARKER (that module imports torch)


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (
        (path / "metrics.json").is_file() or (path / MARKER).is_file())


def read_run(path: str | Path) -> dict[str, Any]:
    """One run as a row: name, path, model, recipe, best val acc/epoch, epochs done / planned, wall time, date,
    the flattened resolved recipe (``config``) and the per-epoch metrics."""
    import yaml

    path = Path(path)
    if not is_run(path):
        raise ConfigError(f"'{path}' is not a finetune run directory (no config.yaml and metrics.json); see "
                          "finetune runs")
    cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {"best": {}, "epochs": []}
    marker = path / MARKER
    started = marker.stat().st_mtime if marker.is_file() else (path / "config.yaml").stat().st_mtime
    ended = metrics_file.stat().st_mtime if metrics_file.is_file() else None
    epochs = metrics.get("epochs", [])
    best = metrics.get("best") or {}
    return {"name": path.name, "path": str(path), "model": (cfg.get("model") or {}).get("name"),
            "recipe": cfg.get("name", ""), "best_val_acc": best.get("val_acc"), "best_epoch": best.get("epoch"),
            "epochs": len(epochs), "epochs_planned": (cfg.get("train") or {}).get("epochs"),
            "wall_seconds": (ended - started) if ended else None,
            "train_seconds": sum(r.get("seconds") or 0 for r in epochs),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
            "report": (path / "report.html").is_file(), "config": flatten(cfg), "history": epochs}


def list_runs(root: str | Path = "runs", depth: int = 2) -> list[dict[str, Any]]:
    """The runs under ``root`` (itself, its subfolders, and theirs: a multi-model probe nests one level), oldest
    first; without their config and history."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"folder '{root}' not found; finetune runs takes the folder your runs are in (default "
                          "runs/, where finetune train writes them)")
    found: list[Path] = []
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            if is_run(d):
                found.append(d)
            else:
                nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        level = nxt
    rows = [read_run(p) for p in found]
    for r in rows:
        del r["config"], r["history"]
    return sorted(rows, key=lambda r: (r["date"], r["path"]))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def compare_runs(paths: list[str | Path]) -> dict[str, Any]:
    """``runs`` (rows as :func:`read_run`) and ``differences``: every recipe key whose value is not the same in
    all runs (``name``/``description`` included), as ``{key: [value per run]}`` in key order."""
    if len(paths) < 2:
        raise ConfigError("finetune compare takes at least two run directories (see finetune runs)")
    runs = [read_run(p) for p in paths]
    keys = sorted(set().union(*(r["config"] for r in runs)))
    missing = object()
    diff = {k: [r["config"].get(k, missing) for r in runs] for k in keys}
    diff = {k: [None if v is missing else v for v in vs] for k, vs in diff.items()
            if any(v != vs[0] for v in vs[1:])}
    return {"runs": runs, "differences": diff}


def compare_figure(runs: list[dict]):
    """Train/val loss and val accuracy per epoch, one colour per run."""
    from finetune.report import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, r in enumerate(runs):
        colour = f"C{i % 10}"
        h = r["history"]
        for ax, key, style in ((axes[0], "train_loss", "-"), (axes[0], "val_loss", "--"), (axes[1], "val_acc", "-"),
                               (axes[2], "train_acc", "-")):
            pts = [(e["epoch"], e[key]) for e in h if e.get(key) is not None]
            if pts:
                scale = 100 if key.endswith("acc") else 1
                ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], style, color=colour, marker="o", ms=3,
                        label=f"{r['name']}" + (" (val)" if key == "val_loss" else ""))
    for ax, title in zip(axes, ("loss (solid: train, dashed: val)", "val accuracy (%)", "train accuracy (%)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_compare_html(result: dict[str, Any], out: str | Path) -> Path:
    """The comparison as one self-contained HTML page (curves overlaid, inline)."""
    from finetune.report import _CSS, _MARK, _e, _png, _table, check_out

    out = check_out(out)
    runs = result["runs"]
    fig = _png(compare_figure(runs))
    metrics = _table(["run", "model", "recipe", "best val acc", "best epoch", "epochs", "train s", "date"],
                     [[r["name"], r["model"], r["recipe"], _acc(r["best_val_acc"]), r["best_epoch"],
                       f"{r['epochs']}/{r['epochs_planned']}", f"{r['train_seconds']:.1f}", r["date"]]
                      for r in runs])
    diff = _table(["key", *[r["name"] for r in runs]],
                  [[k, *[_short(v) for v in vs]] for k, vs in result["differences"].items()])
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{_MARK}<title>finetune compare: "
            f"{_e(', '.join(r['name'] for r in runs))}</title><style>{_CSS}</style></head><body>"
            f"<h1>Comparison of {len(runs)} runs</h1><h2>Metrics</h2>{metrics}<h2>Curves</h2>"
            f'<img class="fig" id="fig-compare" src="{fig}" alt="curves of the runs"><h2>Configuration differences'
            f"</h2>{diff if result['differences'] else '<p>None: the runs have the same configuration.</p>'}"
            "</body></html>")
    from finetune.checkpoint import atomic_write_text

    atomic_write_text(out, page)
    return out


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."
