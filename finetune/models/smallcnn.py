"""The tutorial's CIFAR-10 network, unchanged, so its parameter names (``seq.0.weight`` ... ``seq.8.bias``)
are the ones the tutorial's freezing examples use."""

from __future__ import annotations

from typing import Any

from torch import nn

from finetune.config.catalog import smallcnn_parse as parse
from finetune.errors import WeightsError
from finetune.models.backbone import Backbone
from finetune.models.sources import BackboneSource, register_source
from finetune.models.weights import WeightsSpec


class SmallCNN(nn.Module):
    """Conv-pool x3, flatten, two Linear layers; expects 3x32x32 input (1024 = 64 channels x 4 x 4)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1024, 64),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.seq(x)


HEAD = ["seq.8"]
DEFAULT_CFG = {
    "input_size": (3, 32, 32),
    "resize": 32,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}


def build(arch: str, num_classes: int | None, spec: WeightsSpec) -> Backbone:
    return Backbone(SmallCNN(num_classes or 10), "smallcnn", "smallcnn", arch, num_classes or 10, list(HEAD),
                    data_cfg=dict(DEFAULT_CFG))


def data_config(arch: str, spec: WeightsSpec) -> dict[str, Any]:
    return dict(DEFAULT_CFG)


def weights(value: str, arch: str) -> WeightsSpec:
    if value.lower() in ("default", "pretrained"):
        return WeightsSpec("none", "none")  # smallcnn has no pretrained weights: the default is random init
    raise WeightsError(f"smallcnn has no pretrained weights named '{value}'; pass --weights none or a weights file")


register_source("smallcnn", BackboneSource(parse, build, data_config, lambda: {"smallcnn": []}, weights,
                                           bare=lambda arch: arch == "smallcnn", title="smallcnn"))
