"""The run report: one self-contained ``report.html`` (figures and thumbnails inline, no network, no script) with
a short "what this run says" (overfitting, LP-FT's two phases, where the best epoch fell, test vs val, a next step:
facts computed from the run), how ``finetune auto`` chose the model when the run directory has its ``auto.json``
(:mod:`.decision`), learning curves, the confusion matrix as a heat map, per-class precision/recall/F1,
the most confidently wrong and the most uncertain correct val images, the freeze plan as a picture, the resolved
recipe, environment, data summary and wall times; plus ``report.json``, the numbers that feed the pictures.

The numbers (``top_wrong``, ``confused_pairs``, ``findings``, ...) are plain functions of lists, tested against
hand-computed values; the confusion matrix and per-class precision/recall/F1 come from
:mod:`finetune.training.metrics`, as the training loop's, and every accuracy shown carries its Wilson interval
(:mod:`finetune.training.stats`). The page's pieces shared with ``finetune compare --html`` are in :mod:`.html`. The
figures are hand-written SVG (:mod:`.svg`: milliseconds, no matplotlib); TensorBoard's confusion image is drawn with
numpy and PIL. A run's report reads the run directory: ``metrics.json``, ``config.yaml`` and ``best.pt``, whose
``val`` holds the per-image predictions of the best epoch (``engine.evaluate``'s ``samples``), so writing it needs
no forward pass.
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

from finetune.errors import CheckpointError, FinetuneError, shown
from finetune.reporting import decision, svg
from finetune.reporting.html import CSS, MARK, check_out, esc, pct, table
from finetune.run.callbacks import Callback
from finetune.training.metrics import accuracy, per_class_metrics
from finetune.training.stats import half_width, pm_text, tied

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


def confusion_svg(confusion: list[list[int]], names: list[str]) -> str:
    """Counts and row-normalised (recall) heat maps side by side, as an SVG document (the report's figure)."""
    return svg.heatmaps([("counts", confusion, "{:d}"), ("row-normalised (recall)", row_normalised(confusion),
                                                          "{:.2f}")], names)


_FONTS: dict[int, Any] = {}


def _font(size: int):
    from PIL import ImageFont

    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)  # Pillow's built-in scalable font (FreeType)
        except (TypeError, OSError, ImportError):  # pragma: no cover - Pillow without FreeType: the bitmap font
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _blues_lut():
    if "lut" not in _FONTS:
        import numpy as np

        _FONTS["lut"] = np.array([svg.blues(i / 255) for i in range(256)], dtype=np.uint8)
    return _FONTS["lut"]


def add_png(writer, tag: str, image, step: int) -> None:
    """An HWC uint8 RGB image as a TensorBoard image summary (what ``add_image`` writes), PNG-encoded at zlib level
    1: ``add_image``'s default level took 3x as long on a flat-coloured heat map for a file ~25% smaller."""
    from PIL import Image

    try:
        from tensorboard.compat.proto.summary_pb2 import Summary

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        h, w, c = image.shape
        summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
            height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue()))])
        writer._get_file_writer().add_summary(summary, step)
    except (ImportError, AttributeError):  # pragma: no cover - another SummaryWriter: its own encoder
        writer.add_image(tag, image, step, dataformats="HWC")


