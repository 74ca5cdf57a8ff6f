"""Runs side by side: ``finetune runs [DIR]`` lists the run directories under DIR, ``finetune compare A B ...``
shows how their configurations differ and what they reached (``--html``: curves overlaid, figures inline).

Reads only ``config.yaml``, ``metrics.json`` and the run marker: no torch, no checkpoint is opened, so listing a
folder of hundreds of runs takes a moment.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError, shown
from finetune.reporting.html import CSS, MARK, check_out, esc, mpl_text, png, pyplot, table
from finetune.training.stats import half_width, pm_text, tied, wilson

MARKER = ".finetune-run"  # finetune.run.checkpoint.MARKER (that module imports torch)
log = logging.getLogger("finetune")

# the numbers of an epoch row in metrics.json that runs/compare/the curves read (each a number or null)
_NUMBERS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_sec")


class MalformedRun(ConfigError):
    """A run directory whose config.yaml or metrics.json cannot be read as finetune writes them; ``runs`` and
    ``compare`` skip it with a warning."""


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (
        (path / "metrics.json").is_file() or (path / MARKER).is_file())


def read_run(path: str | Path) -> dict[str, Any]:
    """One run as a row: name, path, model, recipe, best val acc/epoch, the val images it was measured on and its
    95% Wilson interval (``best_val_acc_ci``: [low, high], None when the run did not record its val count), epochs
    done / planned, wall time, date, the flattened resolved recipe (``config``) and the per-epoch metrics."""
    import yaml

    path = Path(path)
    if not is_run(path):
        raise ConfigError(f"'{shown(path)}' is not a finetune run directory (no config.yaml and metrics.json); see "
                          "finetune runs")
    metrics_file = path / "metrics.json"
    what = path / "config.yaml"
    try:  # both files are untrusted input: a wrong type anywhere is one MalformedRun naming the file
        cfg = yaml.safe_load(what.read_text()) or {}
        _check_config(cfg)
        config = flatten(cfg)
        what = metrics_file
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {"best": {}, "epochs": []}
        epochs, best = _check_metrics(metrics)
    except MalformedRun as e:
        raise MalformedRun(f"'{shown(what)}' {e}") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        kind = "cannot be read" if isinstance(e, OSError) else (
            f"is not valid {'JSON' if what == metrics_file else 'YAML'}")
        why = (e.strerror or type(e).__name__) if isinstance(e, OSError) else (
            str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise MalformedRun(f"'{shown(what)}' {kind} ({shown(why)})") from None
    except RecursionError:
        raise MalformedRun(f"'{shown(what)}' is nested too deeply to be a finetune file") from None
    marker = path / MARKER
    started = marker.stat().st_mtime if marker.is_file() else (path / "config.yaml").stat().st_mtime
    ended = metrics_file.stat().st_mtime if metrics_file.is_file() else None
    model, name = (cfg.get("model") or {}).get("name"), cfg.get("name")
    n_val = metrics.get("val_images")
    n_val = n_val if isinstance(n_val, int) and not isinstance(n_val, bool) and n_val > 0 else None
    ci = wilson(best.get("val_acc"), n_val)
    return {"name": path.name, "path": str(path), "model": None if model is None else str(model),
            "recipe": "" if name is None else str(name), "best_val_acc": best.get("val_acc"),
            "val_images": n_val, "best_val_acc_ci": None if ci is None else [ci[0], ci[1]],
            "best_epoch": best.get("epoch"), "epochs": len(epochs),
            "epochs_planned": (cfg.get("train") or {}).get("epochs"),
            "wall_seconds": (ended - started) if ended else None,
            "train_seconds": _train_seconds(epochs),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
            "report": (path / "report.html").is_file(), "config": config, "history": epochs}


def _train_seconds(epochs: list[dict]) -> float | None:
    """The epochs' training seconds summed; None when no epoch recorded any (a probe run's heads train together in
    one pass, so its epoch rows carry no time: "0 s" said it took none)."""
    times = [r["seconds"] for r in epochs if r.get("seconds") is not None]
    return sum(times) if times else None


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _int(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _check_config(cfg: Any) -> None:
    """config.yaml as runs/compare read it: a mapping; ``model`` and ``train`` mappings; ``train.epochs`` an int."""
    if not isinstance(cfg, dict):
        raise MalformedRun(f"holds a {type(cfg).__name__}, not a recipe mapping")
    for key in ("model", "train"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise MalformedRun(f"has '{key}' as a {type(cfg[key]).__name__}, not a mapping")
    if not _int((cfg.get("train") or {}).get("epochs")):
        raise MalformedRun("has train.epochs that is not a whole number")


def _check_metrics(metrics: Any) -> tuple[list[dict], dict]:
    """metrics.json as finetune writes it: ``{"best": {"epoch", "val_acc"}, "epochs": [row, ...]}``, each row's
    ``epoch`` an int and its numbers numbers or null; returns (epochs, best)."""
    if not isinstance(metrics, dict):
        raise MalformedRun(f"holds a JSON {type(metrics).__name__}, not an object")
    epochs, best = metrics.get("epochs", []), metrics.get("best") or {}
    if not isinstance(best, dict) or not _number(best.get("val_acc")) or not _int(best.get("epoch")):
        raise MalformedRun("has a 'best' entry that is not {\"epoch\": int, \"val_acc\": number}")
    if not isinstance(epochs, list):
        raise MalformedRun(f"has 'epochs' as a {type(epochs).__name__}, not a list")
    for i, r in enumerate(epochs):
        if not isinstance(r, dict):
            raise MalformedRun(f"has epoch row {i} as a {type(r).__name__}, not an object")
        bad = [k for k in _NUMBERS if not _number(r.get(k))]
        if not _int(r.get("epoch")) or r.get("epoch") is None:
            bad.insert(0, "epoch")
        lrs = r.get("lrs")
        if lrs is not None and not (isinstance(lrs, dict) and all(_number(v) for v in lrs.values())):
            bad.append("lrs")
        if bad:
            raise MalformedRun(f"has epoch row {i} with {', '.join(bad)} of the wrong type")
    return epochs, best


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
    rows = _readable(found)
    for r in rows:
        del r["config"], r["history"]
    return sorted(rows, key=lambda r: (r["date"], r["path"]))


def _readable(paths: list) -> list[dict[str, Any]]:
    """:func:`read_run` of each; a run whose config.yaml or metrics.json is malformed is left out with one warning
    line naming the file (one broken run never hides the others)."""
    rows = []
    for p in paths:
        try:
            rows.append(read_run(p))
        except MalformedRun as e:
            log.warning(f"skipping run {shown(p)}: {e}")
    return rows


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


def within_noise(a: dict, b: dict) -> bool | None:
    """Whether runs ``a`` and ``b`` (rows of :func:`read_run`) reached best val accuracies within noise of each
    other. On the same number of val images: :func:`finetune.training.stats.tied` (each inside the other's 95%
    Wilson interval). On different counts (different val sets, so independent measurements): the difference is
    at most the two half widths combined, sqrt(ha² + hb²). None when either run lacks an accuracy or its count."""
    na, nb = a.get("val_images"), b.get("val_images")
    ha, hb = half_width(a["best_val_acc"], na), half_width(b["best_val_acc"], nb)
    if ha is None or hb is None:
        return None
    if na == nb:
        return tied(a["best_val_acc"], b["best_val_acc"], na)
    return abs(a["best_val_acc"] - b["best_val_acc"]) <= math.hypot(ha, hb)


def compare_runs(paths: list[str | Path]) -> dict[str, Any]:
    """``runs`` (rows as :func:`read_run`) and ``differences``: every recipe key whose value is not the same in
    all runs (``name``/``description`` included), as ``{key: [value per run]}`` in key order. ``top``: the index of
    the run with the highest best val accuracy (None if none has one); each run's ``tie_with_top``: whether its
    accuracy is within noise of the top one's (:func:`within_noise`; None when unknown, True for the top run)."""
    if len(paths) < 2:
        raise ConfigError("finetune compare takes at least two run directories (see finetune runs)")
    runs = _readable(paths)
    if len(runs) < 2:
        raise ConfigError(f"finetune compare needs at least two readable run directories; {len(runs)} of "
                          f"{len(paths)} could be read (see the warnings above)")
    keys = sorted(set().union(*(r["config"] for r in runs)))
    missing = object()
    diff = {k: [r["config"].get(k, missing) for r in runs] for k in keys}
    diff = {k: [None if v is missing else v for v in vs] for k, vs in diff.items()
            if any(v != vs[0] for v in vs[1:])}
    scored = [i for i, r in enumerate(runs) if r["best_val_acc"] is not None]
    top = max(scored, key=lambda i: runs[i]["best_val_acc"]) if scored else None
    for i, r in enumerate(runs):
        r["tie_with_top"] = None if top is None else True if i == top else within_noise(r, runs[top])
    return {"runs": runs, "differences": diff, "top": top}


