"""Command-line flags shared by ``train`` and ``inspect``, and their mapping onto recipe keys. No torch import.

Each flag replaces the one recipe key it names; the recipe's other freeze keys stay (``--freeze-first 0``,
``--freeze-names ''``, ``--freeze-layers ''`` and ``--no-freeze-backbone`` clear one).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, List, Optional

import typer

from finetune.api import ConfigError

FREEZE_NAMES = typer.Option(None, "--freeze-names",
                            help="Freeze parameters whose name contains A or B (globs match whole names): A,B.")
FREEZE_FIRST = typer.Option(None, "--freeze-first", help="Freeze the first N parameter tensors (YOLOv5's --freeze N).")
FREEZE_STAGES = typer.Option(None, "--stages",
                             help="fastai's freeze_to: -N trains the last N stages and the head, N freezes the first "
                                  "N stages (stages per architecture: see 'finetune inspect MODEL').")
FREEZE_LAYERS = typer.Option(None, "--freeze-layers",
                             help="Freeze modules by dotted path (conv1,bn1,layer1) or stage address "
                                  "(stage:0, stage:-1).")
FREEZE_BACKBONE = typer.Option(None, "--freeze-backbone/--no-freeze-backbone",
                               help="Freeze everything except the head (linear probing).")
UNFREEZE = typer.Option(None, "--unfreeze",
                        help="Repeatable. L1,L2 makes them trainable again now; L1,L2@EPOCH[:LR_MULT] unfreezes at "
                             "the start of epoch EPOCH (1 = the first, as logged) with LR x LR_MULT (e.g. "
                             "stage:-1@2:0.1, all@4:0.01).")
BN = typer.Option(None, "--bn", help="BatchNorm: frozen (the running stats of frozen layers stay fixed; default), "
                 "eval (every BN layer keeps its running stats, also after an unfreeze; its scale/shift still "
                 "train) or train.")
TRUST = typer.Option(False, "--trust-checkpoint",
                     help="Also load files that hold pickled Python objects (a whole model saved with "
                          "torch.save(model)). Unpickling runs any code in the file: use only for files you trust.")
RECIPE = typer.Option(None, "--recipe", "-r", help="Recipe name (see 'finetune recipes') or path to a YAML file.")


def panel(option, name: str):
    """A copy of a shared option shown under help panel ``name``."""
    import copy

    opt = copy.copy(option)
    opt.rich_help_panel = name
    return opt


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_unfreeze(items: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Split ``--unfreeze`` values into immediate targets and schedule steps ``{epoch, layers, lr_mult}``."""
    now: list[str] = []
    steps: list[dict[str, Any]] = []
    for item in items:
        if "@" not in item:
            now += _split(item)
            continue
        layers, _, when = item.partition("@")
        epoch, _, mult = when.partition(":")
        try:
            step = {"epoch": int(epoch), "layers": _split(layers), "lr_mult": float(mult) if mult else 1.0}
        except ValueError:
            step = {}
        if not step or not step["layers"]:
            raise ConfigError(f"--unfreeze '{item}' must be LAYERS or LAYERS@EPOCH[:LR_MULT], e.g. layer4@2:0.1")
        steps.append(step)
    return now, steps


def freeze_overrides(freeze_names: Optional[str] = None, freeze_first: Optional[int] = None,
                     freeze_layers: Optional[str] = None, freeze_backbone: Optional[bool] = None,
                     unfreeze: Optional[List[str]] = None, bn: Optional[str] = None,
                     stages: Optional[int] = None) -> dict[str, Any]:
    """Dotted recipe keys for :func:`finetune.config.apply_overrides`; ``None`` = flag not given."""
    out: dict[str, Any] = {
        "freeze.names": None if freeze_names is None else _split(freeze_names),
        "freeze.first": freeze_first,
        "freeze.stages": stages,
        "freeze.layers": None if freeze_layers is None else _split(freeze_layers),
        "freeze.backbone": freeze_backbone,
        "freeze.bn": bn,
    }
    if unfreeze:
        now, steps = parse_unfreeze(list(unfreeze))
        if now:
            out["freeze.unfreeze"] = now
        if steps:
            out["freeze.schedule"] = steps
    return out


FREEZE_KEYS = {"freeze.names": "freeze_names", "freeze.first": "freeze_first", "freeze.stages": "stages",
               "freeze.layers": "freeze_layers", "freeze.backbone": "freeze_backbone", "freeze.unfreeze": "unfreeze",
               "freeze.schedule": "unfreeze", "freeze.bn": "bn"}  # recipe key -> parameter of the freeze options


def flags_of(command, keys: dict[str, str]) -> dict[str, str]:
    """Recipe key -> the flag that sets it, generated from ``keys`` (recipe key -> parameter name of ``command``)
    and the typer options' own declarations (``--freeze-backbone/--no-freeze-backbone`` -> ``--freeze-backbone``).
    """
    import inspect

    params = inspect.signature(command).parameters
    return {key: next(d.split("/")[0] for d in params[name].default.param_decls if d.startswith("--"))
            for key, name in keys.items()}


@contextmanager
def name_flags(given, flags: dict[str, str]):
    """Prefix a recipe-key error (``ConfigError.key``) with the flag the user typed: ``--lr: optimizer.lr must be
    greater than 0``. ``given``: the recipe keys the flags set; ``flags``: :func:`flags_of`."""
    try:
        yield
    except ConfigError as e:
        key = getattr(e, "key", None) or ""
        hit = [k for k in given if key == k or key.startswith((k + ".", k + "["))]
        if hit:
            raise ConfigError(f"{flags[max(hit, key=len)]}: {e}") from None
        raise
