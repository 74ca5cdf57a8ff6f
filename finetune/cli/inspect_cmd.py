from __future__ import annotations

import json
from typing import Optional

import typer

from finetune.cli import options as O

HELP = ("List a model's parameters (index, name, shape, numel, trainable) with totals; --modules shows the "
        "dotted module names that layer freezing takes. With freeze flags or --recipe, previews the freeze plan "
        "(trainable marks, frozen/trainable totals, a summary per top-level module) without training. Builds the "
        "architecture without downloading weights unless --weights is given.")


def inspect(
    model: Optional[str] = typer.Argument(
        None, help="smallcnn, a torchvision name (resnet18, vgg16, ...) or timm:<name>; default: the recipe's."),
    weights: str = typer.Option("none", "--weights", "-w",
                                help="none, DEFAULT, a torchvision/timm weights name, or a .pth/.safetensors file "
                                     "(a recipe's weights are not read: the plan needs names, not values)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", "-n",
                                              help="Replace the head for N classes (default: the recipe's)."),
    modules: bool = typer.Option(False, "--modules", "-m", help="Show the module tree with dotted names."),
    depth: int = typer.Option(2, "--depth", help="How deep --modules goes (dots in the name + 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
    recipe: Optional[str] = O.RECIPE,
    freeze_names: Optional[str] = O.FREEZE_NAMES,
    freeze_first: Optional[int] = O.FREEZE_FIRST,
    stages: Optional[int] = O.FREEZE_STAGES,
    freeze_layers: Optional[str] = O.FREEZE_LAYERS,
    freeze_backbone: Optional[bool] = O.FREEZE_BACKBONE,
    unfreeze: Optional[list[str]] = O.UNFREEZE,
    bn: Optional[str] = O.BN,
    trust_checkpoint: bool = O.TRUST,
) -> None:
    overrides = O.freeze_overrides(freeze_names, freeze_first, freeze_layers, freeze_backbone, unfreeze, bn, stages)
    rec = _recipe(recipe, overrides)
    head_note = None
    if rec is not None and recipe:
        model = model or rec.model.name
    if model:  # an unknown name or a missing weights file: the error before torch is imported
        from finetune.api import preflight

        preflight.check_model(model)
        preflight.weights_file(weights)
    if rec is not None and recipe:
        num_classes = num_classes if num_classes is not None else rec.model.num_classes
        if num_classes is None:
            num_classes, head_note = _data_classes(rec)
    if not model:
        from finetune.api import ConfigError

        raise ConfigError("give a MODEL (e.g. 'finetune inspect resnet18') or --recipe NAME")
    from finetune.api import trusted

    with trusted(trust_checkpoint):
        bb = _build(model, num_classes, weights)
    plan = None
    if rec is not None:
        from finetune.api import FreezeError, apply_freeze, from_recipe

        try:
            plan = apply_freeze(bb, rec.freeze)
        except FreezeError as e:
            raise from_recipe(e, recipe, [k for k, v in overrides.items() if v is not None]) from None
    doc = _doc(bb, plan, rec)
    if as_json:
        if modules:
            from finetune.api import module_rows

            doc["modules"] = module_rows(bb.model, depth)
        typer.echo(json.dumps(doc))
        return
    _print(bb, doc, plan, head_note, depth if modules else None)


def _doc(bb, plan, rec) -> dict:
    """The ``--json`` document: parameters, stages and (with a plan) the plan."""
    from finetune.api import inspect_json, model_stages

    doc = inspect_json(bb.name, bb.model)
    st = model_stages(bb)
    doc["stages"] = [{"stage": s.index, "from_head": s.index - len(st), "modules": s.modules,
                      "tensors": len(s.params)} for s in st]
    if plan is not None:
        doc["plan"] = _plan_doc(plan, rec.freeze.schedule)
    return doc


def _print(bb, doc: dict, plan, head_note: str | None, depth: int | None) -> None:
    from finetune.api import module_rows, shown
    from finetune.cli import render

    render.parameter_table(bb, doc)
    if head_note:
        typer.echo(shown(head_note))  # it names the recipe's data path
    typer.echo(f"stages (freeze.stages / --stages N, addresses stage:K; the head {','.join(bb.head)} is apart):")
    for s in doc["stages"]:
        typer.echo(f"  stage:{s['stage']:<3} stage:{s['from_head']:<4} {shown('+'.join(s['modules']))} "
                   f"({s['tensors']} tensors)")
    if plan is not None:
        render.plan_summary(plan, doc["plan"])
    if depth is not None:
        render.module_tree(bb, module_rows(bb.model, depth))


def _data_classes(rec) -> tuple[int | None, str]:
    """The class count of the recipe's data (the head training will build), or None with a note saying that the
    head shown is the backbone's own placeholder."""
    try:
        from finetune.api import data_class_count

        n = data_class_count(rec.data.path, rec.data.labels)
        if n >= 2:
            return n, f"head: {n} classes, from the recipe's data ({rec.data.path})"
    except Exception:  # noqa: BLE001 - a preview: fall back to the placeholder and say so
        pass
    return None, (f"head: the backbone's own class count, a placeholder: the recipe's data ({rec.data.path}) "
                  "could not be read here; training takes the count from the data (or pass --num-classes)")


def _recipe(recipe: Optional[str], overrides: dict):
    """The recipe with the flags applied, or None when neither a recipe nor a freeze flag was given."""
    if recipe is None and all(v is None for v in overrides.values()):
        return None
    from finetune import api

    base = api.load_recipe(recipe) if recipe else api.Recipe()
    from finetune.cli.options import FREEZE_KEYS, flags_of, name_flags

    with name_flags([k for k, v in overrides.items() if v is not None], flags_of(inspect, FREEZE_KEYS)):
        return api.apply_overrides(base, overrides)


def _plan_doc(plan, schedule) -> dict:
    """The ``plan`` entry of ``--json``: BN policy, applied steps, per-top-level-module summary, unfreeze schedule."""
    return {"bn": plan.bn, "steps": plan.steps, "summary": plan.summary(),
            "schedule": [{"epoch": s.epoch, "layers": list(s.layers), "lr_mult": s.lr_mult} for s in schedule]}


def _build(model: str, num_classes, weights: str):
    """Without weights the listing needs shapes, not values: build on the meta device."""
    from finetune.api import build_model, build_model_shapes

    if weights.lower() in ("none", "random"):
        return build_model_shapes(model, num_classes)
    return build_model(model, num_classes=num_classes, weights=weights)
