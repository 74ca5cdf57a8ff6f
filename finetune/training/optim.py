"""Optimizers over trainable parameters only, with readable parameter groups (schedulers live in engine.py).

Every group carries ``params``, ``lr``, ``base_lr`` (base LR x multipliers, before any schedule),
``weight_decay`` and ``name``. A scheduler sets ``group["lr"] = group["base_lr"] * factor``, so groups added by an
unfreeze step later follow the same schedule.

Grouping, deterministic (resume rebuilds the same groups before loading the optimizer state):

- Parameters with ``ndim <= 1`` (biases, norm weights) get weight decay 0, in a ``"<label> (no_decay)"`` group,
  when ``weight_decay > 0``.
- ``lr_mult``: ``{path: multiplier}``; a path is a dotted module path, a glob over parameter names, or the special
  ``backbone`` (everything but the head) / ``head``. The most specific (longest) matching path wins.
- ``layer_decay`` (timm/BEiT style): layer ``i`` of ``L`` gets ``layer_decay ** (L - 1 - i)``, so the head trains
  at the full LR and the stem at the smallest. The layers of a timm model are timm's own (``group_matcher``, as in
  ``param_groups_layer_decay``: one per block); of other models, the top-level modules in order, then the head
  (labelled by its module paths). It multiplies with ``lr_mult``.
- Groups appear in the order of their first parameter in ``named_parameters()``; empty groups are dropped.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from finetune.config import choices
from finetune.errors import ConfigError, FreezeError, suggest
from finetune.models.sources import uses_group_matcher
from finetune.training.freeze import unfreeze_layers

if TYPE_CHECKING:
    from finetune.config import OptimizerCfg, UnfreezeStep
    from finetune.models.backbone import Backbone

log = logging.getLogger("finetune")

OPTIMIZERS = choices("optimizer.name")  # written once: the type of OptimizerCfg.name


def _no_decay(p: nn.Parameter) -> bool:
    return p.ndim <= 1


def _path_matches(bb: Backbone, path: str, name: str, head: set[str]) -> bool:
    if path == "backbone":
        return name not in head
    if path == "head":
        return name in head
    if any(c in path for c in "*?["):
        return fnmatch.fnmatchcase(name, path)
    return name == path or name.startswith(path + ".")


def _check_lr_mult(bb: Backbone, cfg: OptimizerCfg, names: list[str], head: set[str]) -> None:
    """A multiplier for a path that matches no parameter at all is a typo: say so."""
    for path in cfg.lr_mult:
        if not any(_path_matches(bb, path, n, head) for n in names):
            modules = [m for m, _ in bb.model.named_modules() if m]
            raise ConfigError(f"optimizer.lr_mult: '{path}' matches no parameter of {bb.name}"
                              f"{suggest(path, ['backbone', 'head', *modules])}")


def _lr_mult(bb: Backbone, cfg: OptimizerCfg, name: str, head: set[str]) -> tuple[str | None, float]:
    hits = [p for p in cfg.lr_mult if _path_matches(bb, p, name, head)]
    if not hits:
        return None, 1.0
    best = max(hits, key=lambda p: (p not in ("backbone", "head"), len(p)))
    return best, cfg.lr_mult[best]


def layer_ids(bb: Backbone) -> tuple[dict[str, int], dict[str, str]]:
    """Each parameter's layer for layer-wise LR decay (0 = the stem) and its unit label.

    Models whose source has ``group_matcher`` (timm) use timm's own grouping (``param_groups_layer_decay``
    semantics: one layer per block, ``blocks.3`` or ``layer2.1``; what the matcher leaves out joins the last layer).
    Other models: the top-level modules in order, then the head. The head is labelled by its module paths (``fc``,
    ``head``)."""
    head = set(bb.head_parameter_names())
    names = [n for n, _ in bb.model.named_parameters()]
    matcher = getattr(bb.model, "group_matcher", None) if uses_group_matcher(bb) else None
    if matcher is not None:
        from timm.models import group_parameters

        ids = group_parameters(bb.model, matcher(coarse=False), reverse=True)
        top = max(ids.values(), default=0)
        layer = {n: ids.get(n, top) for n in names}
    else:
        tops = list(dict.fromkeys(n.split(".", 1)[0] for n in names if n not in head))
        layer = {n: len(tops) if n in head else tops.index(n.split(".", 1)[0]) for n in names}
    by_layer: dict[int, list[str]] = {}
    for n in names:
        if n not in head:
            by_layer.setdefault(layer[n], []).append(n)
    label = {n: _head_label(bb) for n in head}
    for members in by_layer.values():
        text = _label(members) if matcher is not None else members[0].split(".", 1)[0]
        label.update({n: text for n in members})
    return layer, label


def _label(names: list[str]) -> str:
    """``blocks.3`` for blocks.3.*; ``cls_token,pos_embed,patch_embed.proj`` for a stem of several modules."""
    parts: dict[str, list[list[str]]] = {}
    for n in names:
        parts.setdefault(n.split(".", 1)[0], []).append(n.split("."))
    out = []
    for group in parts.values():
        common = group[0][:-1] if len(group) > 1 or len(group[0]) > 1 else group[0]
        for g in group[1:]:
            while common != g[:len(common)]:
                common = common[:-1]
        out.append(".".join(common) or group[0][0])
    return ",".join(out)


def layer_units(bb: Backbone) -> list[str]:
    """The layer-decay units' labels, stem first, head last (e.g. ``conv1, bn1, layer1, ..., fc`` for
    torchvision's resnet18; ``cls_token,pos_embed,patch_embed.proj, blocks.0, ..., head`` for a timm ViT)."""
    layer, label = layer_ids(bb)
    return list(dict.fromkeys(label[n] for n in sorted(layer, key=lambda n: layer[n])))


