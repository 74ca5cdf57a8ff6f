from __future__ import annotations

from typing import Optional

import typer

HELP = "List the shipped recipes with a one-line description, or print one: finetune recipes NAME."


def recipes(name: Optional[str] = typer.Argument(None, help="A recipe name or a path to a YAML file.")) -> None:
    from finetune import api

    if name:
        path = api.recipe_path(name)
        api.load_recipe(name)  # validate before printing, so a broken recipe is an error, not a listing
        typer.echo(path.read_text(encoding="utf-8"), nl=False)
        return
    names = api.recipe_names()
    width = max((len(n) for n in names), default=0)
    for n in names:
        typer.echo(f"{n.ljust(width)}  {api.describe(api.recipes_dir() / f'{n}.yaml')}")
