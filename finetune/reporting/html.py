"""The HTML and PNG pieces that the run report (:mod:`.report`) and ``finetune compare --html`` (:mod:`.runs`)
share: matplotlib without a display, figures as inline PNG data, escaping, tables, the page style, and where a report
may be written. No torch: ``compare`` reads only the run directories' text files.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def mpl_text(text: Any) -> str:
    """User text (a class, run, layer or group name) as matplotlib draws it literally: every ``$`` escaped, so
    "a$b" or "$x^2$" is not mathtext (an unbalanced or invalid formula made the whole figure fail to draw);
    matplotlib shows ``\\$`` in plain text as ``$``. Control characters are escaped visibly, as in the terminal
    (the font has no glyph for them)."""
    from finetune.errors import shown

    return shown(text).replace("$", r"\$")


def png(fig) -> str:
    """``fig`` as an inline ``data:`` PNG URL; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)  # layout by tight_layout: bbox "tight" would draw twice
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


MARK = '<meta name="generator" content="finetune report">'  # what lets a later report replace this file
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;
padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.sub{color:#666}table{border-collapse:collapse;font-size:.9em;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}img.fig{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:124px;font-size:.75em;line-height:1.25;overflow-wrap:anywhere}
.card img{width:112px;height:112px;display:block;border:3px solid #c0392b;border-radius:3px}
.card.ok img{border-color:#e0a800}.muted{color:#777}pre{background:#f7f7f7;padding:10px;overflow:auto;
font-size:.8em}.kpi{font-size:1.15em}.warn{color:#c0392b}
"""


def esc(x: Any) -> str:
    """Any value as HTML text (quotes escaped too: safe inside attributes)."""
    return html.escape(str(x), quote=True)


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals; None as '-'."""
    return "-" if x is None else f"{100 * x:.2f}%"


def table(head: list[str], rows: list[list[Any]]) -> str:
    """A plain HTML table, every cell escaped."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def check_out(out: str | Path) -> Path:
    """Where a report may go: an .html file whose folder exists, and never over a file that is not a report
    (``--report best.pt`` must not replace a checkpoint)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"report file '{out}' must end in .html (it is one HTML page); e.g. --report "
                          f"{out.with_suffix('.html').name}")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write the report to '{out}': folder '{out.parent}' does not exist; create it "
                          "first")
    if out.is_dir() or (out.exists() and MARK not in out.read_bytes()[:400].decode("utf-8", "replace")):
        raise ConfigError(f"'{out}' exists and is not a finetune report; pick another file name (reports are "
                          "only written over earlier reports)")
    return out
