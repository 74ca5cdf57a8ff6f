"""Command-line options built from the recipe schema, and their mapping back onto recipe keys. No torch import.

Every flag that sets a recipe key is declared once, on the key's field in :mod:`finetune.config` (flag name, alias,
help, panel); the options of ``train`` and ``lr-find`` (:func:`command`) and ``inspect``'s freeze options are
generated from those declarations, and so is the map from a recipe key back to its flag (:func:`flag_map`), which
names the flag in an error about the key. Each flag replaces the one recipe key it names; the recipe's other
freeze keys stay (``--freeze-first 0``, ``--freeze-names ''``, ``--freeze-layers ''`` and ``--no-freeze-backbone``
clear one).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, List, Literal, Optional, Union

import typer

from finetune.api import ConfigError, many_errors, recipe_flags

TRUST = typer.Option(False, "--trust-checkpoint",
                     help="Also load files that hold pickled Python objects (a whole model saved with "
                          "torch.save(model)). Unpickling runs any code in the file: use only for files you trust.")
RECIPE = typer.Option(None, "--recipe", "-r", help="Recipe name (see 'finetune recipes') or path to a YAML file.")
PANELS = ("Recipe", "Model", "Data", "Freezing", "Optimization", "Run")  # the order of the options in --help


def panel(option, name: str):
    """A copy of a shared option shown under help panel ``name``."""
    import copy

    opt = copy.copy(option)
    opt.rich_help_panel = name
    return opt


@dataclass(frozen=True)
class RecipeOption:
    """One generated option: the recipe ``key`` it sets, the command's ``param`` name, the ``flag`` declared on the
    key's field, the ``kind`` click parses the value as and how the value becomes the key's (``value``)."""

    key: str
    param: str
    flag: Any
    kind: Any
    value: Callable[[Any], Any]

    def option(self) -> Any:
        decls = [self.flag.name] + [self.flag.short] * bool(self.flag.short)
        return typer.Option(None, *decls, help=self.flag.help, rich_help_panel=self.flag.panel)

    def parameter(self) -> inspect.Parameter:
        return inspect.Parameter(self.param, inspect.Parameter.KEYWORD_ONLY, default=self.option(),
                                 annotation=Optional[self.kind])


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _number_or_word(value: str) -> Any:
    """``--lr 0.1`` or ``--lr auto``: a number when it reads as one, else the word as typed (the recipe check
    names the flag and the value)."""
    try:
        return float(value)
    except ValueError:
        return value


def _kind(tp: Any, repeat: bool) -> tuple[Any, Callable[[Any], Any]]:
    """What click parses a flag of field type ``tp`` as, and how its value becomes the key's: the field's own type
    without its checks (the recipe check reports a bad value, naming the flag); a list is one comma-separated
    value (``repeat``: a value per use of the flag); a number or a word (``lr: auto``) is typed as a string."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _kind(typing.get_args(tp)[0], repeat)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _kind(args[0], repeat) if len(args) == 1 else (str, _number_or_word)
    if origin is Literal:
        return str, lambda v: v
    if origin is list:
        return (List[str], list) if repeat else (str, _split)
    return tp, lambda v: v


@functools.cache
def recipe_options() -> tuple[RecipeOption, ...]:
    """The options of every recipe key that has a flag, in schema order (:func:`finetune.config.recipe_flags`)."""
    out = []
    for key, tp, fl in recipe_flags():
        kind, value = _kind(tp, fl.repeat)
        param = fl.name.split("/")[0].lstrip("-").replace("-", "_")
        out.append(RecipeOption(key, param, fl, kind, value))
    return tuple(out)


def option_of(key: str) -> Any:
    """The typer option of recipe key ``key``, for a command that declares its parameters itself (``inspect``)."""
    return next(o for o in recipe_options() if o.key == key).option()


FREEZE_NAMES, FREEZE_FIRST, FREEZE_STAGES, FREEZE_LAYERS, FREEZE_BACKBONE, UNFREEZE, BN = (
    option_of(f"freeze.{k}") for k in ("names", "first", "stages", "layers", "backbone", "unfreeze", "bn"))


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


