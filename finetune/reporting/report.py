"""The run report: one self-contained ``report.html`` (figures and thumbnails inline, no network, no script) with
learning curves, the confusion matrix as a heat map, per-class precision/recall/F1, the most confidently wrong and
the most uncertain correct val images, the freeze plan as a picture, the resolved recipe, environment, data summary
and wall times; plus ``report.json``, the numbers that feed the pictures.

The numbers (``top_wrong``, ``confused_pairs``, ...) are plain functions of lists, tested against hand-computed
values; the confusion matrix and per-class precision/recall/F1 come from :mod:`finetune.training.metrics`, as the
training loop's. The page's pieces shared with ``finetune compare --html`` are in :mod:`.html`. The figures use
matplotlib (Agg backend, imported on first use). A run's report reads the run directory: ``metrics.json``,
``config.yaml`` and ``best.pt``, whose ``val`` holds the per-image predictions of the best epoch
(``engine.evaluate``'s ``samples``), so writing it needs no forward pass.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.errors import CheckpointError, FinetuneError
from finetune.reporting.html import CSS, MARK, check_out, esc, mpl_text, pct, png, pyplot, table
from finetune.run.callbacks import Callback
from finetune.training.metrics import accuracy, per_class_metrics

log = logging.getLogger("finetune")

N_WRONG = 24  # most confidently wrong val images shown
N_UNSURE = 8  # most uncertain correct ones
THUMB = 112  # thumbnail side in pixels (JPEG, inline)

# ------------------------------------------------------------------------------------------------ the numbers


def row_normalised(confusion: list[list[int]]) -> list[list[float]]:
    """Each row divided by its sum (the recall view); a class without images is a row of zeros."""
    return [[v / sum(row) if sum(row) else 0.0 for v in row] for row in confusion]


def top_wrong(targets: list[int], preds: list[int], conf: list[float], k: int) -> list[int]:
    """Indices of the ``k`` misclassified images with the highest confidence in their (wrong) prediction;
    ties by index."""
    wrong = [i for i, (t, p) in enumerate(zip(targets, preds)) if t != p]
    return sorted(wrong, key=lambda i: (-conf[i], i))[:k]


def most_uncertain_correct(targets: list[int], preds: list[int], conf: list[float], k: int) -> list[int]:
    """Indices of the ``k`` correctly classified images with the lowest confidence; ties by index."""
    right = [i for i, (t, p) in enumerate(zip(targets, preds)) if t == p]
    return sorted(right, key=lambda i: (conf[i], i))[:k]


def confused_pairs(confusion: list[list[int]], names: list[str], k: int = 5) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells as (true, predicted, count), largest first; ties in row-major order."""
    cells = [(-v, t, p) for t, row in enumerate(confusion) for p, v in enumerate(row) if t != p and v > 0]
    return [(names[t], names[p], -v) for v, t, p in sorted(cells)[:k]]


def freeze_rows(numel: dict[str, int], frozen_at_start: list[str], trainable_at_end: list[str]) -> list[dict]:
    """Per top-level module, in model order: parameters trainable from the start, unfrozen later by a schedule,
    and frozen throughout."""
    start_frozen, end_trainable = set(frozen_at_start), set(trainable_at_end)
    rows: dict[str, dict[str, Any]] = {}
    for name, n in numel.items():
        r = rows.setdefault(name.split(".", 1)[0], {"module": name.split(".", 1)[0], "trainable": 0,
                                                     "unfrozen": 0, "frozen": 0})
        key = ("frozen" if name not in end_trainable else "unfrozen" if name in start_frozen else "trainable")
        r[key] += n
    return list(rows.values())


# ------------------------------------------------------------------------------------------------ figures


