from __future__ import annotations

import json
from typing import Optional

import typer

HELP = ("List a model's parameters (index, name, shape, numel, trainable) with totals; --modules shows the "
        "dotted module names that layer freezing takes. Builds the architecture without downloading weights "
        "unless --weights is given.")


def inspect(
    model: str = typer.Argument(..., help="smallcnn, a torchvision name (resnet18, vgg16, ...) or timm:<name>."),
    weights: str = typer.Option("none", "--weights", "-w",
                                help="none, DEFAULT, a torchvision/timm weights name, or a .pth/.safetensors file."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", "-n", help="Replace the head for N classes."),
    modules: bool = typer.Option(False, "--modules", "-m", help="Show the module tree with dotted names."),
    depth: int = typer.Option(2, "--depth", help="How deep --modules goes (dots in the name + 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
) -> None:
    from finetune.params import inspect_json, module_rows

    bb = _build(model, num_classes, weights)
    doc = inspect_json(bb.name, bb.model)
    if as_json:
        if modules:
            doc["modules"] = module_rows(bb.model, depth)
        typer.echo(json.dumps(doc))
        return
    from finetune.cli import render

    render.parameter_table(bb, doc)
    if modules:
        render.module_tree(bb, module_rows(bb.model, depth))


def _build(model: str, num_classes, weights: str):
    """Without weights, build on the meta device: the listing needs shapes, not values (vgg16: ~0.1 s, not 2 s)."""
    import torch

    from finetune.errors import FinetuneError
    from finetune.models import build_model

    if weights.lower() in ("none", "random"):
        try:
            with torch.device("meta"):
                return build_model(model, num_classes=num_classes, weights=weights)
        except FinetuneError:
            raise
        except Exception:  # noqa: BLE001 - a constructor that needs real tensors (regnet): build it for real
            pass
    return build_model(model, num_classes=num_classes, weights=weights)
