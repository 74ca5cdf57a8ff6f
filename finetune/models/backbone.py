"""The built model and what the toolkit knows about it. A leaf: imports nothing of finetune, so the model
adapters (tv, timm_models), weights, freeze and optim can all use it without a cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class Backbone:
    """A built model plus what the rest of the toolkit needs to know about it."""

    model: nn.Module
    name: str  # canonical name: "smallcnn", "resnet18", "timm:resnet18"
    source: str  # "smallcnn" | "torchvision" | "timm"
    arch: str  # the name inside its source
    num_classes: int
    head: list[str]  # dotted module paths that form the classifier ("fc", "classifier.6", "head.fc")
    weights: str = "none"  # the resolved weights that were loaded
    data_cfg: dict[str, Any] = field(default_factory=dict)  # input_size, resize, crop_pct, interpolation, mean, std
    notes: list[str] = field(default_factory=list)  # things the user should hear (e.g. "head not loaded")

    def head_parameter_names(self) -> list[str]:
        """Names (as in ``named_parameters()``) of the classifier's parameters."""
        return [n for n, _ in self.model.named_parameters() if is_under(n, self.head)]


def is_under(name: str, prefixes: list[str]) -> bool:
    """True when dotted ``name`` is one of ``prefixes`` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
