from __future__ import annotations

import json
from typing import Optional

import typer

HELP = ("List the backbones finetune can build: smallcnn, torchvision classification models, and timm models "
        "(as timm:<name>), with their known pretrained weights. PATTERN is a glob (resnet*) or a substring.")


def models(
    pattern: Optional[str] = typer.Argument(None, help="Glob or substring, e.g. 'resnet*', 'timm:vit_*', 'efficient'."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Only models with known pretrained weights."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
) -> None:
    from finetune.api import list_models

    rows = list_models(pattern, pretrained_only=pretrained)
    if not rows and not as_json:
        from finetune.api import ConfigError

        raise ConfigError(f"no models match '{pattern}'; patterns are globs ('resnet*', 'timm:vit_*') or "
                          "substrings ('efficient')")
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.table import Table

    from finetune.cli.render import console

    t = Table(title=f"{len(rows)} models" + (f" matching '{pattern}'" if pattern else ""), title_justify="left")
    t.add_column("source")
    t.add_column("name")
    t.add_column("pretrained weights")
    for r in rows:
        w = r["weights"]
        shown = ", ".join(w[:3]) + (f", ... (+{len(w) - 3})" if len(w) > 3 else "")
        t.add_row(r["source"], r["name"], shown or "-")
    console.print(t)
