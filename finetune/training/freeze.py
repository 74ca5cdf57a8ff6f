"""Freeze plans: which parameters train. Plain functions over ``nn.Module``; no CLI code.

Strategies (each selects parameter tensors; all start from "everything trainable"):

- ``names``: the tutorial's method 1, ``any(x in name for x in freeze)``. A pattern with ``*?[`` is a glob
  matched against the whole parameter name; otherwise a substring.
- ``first``: the first N tensors in ``named_parameters()`` order (method 2; YOLOv5's ``--freeze N``).
- ``layers``: dotted module paths (method 3: ``layer1``, ``features``, ``features.0``, ``blocks.3``); a path with
  glob characters matches module names (``blocks.*``).
- ``backbone``: everything except the head (linear probing).
- ``unfreeze``: the inverse; ``all``, a module path, or a parameter-name pattern.

Each kind is a :class:`FreezeKind` in a registry by name (``select``, ``describe``, its recipe key); the six above
are registered here, and :func:`register_freeze_kind` adds one from anywhere, given in a recipe as
``freeze.kinds.NAME`` (a value the kind checks). Composition: strategies are a list applied in order
(:func:`apply_strategies`). :func:`apply_freeze` builds that list from a :class:`~finetune.config.FreezeCfg` in
registration order (names, first, stages, layers, backbone, registered kinds), unfreezing kinds last; the freezing
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
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from finetune.config import choices
from finetune.errors import FreezeError, suggest
from finetune.models.sources import uses_group_matcher

if TYPE_CHECKING:
    from finetune.config import FreezeCfg
    from finetune.models.backbone import Backbone

BN_POLICIES = choices("freeze.bn")  # written once: the type of FreezeCfg.bn
KINDS = ("names", "first", "stages", "layers", "backbone", "unfreeze")  # the built-in kinds; freeze_kinds(): all
STAGE = "stage:"  # a layer address: stage:K is the K-th stage (0 = the stem; -1 = the last before the head)
_GLOB = "*?["


@dataclass
class Strategy:
    """One step of a freeze plan: ``kind`` names a registered :class:`FreezeKind`; ``targets`` is what that kind
    takes (a list of patterns/paths, an int for ``first``/``stages``, ignored for ``backbone``)."""

    kind: str
    targets: Any = None

    def describe(self) -> str:
        kind = _KINDS.get(self.kind)
        return kind.describe(self.targets) if kind else f"{self.kind} {self.targets}"


@dataclass(frozen=True)
class FreezeKind:
    """A way to choose parameters, registered by ``name`` (:func:`register_freeze_kind`).

    ``select(bb, targets) -> [parameter names]`` (raise :class:`~finetune.errors.FreezeError` for targets that
    match nothing); ``describe(targets) -> str`` (the plan's step line: ``freeze every other tensor``);
    ``check(value) -> targets`` turns the recipe's value into targets, or raises ``FreezeError`` (None: taken
    as is); ``unfreezes``: the step makes its parameters trainable (applied after every freezing step).
    ``value(cfg)``: where the recipe gives it (the built-ins: their own key, ``freeze.names``), None when unused;
    a registered kind leaves it None and is given as ``freeze.kinds.NAME`` (None or false there: unused)."""

    name: str
    select: Callable[[Backbone, Any], list[str]]
    describe: Callable[[Any], str]
    check: Callable[[Any], Any] | None = None
    unfreezes: bool = False
    value: Callable[[FreezeCfg], Any] | None = None

    def recipe_key(self) -> str:
        """Where a recipe gives this kind (errors name it, and the flag that set it)."""
        return f"freeze.{self.name}" if self.value else f"freeze.kinds.{self.name}"


_KINDS: dict[str, FreezeKind] = {}


def register_freeze_kind(kind: FreezeKind) -> FreezeKind:
    """Add a freeze kind: recipes may then give ``freeze.kinds.NAME``, and ``Strategy(NAME, targets)`` works.
    Registering a name twice is an error (call :func:`unregister_freeze_kind` first)."""
    if kind.name in _KINDS:
        raise ValueError(f"freeze kind '{kind.name}' is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister_freeze_kind(name: str) -> FreezeKind:
    """Remove a registered kind (a test's clean-up); returns it."""
    return _KINDS.pop(name)


def freeze_kinds() -> dict[str, FreezeKind]:
    """The registered kinds by name, in the order a recipe's steps are applied (a copy)."""
    return dict(_KINDS)


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
    """Parameters inside the named modules (dotted paths or globs over module names, or ``stage:K``); ``all``
    when allowed."""
    names = _param_names(bb.model)
    modules = dict(bb.model.named_modules())
    out: set[str] = set()
    for layer in layers:
        if allow_all and layer == "all":
            out.update(names)
            continue
        if layer.startswith(STAGE):
            out.update(select_stage(bb, layer, verb))
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
    as_layers = [t for t in targets if t == "all" or t in modules or t.startswith(STAGE) or (_is_glob(t) and
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
    """The parameter names one strategy step addresses (its kind's ``select``)."""
    kind = _KINDS.get(s.kind)
    if kind is None:
        raise FreezeError(f"unknown freeze strategy '{s.kind}'{suggest(s.kind, _KINDS)}; use one of "
                          f"{', '.join(_KINDS)}")
    return kind.select(bb, s.targets)


# ------------------------------------------------------------------------------------------------ stages

@dataclass
class Stage:
    """One stage of a backbone, in forward order: ``modules`` (dotted paths, for display) and its parameters."""

    index: int
    modules: list[str]
    params: list[str]


def model_stages(bb: Backbone) -> list[Stage]:
    """The backbone (everything but the head) as stages, from the stem to the one feeding the head.

    timm models: their own ``group_matcher(coarse=True)`` (stem, ``blocks.N``/``stages.N``/``layers.N``; the final
    norm or ``conv_head`` joins the last stage). Others (torchvision, smallcnn): the top-level modules in order,
    leading single layers merged into a stem (resnet: ``conv1+bn1``, ``layer1`` .. ``layer4``), a container that
    holds most of the model opened up (vgg/efficientnet/mobilenet: ``features.N``; torchvision ViT:
    ``encoder.layers.N``). Parameters outside every stage (a ``cls_token``) join the stage that follows them.
    """
    head = set(bb.head_parameter_names())
    keep = [n for n in _param_names(bb.model) if n not in head]
    groups = _timm_groups(bb, keep, head) if uses_group_matcher(bb) else None
    if groups is None:
        groups = _module_groups(bb.model, keep)
    return [Stage(i, mods, params) for i, (mods, params) in enumerate(groups)]


def _timm_groups(bb: Backbone, keep: list[str], head: set[str]) -> list[tuple[list[str], list[str]]] | None:
    try:
        from timm.models._manipulate import group_parameters

        grouped = group_parameters(bb.model, bb.model.group_matcher(coarse=True))
    except Exception:  # noqa: BLE001 - no group_matcher: fall back to the module rule
        return None
    out: list[tuple[list[str], list[str]]] = []
    every = _param_names(bb.model)
    for _, names in sorted(grouped.items(), key=lambda kv: kv[0]):
        params = [n for n in names if n not in head]
        if not params:
            continue
        if out and any(n in head for n in names):  # the head's group: its norm/conv_head ends the last stage
            out[-1][1].extend(params)
            out[-1][0].extend(m for m in _display(params, every) if m not in out[-1][0])
            continue
        out.append((_display(params, every), params))
    order = {n: i for i, n in enumerate(keep)}
    return [(mods, sorted(ps, key=order.get)) for mods, ps in out] if out else None


def _display(params: list[str], every: list[str]) -> list[str]:
    """The shortest module paths that cover a group of parameters and nothing else: ``blocks.3`` for
    ``blocks.3.0.conv.weight`` when ``blocks`` spans several groups."""
    mine = set(params)
    out: dict[str, None] = {}
    for n in params:
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if all(m in mine for m in every if _under(m, prefix)):
                out[prefix] = None
                break
    return list(out)


def _module_groups(model: nn.Module, keep: list[str]) -> list[tuple[list[str], list[str]]]:
    kept = set(keep)

    def kids(path: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{path}.{k}" if path else k, c) for k, c in m.named_children()
                if any((f"{path}.{k}.{n}" if path else f"{k}.{n}") in kept for n, _ in c.named_parameters())]

    def size(path: str, m: nn.Module) -> int:
        return sum(p.numel() for n, p in m.named_parameters(prefix=path) if n in kept)

    units = kids("", model)
    for _ in range(8):  # open the biggest container while there are too few units to address
        if len(units) >= 4:
            break
        opens = [(i, kids(*u)) for i, u in enumerate(units)]
        opens = [(i, k) for i, k in opens if len(k) >= 2]
        if not opens:
            break
        i, k = max(opens, key=lambda t: size(*units[t[0]]))
        units[i:i + 1] = k
    paths = [p for p, _ in units]
    # leading single layers at the top level (resnet's conv1, bn1) form one stem stage
    leaf = [p for p, m in units if "." not in p and not list(m.children())]
    stem = 0
    while stem < len(paths) and paths[stem] in leaf:
        stem += 1
    groups: list[list[str]] = ([paths[:stem]] if stem > 1 else [[p] for p in paths[:stem]]) + \
        [[p] for p in paths[stem:]]
    params: list[list[str]] = [[] for _ in groups]
    pending: list[str] = []
    for n in keep:
        g = next((i for i, mods in enumerate(groups) if any(_under(n, m) for m in mods)), None)
        if g is None:
            pending.append(n)  # e.g. a class token: it joins the next stage
            continue
        params[g].extend(pending + [n])
        pending = []
    if pending and params:
        params[-1].extend(pending)
    return [(mods, ps) for mods, ps in zip(groups, params) if ps]


def _stage_error(bb: Backbone, what: str, n: int) -> FreezeError:
    k = len(model_stages(bb))
    return FreezeError(f"{what} {n} is out of range: {_model_label(bb)} has {k} stages (0..{k - 1}, or "
                       f"-{k}..-1 counted from the head); see 'finetune inspect {_model_label(bb)}'")


def select_stages(bb: Backbone, n: int) -> list[str]:
    """fastai's ``freeze_to(n)``: the parameters of the first ``n`` stages, or for ``n < 0`` of all but the last
    ``-n`` stages (``-2``: the last two stages and the head train)."""
    stages = model_stages(bb)
    if isinstance(n, bool) or not -len(stages) <= n <= len(stages):
        raise _stage_error(bb, "freeze stages", n)
    return [p for s in stages[:n if n >= 0 else len(stages) + n] for p in s.params]


def select_stage(bb: Backbone, address: str, verb: str = "freeze") -> list[str]:
    """The parameters of ``stage:K`` (K from 0, or negative from the head)."""
    stages = model_stages(bb)
    try:
        k = int(address[len(STAGE):])
    except ValueError:
        raise FreezeError(f"{verb} layer '{address}': a stage address is stage:K with an integer K (stage:-1 is "
                          "the last stage before the head)") from None
    if not -len(stages) <= k < len(stages):
        raise _stage_error(bb, f"{verb} layer '{address}':", k)
    return list(stages[k].params)


# ----------------------------------------------------------------------------------------------- plans

def strategies_from_cfg(cfg: FreezeCfg) -> list[Strategy]:
    """The recipe's steps in registration order (names, first, stages, layers, backbone, registered kinds),
    unfreezing kinds last; a registered kind's value checked by the kind."""
    _check_kind_names(cfg)
    steps: list[Strategy] = []
    last: list[Strategy] = []
    for kind in _KINDS.values():
        value = kind.value(cfg) if kind.value else getattr(cfg, "kinds", {}).get(kind.name)
        if value is None or (value is False and not kind.value):
            continue
        if kind.check is not None:
            try:
                value = kind.check(value)
            except FreezeError as e:
                e.key = kind.recipe_key()
                raise
        (last if kind.unfreezes else steps).append(Strategy(kind.name, value))
    return steps + last


def _check_kind_names(cfg: FreezeCfg) -> None:
    for name in getattr(cfg, "kinds", {}):
        kind = _KINDS.get(name)
        if kind is None or kind.value:
            extra = [k for k, v in _KINDS.items() if not v.value]
            hint = f"; it has its own key, freeze.{name}" if kind else \
                f"{suggest(name, extra)}; registered: {', '.join(extra) or 'none'}"
            e = FreezeError(f"freeze.kinds: unknown freeze kind '{name}'{hint}")
            e.key = f"freeze.kinds.{name}"
            raise e


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
    selected = []
    for s in strategies:
        try:
            selected.append((s, set(select(bb, s))))
        except FreezeError as e:
            kind = _KINDS.get(s.kind)
            e.key = getattr(e, "key", None) or (kind.recipe_key() if kind else f"freeze.{s.kind}")  # for the caller
            raise
    trainable = {n: True for n in _param_names(bb.model)}
    for s, names in selected:
        unfreezes = _KINDS[s.kind].unfreezes
        if unfreezes and all(trainable[n] for n in names):
            import logging

            logging.getLogger("finetune").warning(f"{s.describe()} changes nothing: those parameters are already "
                                                  "trainable")
        for n in names:
            trainable[n] = unfreezes
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
    for i, step in enumerate(cfg.schedule):
        try:
            select_layers(bb, list(step.layers), verb="unfreeze", allow_all=True)
        except FreezeError as e:
            e.key = f"freeze.schedule[{i}]"
            raise
    return plan


def from_recipe(error: FreezeError, recipe: str | None, flags) -> FreezeError:
    """``error`` prefixed with where it came from when that is a recipe file rather than a flag the user typed:
    ``recipe gradual-unfreeze, freeze.schedule[0]: unfreeze layer 'layer4' matches no module of ...``."""
    key = getattr(error, "key", None)
    if not recipe or not key or any(key.split("[")[0] == f.split("[")[0] for f in flags):
        return error
    return FreezeError(f"recipe {recipe}, {key}: {error}")


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


# ------------------------------------------------------------------------------------------------ built-ins

def _describe_stages(n: Any) -> str:
    n = int(n)
    return f"freeze stages (all but the last {-n} stages)" if n < 0 else f"freeze stages (the first {n})"


BUILT_INS = (
    FreezeKind("names", lambda bb, t: select_names(bb, list(t)), lambda t: f"freeze names {','.join(t)}",
               value=lambda cfg: list(cfg.names) or None),
    FreezeKind("first", select_first, lambda t: f"freeze first {t}", value=lambda cfg: cfg.first or None),
    FreezeKind("stages", lambda bb, t: select_stages(bb, int(t)), _describe_stages, value=lambda cfg: cfg.stages),
    FreezeKind("layers", lambda bb, t: select_layers(bb, list(t)), lambda t: f"freeze layers {','.join(t)}",
               value=lambda cfg: list(cfg.layers) or None),
    FreezeKind("backbone", lambda bb, t: select_backbone(bb), lambda t: "freeze backbone",
               value=lambda cfg: True if cfg.backbone else None),
    FreezeKind("unfreeze", lambda bb, t: select_unfreeze(bb, list(t)), lambda t: f"unfreeze {','.join(t)}",
               unfreezes=True, value=lambda cfg: list(cfg.unfreeze) or None),
)
for _kind in BUILT_INS:
    register_freeze_kind(_kind)


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
    go back to eval mode, so forward passes neither update nor use batch statistics; with ``eval``, every BatchNorm
    layer does (its scale and shift still train when unfrozen: Keras' advice for fine-tuning on small data).
    ``train`` does nothing."""
    if bn not in BN_POLICIES:
        raise FreezeError(f"BatchNorm policy must be one of {', '.join(BN_POLICIES)}, got '{bn}'"
                          f"{suggest(bn, BN_POLICIES)}")
    if bn == "train":
        return
    if bn == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return
    modules = dict(model.named_modules())
    for name in frozen_bn_layers(model):
        modules[name].eval()
