from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from finetune.cli import options as O

HELP = ("Evaluate a checkpoint: accuracy (argmax under eval() + inference_mode), top-5, loss, per-class accuracy "
        "and the confusion matrix. Rebuilds the model from the checkpoint alone.")


def eval_(
    checkpoint: str = typer.Argument(..., help="A checkpoint (runs/<run>/best.pt) or a run directory."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data to evaluate on (default: the run's data)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="prefix:A=x,=y | regex:PATTERN | csv:FILE "
                                         "(default: the run's, when --data is the run's data)."),
    split: str = typer.Option("val", "--split", help="val | train | test (ROOT/test/, or CIFAR's test set) | all "
                       "(each split the data has, one after another)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per batch (no effect on the result)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu) | cpu | cuda | mps."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 (default: the "
                                            "checkpoint's, which reproduces the accuracy training recorded)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write this HTML report: confusion heat "
                                          "map, per-class precision/recall/F1, the most confidently wrong images."),
    fast_inference: Optional[str] = typer.Option(None, "--fast-inference", help="auto | off: run a conv+BN-folded "
                                                 "copy of the model (default: the checkpoint's setting)."),
    trust_checkpoint: bool = O.TRUST,
) -> None:
    from finetune.api import ConfigError

    if split not in ("val", "train", "test", "all"):
        raise ConfigError(f"--split must be val, train, test or all, got '{split}'")
    if precision is not None and precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be fp32, bf16 or fp16, got '{precision}'")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    from finetune.api import evaluate_checkpoint, finite_json, trusted

    with trusted(trust_checkpoint):
        res = evaluate_checkpoint(checkpoint, data, split, device=device, batch_size=batch_size,
                                  precision=precision, labels=labels, report=report,
                                  fast_inference=fast_inference)
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "top5", "loss", "n", "per_class", "confusion")
    results = res if split == "all" else {split: res}
    if as_json:
        pick = {s: {**{k: r[k] for k in keys}, "accuracy_ci": accuracy_ci(r)} for s, r in results.items()}
        out = pick if split == "all" else pick[split]
        typer.echo(json.dumps(finite_json(out), allow_nan=False))  # NaN -> null: strict JSON
        return
    for name, r in results.items():
        _show(r, name)


def accuracy_ci(res: dict) -> list[float] | None:
    """The accuracy's 95% Wilson interval on the split's images, [low, high] (``--json``'s ``accuracy_ci``)."""
    from finetune.api import wilson

    ci = wilson(res["accuracy"], res["n"])
    return None if ci is None else [ci[0], ci[1]]


def accuracy_text(acc: float | None, n: int | None) -> str:
    """``"86.67% ± 4.2 (95%, 240 images)"``: the accuracy and how far the noise of ``n`` images reaches."""
    from finetune.api import pm_text

    if acc is None:
        return "-"
    pm = pm_text(acc, n)
    return f"{100 * acc:.2f}%" + (f" {pm} (95%, {n} images)" if pm else "")


def _show(res: dict, split: str) -> None:
    from finetune.cli.render import console, term

    top5 = "" if res["top5"] is None else f"   top-5 {100 * res['top5']:.2f}%"
    console.print(f"{term(res['checkpoint'])} (epoch {res['epoch']}) on {term(res['data'])} ({split} split): "
                  f"{res['n']} images\n"
                  f"accuracy {accuracy_text(res['accuracy'], res['n'])}{top5}   balanced accuracy "
                  f"{100 * res['balanced_accuracy']:.2f}%   macro-F1 {100 * res['macro_f1']:.2f}%   loss "
                  f"{res['loss']:.4f}", highlight=False, soft_wrap=True)  # no wrap: no trailing spaces
    t = _matrix(res)
    if table_width(t) <= console.width:
        console.print(t)
    else:  # rich would squeeze the columns to "bl…" and "10…": the per-class numbers as a list instead
        for line in per_class_lines(res, console.width):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"confusion matrix: --json, or --report FILE (too wide for {console.width} columns)",
                      highlight=False, soft_wrap=True)
    if res.get("report"):
        console.print(f"report: {term(res['report'])}", highlight=False)


def _matrix(res: dict):
    """The confusion matrix with each class's accuracy, as a rich table."""
    from rich.table import Table

    from finetune.cli.render import term

    names = res["class_names"]
    t = Table(title="confusion matrix (rows: true class, columns: predicted)", title_justify="left")
    t.add_column("class", no_wrap=True)
    for n in names:
        t.add_column(term(n[:10]), justify="right", no_wrap=True)
    t.add_column("accuracy", justify="right", no_wrap=True)
    for n, row in zip(names, res["confusion"]):
        acc = res["per_class"][n]
        t.add_row(term(n), *[str(v) for v in row], "no samples" if acc is None else f"{100 * acc:.1f}%")
    return t


def table_width(t) -> int:
    """The columns ``t`` needs to show every cell whole (rich's widest measurement)."""
    from rich.console import Console

    return Console(width=100_000).measure(t).maximum


def per_class_lines(res: dict, width: int) -> list[str]:
    """Each class's accuracy and image count (its confusion row's sum) as markup lines, two entries a line when
    they fit ``width``, in class order down the first column then the second."""
    from finetune.cli.render import cell_width, term

    entries = []
    for n, row in zip(res["class_names"], res["confusion"]):
        acc = res["per_class"][n]
        entries.append((term(n), "no samples" if acc is None else f"{100 * acc:.1f}%", str(sum(row))))
    nw = max([5] + [cell_width(e[0]) for e in entries])
    aw = max([8] + [len(e[1]) for e in entries])
    cw = max([1] + [len(e[2]) for e in entries])

    def cell(name: str, acc: str, n: str) -> str:
        return f"{name}{' ' * (nw - cell_width(name))}  {acc:>{aw}}  {n:>{cw}}"

    per = 2 if 2 * (nw + aw + cw + 4) + 4 <= width and len(entries) > 1 else 1
    rows = -(-len(entries) // per)
    cols = [entries[i * rows:(i + 1) * rows] for i in range(per)]
    lines = ["    ".join([cell("class", "accuracy", "n")] * per)]
    for r in range(rows):
        lines.append("    ".join(cell(*c[r]) for c in cols if r < len(c)))
    return ["per-class accuracy (n: the class's images in this split)"] + lines
