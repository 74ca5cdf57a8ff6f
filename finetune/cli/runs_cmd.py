"""``finetune runs [DIR]`` (a table of the runs) and ``finetune compare RUN_A RUN_B ...`` (configuration
differences and metrics side by side; ``--html`` with the curves overlaid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

RUNS_HELP = ("List the runs under DIR (default runs/): model, recipe, best val accuracy, epochs, training time, "
             "date. Reads config.yaml and metrics.json only (fast).")
COMPARE_HELP = ("Compare runs: the recipe keys whose values differ, and best val accuracy, epochs and time side by "
                "side; --html OUT writes the same with the learning curves overlaid.")


def _acc(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _loss(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _secs(v) -> str:
    return "-" if v is None else f"{v:.0f} s" if v < 600 else f"{v / 60:.1f} min"


def runs(
    folder: Path = typer.Argument(Path("runs"), help="The folder holding run directories (default runs/)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
) -> None:
    from finetune.api import list_runs

    rows = list_runs(folder)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        from finetune.api import shown

        typer.echo(f"no runs under '{shown(folder)}' (finetune train writes them to runs/)", err=True)
        return
    from rich.table import Table

    from finetune.cli.render import console, term

    t = Table(title=f"runs under {term(folder)}", title_justify="left")
    for col, just in (("run", "left"), ("model", "left"), ("recipe", "left"), ("best val acc", "right"),
                      ("epochs", "right"), ("train time", "right"), ("date", "left"), ("report", "left")):
        t.add_column(col, justify=just, overflow="fold", no_wrap=col in ("run", "best val acc", "epochs", "date"))
    for r in rows:
        t.add_row(term(Path(r["path"]).relative_to(folder) if r["path"] != str(folder) else r["name"]),
                  term(r["model"]), term(r["recipe"]),
                  _acc(r["best_val_acc"]) + (f" @{r['best_epoch']}" if r["best_val_acc"] is not None else ""),
                  term(f"{r['epochs']}/{r['epochs_planned']}"), _secs(r["train_seconds"]), r["date"],
                  "yes" if r["report"] else "")
    console.print(t)


def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Two or more run directories."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write this HTML page (curves overlaid)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
) -> None:
    from finetune.api import compare_runs, write_compare_html

    if html is not None:
        from finetune.api import check_report_path

        check_report_path(html)
    res = compare_runs(run_dirs)
    if html is not None:
        write_compare_html(res, html)
    if as_json:
        typer.echo(json.dumps({"runs": [{k: v for k, v in r.items() if k != "config"} for r in res["runs"]],
                               "differences": res["differences"]}, default=str))  # a YAML date: its text
        return
    from rich.table import Table

    from finetune.cli.render import console, term

    names = [r["name"] for r in res["runs"]]
    m = Table(title="metrics", title_justify="left")
    m.add_column("")
    for n in names:
        m.add_column(term(n), justify="right", overflow="fold")
    for label, fn in (("model", lambda r: term(r["model"])), ("recipe", lambda r: term(r["recipe"])),
                      ("best val acc", lambda r: _acc(r["best_val_acc"])),
                      ("best epoch", lambda r: str(r["best_epoch"])),
                      ("epochs", lambda r: term(f"{r['epochs']}/{r['epochs_planned']}")),
                      ("final train loss", lambda r: _loss((r["history"] or [{}])[-1].get("train_loss"))),
                      ("train time", lambda r: _secs(r["train_seconds"])), ("date", lambda r: r["date"])):
        m.add_row(label, *[fn(r) for r in res["runs"]])
    console.print(m)
    d = Table(title="configuration differences", title_justify="left")
    d.add_column("key")
    for n in names:
        d.add_column(term(n), overflow="fold")
    for k, vs in res["differences"].items():
        d.add_row(term(k), *[term(json.dumps(v, default=str) if not isinstance(v, str) else v) for v in vs])
    console.print(d if res["differences"] else "configuration: the same in every run")
    if html is not None:
        console.print(f"html: {term(html)}", highlight=False)