def confusion_figure(confusion: list[list[int]], names: list[str]):
    """Counts and row-normalised heat maps side by side (a matplotlib Figure; also what TensorBoard gets)."""
    plt = pyplot()
    n = len(names)
    side = min(6.5, 2.0 + 0.42 * n)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    norm = row_normalised(confusion)
    for ax, data, title, fmt in ((axes[0], confusion, "counts", "{:d}"), (axes[1], norm, "row-normalised (recall)",
                                                                           "{:.2f}")):
        im = ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ticks = list(range(n)) if n <= 40 else []
        ax.set_xticks(ticks, [mpl_text(names[i][:14]) for i in ticks], rotation=90, fontsize=8)
        ax.set_yticks(ticks, [mpl_text(names[i][:14]) for i in ticks], fontsize=8)
        if n <= 20:
            hi = max((max(r) for r in data), default=0) or 1
            for t in range(n):
                for p in range(n):
                    v = data[t][p]
                    if v:
                        ax.text(p, t, fmt.format(v), ha="center", va="center", fontsize=7,
                                color="white" if v > hi / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def curves_figure(epochs: list[dict], unfreeze: list[tuple[int, str]]):
    """Loss, accuracy, LR per group and images/s per epoch; dashed lines where an unfreeze step starts."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    x = [r["epoch"] for r in epochs]

    def line(ax, key, label, **kw):
        pts = [(e, r[key]) for e, r in zip(x, epochs) if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label, **kw)

    line(axes[0, 0], "train_loss", "train")
    line(axes[0, 0], "val_loss", "val")
    axes[0, 0].set_title("loss")
    for r in epochs:
        for key in ("train_acc", "val_acc"):
            if r.get(key) is not None:
                r.setdefault("_" + key, 100 * r[key])
    line(axes[0, 1], "_train_acc", "train")
    line(axes[0, 1], "_val_acc", "val")
    axes[0, 1].set_title("accuracy (%)")
    groups = list(dict.fromkeys(g for r in epochs for g in (r.get("lrs") or {})))
    for g in groups:
        pts = [(e, r["lrs"][g]) for e, r in zip(x, epochs) if g in (r.get("lrs") or {})]
        axes[1, 0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=mpl_text(g))
    if not groups:
        line(axes[1, 0], "lr", "lr")
    axes[1, 0].set_title("learning rate per group (first update of the epoch)")
    if any((r.get("lr") or 0) > 0 for r in epochs):
        axes[1, 0].set_yscale("log")
    line(axes[1, 1], "images_per_sec", "train")
    axes[1, 1].set_title("images/s (training)")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        for ep, what in unfreeze:
            ax.axvline(ep - 0.5, color="tab:red", ls="--", lw=1)
            if ax is axes[0, 0]:
                ax.annotate(mpl_text(f"unfreeze {what}"), (ep - 0.5, 1), xycoords=("data", "axes fraction"), fontsize=7,
                            color="tab:red", rotation=90, va="top", ha="right")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if x:
        for ax in axes.flat:
            ax.set_xlim(min(x) - 0.7, max(x) + 0.7)
    fig.tight_layout()
    for r in epochs:
        r.pop("_train_acc", None), r.pop("_val_acc", None)
    return fig


def freeze_figure(rows: list[dict]):
    """Horizontal stacked bars per top-level module: trainable, unfrozen by a schedule, frozen (parameters)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.32 * len(rows)))
    names = [mpl_text(r["module"]) for r in rows][::-1]
    left = [0] * len(rows)
    for key, colour in (("trainable", "tab:green"), ("unfrozen", "tab:orange"), ("frozen", "tab:gray")):
        vals = [r[key] for r in rows][::-1]
        if any(vals):
            ax.barh(names, vals, left=left, color=colour, label=key)
            left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("parameters")
    ax.set_xscale("symlog", linthresh=1000)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("freeze plan per top-level module")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ thumbnails


def _pil_of(dataset, index: int):
    from PIL import Image

    samples = getattr(dataset, "samples", None)
    if samples:
        from finetune.data import load_image

        return load_image(samples[index][0], min_side=THUMB)
    img = dataset.images[index]  # in-memory uint8 CHW (CIFAR)
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def thumbnail(dataset, index: int) -> str:
    """A THUMB x THUMB centre crop of image ``index`` as an inline JPEG data URI ("" when it can't be read)."""
    from PIL import Image, ImageOps

    try:
        im = ImageOps.fit(_pil_of(dataset, index), (THUMB, THUMB), Image.Resampling.BICUBIC)
    except (FinetuneError, OSError):
        return ""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_name(dataset, index: int) -> str:
    samples = getattr(dataset, "samples", None)
    if samples:
        p = Path(samples[index][0])
        return f"{p.parent.name}/{p.name}"
    return f"#{index}"


# ------------------------------------------------------------------------------------------------ evaluation part


