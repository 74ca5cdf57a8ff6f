"""``finetune runs [DIR]`` (a table of the runs) and ``finetune compare RUN_A RUN_B ...`` (configuration
differences and metrics side by side; ``--html`` with the curves overlaid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

RUNS_HELP = ("List the runs under DIR (default runs/): model, recipe, best val accuracy ± its 95% interval, epochs, "
             "training time, date. Reads config.yaml and metrics.json only (fast). In a narrow terminal the "
             "least useful columns are left out (a footer line names them).")
COMPARE_HELP = ("Compare runs: the recipe keys whose values differ, and best val accuracy (± its 95% interval; "
                "differences within noise marked as ties), epochs and time side by side; --html OUT writes the same "
                "with the learning curves overlaid.")


def _acc(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _acc_pm(v, n) -> str:
    from finetune.cli.render import pct_pm

    return pct_pm(v, n)


def _loss(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _secs(v) -> str:
    """Training seconds as a reader wants them: a cached linear probe's 0.43 s is not "0 s"."""
    if v is None:
        return "-"
    return f"{v:.2g} s" if v < 10 else f"{v:.0f} s" if v < 600 else f"{v / 60:.1f} min"


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
    from finetune.cli.render import console, fitted_table, term

    cells = {"run": [term(Path(r["path"]).relative_to(folder) if r["path"] != str(folder) else r["name"])
                     for r in rows],
             "model": [term(r["model"]) for r in rows], "recipe": [term(r["recipe"]) or "-" for r in rows],
             "best val acc": [_acc_pm(r["best_val_acc"], r.get("val_images"))
                              + (f" @{r['best_epoch']}" if r["best_val_acc"] is not None else "") for r in rows],
             "epochs": [term(f"{r['epochs']}/{r['epochs_planned']}") for r in rows],
             "train time": [_secs(r["train_seconds"]) for r in rows], "date": [r["date"] for r in rows],
             "report": ["yes" if r["report"] else "-" for r in rows]}
    t, dropped = fitted_table(f"runs under {term(folder)}", cells, console.width, fold="run",
                              right=("best val acc", "epochs", "train time"), stack=("model", "recipe"),
                              drop=("report", "date", "train time", "epochs"))
    console.print(t)
    if any(r.get("val_images") for r in rows):
        console.print("best val acc: ± the 95% interval (Wilson) on the run's val images; @N: its epoch",
                      highlight=False)
    if dropped:
        console.print(f"columns left out to fit {console.width}: {', '.join(dropped)}; --json has them",
                      highlight=False)


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
    from finetune.cli.render import console, term

    console.print(_metrics_table(res))
    if len(res["runs"]) > 1 and res.get("top") is not None:
        _print_noise_notes(console, res["runs"])
    console.print(_differences_table(res) if res["differences"] else "configuration: the same in every run")
    if html is not None:
        console.print(f"html: {term(html)}", highlight=False)


def _versus_top(res: dict, i: int, r: dict) -> str:
    """The "vs the top" cell of run ``r`` (the ``i``-th): "top" for the most accurate run, else its difference in
    points from it, or that the difference is within the val noise (or that the noise is unknown)."""
    top = res.get("top")
    if top is None or r["best_val_acc"] is None:
        return "-"
    if i == top:
        return "top"
    top_acc = res["runs"][top]["best_val_acc"]
    diff = f"{100 * (r['best_val_acc'] - top_acc):+.2f}"
    return {True: f"≈ tie ({diff}, within noise)", False: f"{diff} points"}.get(r["tie_with_top"],
                                                                              f"{diff} (noise unknown)")


def _metrics_table(res: dict):
    """``compare``'s metrics table: one column per run, one row per measure (model, recipe, best val accuracy with
    its 95% interval, how it stands against the top run, epochs, loss, time, date)."""
    from rich.table import Table

    from finetune.cli.render import term

    m = Table(title="metrics", title_justify="left")
    m.add_column("")
    for n in (r["name"] for r in res["runs"]):
        m.add_column(term(n), justify="right", overflow="fold")
    index = {id(r): i for i, r in enumerate(res["runs"])}
    for label, fn in (("model", lambda r: term(r["model"])), ("recipe", lambda r: term(r["recipe"])),
                      ("best val acc (95%)", lambda r: _acc_pm(r["best_val_acc"], r.get("val_images"))),
                      ("val images", lambda r: "-" if not r.get("val_images") else str(r["val_images"])),
                      ("vs the top", lambda r: _versus_top(res, index[id(r)], r)),
                      ("best epoch", lambda r: str(r["best_epoch"])),
                      ("epochs", lambda r: term(f"{r['epochs']}/{r['epochs_planned']}")),
                      ("final train loss", lambda r: _loss((r["history"] or [{}])[-1].get("train_loss"))),
                      ("train time", lambda r: _secs(r["train_seconds"])), ("date", lambda r: r["date"])):
        m.add_row(label, *[fn(r) for r in res["runs"]])
    return m


def _print_noise_notes(console, runs: list[dict]) -> None:
    """Under the metrics of several runs: what "≈" means, and a warning when the runs were measured on val sets of
    different sizes (their accuracies are then not comparable)."""
    console.print("≈: within noise of the top run (95% Wilson intervals on the val images): the difference is "
                  "no evidence either way", highlight=False)
    counts = {r.get("val_images") for r in runs}
    if len(counts) > 1:
        console.print("the runs' val sets differ (" + ", ".join("?" if n is None else str(n) for n in
                                                              (r.get("val_images") for r in runs))
                      + " images): their accuracies measure different things", highlight=False)


def _differences_table(res: dict):
    """``compare``'s configuration table: one row per recipe key whose value differs, one column per run (a
    non-string value shown as JSON)."""
    from rich.table import Table

    from finetune.cli.render import term

    d = Table(title="configuration differences", title_justify="left")
    d.add_column("key")
    for n in (r["name"] for r in res["runs"]):
        d.add_column(term(n), overflow="fold")
    for k, vs in res["differences"].items():
        d.add_row(term(k), *[term(json.dumps(v, default=str) if not isinstance(v, str) else v) for v in vs])
    return d
