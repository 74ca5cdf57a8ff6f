"""Freeze plans: which parameters train. Plain functions over ``nn.Module``; no CLI code.

Strategies (each selects parameter tensors; all start from "everything trainable"):

- ``names``: the tutorial's method 1, ``any(x in name for x in freeze)``. A pattern with ``*?[`` is a glob
  matched against the whole parameter name; otherwise a substring.
- ``first``: the first N tensors in ``named_parameters()`` order (method 2; YOLOv5's ``--freeze N``).
- ``layers``: dotted module paths (method 3: ``layer1``, ``features``, ``features.0``, ``blocks.3``); a path with
  glob characters matches module names (``blocks.*``).
- ``backbone``: everything except the head (linear probing).
- ``unfreeze``: the inverse; ``all``, a module path, or a parameter-name pattern.

Composition: strategies are a list applied in order (:func:`apply_strategies`). :func:`apply_freeze` builds that
list from a :class:`~finetune.config.FreezeCfg` as names, first, layers, backbone, then unfreeze; the freezing
steps are a union, so only "unfreeze comes last" matters. A selector that matches nothing is a
:class:`~finetune.errors.FreezeError` naming it with the closest real names; so is a plan that trains nothing.

BatchNorm policy (``bn``): ``frozen`` (default) keeps a BN layer whose parameters are all frozen in eval mode, so
its running statistics stay fixed; ``train`` leaves BN alone (fastai's ``train_bn``). We chose the MMPretrain
``norm_eval`` / Ultralytics way, :func:`apply_bn_policy` after every ``model.train()``, over timm's
FrozenBatchNorm2d swap: the module tree and the ``state_dict`` stay those of the plain model (checkpoints load
anywhere, ``inspect`` shows the real types), and a BN layer unfrozen later by a schedule simply trains again.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from finetune.errors import FreezeError, suggest

if TYPE_CHECKING:
    from finetune.config import FreezeCfg
    from finetune.models.backbone import Backbone

BN_POLICIES = ("frozen", "train")
KINDS = ("names", "first", "layers", "backbone", "unfreeze")
_GLOB = "*?["


@dataclass
class Strategy:
    """One step of a freeze plan: ``kind`` in :data:`KINDS`; ``targets`` is a list of patterns/paths, an int for
    ``first``, ignored for ``backbone``."""

    kind: str
    targets: Any = None

    def describe(self) -> str:
        if self.kind == "backbone":
            return "freeze backbone"
        if self.kind == "first":
            return f"freeze first {self.targets}"
        verb = "unfreeze" if self.kind == "unfreeze" else f"freeze {self.kind}"
        return f"{verb} {','.join(self.targets)}"


@dataclass
class FreezePlan:
    """The outcome of a plan: parameter names in ``named_parameters()`` order, split by trainability."""

    frozen: list[str]
    trainable: list[str]
    bn: str = "frozen"
    steps: list[str] = field(default_factory=list)  # Strategy.describe() of each applied step, in order
    numel: dict[str, int] = field(default_factory=dict, repr=False)  # parameter name -> element count

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; stored in checkpoints so a resume can check it re-created the same plan."""
        return {"frozen": list(self.frozen), "trainable": list(self.trainable), "bn": self.bn,
                "steps": list(self.steps)}

    def summary(self) -> list[dict[str, Any]]:
        """One row per top-level module, in model order: module, tensors, params, trainable, frozen (elements)."""
        rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
        frozen = set(self.frozen)
        for name in _ordered(self):
            top = name.split(".", 1)[0]
            r = rows.setdefault(top, {"module": top, "tensors": 0, "params": 0, "trainable": 0, "frozen": 0})
            n = self.numel.get(name, 0)
            r["tensors"] += 1
            r["params"] += n
            r["frozen" if name in frozen else "trainable"] += n
        return list(rows.values())


def _ordered(plan: FreezePlan) -> list[str]:
    """All names in model order (the plan keeps that order in ``numel``; fall back to frozen + trainable)."""
    return list(plan.numel) if plan.numel else plan.frozen + plan.trainable


# ------------------------------------------------------------------------------------------------ selectors

def _is_glob(s: str) -> bool:
    return any(c in s for c in _GLOB)


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _model_label(bb: Backbone) -> str:
    return getattr(bb, "name", None) or type(bb.model).__name__


