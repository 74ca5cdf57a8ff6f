"""A built model's tensors without its code: the stand-in a head-only run on stored features uses instead of the
backbone, so it needs neither the model's library (importing timm costs ~2 s, since it imports torchvision and
torchvision imports ``torch._dynamo``) nor a forward pass.

:func:`describe` records a model's module tree: every module path in ``named_modules()`` order with its own
parameter and persistent-buffer names in registration order, the classifier's shape, and whether the model has
convolutions (the channels-last choice). :func:`build` turns that record and the tensors of the model's
``state_dict()`` back into an ``nn.Module`` with the same ``state_dict()`` (keys, order, values) and the same
``named_parameters()``: plain containers, except the classifier, which is a real ``nn.Linear`` (the head trains).
Its ``forward`` raises :class:`NeedsBackbone`: whoever needs the backbone to run builds the real model instead.

Only models whose tensors are not shared between modules and whose classifier is one ``nn.Linear`` are described
(:func:`describe` returns None otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

KIND = "finetune.stand-in/1"


class NeedsBackbone(RuntimeError):
    """A stand-in was asked to run: the caller builds the real backbone and tries again."""


class _Node(nn.Module):
    """A container at one of the model's module paths: its tensors, no computation."""

    def forward(self, *args, **kwargs):
        raise NeedsBackbone("the stand-in of a stored backbone cannot run; build the model")


class StandIn(_Node):
    """The root of a stand-in (see the module docstring). ``has_conv``: the real model has convolutions (it runs
    channels-last where the recipe leaves the choice to finetune). ``drop_rate`` (timm's dropout before the
    classifier) and ``train_effects`` (the modules of the frozen part that act differently in train mode, under the
    ``train`` BatchNorm policy and the others: :func:`finetune.speedups.feature_cache.train_mode_effects`) are the
    real model's, for the frozen-feature cache's decision."""

    def __init__(self, has_conv: bool, drop_rate: float = 0.0, train_effects: dict[str, list[str]] | None = None):
        super().__init__()
        self.has_conv = has_conv
        self.drop_rate = drop_rate
        self.train_effects = train_effects or {"train": [], "other": []}


def is_stand_in(model: nn.Module) -> bool:
    return isinstance(model, StandIn)


def describe(model: nn.Module, head: list[str]) -> dict[str, Any] | None:
    """The record :func:`build` needs to stand in for ``model`` (JSON-serialisable), or None when it cannot: a
    tensor shared between modules, a classifier that is not one ``nn.Linear``, or a module that keeps state outside
    its parameters and buffers (``get_extra_state``)."""
    if len(head) != 1:
        return None
    mods = dict(model.named_modules(remove_duplicate=False))
    if len(mods) != len(dict(model.named_modules())):
        return None  # a module registered twice
    lin = mods.get(head[0])
    if type(lin) is not nn.Linear:
        return None
    seen: set[int] = set()
    rows = []
    for path, m in mods.items():
        if type(m).get_extra_state is not nn.Module.get_extra_state:
            return None
        params = [n for n, p in m._parameters.items() if p is not None]
        buffers = [n for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
        for t in [m._parameters[n] for n in params] + [m._buffers[n] for n in buffers]:
            if id(t) in seen:
                return None
            seen.add(id(t))
        if path == head[0]:
            if buffers or params != (["weight", "bias"] if lin.bias is not None else ["weight"]):
                return None
            rows.append({"path": path, "params": params, "buffers": [], "linear": [lin.in_features,
                                                                                  lin.out_features]})
            continue
        rows.append({"path": path, "params": params, "buffers": buffers})
    return {"kind": KIND, "modules": rows, "head": head[0],
            "has_conv": any(isinstance(m, nn.Conv2d) for m in model.modules()),
            "drop_rate": float(getattr(model, "drop_rate", 0.0) or 0.0)}


def state_names(record: dict[str, Any]) -> list[str]:
    """The ``state_dict()`` keys of the described model, in order."""
    out = []
    for row in record["modules"]:
        prefix = f"{row['path']}." if row["path"] else ""
        out += [prefix + n for n in row["params"] + row["buffers"]]
    return out


def build(record: dict[str, Any], state: dict[str, torch.Tensor], trainable: bool = True) -> StandIn:
    """The stand-in of the described model holding ``state`` (the model's ``state_dict()``; exactly its keys).
    Parameters start with ``requires_grad=trainable``, as a freshly built model's do."""
    if record.get("kind") != KIND or sorted(state) != sorted(state_names(record)):
        raise ValueError("the stored backbone's tensors do not match its module record")
    effects = record.get("train_effects") or {}
    root = StandIn(bool(record["has_conv"]), float(record.get("drop_rate", 0.0)),
                   {k: [str(x) for x in effects.get(k, [])] for k in ("train", "other")})
    mods: dict[str, nn.Module] = {}
    for row in record["modules"]:
        path = row["path"]
        prefix = f"{path}." if path else ""
        if "linear" in row:
            fan_in, fan_out = row["linear"]
            m: nn.Module = nn.Linear(fan_in, fan_out, bias="bias" in row["params"], device="meta")
        else:
            m = root if path == "" else _Node()
        if path:
            parent, _, name = path.rpartition(".")
            mods[parent].add_module(name, m)
        mods[path] = m
        for n in row["params"]:
            t = state[prefix + n]
            m.register_parameter(n, nn.Parameter(t, requires_grad=trainable and t.is_floating_point()))
        for n in row["buffers"]:
            m.register_buffer(n, state[prefix + n])
    return root