def evaluation_part(confusion: list[list[int]], names: list[str], samples: dict | None, dataset,
                    *, n_wrong: int | None = None, n_unsure: int | None = None) -> dict[str, Any]:
    """Numbers + pictures of one evaluation: heat map, per-class table, confused pairs, thumbnails (``n_wrong`` /
    ``n_unsure``: default N_WRONG / N_UNSURE, read at call time)."""
    n_wrong = N_WRONG if n_wrong is None else n_wrong
    n_unsure = N_UNSURE if n_unsure is None else n_unsure
    metrics = per_class_metrics(confusion)
    part: dict[str, Any] = {
        "class_names": names, "confusion": confusion, "per_class": [{"class": n, **m} for n, m in zip(names, metrics)],
        "accuracy": accuracy(confusion),
        "confused_pairs": [list(p) for p in confused_pairs(confusion, names)],
        "figure_confusion": png(confusion_figure(confusion, names)), "wrong": [], "unsure": [],
    }
    if samples is None or dataset is None:
        part["images_note"] = "no per-image predictions for this evaluation (thumbnails left out)"
        return part
    t, p = samples["target"].tolist(), samples["pred"].tolist()
    c, pt = samples["conf"].tolist(), samples["p_true"].tolist()
    for key, idx in (("wrong", top_wrong(t, p, c, n_wrong)), ("unsure", most_uncertain_correct(t, p, c, n_unsure))):
        part[key] = [{"index": i, "name": image_name(dataset, i), "true": names[t[i]], "pred": names[p[i]],
                      "conf": c[i], "p_true": pt[i], "src": thumbnail(dataset, i)} for i in idx]
    part["n_wrong_total"] = sum(a != b for a, b in zip(t, p))
    return part


def _samples_match(samples: dict | None, dataset) -> bool:
    return (samples is not None and dataset is not None
            and samples["target"].tolist() == list(getattr(dataset, "targets", [])))


def _predict_samples(ckpt_path: Path, dataset) -> dict:
    """Per-image predictions of a checkpoint on ``dataset`` (a forward pass, for reports of older checkpoints)."""
    from finetune.data import make_loader
    from finetune.run.restore import eval_precision, restore_model
    from finetune.training.engine import evaluate, resolve_device

    dev = resolve_device("auto")
    model, ckpt = restore_model(ckpt_path, dev)
    cl = bool(ckpt.get("channels_last"))
    return evaluate(model, make_loader(dataset, 64, shuffle=False, seed=0, device=dev.type),
                    int(ckpt["num_classes"]), device=dev, precision=eval_precision(ckpt, dev), channels_last=cl)


# ------------------------------------------------------------------------------------------------ TensorBoard

TB_WRONG = 16  # misclassified images per evaluation in TensorBoard


def log_tensorboard(writer, ev: dict | None, dataset, names: list[str], step: int) -> None:
    """At each evaluation: the confusion matrix (figure, ``val/confusion_matrix``) and the most confidently wrong
    val images (``val/most_confidently_wrong``, captions under TEXT), beside the scalars. A failure here costs one
    warning and turns the pictures off for the run; training goes on."""
    if ev is None or writer is None or getattr(writer, "_finetune_no_pictures", False):
        return
    try:
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        writer.add_figure("val/confusion_matrix", confusion_figure(ev["confusion"], names), step)  # closes it
        s = ev.get("samples")
        if not _samples_match(s, dataset):
            return
        idx = top_wrong(s["target"].tolist(), s["pred"].tolist(), s["conf"].tolist(), TB_WRONG)
        if not idx:
            return
        side = 96
        ims = [np.asarray(ImageOps.fit(_pil_of(dataset, i), (side, side), Image.Resampling.BICUBIC)) for i in idx]
        writer.add_images("val/most_confidently_wrong", torch.from_numpy(np.stack(ims)), step, dataformats="NHWC")
        rows = "\n".join(f"| {n} | {names[int(s['target'][i])]} | {names[int(s['pred'][i])]} | "
                         f"{100 * float(s['conf'][i]):.1f}% | {image_name(dataset, i)} |" for n, i in enumerate(idx))
        writer.add_text("val/most_confidently_wrong", "| # | true | predicted | confidence | image |\n"
                        "|---|---|---|---|---|\n" + rows, step)
    except Exception as e:  # noqa: BLE001 - pictures are a convenience; the run must not fail for them
        writer._finetune_no_pictures = True
        log.warning(f"TensorBoard pictures turned off for this run ({type(e).__name__}: {e})")