def select_names(bb: Backbone, patterns: list[str]) -> list[str]:
    """Parameters whose name contains a pattern (or matches it, for a glob). Every pattern must match."""
    names = _param_names(bb.model)
    out: set[str] = set()
    for pat in patterns:
        hit = [n for n in names if (fnmatch.fnmatchcase(n, pat) if _is_glob(pat) else pat in n)]
        if not hit:
            cands = _module_names(bb.model) + names
            raise FreezeError(f"freeze name '{pat}' matches no parameter of {_model_label(bb)}"
                              f"{suggest(pat, cands)}; see 'finetune inspect {_model_label(bb)}'")
        out.update(hit)
    return [n for n in names if n in out]


def select_first(bb: Backbone, n: int) -> list[str]:
    """The first ``n`` tensors in ``named_parameters()`` order; ``0 <= n <= number of tensors``."""
    names = _param_names(bb.model)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(names):
        raise FreezeError(f"freeze first N must be between 0 and {len(names)} (the number of parameter tensors "
                          f"in {_model_label(bb)}), got {n}")
    return names[:n]


def select_layers(bb: Backbone, layers: list[str], verb: str = "freeze", allow_all: bool = False) -> list[str]:
    """Parameters inside the named modules (dotted paths or globs over module names); ``all`` when allowed."""
    names = _param_names(bb.model)
    modules = dict(bb.model.named_modules())
    out: set[str] = set()
    for layer in layers:
        if allow_all and layer == "all":
            out.update(names)
            continue
        paths = [m for m in modules if m and fnmatch.fnmatchcase(m, layer)] if _is_glob(layer) else \
            ([layer] if layer and layer in modules else [])
        if not paths:
            raise FreezeError(f"{verb} layer '{layer}' matches no module of {_model_label(bb)}"
                              f"{suggest(layer, _module_names(bb.model))}; see "
                              f"'finetune inspect {_model_label(bb)} --modules'")
        hit = [n for n in names if any(_under(n, p) for p in paths)]
        if not hit:
            kind = type(modules[paths[0]]).__name__
            raise FreezeError(f"{verb} layer '{layer}' ({kind}) has no parameters in {_model_label(bb)}")
        out.update(hit)
    return [n for n in names if n in out]


def select_backbone(bb: Backbone) -> list[str]:
    """Everything except the head (``bb.head``)."""
    head = set(bb.head_parameter_names())
    return [n for n in _param_names(bb.model) if n not in head]


def select_unfreeze(bb: Backbone, targets: list[str]) -> list[str]:
    """``all``, module paths, or (for what is not a module) parameter-name patterns."""
    modules = set(_module_names(bb.model))
    as_layers = [t for t in targets if t == "all" or t in modules or (_is_glob(t) and
                 any(fnmatch.fnmatchcase(m, t) for m in modules))]
    as_names = [t for t in targets if t not in as_layers]
    out = set(select_layers(bb, as_layers, verb="unfreeze", allow_all=True))
    for pat in as_names:
        try:
            out.update(select_names(bb, [pat]))
        except FreezeError:
            raise FreezeError(f"unfreeze '{pat}' matches no module or parameter of {_model_label(bb)}"
                              f"{suggest(pat, _module_names(bb.model) + _param_names(bb.model))}; see "
                              f"'finetune inspect {_model_label(bb)} --modules'") from None
    return [n for n in _param_names(bb.model) if n in out]


def select(bb: Backbone, s: Strategy) -> list[str]:
    """The parameter names one strategy step addresses."""
    if s.kind == "names":
        return select_names(bb, list(s.targets))
    if s.kind == "first":
        return select_first(bb, s.targets)
    if s.kind == "layers":
        return select_layers(bb, list(s.targets))
    if s.kind == "backbone":
        return select_backbone(bb)
    if s.kind == "unfreeze":
        return select_unfreeze(bb, list(s.targets))
    raise FreezeError(f"unknown freeze strategy '{s.kind}'{suggest(s.kind, KINDS)}; use one of {', '.join(KINDS)}")


# ----------------------------------------------------------------------------------------------- plans

def strategies_from_cfg(cfg: FreezeCfg) -> list[Strategy]:
    """The documented order: names, first, layers, backbone (freezing, a union), then unfreeze."""
    steps: list[Strategy] = []
    if cfg.names:
        steps.append(Strategy("names", list(cfg.names)))
    if cfg.first:
        steps.append(Strategy("first", cfg.first))
    if cfg.layers:
        steps.append(Strategy("layers", list(cfg.layers)))
    if cfg.backbone:
        steps.append(Strategy("backbone"))
    if cfg.unfreeze:
        steps.append(Strategy("unfreeze", list(cfg.unfreeze)))
    return steps


