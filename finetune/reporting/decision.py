"""The run report's "How this model was chosen": what ``finetune auto`` decided and why, read from the run
directory's ``auto.json`` (the candidates it probed with their estimates and 95% Wilson intervals, the winner and
the ties within noise, the strategy, the reasons, the time budget, the command that reruns it).

auto.json is read as untrusted text: every key may be missing, of the wrong type or absurd, and a file that is not
a JSON object costs a one-line note in the section's place, never an exception. :func:`load_auto` turns the file
into a normalised dict (known keys, checked types: numbers are finite floats or None, texts are str or None);
:func:`auto_html` and :func:`auto_fact` only read that. No torch, no figures: a few milliseconds.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

from finetune.reporting.html import esc
from finetune.training.stats import half_width, wilson

AUTO_JSON = "auto.json"
MAX_BYTES = 4 << 20  # a larger auto.json is not one finetune wrote: left out unread


# ------------------------------------------------------------------------------------------------ reading


def _num(x: Any) -> float | None:
    """A finite number as float; anything else (bool, text, NaN, an int too large for a float) as None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        f = float(x)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _count(x: Any) -> int | None:
    """A positive whole number (an image or parameter count); None otherwise."""
    f = _num(x)
    return int(f) if f is not None and f == int(f) and 0 < f < 1e15 else None


def _text(x: Any) -> str | None:
    """A text value (numbers shown as written); None for anything else (a list, a dict, null). A lone surrogate
    (JSON allows "\\udc80") is shown escaped: it cannot be written as UTF-8."""
    if isinstance(x, str):
        return x.encode("utf-8", "backslashreplace").decode("utf-8")
    return str(x) if _num(x) is not None else None