def confusion_image(confusion: list[list[int]], names: list[str]):
    """The same two heat maps as :func:`confusion_svg`, drawn with numpy and PIL as an HWC uint8 array (what
    TensorBoard gets at each evaluation: a few milliseconds where a matplotlib figure took ~0.8 s)."""
    import numpy as np
    from PIL import Image, ImageDraw

    n = max(len(names), 1)
    cell = max(4, min(26, 360 // n))
    side = cell * n
    show_names, show_values = n <= 40, n <= 20
    labels = [shown(x)[:14] for x in names]
    longest = int(max((_font(10).getlength(x) for x in labels), default=0)) + 8 if show_names else 8
    lm = longest + 4  # row labels (and, rotated, column labels below)
    top, bottom, gap = 24, longest + 22, 30
    w, h = 2 * (lm + side) + gap + 10, top + side + bottom
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    lut = _blues_lut()
    font, small = _font(12), _font(max(7, min(11, int(cell * 0.38))))
    if show_names:  # the column labels: drawn once as rows of a strip, the strip turned 90 degrees
        strip = Image.new("RGB", (bottom - 22, side), "white")
        sd = ImageDraw.Draw(strip)
        for i, lab in enumerate(labels):
            sd.text((bottom - 26, i * cell + cell / 2), lab, fill="black", font=_font(10), anchor="rm")
        strip = strip.transpose(Image.Transpose.ROTATE_90)
    for k, (title, m, fmt) in enumerate((("counts", confusion, "{:d}"),
                                         ("row-normalised (recall)", row_normalised(confusion), "{:.2f}"))):
        ox = k * (lm + side + gap)
        a = np.asarray(m, dtype=np.float64).reshape(len(names), len(names))
        hi = float(a.max()) if a.size and a.max() > 0 else 1.0
        idx = np.clip(np.rint(a / hi * 255), 0, 255).astype(np.uint8)
        block = lut[np.repeat(np.repeat(idx, cell, axis=0), cell, axis=1)]
        canvas.paste(Image.fromarray(block), (ox + lm, top))
        draw.rectangle((ox + lm - 1, top - 1, ox + lm + side, top + side), outline=(136, 136, 136))
        draw.text((ox + lm + side / 2, 4), title, fill="black", font=font, anchor="mt")
        if show_values:
            for t in range(len(names)):
                for p in range(len(names)):
                    v = m[t][p]
                    if v:
                        draw.text((ox + lm + p * cell + cell / 2, top + t * cell + cell / 2), fmt.format(v),
                                  fill="white" if v > hi / 2 else "black", font=small, anchor="mm")
        if show_names:
            for i, lab in enumerate(labels):
                draw.text((ox + lm - 4, top + i * cell + cell / 2), lab, fill="black", font=_font(10), anchor="rm")
            canvas.paste(strip, (ox + lm, top + side + 4))
        draw.text((ox + lm + side / 2, h - 4), "predicted", fill="black", font=_font(11), anchor="mb")
    return np.asarray(canvas)


def head_epochs(recipe: dict) -> int | None:
    """How many leading epochs train the new head alone (LP-FT's linear-probe phase, on cached features where the
    recipe asks): the epochs before the first unfreeze step when the backbone starts frozen; None when every epoch
    does (a linear probe); 0 when the backbone trains from the start."""
    fr = recipe.get("freeze") or {}
    if not fr.get("backbone"):
        return 0
    steps = [int(s["epoch"]) for s in fr.get("schedule") or [] if s.get("epoch")]
    return min(steps) - 1 if steps else None


def curves_svg(epochs: list[dict], unfreeze: list[tuple[int, str]], n_head: int | None = 0) -> str:
    """Loss, accuracy, LR per group and images/s per epoch (SVG); dashed lines where an unfreeze step starts. The
    images/s panel splits the head-alone epochs from the rest and turns logarithmic when they differ by more than
    5x (a 680 img/s epoch on cached features beside 5 img/s fine-tuning epochs)."""
    x = [r["epoch"] for r in epochs]

    def pts(key, scale=1.0, rows=epochs):
        return [(r["epoch"], scale * r[key]) for r in rows if r.get(key) is not None]

    groups = list(dict.fromkeys(g for r in epochs for g in (r.get("lrs") or {})))
    lr_series = ([(g, [(r["epoch"], r["lrs"][g]) for r in epochs if g in (r.get("lrs") or {})]) for g in groups]
                 or [("lr", pts("lr"))])
    k = len(epochs) if n_head is None else n_head
    head = [r for r in epochs if r["epoch"] <= k]
    rest = [r for r in epochs if r["epoch"] > k]
    speed = [(lab, pts("images_per_sec", rows=rows)) for lab, rows in
             (("head alone", head), ("fine-tuning" if n_head else "train", rest)) if rows]
    if len(speed) == 1:
        speed = [("train", speed[0][1])]
    ips = [y for _, p in speed for _, y in p if y and y > 0]
    vlines = [(ep - 0.5, f"unfreeze {what}") for ep, what in unfreeze]
    grid = [svg.Panel("loss", [("train", pts("train_loss")), ("val", pts("val_loss"))], vlines=vlines, vlabels=True),
            svg.Panel("accuracy (%)", [("train", pts("train_acc", 100)), ("val", pts("val_acc", 100))],
                      vlines=vlines),
            svg.Panel("learning rate per group (first update of the epoch)", lr_series, vlines=vlines,
                      log=any((r.get("lr") or 0) > 0 for r in epochs)),
            svg.Panel("images/s (training)" + (", log scale" if ips and max(ips) > 5 * min(ips) else ""), speed,
                      vlines=vlines, log=bool(ips) and max(ips) > 5 * min(ips))]
    xr = (min(x) - 0.7, max(x) + 0.7) if x else (0.0, 1.0)
    return svg.panels(grid, xr)


def freeze_svg(rows: list[dict]) -> str:
    """Stacked bars per top-level module: trainable, unfrozen by a schedule, frozen (parameters; SVG)."""
    return svg.stacked_bars([r["module"] for r in rows], [
        (key, colour, [r[key] for r in rows]) for key, colour in
        (("trainable", "#2ca02c"), ("unfrozen", "#ff7f0e"), ("frozen", "#7f7f7f"))],
        "freeze plan per top-level module", "parameters (linear to 1,000, then logarithmic)")


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
        "figure_confusion": svg.uri(confusion_svg(confusion, names)), "wrong": [], "unsure": [],
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


# ------------------------------------------------------------------------------------------------ what the run says

OVERFIT_GAP = 0.05  # train minus val accuracy (at the best epoch) above which, and above the val noise, we say so
CHEAP_RUN_S = 60.0  # a run this short (a head on cached features) is not told to stop sooner: nothing to save


def _p(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def findings(epochs: list[dict], best: dict, recipe: dict, n_val: int | None, test: dict | None = None,
             run_dir: str = "RUN") -> dict[str, Any]:
    """What the run's numbers say, as sentences computed from them (``facts``) and one concrete ``next`` step:
    the val noise, an overfitting flag (train vs val accuracy at the last epoch), LP-FT's two phases (what the
    linear probe reached and in how long, what fine-tuning added, within the noise or not, and at how many times
    the time), where the best epoch fell (the last: still rising beyond the noise, or flat within it; early:
    over-training when val loss rose after it, else a plateau), and test vs val. The next step fits the run's
    setup (a head-only run is never told to freeze layers or to augment). ``n_val``: the val images (the
    intervals' n)."""
    rows = [r for r in epochs if r.get("val_acc") is not None]
    if not rows:
        return {"facts": ["No val accuracy was recorded, so there is nothing to judge the run by."],
                "next": "Give the data a val/ folder (or --val-split 0.2) so every epoch is measured."}
    n_ep = max(r["epoch"] for r in epochs)
    best_ep = best.get("epoch") or _best_row(rows)["epoch"]
    brow = next((r for r in rows if r["epoch"] == best_ep), rows[-1])
    h = half_width(brow["val_acc"], n_val)
    overfit_fact, overfit = _overfit_fact(rows[-1], n_val)
    k = head_epochs(recipe)
    phase_fact, ft_tied = _two_phase_fact(epochs, rows, k, n_val)
    best_fact, shape = _best_epoch_fact(epochs, rows, brow, best_ep, n_ep, n_val)
    facts = [f for f in (_noise_fact(brow, n_val, h), overfit_fact, phase_fact, best_fact,
                         _test_fact(test, brow, n_val)) if f is not None]
    secs = [r.get("seconds") for r in epochs]
    cheap = sum(secs) < CHEAP_RUN_S if None not in secs else k is None  # minutes saved by stopping sooner: none
    nxt = _next_step(phase_tied=ft_tied, overfit=overfit, shape=shape, cheap=cheap, n_ep=n_ep, best_ep=best_ep,
                     head=k, h=h, n_val=n_val, recipe=recipe, run_dir=run_dir)
    return {"facts": facts, "next": nxt}


def _best_row(rows: list[dict]) -> dict:
    """The epoch train keeps as best.pt by val accuracy (runner.py): the first at the highest accuracy, unless a
    later one equals it exactly at a lower val loss."""
    b = rows[0]
    for r in rows[1:]:
        if r["val_acc"] > b["val_acc"] or (r["val_acc"] == b["val_acc"] and None not in (r.get("val_loss"),
                                                                                          b.get("val_loss"))
                                           and r["val_loss"] < b["val_loss"]):
            b = r
    return b


def _noise_fact(brow: dict, n_val: int | None, h: float | None) -> str | None:
    """The val noise at the best epoch (``brow``): its accuracy ± ``h``, the 95% Wilson half-width on ``n_val``
    images, so that a reader knows which differences mean nothing; None when the interval is unknown."""
    if h is None:
        return None
    return (f"Val accuracy {_p(brow['val_acc'])} ± {_pts(h)} points (95% Wilson interval on {n_val} "
            f"images): differences smaller than about {_pts(h)} points between epochs or runs are noise.")


def _overfit_fact(lrow: dict, n_val: int | None) -> tuple[str | None, bool]:
    """Overfitting, judged at the last epoch ``lrow`` (a first epoch's train accuracy is a running mean from a
    random head): the sentence, and whether train accuracy beats val by more than :data:`OVERFIT_GAP` and the val
    noise; (None, False) when the epoch has no train accuracy."""
    if lrow.get("train_acc") is None:
        return None, False
    gap = lrow["train_acc"] - lrow["val_acc"]
    if gap > max(OVERFIT_GAP, half_width(lrow["val_acc"], n_val) or 0):
        return (f"Overfitting: at the last epoch ({lrow['epoch']}) train accuracy is "
                f"{_p(lrow['train_acc'])} vs val {_p(lrow['val_acc'])}, a {_pts(gap)}-point gap (beyond "
                "the val noise): the model fits its training images much better than new ones."), True
    return (f"No sign of overfitting: train accuracy {_p(lrow['train_acc'])} vs val "
            f"{_p(lrow['val_acc'])} at the last epoch ({lrow['epoch']})."), False


def _two_phase_fact(epochs: list[dict], rows: list[dict], k: int | None,
                    n_val: int | None) -> tuple[str | None, bool]:
    """LP-FT: the head-alone phase (epochs 1-``k``) against the fine-tuning after it: what the linear probe
    reached and in how long, what fine-tuning added and at what cost in time; and whether that gain is within the
    val noise. (None, False) for a run without both phases measured."""
    two_phase = bool(k) and any(r["epoch"] > k for r in rows) and any(r["epoch"] <= k for r in rows)
    if not two_phase:
        return None, False
    head = [r for r in epochs if r["epoch"] <= k]
    ft = [r for r in epochs if r["epoch"] > k]
    hb = max((r for r in head if r.get("val_acc") is not None), key=lambda r: r["val_acc"])
    fb = max((r for r in ft if r.get("val_acc") is not None), key=lambda r: r["val_acc"])
    th, tf = sum(r.get("seconds") or 0 for r in head), sum(r.get("seconds") or 0 for r in ft)
    gain = fb["val_acc"] - hb["val_acc"]
    ft_tied = tied(hb["val_acc"], fb["val_acc"], n_val)
    hw = half_width(fb["val_acc"], n_val)
    span = f"epoch {k}" if k == 1 else f"epochs 1-{k}"
    times = f" at {tf / th:.0f}x the time ({_secs(tf)} vs {_secs(th)})" if th > 0 else ""
    return (f"The linear probe (head alone, {span}) reached {_p(hb['val_acc'])} in {_secs(th)}; "
            f"fine-tuning added {100 * gain:+.1f}" + (f" ± {_pts(hw)}" if hw is not None else "")
            + f" points{times}" + (": within the noise, so no measurable gain." if ft_tied else ".")), ft_tied


def _best_epoch_fact(epochs: list[dict], rows: list[dict], brow: dict, best_ep: int, n_ep: int,
                     n_val: int | None) -> tuple[str | None, str | None]:
    """Where the best epoch fell among ``n_ep``, and the curve's shape that the next step follows: the last and
    beyond the val noise of every epoch before it ("rising": more epochs may help), the last but within the noise
    of earlier epochs ("flat"), early (the epochs after it were wasted: "overtrained" when val loss rose after it,
    or without val losses when the last epoch is worse beyond the noise; else a "plateau") or in between
    ("middle"); (None, None) for one epoch."""
    if n_ep <= 1:
        return None, None
    if best_ep == n_ep:
        return _last_epoch_fact(rows, brow, n_ep, n_val)
    if best_ep > 0.6 * n_ep:
        return f"The best epoch was {best_ep} of {n_ep}.", "middle"
    after = [r for r in epochs if r["epoch"] > best_ep]
    wasted = sum(r.get("seconds") or 0 for r in after)
    last = rows[-1]
    vl = [brow.get("val_loss"), after[-1].get("val_loss")]
    worse = not tied(brow["val_acc"], last["val_acc"], n_val)
    over = vl[1] > vl[0] if None not in vl else worse
    acc = (f"the last one ({_p(last['val_acc'])}) is "
           + ("worse beyond the noise" if worse else "within the noise of it"))
    head = (f"The best epoch was early ({best_ep} of {n_ep}): the {len(after)} epochs after it ({_secs(wasted)}) "
            "did not beat it")
    if over:
        loss = f"; val loss went from {vl[0]:.3f} to {vl[1]:.3f}" if None not in vl else ""
        return f"{head}{loss}; {acc}: over-training.", "overtrained"
    if None in vl:
        return f"{head}; {acc}: a plateau.", "plateau"
    return (f"{head}; {acc}, and val loss kept falling ({vl[0]:.3f} to {vl[1]:.3f}): a plateau in accuracy, "
            "not over-training."), "plateau"


def _last_epoch_fact(rows: list[dict], brow: dict, n_ep: int, n_val: int | None) -> tuple[str, str]:
    """The best epoch is the last: "rising" when it beats every earlier epoch beyond the val noise, else "flat"
    since the first epoch of the run of epochs (up to the last) within the noise of it."""
    before = [r for r in rows if r["epoch"] < n_ep]
    prev = next((r for r in reversed(before)), None)
    what = f"The best epoch was the last ({n_ep} of {n_ep})"
    if prev is None:
        return f"{what}.", "flat"
    rise = brow["val_acc"] - prev["val_acc"]
    step = f"{100 * rise:+.1f} points over epoch {prev['epoch']}" if rise else f"level with epoch {prev['epoch']}"
    close = [r for r in before if tied(r["val_acc"], brow["val_acc"], n_val)]
    if not close:
        top = max(before, key=lambda r: r["val_acc"])
        return (f"{what} (+{_pts(brow['val_acc'] - top['val_acc'])} points over the best epoch before it, "
                f"{top['epoch']}: beyond the noise): accuracy may still be rising, so more epochs may help."), "rising"
    steady = _steady_rise(rows, n_val)
    if steady:
        return f"{what} ({step}): {steady}, so more epochs may help.", "rising"
    since = brow
    for r in reversed(before):
        if not tied(r["val_acc"], brow["val_acc"], n_val):
            break
        since = r
    if since is brow:  # the epoch just before is outside the noise, an earlier one within it
        return (f"{what} ({step}), but epoch {close[0]['epoch']} was already within the noise of it "
                f"({_p(close[0]['val_acc'])}): more epochs are unlikely to help."), "flat"
    return (f"{what} ({step}): accuracy has been flat within the noise since epoch {since['epoch']} "
            f"({_p(since['val_acc'])}), so more epochs are unlikely to help."), "flat"


STEADY_EPOCHS = 3  # rises in a row that make a trend, when each one alone is within the noise


def _steady_rise(rows: list[dict], n_val: int | None) -> str | None:
    """A trend that single steps hide: val accuracy rose at each of the last ``STEADY_EPOCHS`` epochs, by at least
    the noise's half width in all (+2 points an epoch on 240 images is within the noise at every step, but not over
    three). One image more at each of three epochs on a plateau is not it. None when there is no such rise."""
    tail = [r["val_acc"] for r in rows[-(STEADY_EPOCHS + 1):]]
    if len(tail) <= STEADY_EPOCHS or any(b <= a for a, b in zip(tail, tail[1:])):
        return None
    hw = half_width(tail[-1], n_val)
    if hw is None or tail[-1] - tail[0] < hw:
        return None
    first = rows[-(STEADY_EPOCHS + 1)]["epoch"]
    return (f"accuracy rose at each of the last {STEADY_EPOCHS} epochs, +{_pts(tail[-1] - tail[0])} points since "
            f"epoch {first} (each step within the noise, together more than it)")


def _test_fact(test: dict | None, brow: dict, n_val: int | None) -> str | None:
    """The held-out test accuracy against val at the best epoch (``brow``): within the noise of each other, or
    by how much the val number flatters or understates the model; None without a test result."""
    if not (test and test.get("accuracy") is not None):
        return None
    ht = half_width(test["accuracy"], test.get("n"))
    diff = test["accuracy"] - brow["val_acc"]
    same = tied(test["accuracy"], brow["val_acc"], min(test.get("n") or 0, n_val or 0) or None)
    return (f"Test accuracy {_p(test['accuracy'])}" + (f" ± {_pts(ht)}" if ht is not None else "")
            + f" on {test.get('n')} held-out images (never used to choose best.pt) vs val "
            f"{_p(brow['val_acc'])}: " + ("within the noise of each other." if same else
                                         f"{100 * diff:+.1f} points; the val number "
                                         f"{'flatters' if diff < 0 else 'understates'} the model."))


def _next_step(*, phase_tied: bool, overfit: bool, shape: str | None, cheap: bool, n_ep: int, best_ep: int,
               head: int | None, h: float | None, n_val: int | None, recipe: dict, run_dir: str) -> str:
    """The one concrete next step :func:`findings` suggests, the most useful that applies first: the linear probe
    is enough (``phase_tied``), regularise (what fits the run: :func:`_regularise`), train longer (accuracy
    still ``rising`` beyond the noise), stop sooner (``overtrained``, and not a ``cheap`` run of seconds),
    fine-tune the backbone (a head-only run: ``head`` None), more val images (a wide interval ``h``), or else
    compare backbones."""
    nxt: list[str] = []
    if phase_tied:
        nxt.append("The linear probe alone is as accurate within the noise: `--recipe linear-probe` gets it in a "
                   "fraction of the time; to make fine-tuning pay, try a lower LR (`--lr`).")
    if overfit:
        nxt.append(_regularise(recipe, head_only=head is None))
    if shape == "rising" and not overfit:
        nxt.append(f"Train longer: `finetune train --resume {run_dir} --epochs {2 * n_ep}` continues this run "
                   "to twice the epochs.")
    if shape == "overtrained" and not cheap:
        nxt.append(f"Stop sooner: `--early-stop 2` ends a run 2 epochs after its last improvement (here: "
                   f"epoch {min(best_ep + 2, n_ep)} instead of {n_ep}); best.pt stays the best epoch either way.")
    if head is None and not overfit and shape != "rising":
        nxt.append("Fine-tune: `--recipe lp-ft` also trains the backbone after the head (slower per epoch; "
                   "often a few points better on images unlike ImageNet's).")
    if not nxt and h is not None and h > 0.03:
        nxt.append(f"More val images: with {n_val} the interval is ± {_pts(h)} points; a bigger val set would "
                   "tell smaller differences apart.")
    if not nxt:
        nxt.append("Compare backbones on the same data: `finetune probe --model A --model B` ranks them in one "
                   "pass of cached features.")
    return nxt[0]


def _regularise(recipe: dict, *, head_only: bool) -> str:
    """Regularisation that fits what the run did: for a head-only run (only the head trains, on cached features)
    more weight decay than the recipe's, label smoothing, or ``finetune probe``'s LR x weight-decay sweep (never
    stronger augmentation, which turns the feature cache off, nor fewer trainable layers); otherwise stronger
    augmentation unless it was strong already, label smoothing unless set, more weight decay, fewer layers."""
    wd = float((recipe.get("optimizer") or {}).get("weight_decay") or 0)
    smooth = "" if (recipe.get("train") or {}).get("label_smoothing") else "`--label-smoothing 0.1`, "
    if head_only:
        return (f"Regularise the head (the only part that trains): more weight decay (`--weight-decay "
                f"{1e-2 if wd < 1e-2 else 10 * wd:g}`; this run had {wd:g}), {smooth}or let `finetune probe --wds "
                "1e-3,1e-2,1e-1` pick the LR and weight decay in one pass of cached features.")
    strong = ("" if (recipe.get("data") or {}).get("augment") == "strong"
              else "stronger augmentation (`--augment strong`), ")
    return (f"Regularise: {strong}{smooth}more weight decay (`--weight-decay`; this run had {wd:g}), or fewer "
            "trainable layers.")


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

        add_png(writer, "val/confusion_matrix", confusion_image(ev["confusion"], names), step)
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
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("torchvision", "timm"):  # the installed versions, without importing them (timm: ~2 s)
        try:
            env[mod] = version(mod)
        except PackageNotFoundError:  # pragma: no cover
            pass
    return env


def build_run_report(run_dir: str | Path, *, val_dataset=None, data: dict | None = None,
                     fresh: bool = False) -> dict[str, Any]:
    """Everything the run report shows, as data (figures as data URIs). ``val_dataset``/``data``: the run's own
    (at the end of a run); otherwise rebuilt from the checkpoint's data record, or taken from an earlier
    report.json. ``fresh``: the end of the run that just wrote best.pt (read memory-mapped, without the repair
    and checks that `finetune report` of any run directory does)."""
    from finetune import __version__

    run_dir = Path(run_dir)
    best_pt = run_dir / "best.pt"
    if not best_pt.is_file():
        raise CheckpointError(f"'{run_dir}' has no best.pt; finetune report takes a run directory written by "
                              "finetune train (or finetune probe)")
    t0 = time.perf_counter()
    ckpt = _load_best(best_pt, fresh)
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
    val_dataset, data = _run_data(ckpt, names, val_dataset, data, has_val)
    samples, confusion = _val_results(best_pt, val, samples, val_dataset, names)
    schedule = [(int(s["epoch"]), ", ".join(s["layers"])) for s in (recipe.get("freeze") or {}).get("schedule", [])]
    plan = ckpt.get("plan") or {}
    rows = _ckpt_freeze_rows(ckpt)
    report = {
        "kind": "run", "run_dir": str(run_dir), "title": run_dir.name, "model": ckpt.get("model_name"),
        "recipe_name": recipe.get("name", ""), "best": metrics.get("best", {}), "epochs": metrics.get("epochs", []),
        "best_epoch_in_ckpt": ckpt.get("epoch"), "unfreeze": schedule, "bn": plan.get("bn"),
        "freeze_rows": rows, "config_text": config_text, "environment": environment(picked, ckpt),
        "data": data, "finetune_version": __version__,
        "wall": _wall(run_dir, metrics_path, metrics),
        "figure_curves": (svg.uri(curves_svg(metrics.get("epochs", []), schedule, head_epochs(recipe)))
                          if metrics.get("epochs") else ""),
        "figure_freeze": svg.uri(freeze_svg(rows)) if rows else "",
        "eval": evaluation_part(confusion, names, samples, val_dataset) if has_val else None,
        "class_names": names, "test": _kept_test(metrics),
        "monitor": (recipe.get("train") or {}).get("monitor", "val_acc"),
    }
    n_val = sum(map(sum, confusion)) if has_val else None
    report["n_val"] = n_val or None
    report["findings"] = findings(report["epochs"], report["best"], recipe, report["n_val"], report["test"],
                                  str(run_dir))
    report["auto"], report["auto_note"] = decision.load_auto(run_dir)  # a run that finetune auto made: its choice
    if decision.auto_fact(report["auto"]):
        report["findings"]["facts"].insert(0, decision.auto_fact(report["auto"]))
    report["wall"]["report_seconds"] = time.perf_counter() - t0
    return report


def _load_best(best_pt: Path, fresh: bool) -> dict[str, Any]:
    """best.pt for the report. ``fresh`` (written by this process a moment ago): loaded memory-mapped, with nothing
    to repair or check, so the tensors stay on disk; otherwise (or when that load is not a plain single-file
    checkpoint) through :func:`load_checkpoint`, with its repair and checks."""
    from finetune.run.checkpoint import load_checkpoint

    if fresh:  # written by this process a moment ago: nothing to repair or check; the tensors stay on disk
        import torch

        ckpt = torch.load(best_pt, map_location="cpu", weights_only=True, mmap=True)
    if not fresh or not isinstance(ckpt, dict) or ckpt.get("sharded") or "model" not in ckpt:
        ckpt = load_checkpoint(best_pt)
    return ckpt


def _run_data(ckpt: dict, names: list[str], val_dataset, data: dict | None, has_val: bool) -> tuple[Any, dict | None]:
    """The run's val set and data summary where the caller has neither: rebuilt from the checkpoint's data record.
    Data that has moved or gone is a warning, not an error: the report then has everything but the thumbnails
    (and whatever of the two was already known)."""
    try:
        if has_val and val_dataset is None:
            val_dataset = _val_dataset_for(ckpt)
        if data is None:
            source = str((ckpt.get("data") or {}).get("path", ""))
            data = data_summary(names, _train_dataset_for(ckpt), val_dataset, None, source)
    except FinetuneError as e:  # data moved or gone: the report still has everything but the thumbnails
        log.warning(f"report: the run's data could not be read ({e}); thumbnails left out")
    return val_dataset, data


def _val_results(best_pt: Path, val: dict, samples: dict | None, val_dataset,
                 names: list[str]) -> tuple[dict | None, list[list[int]]]:
    """The per-image val results and the confusion matrix the report shows: the checkpoint's own when they match
    ``val_dataset``; else one val pass of best.pt over it (an older checkpoint, a probe, a DDP run), so that the
    thumbnails and the matrix describe the same images."""
    if val_dataset is not None and not _samples_match(samples, val_dataset):
        res = _predict_samples(best_pt, val_dataset)  # an older checkpoint, a probe, a DDP run: one val pass
        return res["samples"], res["confusion"]
    return samples, val.get("confusion") or [[0] * len(names) for _ in names]


def _ckpt_freeze_rows(ckpt: dict) -> list[dict]:
    """The freeze figure's rows: the parameter count of every tensor the plan froze or the run trained, by
    :func:`freeze_rows` (frozen at the start, trainable at the end)."""
    numel = {k: int(v.numel()) for k, v in ckpt["model"].items()
             if k in set(ckpt.get("plan", {}).get("frozen", [])) | set(ckpt.get("trainable", []))}
    plan = ckpt.get("plan") or {}
    return freeze_rows(numel, plan.get("frozen", []), ckpt.get("trainable", plan.get("trainable", [])))


def _wall(run_dir: Path, metrics_path: Path, metrics: dict) -> dict[str, Any]:
    """The run's wall-clock times: started (the run marker's time), ended (metrics.json's last write), the run's
    seconds between them, and the seconds its epochs took; ``report_seconds`` is added by the caller."""
    created = _created(run_dir)
    ended = metrics_path.stat().st_mtime if metrics_path.is_file() else None
    return {"run_started": _iso(created), "run_ended": _iso(ended),
            "run_seconds": (ended - created) if created and ended else None,
            "epoch_seconds": sum(r.get("seconds") or 0 for r in metrics.get("epochs", []))}


def _kept_test(metrics: dict) -> dict | None:
    """metrics.json's test result while it describes the best epoch's best.pt (a stale one is not shown)."""
    test = metrics.get("test")
    best = metrics.get("best") or {}
    return test if isinstance(test, dict) and test.get("epoch") == best.get("epoch") else None


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
                     data: dict | None = None, fresh: bool = False) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) and ``RUN_DIR/report.json``; returns the HTML's path
    (``fresh``: see :func:`build_run_report`)."""
    from finetune.files import atomic_write_text

    run_dir = Path(run_dir)
    rep = build_run_report(run_dir, val_dataset=val_dataset, data=data, fresh=fresh)
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
        path = write_run_report(run_dir, val_dataset=bundle.val, data=data, fresh=True)
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
    n = sum(map(sum, ev["confusion"]))
    s = [f'<p class="kpi">accuracy {pct(ev["accuracy"])} {pm_text(ev["accuracy"], n)} on {n} images'
         + (" <span class='muted'>(95% Wilson interval)</span>" if n else "") + "</p>",
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


def _md(text: str) -> str:
    """A finding as HTML: escaped, `code` spans as <code>."""
    parts = esc(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _findings_html(f: dict) -> str:
    return ("<h2>What this run says</h2><ul id='findings'>" + "".join(f"<li>{_md(x)}</li>" for x in f["facts"])
            + f"</ul><p><b>Next step:</b> {_md(f['next'])}</p>")


def _test_html(test: dict, monitor: str, run_dir: str) -> str:
    n = test.get("n")
    rows = [["accuracy", f"{pct(test['accuracy'])} {pm_text(test['accuracy'], n)}".strip()]]
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"), ("top5", "top-5"),
                       ("loss", "loss")):
        if test.get(key) is not None:
            rows.append([label, f"{test[key]:.4f}" if key == "loss" else pct(test[key])])
    return (f'<p class="kpi">test accuracy {pct(test["accuracy"])} {pm_text(test["accuracy"], n)} on {esc(n)} '
            "images <span class='muted'>(95% Wilson interval)</span></p>"
            f"<p>The test split was held out: evaluated once, after the last epoch, never used to pick best.pt, "
            f"which the val set selected (monitor <b>{esc(monitor)}</b>). Its heat map and mistakes: "
            f"<code>finetune eval {esc(run_dir)}/best.pt --split test --report test.html</code>.</p>"
            + table(["test split", ""], rows))


def render_html(rep: dict) -> str:
    """The report as one self-contained HTML page (inline CSS and images; no script, no external reference)."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{MARK}<title>finetune report: "
             f"{esc(rep['title'])}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(rep['title'])}</h1>"]
    if rep["kind"] == "run":
        best = rep.get("best") or {}
        test, n_val = rep.get("test"), rep.get("n_val")
        val = f"{pct(best.get('val_acc'))} {pm_text(best.get('val_acc'), n_val)}".strip()
        if test and test.get("accuracy") is not None:
            lead = (f"test accuracy <b>{pct(test['accuracy'])} {pm_text(test['accuracy'], test.get('n'))}</b> "
                    f"({esc(test.get('n'))} held-out images) &middot; val {val} (the set that selected best.pt)")
        else:
            lead = f"best val accuracy <b>{val}</b>"
        parts.append(f"<p class='sub'>model <b>{esc(rep['model'])}</b> &middot; recipe <b>{esc(rep['recipe_name'])}"
                     f"</b> &middot; {lead} at epoch {esc(best.get('epoch'))} of {len(rep['epochs'])} &middot; "
                     f"{esc(rep['wall']['run_started'])}</p>")
        if rep.get("findings"):
            parts.append(_findings_html(rep["findings"]))
        if rep.get("auto") or rep.get("auto_note"):
            parts.append(decision.auto_html(rep.get("auto"), rep.get("auto_note"), rep["run_dir"]))
        parts.append("<h2>Learning curves</h2>")
        parts.append(f'<img class="fig" id="fig-curves" src="{rep["figure_curves"]}" alt="learning curves">'
                     if rep["figure_curves"] else "<p>No epochs recorded.</p>")
        if rep["unfreeze"]:
            parts.append("<p>Unfreeze steps (dashed lines): " + ", ".join(
                f"epoch {e}: {esc(w)}" for e, w in rep["unfreeze"]) + "</p>")
        if test and test.get("accuracy") is not None:
            parts.append(f"<h2>Evaluation of best.pt (epoch {esc(rep['best_epoch_in_ckpt'])}) on the test set</h2>"
                         + _test_html(test, rep.get("monitor") or "val_acc", rep["run_dir"]))
            parts.append("<h2>Evaluation of best.pt on the val set (which selected it)</h2>")
        else:
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