# ------------------------------------------------------------------------------------------------ run report


def _read_config(run_dir: Path) -> tuple[dict, dict[str, str], str]:
    """config.yaml as (recipe dict, the 'picked on this machine' notes, raw text)."""
    import yaml

    path = run_dir / "config.yaml"
    text = path.read_text() if path.is_file() else ""
    picked = {}
    for line in text.splitlines():
        if line.startswith("#   ") and ":" in line:
            k, v = line[4:].split(":", 1)
            picked[k.strip()] = v.strip()
    return (yaml.safe_load(text) or {}) if text else {}, picked, text


def data_summary(class_names: list[str], train=None, val=None, skipped: list[str] | None = None,
                 source: str = "", unlabeled: int = 0) -> dict[str, Any]:
    """Images per class in train and val, skipped files (as the run reported them), the data's description."""
    def counts(ds):
        if ds is None:
            return None
        c = Counter(int(t) for t in ds.targets)
        return [c.get(i, 0) for i in range(len(class_names))]

    return {"source": source, "train": counts(train), "val": counts(val), "skipped": list(skipped or []),
            "unlabeled": unlabeled, "recorded": skipped is not None}


def _val_dataset_for(ckpt: dict):
    """The run's val set rebuilt from the checkpoint's data record (same files, same order, same split)."""
    from finetune.data import build_eval_dataset

    info = ckpt.get("data") or {}
    return build_eval_dataset(info.get("path", "sample"), "val", list(ckpt["class_names"]), ckpt["transform"],
                              labels=info.get("labels"), val_split=info.get("val_split", 0.2),
                              seed=info.get("seed", 0))


def _train_dataset_for(ckpt: dict):
    from finetune.data import build_eval_dataset

    info = ckpt.get("data") or {}
    return build_eval_dataset(info.get("path", "sample"), "train", list(ckpt["class_names"]), ckpt["transform"],
                              labels=info.get("labels"), val_split=info.get("val_split", 0.2),
                              seed=info.get("seed", 0))


