"""torchvision classification models: build, load pretrained weights, replace the classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finetune.config import catalog
from finetune.config.catalog import tv_bare, tv_names as names, tv_parse as parse  # noqa: F401 - names: API
from finetune.errors import ModelError, WeightsError
from finetune.models.backbone import Backbone, init_new_head
from finetune.models.sources import BackboneSource, register_source
from finetune.models.weights import WeightsSpec, fetch_torchvision

# Models whose auxiliary classifiers would change the output type in train mode; torchvision itself drops them
# when it loads pretrained weights, so a fine-tuned model never has them.
_NO_AUX = {"googlenet", "inception_v3"}


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier: the last Linear (or the 1x1 Conv2d of SqueezeNet) in module order."""
    last: tuple[str, nn.Module] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1)
                                          and name.startswith("classifier")):
            last = (name, mod)
    if last is None:
        raise ModelError(f"cannot find the classifier of {type(model).__name__}")
    return last


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def new_head_like(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:  # SqueezeNet's final 1x1 conv
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    return new.to(device=old.weight.device, dtype=old.weight.dtype)


def data_cfg_from_weights(w) -> dict:
    t = w.transforms()
    crop = t.crop_size[0]
    resize = t.resize_size[0]
    return {
        "input_size": (3, crop, crop),
        "resize": resize,
        "crop_pct": crop / resize,
        "interpolation": t.interpolation.value,
        "mean": tuple(t.mean),
        "std": tuple(t.std),
    }


IMAGENET_CFG = {"input_size": (3, 224, 224), "resize": 256, "crop_pct": 0.875, "interpolation": "bilinear",
                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def build(arch: str, num_classes: int | None, spec: WeightsSpec) -> Backbone:
    import torchvision.models as tvm

    # with pretrained weights torchvision already drops the aux heads and skips the slow init
    kwargs = {"aux_logits": False, "init_weights": True} if arch in _NO_AUX and spec.kind != "torchvision" else {}
    if spec.kind == "torchvision":
        fetch_torchvision(spec.enum)
        model = tvm.get_model(arch, weights=spec.enum, **kwargs)
        data_cfg = data_cfg_from_weights(spec.enum)
    else:
        model = tvm.get_model(arch, weights=None, **kwargs)
        try:
            data_cfg = data_cfg_from_weights(tvm.get_model_weights(arch).DEFAULT)
        except (ValueError, KeyError, AttributeError):
            data_cfg = dict(IMAGENET_CFG)
        fixed = getattr(model, "image_size", None)  # ViTs: the architecture's size, not the weights' (vit_h_14)
        if isinstance(fixed, int) and fixed != data_cfg["input_size"][-1]:
            data_cfg.update(input_size=(3, fixed, fixed), resize=int(fixed / 0.875), crop_pct=0.875)
    head_name, head = find_head(model)
    out = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    if num_classes is not None and num_classes != out:
        with torch.no_grad():
            replace_module(model, head_name, new_head_like(head, num_classes))
        out = num_classes
        if spec.kind == "torchvision":  # a new head on pretrained weights (a file: build_model zeroes it)
            init_new_head(model, [head_name])
    return Backbone(model, arch, "torchvision", arch, out, [head_name], data_cfg=data_cfg)


def weights_names(arch: str) -> list[str]:
    return list(catalog.listing("torchvision").get(arch, []))


def weights_spec(w: str, arch: str) -> WeightsSpec:
    """A torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ``ResNet18_Weights.IMAGENET1K_V1``) as a spec."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision has no pretrained weights for '{arch}'; pass --weights none or a file") \
            from None
    members = [e.name for e in enum]
    member = w.split(".", 1)[1] if w.startswith(enum.__name__ + ".") else w
    if member.lower() in ("default", "pretrained"):
        member = "DEFAULT"
    if member == "DEFAULT":
        e = enum.DEFAULT
    elif member in members:
        e = enum[member]
    else:
        valid = ", ".join(["DEFAULT", *members])
        raise WeightsError(f"unknown weights '{w}' for {arch}; valid: {valid}, none, or a file path")
    return WeightsSpec("torchvision", f"{enum.__name__}.{e.name}", enum=e)


def data_config(arch: str, spec: WeightsSpec) -> dict[str, Any] | None:
    """From the weights' own transforms; None without weights (the architecture may fix its size: build it)."""
    return data_cfg_from_weights(spec.enum) if spec.kind == "torchvision" else None


# the names (parse, bare, the listing) come from the torch-free catalog: cached per torchvision version
register_source("torchvision", BackboneSource(
    parse, build, data_config, lambda: catalog.listing("torchvision"), weights_spec,
    bare=tv_bare, packages=("torchvision",), title="torchvision"))
