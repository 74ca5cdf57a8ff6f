from __future__ import annotations

import json
from typing import List

import typer

from finetune.cli import options as O

HELP = ("Predict labels for images or folders of images with a checkpoint's eval transform: top-k labels and "
        "probabilities.")


def predict(
    checkpoint: str = typer.Argument(..., help="A checkpoint (runs/<run>/best.pt) or a run directory."),
    paths: List[str] = typer.Argument(..., help="Image files or folders."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many labels per image."),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
    trust_checkpoint: bool = O.TRUST,
) -> None:
    from finetune.api import ConfigError

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    from finetune.api import predict as run_predict
    from finetune.api import trusted

    with trusted(trust_checkpoint):
        rows = run_predict(checkpoint, list(paths), top_k=top_k, device=device)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.table import Table

    from finetune.cli.render import console

    t = Table(title=f"{len(rows)} images", title_justify="left")
    t.add_column("image")
    for i in range(min(top_k, len(rows[0]["top"]))):
        t.add_column(f"#{i + 1}")
    for r in rows:
        t.add_row(r["path"], *[f"{p['label']} {100 * p['prob']:.1f}%" for p in r["top"]])
    console.print(t)
