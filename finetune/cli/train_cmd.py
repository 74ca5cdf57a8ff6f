from __future__ import annotations

from typing import Optional

import typer

HELP = "Train a model from a recipe (default: smallcnn on the bundled sample data)."


def train(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe name (see 'finetune recipes') or path."),
) -> None:
    from finetune import config
    from finetune.errors import FinetuneError

    config.load_recipe(recipe or "default")
    raise FinetuneError("training is not implemented yet in this version; 'finetune inspect MODEL' works "
                        "(see README, 'Status')")