def _candidate(c: dict) -> dict[str, Any]:
    """One candidate with its keys checked (see the module's docstring)."""
    ci = c.get("ci")
    ci = [_num(v) for v in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
    knn = c.get("knn")
    knn = {str(k): _num(v) for k, v in knn.items() if _num(v) is not None} if isinstance(knn, dict) else {}
    return {"model": _text(c.get("model")), "weights": _text(c.get("weights")),
            "status": _text(c.get("status")) or "ok", "reason": _text(c.get("reason")),
            "acc": _num(c.get("acc")), "ci": ci if ci and None not in ci else None, "n": _count(c.get("n")),
            "knn": knn, "lr": _num(c.get("lr")), "weight_decay": _num(c.get("weight_decay")),
            "images_per_sec": _num(c.get("images_per_sec")),
            "train_images_per_sec": _num(c.get("train_images_per_sec")),
            "parameters": _count(c.get("parameters")), "seconds": _num(c.get("seconds")),
            "from_store": c.get("from_store") is True, "tied": c.get("tied") is True, "winner": False}


def normalise(raw: dict) -> dict[str, Any]:
    """auto.json's object with its keys checked: unknown keys dropped, wrong types as None, candidates that are not
    objects dropped; ``winner`` is the chosen candidate's index (auto.json's ``winner``, else the first candidate
    marked ``winner``; None when neither names one) and that candidate alone has ``winner`` True."""
    raw_cands = [c for c in raw.get("candidates") or [] if isinstance(c, dict)] \
        if isinstance(raw.get("candidates"), list) else []
    cands = [_candidate(c) for c in raw_cands]
    w = raw.get("winner")
    if not (isinstance(w, int) and not isinstance(w, bool) and 0 <= w < len(cands)):
        w = next((i for i, c in enumerate(raw_cands) if c.get("winner") is True), None)
    if w is not None:
        cands[w]["winner"] = True
    stages = raw.get("stages")
    stages = {str(k): _num(v) for k, v in stages.items() if _num(v) is not None} if isinstance(stages, dict) else {}
    data = raw.get("data")
    data = {k: _count(data.get(k)) for k in ("train", "val", "test", "classes")} if isinstance(data, dict) else {}
    reasons = raw.get("reasons")
    reasons = [t for t in (_text(r) for r in reasons) if t] if isinstance(reasons, list) else []
    return {"version": _num(raw.get("version")), "budget_seconds": _num(raw.get("budget_seconds")),
            "seconds": _num(raw.get("seconds")), "stages": stages, "data": data,
            "estimate": _text(raw.get("estimate")), "candidates": cands, "winner": w,
            "strategy": _text(raw.get("strategy")), "epochs": _count(raw.get("epochs")), "reasons": reasons,
            "recipe": _text(raw.get("recipe"))}


def load_auto(run_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """``run_dir``'s auto.json as (normalised dict, None); (None, None) when there is none (a run ``finetune
    auto`` did not make); (None, note) when it cannot be shown: unreadable, too large, not JSON, not an object.
    The note is one line that names the file and why."""
    path = Path(run_dir) / AUTO_JSON
    if not path.exists() and not path.is_symlink():
        return None, None
    why = None
    try:
        if path.stat().st_size > MAX_BYTES:
            why = f"{path.stat().st_size:,} bytes, more than finetune auto writes"
        else:
            raw = json.loads(path.read_bytes())
    except OSError as e:
        why = f"unreadable: {e.strerror or type(e).__name__}"
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON; nested too deep
        why = f"not valid JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if why is None and not isinstance(raw, dict):
        why = f"a JSON {type(raw).__name__}, not the object finetune auto writes"
    if why is not None:
        return None, f"{AUTO_JSON} is left out of this report ({why})."
    try:
        return normalise(raw), None
    except Exception as e:  # noqa: BLE001 - a foreign file never breaks the report (normalise checks every type)
        return None, f"{AUTO_JSON} is left out of this report (it could not be read: {type(e).__name__})."


# ------------------------------------------------------------------------------------------------ text


def _p(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _secs(s: float | None) -> str:
    """Seconds as auto.json has them (a budget is given in seconds): "310.2 s", "1,830 s"."""
    if s is None:
        return "-"
    return f"{s:.1f} s" if abs(s) < 1000 else f"{s:,.0f} s"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def _half(c: dict) -> float | None:
    """The ± of a candidate's estimate: the Wilson half-width on its ``n`` images (the codebase's ± everywhere),
    else half its recorded interval."""
    h = half_width(c["acc"], c["n"])
    if h is None and c["ci"]:
        h = (c["ci"][1] - c["ci"][0]) / 2
    return h


def estimate_text(c: dict) -> str:
    """``"95.1% ± 1.6"`` (points), ``"95.1%"`` without an interval, ``"-"`` without an estimate."""
    if c["acc"] is None:
        return "-"
    h = _half(c)
    return _p(c["acc"]) + ("" if h is None else f" ± {100 * h:.1f}")


def _interval(c: dict) -> str:
    ci = c["ci"] or (wilson(c["acc"], c["n"]) if c["acc"] is not None else None)
    return "-" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def strategy_text(a: dict) -> str:
    """How the winner was trained: "LP-FT (4 epochs)", "a linear probe", or auto.json's word as written."""
    s, ep = a["strategy"], a["epochs"]
    eps = f" ({ep} epoch{'s' if ep != 1 else ''})" if ep else ""
    if s is None:
        return "an unrecorded strategy"
    return {"lp-ft": "LP-FT", "linear-probe": "a linear probe"}.get(s.lower(), s) + eps


def auto_fact(a: dict | None) -> str | None:
    """The findings' line: what auto chose, how, among how many candidates, and the winner's probe estimate; None
    without auto.json or without a winner (or if it cannot be written: never an exception)."""
    try:
        return _fact(a)
    except Exception:  # noqa: BLE001 - the report goes on without the line
        return None


def _fact(a: dict | None) -> str | None:
    if not a or a["winner"] is None:
        return None
    c = a["candidates"][a["winner"]]
    n = len(a["candidates"])
    skipped = sum(x["status"] == "skipped" for x in a["candidates"])
    among = f"{n} candidate{'s' if n != 1 else ''}" + (f" ({skipped} skipped)" if skipped else "")
    est = estimate_text(c)
    on = f" on {c['n']} images" if c["n"] else ""
    return (f"`finetune auto` chose {c['model'] or 'an unnamed model'} with {strategy_text(a)} among {among}"
            + (f"; its probe estimate was {est}{on}." if est != "-" else "."))


def budget_text(a: dict) -> str:
    """Seconds per stage, the total, and the total against the budget ("within budget" or "over by X%")."""
    stages = " · ".join(f"{k} {_secs(v)}" for k, v in a["stages"].items())
    total = a["seconds"] if a["seconds"] is not None else (sum(a["stages"].values()) if a["stages"] else None)
    if total is None:
        return (stages + "; " if stages else "") + "total time not recorded."
    head = (f"{stages}; " if stages else "") + f"total {_secs(total)}"
    if a["seconds"] is None:
        head += " (the stages' sum)"
    b = a["budget_seconds"]
    if b is None or b <= 0:
        return head + " (no time budget)."
    if total <= b:
        return f"{head} of a {_secs(b)} budget: within budget ({100 * total / b:.0f}% used)."
    over = 100 * (total / b - 1)
    over_t = f"{over:.0f}" if over >= 10 else f"{over:.1f}"
    return f"{head} of a {_secs(b)} budget: over by {over_t}% ({_secs(total - b)} more)."


# ------------------------------------------------------------------------------------------------ HTML

LEFT, LINES = "text-align:left", "white-space:pre"  # LINES: a line per value, none broken
COLUMNS = [("model, weights file", LEFT), ("estimate, 95% interval", LINES), ("k-NN", LINES),
           ("head LR, WD", LINES), ("img/s forward", ""), ("img/s training", ""), ("parameters", LINES),
           ("probe time", LINES)]
LEGEND = ("★ chosen · ≈ within noise of the top estimate (ties are broken by cost) · k-NN: a k-nearest-neighbour "
          "classifier on the same features, estimated the same way · probe time: what the candidate cost in the "
          "probe stage (cached: its features came from the feature cache).")


def _md(text: str) -> str:
    """Text as HTML: escaped, `code` spans as <code> (as the findings)."""
    parts = esc(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _knn(knn: dict[str, float]) -> str:
    def key(k: str) -> tuple[int, float, str]:
        f = _num(float(k)) if re.fullmatch(r"\s*\d+(\.\d*)?\s*", k) else None
        return (0, f, "") if f is not None else (1, 0.0, k)

    return "\n".join(f"k={k}  {_p(v)}" for k, v in sorted(knn.items(), key=lambda kv: key(kv[0])))


def _cells(c: dict) -> list[str]:
    """One candidate's table cells, as plain text (escaped by the caller; a newline starts a line in the cell)."""
    mark = "★\u00a0" if c["winner"] else "≈\u00a0" if c["tied"] else ""
    weights = re.split(r"[\\/]", c["weights"])[-1] if c["weights"] else "-"
    hp = "\n".join(f"{x:g}" for x in (c["lr"], c["weight_decay"]) if x is not None) or "-"
    params = "-" if c["parameters"] is None else f"{c['parameters'] / 1e6:.2f} M"
    secs = _secs(c["seconds"]) + (" (cached)" if c["from_store"] else "")
    on = f"on {c['n']} images" if c["n"] is not None and c["acc"] is not None else "-"
    est = "\n".join(x for x in (estimate_text(c), _interval(c), on) if x != "-") or "-"
    return [mark + (c["model"] or "?"), weights, est, _knn(c["knn"]) or "-", hp, _rate(c["images_per_sec"]),
            _rate(c["train_images_per_sec"]), params, secs]


def _note(c: dict) -> str:
    """What a candidate that was not probed (``status`` other than "ok") says instead of its numbers."""
    est = f" (its estimate: {estimate_text(c)})" if c["acc"] is not None else ""
    return c["status"] + (f": {c['reason']}" if c["reason"] else "") + est


def candidates_table(cands: list[dict]) -> str:
    """The candidates as an HTML table (every text escaped): the winner's row bold, a skipped one muted with its
    reason across the row, the weights file by name under the model (its full path as the tooltip)."""
    th = "".join(f"<th style='{style}'>{esc(h)}</th>" if style == LEFT else f"<th>{esc(h)}</th>"
                 for h, style in COLUMNS)
    rows = []
    for c in cands:
        attr = " style='font-weight:bold'" if c["winner"] else "" if c["status"] == "ok" else " class='muted'"
        model, weights, *rest = _cells(c)
        title = f" title='{esc(c['weights'])}'" if c["weights"] else ""
        cells = [f"<td style='{LEFT}'{title}>{esc(model)}<br><span class='muted'>{esc(weights)}</span></td>"]
        if c["status"] == "ok":
            cells += [f"<td style='{style}'>{esc(x)}</td>" if style else f"<td>{esc(x)}</td>"
                      for x, (_, style) in zip(rest, COLUMNS[1:])]
        else:
            cells.append(f"<td colspan='{len(COLUMNS) - 1}' style='{LEFT}'>{esc(_note(c))}</td>")
        rows.append(f"<tr{attr}>" + "".join(cells) + "</tr>")
    return f"<div style='overflow-x:auto'><table id='auto-candidates'><tr>{th}</tr>{''.join(rows)}</table></div>"


def _rerun(a: dict, run_dir: str) -> str:
    if not a["recipe"]:
        return "<p class='muted'>The recipe that reruns this model was not recorded.</p>"
    path = Path(run_dir) / a["recipe"]
    cmd = f"<code>{esc('finetune train --recipe ' + shlex.quote(str(path)))}</code>"
    if path.is_file():
        return f"<p>Rerun it without the search: {cmd}</p>"
    return f"<p class='warn'>Rerun it without the search: {cmd} (that file is missing from the run directory).</p>"


def _data_text(d: dict) -> str:
    """"540 train · 180 val · 240 test images, 12 classes" (what is recorded of it)."""
    parts = []
    imgs = " · ".join(f"{d[k]} {k}" for k in ("train", "val", "test") if d.get(k))
    if imgs:
        parts.append(imgs + " images")
    if d.get("classes"):
        parts.append(f"{d['classes']} classes")
    return ", ".join(parts)


def auto_html(a: dict | None, note: str | None, run_dir: str) -> str:
    """The section: the choice in one line, the data, how the estimates were made, the candidates, the reasons,
    the time against the budget, the rerun command. ``note`` alone (a muted line) when auto.json could not be
    read, or the section could not be written (never an exception); "" when there is none."""
    if a is not None:
        try:
            return _section(a, run_dir)
        except Exception as e:  # noqa: BLE001 - the rest of the report matters more than this section
            note = f"{AUTO_JSON} is left out of this report (it could not be shown: {type(e).__name__})."
    return f"<p class='muted' id='auto-note'>{esc(note)}</p>" if note else ""


def _section(a: dict, run_dir: str) -> str:
    n = len(a["candidates"])
    win = a["candidates"][a["winner"]] if a["winner"] is not None else None
    s = ["<h2 id='auto'>How this model was chosen</h2>",
         f"<p><code>finetune auto</code> compared {n} candidate backbone{'s' if n != 1 else ''} and "
         + (f"chose <b>{esc(win['model'] or '?')}</b>, trained with {esc(strategy_text(a))}.</p>" if win
            else "recorded no winner.</p>")]
    if _data_text(a["data"]):
        s.append(f"<p>Data: {esc(_data_text(a['data']))}.</p>")
    if a["estimate"]:
        s.append(f"<p>Estimates: {_md(a['estimate'])} (accuracy ± half its 95% Wilson interval, in points)."
                 "</p>")
    s.append(candidates_table(a["candidates"]) + f"<p class='muted'>{esc(LEGEND)}</p>" if n
             else "<p class='muted'>No candidates recorded.</p>")
    if a["reasons"]:
        s.append("<h3>Why</h3><ul id='auto-reasons'>" + "".join(f"<li>{_md(r)}</li>" for r in a["reasons"])
                 + "</ul>")
    s.append(f"<p id='auto-budget'>Time: {esc(budget_text(a))}</p>")
    s.append(_rerun(a, run_dir))
    return "\n".join(s)
