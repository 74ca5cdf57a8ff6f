"""Backbones by name, each with a new head for the user's classes.

Names: ``smallcnn`` (the tutorial's CIFAR-10 net), any torchvision classification model by its torchvision
name (``resnet18``, ``vgg16``; ``torchvision:resnet18`` also works), any timm model as ``timm:<name>``
(``timm:resnet18``, ``timm:resnet18.a1_in1k`` with a pretrained tag).
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

from finetune.models import weights as W
from finetune.errors import ModelError, suggest
from finetune.models.backbone import Backbone, init_new_head, is_under

log = logging.getLogger("finetune")

SOURCES = ("smallcnn", "torchvision", "timm")
__all__ = ["Backbone", "is_under", "build_model", "build_model_shapes", "data_config", "list_models", "parse_name"]


def parse_name(name: str) -> tuple[str, str]:
    """Split a model name into (source, arch) and check that it exists."""
    name = name.strip()
    if name == "smallcnn":
        return "smallcnn", "smallcnn"
    if name.startswith("timm:"):
        arch = name[5:]
        import timm

        base = arch.split(".", 1)[0]
        if not timm.is_model(base):
            raise ModelError(
                f"unknown timm model '{arch}'{suggest(base, timm.list_models(), n=3)}; "
                "see 'finetune models timm:PATTERN'"
            )
        return "timm", arch
    arch = name[len("torchvision:"):] if name.startswith("torchvision:") else name
    tv = torchvision_names()
    if arch in tv:
        return "torchvision", arch
    import timm

    hint = ""
    if timm.is_model(arch.split(".", 1)[0]):
        hint = f" ('{arch}' is a timm model: use 'timm:{arch}')"
    else:
        hint = suggest(arch, ["smallcnn", *tv, *(f"timm:{m}" for m in timm.list_models())], n=3)
    raise ModelError(f"unknown model '{name}'{hint}; 'finetune models' lists the available names")


def torchvision_names() -> list[str]:
    """Torchvision's image-classification models (not detection/segmentation/video)."""
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def canonical(source: str, arch: str) -> str:
    return {"smallcnn": "smallcnn", "torchvision": arch, "timm": f"timm:{arch}"}[source]


def build_model(name: str, num_classes: int | None = None, weights: str | None = "none", *,
                drop_rate: float | None = None, drop_path_rate: float | None = None) -> Backbone:
    """Build ``name`` with ``weights`` and a head of ``num_classes`` outputs.

    ``weights``: ``"none"`` (random init), ``"default"`` (the backbone's own pretrained weights: torchvision
    ``DEFAULT``, timm pretrained, none for smallcnn), a torchvision weights name, ``pretrained`` or a timm tag,
    or a path to a ``.pth``/``.pt``/``.safetensors`` file or a finetune checkpoint. ``num_classes=None`` keeps
    the source's own class count (1000 for ImageNet models, 10 for smallcnn). ``drop_rate`` (dropout before the
    classifier) and ``drop_path_rate`` (stochastic depth, rising linearly over the blocks) go to timm's
    ``create_model``; None keeps the model's own default. Other sources refuse them.
    """

    if num_classes is not None and num_classes < 1:
        raise ModelError(f"num_classes must be at least 1, got {num_classes}")
    source, arch = parse_name(name)
    rates = {k: v for k, v in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)) if v is not None}
    if rates and source != "timm":
        key = next(iter(rates))
        raise ModelError(f"model.{key} is passed to timm's create_model; '{name}' is not a timm model (use "
                         f"timm:<name>, or drop --{key.replace('_', '-')})")
    spec = W.parse_spec(weights, source, arch)
    if source == "smallcnn":
        from finetune.models import smallcnn

        model = smallcnn.SmallCNN(num_classes or 10)
        bb = Backbone(model, "smallcnn", source, arch, num_classes or 10, list(smallcnn.HEAD),
                      data_cfg=dict(smallcnn.DEFAULT_CFG))
    elif source == "torchvision":
        from finetune.models import tv

        bb = tv.build(arch, num_classes, spec)
    else:
        from finetune.models import timm_models

        bb = timm_models.build(arch, num_classes, spec, **rates)
    if spec.kind == "file":  # pretrained values from a file: the head starts neutral unless the file's head fits
        init_new_head(bb.model, bb.head)
        W.load_file_into(bb, spec.path)
    if spec.kind != "file":
        bb.weights = spec.label
    for note in bb.notes:
        log.warning(note)
    return bb


