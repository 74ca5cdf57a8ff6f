"""``finetune auto``: which backbone, which strategy, how good, within a time budget (finetune/tools/auto.py)."""

from __future__ import annotations

from typing import Optional

import typer

from finetune.cli import options as O

HELP = ("Pick the backbone and the strategy for your data within a time budget, and train it: probes every "
        "candidate (--model a=WEIGHTS,b=WEIGHTS, or a default shelf of well-known backbones whose weights are "
        "here) on cached features with k-fold cross-validation when val is small, picks the best estimate (ties "
        "within noise go to the faster model), then trains LP-FT with epochs sized to the budget, or stops at the "
        "linear probe when fine-tuning can't pay off. Writes a normal run directory, plus auto.json, recipe.yaml "
        "(finetune train --recipe reruns it) and the decision in report.html.")


def auto(
    data: str = typer.Option(..., "--data", "-d", help="Image folder (same layouts as train; a test/ folder is "
                             "evaluated once at the end)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Candidates, comma-separated, each with its "
                                        "own weights: timm:a=/w/a.safetensors,resnet18 (default: the shelf, "
                                        "those whose pretrained weights can be had)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Wall-clock budget for the whole command: 90s, "
                                         "20m, 1h30m (default: none; LP-FT runs its 5 epochs)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<time>-auto)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous finetune run in --out."),
    folds: int = typer.Option(5, "--folds", help="k of the k-fold cross-validation used when val has fewer than "
                              "1000 images (0: always the val split)."),
    labels: Optional[str] = O.option_of("data.labels"),
    val_split: Optional[float] = O.option_of("data.val_split"),
    image_size: Optional[int] = O.option_of("data.image_size"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Batch size (default 32)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (batch order; the data split; the folds)."),
    device: Optional[str] = O.option_of("train.device"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Feature cache root (default $FINETUNE_CACHE "
                                                                      "or ~/.cache/finetune)."),
    as_json: bool = typer.Option(False, "--json", help="Print only auto.json to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors (and --json)."),
) -> None:
    from finetune import api

    seconds = api.preflight.parse_budget(budget)  # the flags first, no torch
    if batch_size is not None and batch_size < 1:
        raise api.ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if folds < 0 or folds == 1:
        raise api.ConfigError(f"--folds must be 0 (the val split) or at least 2, got {folds}")

    def progress(msg: str) -> None:
        if not quiet:
            typer.echo("\n".join(api.shown(line) for line in str(msg).split("\n")), err=True)

    from finetune.cli.progress import RichReporter

    reporter = RichReporter(quiet=quiet or as_json)
    with O.quiet_logs(quiet), api.sigterm_as_interrupt():
        res = api.auto(model, data=data, budget=seconds, out=out, overwrite=overwrite, cache_dir=cache_dir,
                       folds=folds, progress=progress, reporter=reporter, labels=labels, val_split=val_split,
                       image_size=image_size, batch_size=batch_size, seed=seed, device=device, precision=precision)
    if as_json:
        typer.echo((res.run_dir / "auto.json").read_text())
        return
    if not quiet:
        render(res)


def render(res) -> None:
    """The candidates table and the decision, after the run's own summary."""
    from rich.table import Table

    from finetune.cli.render import pct_pm
    from finetune.cli.render import console, term
    from finetune.api import preflight

    t = Table(title=f"finetune auto: candidates ({res.candidates[0].method or 'not probed'})", title_justify="left")
    for col in ("model", "estimate (95%)", "", "k-NN", "img/s", "params", "time"):
        t.add_column(col, justify="left" if col in ("model", "") else "right",
                     overflow="fold" if col == "model" else "ellipsis")
    for c in res.candidates:
        if c.status != "ok":
            t.add_row(term(c.model), "skipped", "", "", "", "", f"{c.seconds:.0f} s")
            continue
        knn = max(c.knn.values()) if c.knn else None
        mark = "[green]winner[/green]" if c.winner else "≈" if c.tied else ""
        t.add_row(term(c.model), pct_pm(c.acc, c.n), mark, "-" if knn is None else f"{100 * knn:.1f}%",
                  f"{c.images_per_sec:.3g}" if c.images_per_sec else "-",
                  f"{c.parameters / 1e6:.1f}M" if c.parameters else "-", f"{c.seconds:.0f} s")
    console.print(t)
    for c in res.candidates:
        if c.status != "ok":
            console.print(f"skipped {term(c.model)}: {term(c.reason or '')}", highlight=False, soft_wrap=True)
    for r in res.decision.reasons:
        console.print(f"- {term(r)}", highlight=False, soft_wrap=True)
    test = res.result.test
    line = f"{res.decision.strategy}, {res.epochs} epochs: best val {pct_pm(res.result.best_val_acc, _val_n(res))}"
    if test:
        line += f", test {pct_pm(test.get('accuracy'), test.get('n'))}"
    used = f"{preflight.budget_text(res.seconds)}" + (f" of {preflight.budget_text(res.budget)}" if res.budget else "")
    console.print(f"{line}; {used}. Run: {term(res.run_dir)} (report.html; rerun: finetune train --recipe "
                  f"{term(res.run_dir)}/recipe.yaml --out NEW_DIR)", highlight=False, soft_wrap=True)


def _val_n(res) -> int | None:
    ok = [c for c in res.candidates if c.status == "ok"]
    return ok[0].val_images if ok else None