def environment(picked: dict[str, str], ckpt: dict) -> dict[str, str]:
    import torch

    env = {"device": picked.get("device", "?"), "precision": picked.get("precision", str(ckpt.get("precision"))),
           "channels_last": picked.get("channels_last", str(ckpt.get("channels_last"))),
           "processes": picked.get("processes", str(ckpt.get("world_size", 1))),
           "finetune (run)": str(ckpt.get("finetune_version", "?")), "python": platform.python_version(),
           "torch": torch.__version__, "platform": platform.platform(terse=True)}
    for mod in ("torchvision", "timm"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            pass
    return env


def build_run_report(run_dir: str | Path, *, val_dataset=None, data: dict | None = None) -> dict[str, Any]:
    """Everything the run report shows, as data (figures as data URIs). ``val_dataset``/``data``: the run's own
    (at the end of a run); otherwise rebuilt from the checkpoint's data record, or taken from an earlier
    report.json."""
    from finetune import __version__
    from finetune.run.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    best_pt = run_dir / "best.pt"
    if not best_pt.is_file():
        raise CheckpointError(f"'{run_dir}' has no best.pt; finetune report takes a run directory written by "
                              "finetune train (or finetune probe)")
    t0 = time.perf_counter()
    ckpt = load_checkpoint(best_pt)
    names = list(ckpt["class_names"])
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {"best": {}, "epochs": []}
    recipe, picked, config_text = _read_config(run_dir)
    val = ckpt.get("val") or {}
    samples = val.get("samples") if isinstance(val, dict) else None
    previous = _previous(run_dir)
    if data is None:
        data = previous.get("data")
    has_val = bool(val) or val_dataset is not None  # a run without val data has nothing to evaluate
    try:
        if has_val and val_dataset is None:
            val_dataset = _val_dataset_for(ckpt)
        if data is None:
            source = str((ckpt.get("data") or {}).get("path", ""))
            data = data_summary(names, _train_dataset_for(ckpt), val_dataset, None, source)
    except FinetuneError as e:  # data moved or gone: the report still has everything but the thumbnails
        log.warning(f"report: the run's data could not be read ({e}); thumbnails left out")
    if val_dataset is not None and not _samples_match(samples, val_dataset):
        res = _predict_samples(best_pt, val_dataset)  # an older checkpoint, a probe, a DDP run: one val pass
        samples, confusion = res["samples"], res["confusion"]
    else:
        confusion = val.get("confusion") or [[0] * len(names) for _ in names]
    schedule = [(int(s["epoch"]), ", ".join(s["layers"])) for s in (recipe.get("freeze") or {}).get("schedule", [])]
    numel = {k: int(v.numel()) for k, v in ckpt["model"].items()
             if k in set(ckpt.get("plan", {}).get("frozen", [])) | set(ckpt.get("trainable", []))}
    plan = ckpt.get("plan") or {}
    rows = freeze_rows(numel, plan.get("frozen", []), ckpt.get("trainable", plan.get("trainable", [])))
    created = _created(run_dir)
    ended = metrics_path.stat().st_mtime if metrics_path.is_file() else None
    report = {
        "kind": "run", "run_dir": str(run_dir), "title": run_dir.name, "model": ckpt.get("model_name"),
        "recipe_name": recipe.get("name", ""), "best": metrics.get("best", {}), "epochs": metrics.get("epochs", []),
        "best_epoch_in_ckpt": ckpt.get("epoch"), "unfreeze": schedule, "bn": plan.get("bn"),
        "freeze_rows": rows, "config_text": config_text, "environment": environment(picked, ckpt),
        "data": data, "finetune_version": __version__,
        "wall": {"run_started": _iso(created), "run_ended": _iso(ended),
                 "run_seconds": (ended - created) if created and ended else None,
                 "epoch_seconds": sum(r.get("seconds") or 0 for r in metrics.get("epochs", []))},
        "figure_curves": png(curves_figure(metrics.get("epochs", []), schedule)) if metrics.get("epochs") else "",
        "figure_freeze": png(freeze_figure(rows)) if rows else "",
        "eval": evaluation_part(confusion, names, samples, val_dataset) if has_val else None,
        "class_names": names,
    }
    report["wall"]["report_seconds"] = time.perf_counter() - t0
    return report


def _previous(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return {}


def _created(run_dir: Path) -> float | None:
    from finetune.run.checkpoint import MARKER

    p = run_dir / MARKER
    return p.stat().st_mtime if p.is_file() else None


def _iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else None


def write_run_report(run_dir: str | Path, out: str | Path | None = None, *, val_dataset=None,
                     data: dict | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) and ``RUN_DIR/report.json``; returns the HTML's path."""
    from finetune.files import atomic_write_text

    run_dir = Path(run_dir)
    rep = build_run_report(run_dir, val_dataset=val_dataset, data=data)
    out = check_out(out) if out else run_dir / "report.html"
    atomic_write_text(out, render_html(rep))
    atomic_write_text(run_dir / "report.json", json.dumps(_numbers(rep), indent=1))
    return out


def after_run(run_dir: Path, bundle, reporter=None) -> Path | None:
    """The report at the end of ``finetune train``: a failure here is a warning, never a failed run."""
    try:
        data = data_summary(list(bundle.class_names), bundle.train, bundle.val, bundle.skipped, bundle.source,
                            len(bundle.unlabeled))
        t0 = time.perf_counter()
        path = write_run_report(run_dir, val_dataset=bundle.val, data=data)
        if reporter is not None:
            reporter.note(f"report: {path} ({time.perf_counter() - t0:.1f} s)")
        return path
    except Exception as e:  # noqa: BLE001 - the run itself succeeded; its checkpoints are written
        log.warning(f"the run report could not be written ({type(e).__name__}: {e}); the run is complete; "
                    f"retry with finetune report {run_dir}")
        return None


def write_eval_report(out: str | Path, result: dict, dataset, ckpt: dict) -> Path:
    """``finetune eval --report OUT``: the evaluation part for any checkpoint and data."""
    from finetune.files import atomic_write_text

    out = check_out(out)
    names = list(ckpt["class_names"])
    rep = {"kind": "eval", "title": f"{Path(ckpt.get('_path', 'checkpoint')).name} on {result.get('data')}",
           "model": ckpt.get("model_name"), "checkpoint": str(ckpt.get("_path")), "data_path": result.get("data"),
           "split": result.get("split"), "loss": result.get("loss"), "top5": result.get("top5"),
           "environment": environment({}, ckpt),
           "data": data_summary(names, None, dataset, None, str(result.get("data"))),
           "eval": evaluation_part(result["confusion"], names, result.get("samples"), dataset),
           "class_names": names}
    atomic_write_text(out, render_html(rep))
    return out


def _numbers(rep: dict) -> dict:
    """report.json: the report without its pictures."""
    if rep["eval"] is None:
        return {k: v for k, v in rep.items() if not k.startswith("figure_") and k != "config_text"}
    ev = {k: v for k, v in rep["eval"].items() if not k.startswith("figure_")}
    ev["wrong"] = [{k: v for k, v in w.items() if k != "src"} for w in ev["wrong"]]
    ev["unsure"] = [{k: v for k, v in w.items() if k != "src"} for w in ev["unsure"]]
    return {**{k: v for k, v in rep.items() if not k.startswith("figure_") and k != "config_text"}, "eval": ev}


# ------------------------------------------------------------------------------------------------ HTML

def _cards(items: list[dict], cls: str) -> str:
    out = []
    for w in items:
        img = (f'<img src="{w["src"]}" alt="{esc(w["name"])}" width="112" height="112">' if w["src"]
               else '<div class="muted">(unreadable)</div>')
        out.append(f'<div class="card {cls}">{img}<b>true</b> {esc(w["true"])}<br><b>pred</b> {esc(w["pred"])} '
                   f'({100 * w["conf"]:.1f}%)<br><span class="muted">p(true) {100 * w["p_true"]:.1f}%<br>'
                   f'{esc(w["name"])}</span></div>')
    return '<div class="grid">' + "".join(out) + "</div>"


def _eval_html(ev: dict) -> str:
    names = ev["class_names"]
    pairs = ", ".join(f"<b>{esc(t)}</b> &rarr; <b>{esc(p)}</b> ({n})" for t, p, n in ev["confused_pairs"])
    s = [f'<p class="kpi">accuracy {pct(ev["accuracy"])} on {sum(map(sum, ev["confusion"]))} images</p>',
         f"<p>Most confused (true &rarr; predicted): {pairs or 'nothing: no mistakes'}</p>",
         f'<img class="fig" id="fig-confusion" src="{ev["figure_confusion"]}" alt="confusion matrix">',
         "<h3>Per class</h3>",
         table(["class", "precision", "recall", "F1", "support"],
                [[m["class"], f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
                 for m in ev["per_class"]])]
    if ev.get("images_note"):
        s.append(f'<p class="muted">{esc(ev["images_note"])}</p>')
    else:
        s.append(f"<h3>Most confidently wrong ({len(ev['wrong'])} of {ev.get('n_wrong_total', 0)} mistakes)</h3>"
                 "<p class='muted'>Predicted class with its probability; p(true) = the probability of the true "
                 "class. Confident mistakes are often label noise or look-alike classes.</p>"
                 + (_cards(ev["wrong"], "bad") if ev["wrong"] else "<p>No mistakes.</p>"))
        s.append(f"<h3>Most uncertain correct ({len(ev['unsure'])})</h3>" + _cards(ev["unsure"], "ok"))
    del names
    return "\n".join(s)


def render_html(rep: dict) -> str:
    """The report as one self-contained HTML page (inline CSS and images; no script, no external reference)."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{MARK}<title>finetune report: "
             f"{esc(rep['title'])}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(rep['title'])}</h1>"]
    if rep["kind"] == "run":
        best = rep.get("best") or {}
        parts.append(f"<p class='sub'>model <b>{esc(rep['model'])}</b> &middot; recipe <b>{esc(rep['recipe_name'])}"
                     f"</b> &middot; best val accuracy <b>{pct(best.get('val_acc'))}</b> at epoch "
                     f"{esc(best.get('epoch'))} of {len(rep['epochs'])} &middot; {esc(rep['wall']['run_started'])}"
                     "</p>")
        parts.append("<h2>Learning curves</h2>")
        parts.append(f'<img class="fig" id="fig-curves" src="{rep["figure_curves"]}" alt="learning curves">'
                     if rep["figure_curves"] else "<p>No epochs recorded.</p>")
        if rep["unfreeze"]:
            parts.append("<p>Unfreeze steps (dashed lines): " + ", ".join(
                f"epoch {e}: {esc(w)}" for e, w in rep["unfreeze"]) + "</p>")
        parts.append(f"<h2>Evaluation of best.pt (epoch {esc(rep['best_epoch_in_ckpt'])}) on the val set</h2>")
    else:
        parts.append(f"<p class='sub'>model <b>{esc(rep['model'])}</b> &middot; checkpoint {esc(rep['checkpoint'])}"
                     f" &middot; data {esc(rep['data_path'])} ({esc(rep['split'])} split) &middot; loss "
                     f"{rep['loss']:.4f} &middot; top-5 {pct(rep['top5'])}</p><h2>Evaluation</h2>")
    parts.append(_eval_html(rep["eval"]) if rep["eval"] else "<p>No validation set: nothing to evaluate.</p>")
    if rep["kind"] == "run":
        parts.append("<h2>Freeze plan</h2>")
        if rep["figure_freeze"]:
            parts.append(f'<img class="fig" id="fig-freeze" src="{rep["figure_freeze"]}" alt="freeze plan">')
        parts.append(f"<p>BatchNorm policy: <b>{esc(rep['bn'])}</b> (frozen = BN layers whose parameters are all "
                     "frozen stay in eval mode: running statistics unchanged)</p>")
        parts.append(table(["module", "trainable", "unfrozen later", "frozen"],
                            [[r["module"], f"{r['trainable']:,}", f"{r['unfrozen']:,}", f"{r['frozen']:,}"]
                             for r in rep["freeze_rows"]]))
    parts.append("<h2>Data</h2>" + _data_html(rep["data"], rep["class_names"]))
    parts.append("<h2>Environment</h2>" + table(["", ""], [[k, v] for k, v in rep["environment"].items()]))
    if rep["kind"] == "run":
        w = rep["wall"]
        rs = "-" if w["run_seconds"] is None else f"{w['run_seconds']:.1f} s"
        parts.append("<h2>Wall times</h2>" + table(["", ""], [
            ["run started", w["run_started"] or "-"], ["last epoch written", w["run_ended"] or "-"],
            ["start to last epoch (with set-up and any resume gaps)", rs],
            ["training epochs (sum)", f"{w['epoch_seconds']:.1f} s"],
            ["building this report", f"{w['report_seconds']:.2f} s"]]))
        parts.append("<h2>Resolved recipe (config.yaml)</h2><pre>" + esc(rep["config_text"]) + "</pre>")
    parts.append(f"<p class='muted'>finetune {esc(rep.get('finetune_version', ''))} &middot; written "
                 f"{esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p></body></html>")
    return "\n".join(parts)


def _data_html(data: dict | None, names: list[str]) -> str:
    if not data:
        return "<p class='muted'>not recorded</p>"
    rows = [[n, "-" if data["train"] is None else data["train"][i], "-" if data["val"] is None else data["val"][i]]
            for i, n in enumerate(names)]
    tot = lambda k: "-" if data[k] is None else sum(data[k])
    rows.append(["total", tot("train"), tot("val")])
    s = f"<p>{esc(data.get('source', ''))}</p>" + table(["class", "train", "val"], rows)
    if not data.get("recorded"):
        s += "<p class='muted'>Skipped files: not recorded (this report was made after the run).</p>"
    elif data["skipped"]:
        s += (f"<p class='warn'>{len(data['skipped'])} unreadable files skipped:</p><pre>"
              + esc("\n".join(data["skipped"][:50])) + "</pre>")
    else:
        s += "<p>No files skipped.</p>"
    if data.get("unlabeled"):
        s += f"<p>{data['unlabeled']} images matched no --labels rule (left out).</p>"
    return s


class ReportCallback(Callback):
    """``report.html`` at the end of a run that asked for it (``train.report``; a failure is a warning, never a
    failed run). :func:`finetune.api.train` adds it to every run's listeners."""

    def on_run_end(self, run):
        if run.cfg.train.report:
            after_run(run.run_dir, run.bundle, run.reporter)