def compare_figure(runs: list[dict]):
    """Train/val loss and val accuracy per epoch, one colour per run."""
    plt = pyplot()
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
                        label=mpl_text(r["name"]) + (" (val)" if key == "val_loss" else ""))
    for ax, title in zip(axes, ("loss (solid: train, dashed: val)", "val accuracy (%)", "train accuracy (%)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_compare_html(result: dict[str, Any], out: str | Path) -> Path:
    """The comparison as one self-contained HTML page (curves overlaid, inline)."""

    out = check_out(out)
    runs = result["runs"]
    fig = png(compare_figure(runs))
    metrics = table(["run", "model", "recipe", "best val acc (95%)", "best epoch", "epochs", "train s", "date"],
                     [[r["name"], r["model"], r["recipe"], _acc_pm(r, i == result.get("top")), r["best_epoch"],
                       f"{r['epochs']}/{r['epochs_planned']}",
                       "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}", r["date"]]
                      for i, r in enumerate(runs)])
    diff = table(["key", *[r["name"] for r in runs]],
                  [[k, *[_short(v) for v in vs]] for k, vs in result["differences"].items()])
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{MARK}<title>finetune compare: "
            f"{esc(', '.join(r['name'] for r in runs))}</title><style>{CSS}</style></head><body>"
            f"<h1>Comparison of {len(runs)} runs</h1><h2>Metrics</h2>{metrics}<h2>Curves</h2>"
            f'<img class="fig" id="fig-compare" src="{fig}" alt="curves of the runs"><h2>Configuration differences'
            f"</h2>{diff if result['differences'] else '<p>None: the runs have the same configuration.</p>'}"
            "</body></html>")
    from finetune.files import atomic_write_text

    atomic_write_text(out, page)
    return out


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _acc_pm(r: dict, top: bool) -> str:
    """A run's best val accuracy with its interval, and "top" or "≈ top" (within noise of it)."""
    pm = pm_text(r["best_val_acc"], r.get("val_images"))
    tie = " (top)" if top else " (≈ top: within noise)" if r.get("tie_with_top") else ""
    return _acc(r["best_val_acc"]) + (f" {pm}" if pm else "") + tie


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."
