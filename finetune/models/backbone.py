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


def init_new_head(model: nn.Module, paths: list[str]) -> None:
    """Start a new classifier on a pretrained backbone neutral: weights and biases of its Linear/Conv layers set to 0.

    Every class then gets the same logit, so the initial loss is exactly ln(C) on any input, and the first updates
    move the head towards the data instead of undoing a random start (MAE/DINO linear probes use std 0.01 or 0 for
    the same reason). Source inits are made for training from scratch: timm's EfficientNet classifier is uniform in
    +-1/sqrt(C), std 0.41 for 2 classes. Only the last layer of a head is new in this toolkit, so zeros do not
    leave hidden units symmetric. The gradient reaching the backbone is 0 on the first step and grows with the
    head: pretrained features are not disturbed by a random head early in a fine-tune. Not for a network trained
    from scratch (``weights: none``): there every layer is random and a zero last layer only slows the start (the
    tutorial's smallcnn, which has no nonlinearity between its two Linear layers, fell from 70% to 46%).
    """
    import torch

    with torch.no_grad():
        for path in paths:
            for m in model.get_submodule(path).modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.weight.zero_()
                    if m.bias is not None:
                        m.bias.zero_()