def _head_label(bb: Backbone) -> str:
    return ",".join(bb.head) or "head"


def _groups(named: list[tuple[str, nn.Parameter]], cfg: OptimizerCfg, label_of, mult_of) -> list[dict[str, Any]]:
    """Split ``named`` by (label, decay) into group dicts, in order of first appearance."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for n, p in named:
        nd = cfg.weight_decay > 0 and _no_decay(p)
        label = label_of(n)
        key = (label, nd)
        if key not in groups:
            lr = cfg.lr * mult_of(n)
            groups[key] = {"params": [], "lr": lr, "base_lr": lr, "weight_decay": 0.0 if nd else cfg.weight_decay,
                           "name": f"{label} (no_decay)" if nd else label, "param_names": []}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(n)
    return list(groups.values())


def param_groups(bb: Backbone, cfg: OptimizerCfg) -> list[dict[str, Any]]:
    """The groups :func:`build_optimizer` uses (trainable parameters only); see the module docstring."""
    named = [(n, p) for n, p in bb.model.named_parameters() if p.requires_grad]
    if not named:
        raise FreezeError(f"no trainable parameters in {bb.name}: the freeze plan froze everything")
    head = set(bb.head_parameter_names())
    _check_lr_mult(bb, cfg, [n for n, _ in bb.model.named_parameters()], head)
    layer, unit = layer_ids(bb)
    top = max(layer.values())
    decay = cfg.layer_decay

    def label_of(n: str) -> str:
        path, _ = _lr_mult(bb, cfg, n, head)
        if decay is not None:
            return unit[n] if path is None else f"{path}/{unit[n]}"
        return path or ("other" if cfg.lr_mult else "all")

    def mult_of(n: str) -> float:
        m = _lr_mult(bb, cfg, n, head)[1]
        if decay is not None:
            m *= decay ** (top - layer[n])
        return m

    return _groups(named, cfg, label_of, mult_of)


def _fast(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]], **kw: Any) -> torch.optim.Optimizer:
    """``cls(groups, fused=True, ...)`` where torch has a fused kernel for it on the parameters' device (SGD, Adam,
    AdamW on CPU and CUDA), else torch's default (the ``foreach`` implementation on CUDA, a loop on the CPU, where
    ``foreach`` measured slower). Measured on the 2-core CPU, one step over resnet18's 11.7M parameters (best of
    30): SGD 6.0 -> 5.1 ms, AdamW 70 -> 11 ms, Adam 99 -> 14 ms; RMSprop has no fused kernel (loop 19 ms, foreach
    84 ms). A checkpoint of an unfused optimizer resumes with its own setting (``load_state_dict`` restores it)."""
    try:
        return cls([dict(g) for g in groups], fused=True, **kw)  # copies: a refusal leaves the groups as they were
    except (RuntimeError, ValueError, TypeError):
        return cls(groups, **kw)


# What torch's AdamW(groups, fused=True) adds to each group (Adam's defaults, in its order), for
# :func:`adamw_state_dict`. tests/test_probe_optimizer_state.py compares the result with torch's own state_dict().
ADAMW_GROUP_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
                                        "maximize": False, "foreach": None, "capturable": False,
                                        "differentiable": False, "fused": True, "decoupled_weight_decay": True}


def adamw_state_dict(groups: list[dict[str, Any]], state: dict[int, dict[str, torch.Tensor]],
                     fused: bool = True) -> dict[str, Any]:
    """The ``state_dict()`` of ``torch.optim.AdamW(groups, fused=fused)`` holding ``state`` (keyed by a parameter's
    position across ``groups``), built without constructing the optimizer: building one calls its
    ``add_param_group``, which imports ``torch._dynamo`` (1.6 s on the 2-core CPU, a third of a cached
    ``finetune probe``, which trains its heads with its own batched AdamW and only writes this state).
    ``load_state_dict`` of the real optimizer takes it (``train --resume`` of a probe run)."""
    out: list[dict[str, Any]] = []
    first = 0
    for g in groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        for k, v in ADAMW_GROUP_DEFAULTS.items():
            packed.setdefault(k, fused if k == "fused" else v)
        packed["params"] = list(range(first, first + len(g["params"])))
        first += len(g["params"])
        out.append(packed)
    return {"state": dict(state), "param_groups": out}


def build_optimizer(bb: Backbone, cfg: OptimizerCfg) -> torch.optim.Optimizer:
    """An optimizer over ``bb.model``'s trainable parameters: sgd (momentum, nesterov), adam, adamw, rmsprop.

    Frozen parameters never reach it; unfreeze later with :func:`unfreeze_step`. Groups also carry
    ``param_names`` (the parameter names, for logs and checks).
    """
    groups = param_groups(bb, cfg)
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ConfigError("optimizer.nesterov needs optimizer.momentum greater than 0")
        return _fast(torch.optim.SGD, groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return _fast(torch.optim.Adam, groups, lr=cfg.lr)
    if cfg.name == "adamw":
        return _fast(torch.optim.AdamW, groups, lr=cfg.lr)
    if cfg.name == "rmsprop":
        return _fast(torch.optim.RMSprop, groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ConfigError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got '{cfg.name}'"
                      f"{suggest(cfg.name, OPTIMIZERS)}")


def add_param_groups(optimizer: torch.optim.Optimizer, bb: Backbone, names: list[str], cfg: OptimizerCfg,
                     lr_mult: float, label: str) -> None:
    """Add the parameters ``names`` (newly unfrozen) as new groups with ``base_lr = cfg.lr * lr_mult``.

    Same decay / no-decay split as :func:`build_optimizer`. Refuses a frozen parameter or one the optimizer
    already holds. ``names`` empty: nothing is added.
    """
    params = dict(bb.model.named_parameters())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for n in names:
        if n not in params:
            raise FreezeError(f"cannot add '{n}' to the optimizer: {bb.name} has no such parameter")
        if not params[n].requires_grad:
            raise FreezeError(f"cannot add '{n}' to the optimizer: it is frozen")
        if id(params[n]) in held:
            raise FreezeError(f"cannot add '{n}' to the optimizer: it is already in a parameter group")
    wanted = set(names)
    named = [(n, p) for n, p in params.items() if n in wanted]
    for g in _groups(named, cfg, lambda n: label, lambda n: lr_mult):
        optimizer.add_param_group(g)


def unfreeze_step(bb: Backbone, optimizer: torch.optim.Optimizer, step: UnfreezeStep,
                  cfg: OptimizerCfg) -> list[str]:
    """Unfreeze ``step.layers`` and give the newly trainable parameters their own groups (LR x ``step.lr_mult``),
    labelled ``"<layers> @<epoch>"``. Returns the newly trainable names (empty, with a warning, if none)."""
    names = unfreeze_layers(bb, list(step.layers))
    if not names:
        log.warning(f"unfreeze at epoch {step.epoch}: {','.join(step.layers)} was already trainable")
        return names
    add_param_groups(optimizer, bb, names, cfg, step.lr_mult, f"{','.join(step.layers)} @{step.epoch}")
    return names