def current_plan(model: nn.Module, bn: str = "frozen", steps: list[str] | None = None) -> FreezePlan:
    """Read the plan off ``requires_grad`` as it stands."""
    params = list(model.named_parameters())
    return FreezePlan(frozen=[n for n, p in params if not p.requires_grad],
                      trainable=[n for n, p in params if p.requires_grad], bn=bn, steps=list(steps or []),
                      numel={n: p.numel() for n, p in params})


def apply_strategies(bb: Backbone, strategies: list[Strategy], bn: str = "frozen") -> FreezePlan:
    """Make everything trainable, apply ``strategies`` in order, check something trains, return the plan.

    Selection is validated for every step before any ``requires_grad`` changes, so an error leaves the model as
    it was.
    """
    if bn not in BN_POLICIES:
        raise FreezeError(f"BatchNorm policy must be one of {', '.join(BN_POLICIES)}, got '{bn}'"
                          f"{suggest(bn, BN_POLICIES)}")
    selected = [(s, set(select(bb, s))) for s in strategies]
    trainable = {n: True for n in _param_names(bb.model)}
    for s, names in selected:
        for n in names:
            trainable[n] = s.kind == "unfreeze"
    if trainable and not any(trainable.values()):
        head = ",".join(getattr(bb, "head", []) or []) or "LAYER"
        raise FreezeError(f"the freeze plan leaves nothing to train: all {len(trainable)} parameter tensors of "
                          f"{_model_label(bb)} are frozen; unfreeze something (e.g. --unfreeze {head})")
    for n, p in bb.model.named_parameters():
        p.requires_grad_(trainable[n])
    return current_plan(bb.model, bn, [s.describe() for s in strategies])


def apply_freeze(bb: Backbone, cfg: FreezeCfg) -> FreezePlan:
    """Apply ``cfg`` (see :func:`strategies_from_cfg` for the order) to ``bb.model`` and return the plan.

    Also checks that every ``cfg.schedule`` step names real modules, so a typo fails before training starts.
    """
    plan = apply_strategies(bb, strategies_from_cfg(cfg), cfg.bn)
    for step in cfg.schedule:
        select_layers(bb, list(step.layers), verb="unfreeze", allow_all=True)
    return plan


def unfreeze_layers(bb: Backbone, layers: list[str]) -> list[str]:
    """Make the modules at ``layers`` (dotted paths, globs, or ``["all"]``) trainable.

    Returns the names that were frozen and are now trainable, in model order (what a new optimizer group gets).
    """
    names = set(select_layers(bb, list(layers), verb="unfreeze", allow_all=True))
    newly = []
    for n, p in bb.model.named_parameters():
        if n in names and not p.requires_grad:
            p.requires_grad_(True)
            newly.append(n)
    return newly


# ------------------------------------------------------------------------------------------------ BatchNorm

def _bn_is_frozen(module: nn.Module, parent: nn.Module | None) -> bool:
    """Frozen when all its parameters are; a BN without affine parameters follows its parent's parameters."""
    params = list(module.parameters(recurse=False))
    if not params and parent is not None:
        params = list(parent.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def frozen_bn_layers(model: nn.Module) -> list[str]:
    """Dotted names of the BatchNorm layers the ``frozen`` policy holds in eval mode."""
    out = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            parent = modules.get(name.rpartition(".")[0]) if name else None
            if _bn_is_frozen(m, parent):
                out.append(name)
    return out


def apply_bn_policy(model: nn.Module, bn: str) -> None:
    """Call right after every ``model.train()``: with ``frozen``, BatchNorm layers whose parameters are all frozen
    go back to eval mode, so forward passes neither update nor use batch statistics. ``train`` does nothing."""
    if bn not in BN_POLICIES:
        raise FreezeError(f"BatchNorm policy must be one of {', '.join(BN_POLICIES)}, got '{bn}'"
                          f"{suggest(bn, BN_POLICIES)}")
    if bn == "train":
        return
    modules = dict(model.named_modules())
    for name in frozen_bn_layers(model):
        modules[name].eval()
