from __future__ import annotations

import json
from typing import List, Optional

import typer

from finetune.cli import options as O

HELP = ("Predict labels for images or folders of images with a checkpoint's eval transform: top-k labels and "
        "probabilities; a top-1 probability below --min-confidence is marked 'low confidence'.")



def predict(
    checkpoint: str = typer.Argument(..., help="A checkpoint (runs/<run>/best.pt) or a run directory."),
    paths: List[str] = typer.Argument(..., help="Image files or folders."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many labels per image."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu) | cpu | cuda | mps."),
    strict: bool = typer.Option(False, "--strict", help="Fail on an unreadable image instead of skipping it with a "
                                "warning."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
    as_csv: bool = typer.Option(False, "--csv", help="Print only CSV to stdout: image,label_1,prob_1,...,"
                                "low_confidence."),
    min_confidence: str = typer.Option("auto", "--min-confidence", help="Mark a prediction whose top-1 "
                                       "probability is below P as low confidence (the image may belong to none of "
                                       "the model's classes). auto: below what 95% of the correctly classified val "
                                       "images reached (the model's own calibration); 0 = off."),
    fast_inference: Optional[str] = typer.Option(None, "--fast-inference", help="auto | off: run a conv+BN-folded "
                                                 "copy of the model (default: the checkpoint's setting)."),
    trust_checkpoint: bool = O.TRUST,
) -> None:
    from finetune.api import ConfigError

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if as_json and as_csv:
        raise ConfigError("--json and --csv both print to stdout; pass one of them")
    threshold = _threshold(min_confidence)
    from finetune.api import predict as run_predict
    from finetune.api import finite_json, trusted

    with trusted(trust_checkpoint):
        rows = run_predict(checkpoint, list(paths), top_k=top_k, device=device, strict=strict,
                           fast_inference=fast_inference, min_confidence=threshold or None)
    low = [bool(r.get("low_confidence")) for r in rows]
    floor = rows[0].get("min_confidence", 0.0) if rows else 0.0
    if as_json:
        rows = [{**r, "low_confidence": lc} for r, lc in zip(rows, low)]
        typer.echo(json.dumps(finite_json(rows), allow_nan=False))  # a NaN probability -> null: strict JSON
        return
    k = len(rows[0]["top"])
    if as_csv:
        _write_csv(rows, low, k)
        return
    _print_table(rows, low, k)
    if any(low):
        _print_low_confidence_note(sum(low), len(rows), floor, threshold)


def _threshold(min_confidence: str) -> float | str:
    """``--min-confidence`` as ``predict`` takes it: ``"auto"``, or a probability from 0 to 1 (0 = off); anything
    else is a ConfigError naming what was given, before a checkpoint is read."""
    from finetune.api import ConfigError

    threshold: float | str = min_confidence.strip().lower()
    if threshold != "auto":
        try:
            threshold = float(threshold)
        except ValueError:
            threshold = -1.0
        if not 0 <= threshold <= 1:
            raise ConfigError(f"--min-confidence is auto or a probability from 0 to 1 (0 = off), got "
                              f"'{min_confidence}'")
    return threshold


def _write_csv(rows: list[dict], low: list[bool], k: int) -> None:
    """``--csv``: one header line (image, label_i, prob_i for the ``k`` labels, low_confidence), then one line per
    image, to stdout; names go through :func:`csv_cell` so a spreadsheet shows them as text."""
    import csv
    import sys

    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["image"] + [f"{c}_{i + 1}" for i in range(k) for c in ("label", "prob")] + ["low_confidence"])
    for r, lc in zip(rows, low):
        w.writerow([csv_cell(r["path"])] + [v for p in r["top"] for v in (csv_cell(p["label"]),
                                                                           f"{p['prob']:.6f}")]
                   + [str(lc).lower()])


def _print_table(rows: list[dict], low: list[bool], k: int) -> None:
    """The default output: a count line, then the images and their ``k`` labels as an aligned text table, a
    low-confidence mark at the end of a row."""
    from finetune.api import shown

    # plain aligned text, never truncated: a narrow terminal wraps lines instead of eliding the file names;
    # names from disk with their control characters escaped (an ESC or OSC in a file name never reaches the tty)
    header = ["image"] + [f"#{i + 1}" for i in range(k)] + [""]
    table = [header] + [[shown(r["name"])] + [f"{shown(p['label'])} {100 * p['prob']:.1f}%" for p in r["top"]]
                        + ["low confidence" if lc else ""] for r, lc in zip(rows, low)]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    typer.echo(f"{len(rows)} image{'' if len(rows) == 1 else 's'}")
    for row in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _print_low_confidence_note(n: int, total: int, floor: float, threshold: float | str) -> None:
    """After the table, when ``n`` of the ``total`` predictions are marked: the threshold that marked them (and
    where it came from), what a mark means and how to change it."""
    how = ("what 95% of the correctly classified val images reached" if threshold == "auto"
           else "--min-confidence")
    typer.echo(f"{n} of {total} prediction{'s' * (total != 1)} marked low confidence: top-1 "
               f"probability below {100 * floor:.1f}% ({how}): the image may belong to none of the model's "
               "classes, or look like several (--min-confidence P sets the threshold, 0 = off)")


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    """A file or class name as a CSV cell that a spreadsheet shows as text: a cell starting with = + - @ tab or
    carriage return gets a leading single quote (OWASP's rule against formula injection: "=HYPERLINK(...)" stays
    text), and control characters are escaped visibly (the CSV may be printed to a terminal). ``--json`` is
    exact."""
    from finetune.api import shown

    s = str(value)
    return shown("'" + s if s.startswith(_FORMULA) else s)
