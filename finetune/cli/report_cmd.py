"""``finetune report RUN_DIR``: the run report as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = ("Write RUN_DIR/report.html: learning curves, the confusion matrix as a heat map, per-class precision / "
        "recall / F1, the most confidently wrong val images, the freeze plan, recipe, environment and data summary. "
        "One self-contained file (images inline) that opens in any browser.")


def report(
    run_dir: Path = typer.Argument(..., help="A run directory (runs/<run>) holding best.pt and metrics.json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the HTML here instead (default "
                                       "RUN_DIR/report.html)."),
) -> None:
    from finetune.api import write_report

    path = write_report(run_dir, out)
    typer.echo(str(path))