def build_model_shapes(name: str, num_classes: int | None = None) -> Backbone:
    """The architecture without values, on PyTorch's meta device: names, shapes, head and data config in ~0.1 s
    (vgg16 takes 2 s for real). Constructors that need real tensors (regnet) are built for real instead."""
    import torch

    from finetune.errors import FinetuneError

    try:
        with torch.device("meta"):
            return build_model(name, num_classes=num_classes, weights="none")
    except FinetuneError:
        raise
    except Exception:  # noqa: BLE001
        return build_model(name, num_classes=num_classes, weights="none")


def data_config(name: str, weights: str | None = "none") -> dict[str, Any]:
    """The input config (input_size, resize, crop_pct, interpolation, mean, std) that ``build_model(name,
    weights=weights)`` would record, answered from the registries without building the model or reading weights:
    timm's pretrained config, torchvision's ``Weights.transforms()``, smallcnn's own. A weights file counts as
    the architecture's default. Where a registry has no answer (torchvision without weights: the architecture may
    fix its own image size), the model is built on the meta device."""

    source, arch = parse_name(name)
    spec = W.parse_spec("none" if weights and W.looks_like_path(weights) else weights, source, arch)
    if source == "smallcnn":
        from finetune.models import smallcnn

        return dict(smallcnn.DEFAULT_CFG)
    if spec.kind == "torchvision":
        from finetune.models.tv import data_cfg_from_weights

        return data_cfg_from_weights(spec.enum)
    if source == "timm":
        from finetune.models.timm_models import data_cfg_of

        cfg = data_cfg_of(spec.tag_name or arch)
        if cfg is not None:
            return cfg
    return build_model_shapes(canonical(source, spec.tag_name if spec.kind == "timm" else arch)).data_cfg


def list_models(pattern: str | None = None, pretrained_only: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"source", "name", "weights": [...]}`` for every model whose name matches ``pattern``.

    ``pattern`` is a glob (``resnet*``, ``timm:vit_*``) or, without glob characters, a substring; a pattern
    without a ``timm:``/``torchvision:`` prefix matches models of every source.
    """
    import timm
    import torchvision.models as tvm

    def match(name: str) -> bool:
        if not pattern:
            return True
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatch(name, pattern)
        return pattern in name

    rows: list[dict[str, Any]] = []
    if match("smallcnn"):
        rows.append({"source": "smallcnn", "name": "smallcnn", "weights": []})
    for arch in torchvision_names():
        if match(arch) or match(f"torchvision:{arch}"):
            try:
                w = [f"{e.__class__.__name__}.{e.name}" for e in tvm.get_model_weights(arch)]
            except (ValueError, KeyError):
                w = []
            rows.append({"source": "torchvision", "name": arch, "weights": w})
    tags: dict[str, list[str]] = {}
    for full in timm.list_pretrained():
        base, _, tag = full.partition(".")
        tags.setdefault(base, []).append(tag)
    for arch in timm.list_models():
        if match(f"timm:{arch}") or (not (pattern or "").startswith(("timm:", "torchvision:")) and match(arch)):
            rows.append({"source": "timm", "name": f"timm:{arch}", "weights": tags.get(arch, [])})
    if pretrained_only:
        rows = [r for r in rows if r["weights"]]
    return rows