def overrides(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted recipe keys (those starting with ``prefix``) for :func:`finetune.config.apply_overrides` from a
    command's parameter values; ``None`` = flag not given. ``--unfreeze`` sets ``freeze.unfreeze`` (the layers
    trainable now) and ``freeze.schedule`` (``L@EPOCH``), each only when it has entries."""
    out: dict[str, Any] = {}
    for o in recipe_options():
        v = values.get(o.param)
        if not o.key.startswith(prefix):
            continue
        if o.key == "freeze.unfreeze":
            now, steps = parse_unfreeze(list(v or ()))
            out.update({k: x for k, x in (("freeze.unfreeze", now), ("freeze.schedule", steps)) if x})
        else:
            out[o.key] = None if v is None else o.value(v)
    return out


def freeze_overrides(freeze_names: Optional[str] = None, freeze_first: Optional[int] = None,
                     freeze_layers: Optional[str] = None, freeze_backbone: Optional[bool] = None,
                     unfreeze: Optional[List[str]] = None, bn: Optional[str] = None,
                     stages: Optional[int] = None) -> dict[str, Any]:
    """The ``freeze.*`` keys of :func:`overrides` from the freeze flags' values; ``None`` = flag not given."""
    return overrides(dict(locals()), "freeze.")


def flag_map() -> dict[str, str]:
    """Recipe key -> the flag that sets it (``--freeze-backbone/--no-freeze-backbone`` -> ``--freeze-backbone``),
    generated from the schema: one mapping for every message that names a flag."""
    flags = {o.key: o.flag.name.split("/")[0] for o in recipe_options()}
    flags["freeze.schedule"] = flags["freeze.unfreeze"]  # --unfreeze L@EPOCH
    return flags


FREEZE_KEYS = {k: f.lstrip("-").replace("-", "_") for k, f in flag_map().items() if k.startswith("freeze.")}
# recipe key -> the parameter of a command that takes the freeze options (inspect)


def flags_of(command, keys: dict[str, str]) -> dict[str, str]:
    """Recipe key -> the flag that sets it, from ``keys`` (recipe key -> parameter name of ``command``) and the
    typer options' own declarations."""
    params = inspect.signature(command).parameters
    return {key: next(d.split("/")[0] for d in params[name].default.param_decls if d.startswith("--"))
            for key, name in keys.items()}


def command(body: Callable[[dict[str, Any]], None], *own: Callable[..., None]) -> Callable[..., None]:
    """A typer command taking an option per flagged recipe key plus the parameters of each ``own`` (the options
    that set no recipe key: declared as an ordinary typer function's), in PANELS order; ``body`` gets the values as
    ``{parameter: value}``."""
    params = [o.parameter() for o in recipe_options()]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for fn in own for p in inspect.signature(fn, eval_str=True).parameters.values()]
    names = [p.name for p in params]
    assert len(set(names)) == len(names), f"two options with one parameter name: {names}"
    params.sort(key=lambda p: PANELS.index(p.default.rich_help_panel))

    def cmd(**values: Any) -> None:
        body(values)

    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__name__, cmd.__doc__ = body.__name__, body.__doc__
    return cmd


@contextmanager
def name_flags(given, flags: dict[str, str]):
    """Prefix a recipe-key error (``ConfigError.key``) with the flag the user typed: ``--lr: optimizer.lr must be
    greater than 0``; each of several errors (``.errors``) likewise. ``given``: the recipe keys the flags set;
    ``flags``: :func:`flag_map`."""

    def flag_of(e: ConfigError) -> str | None:
        key = getattr(e, "key", None) or ""
        hit = [k for k in given if key == k or key.startswith((k + ".", k + "["))]
        return flags[max(hit, key=len)] if hit else None

    def brief(e: ConfigError) -> str:
        text = getattr(e, "brief", None) or str(e)
        return f"{flag_of(e)}: {text}" if flag_of(e) else text

    try:
        yield
    except ConfigError as e:
        several = getattr(e, "errors", None)
        if several and any(flag_of(x) for x in several):
            raise many_errors(several, "the command" if e.subject == "the recipe" else e.subject, brief) from None
        if flag_of(e):
            raise ConfigError(f"{flag_of(e)}: {e}") from None
        raise


@contextmanager
def quiet_logs(quiet: bool):
    """``--quiet``: the ``finetune`` logger's information lines (progress of the feature extraction, cache notes)
    are not printed while the command runs; warnings and errors are."""
    log = logging.getLogger("finetune")
    level = log.level
    if quiet:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
