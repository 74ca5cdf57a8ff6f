"""Backbones by name, each with a new head for the user's classes.

Names: ``smallcnn`` (the tutorial's CIFAR-10 net), any torchvision classification model by its torchvision
name (``resnet18``, ``vgg16``; ``torchvision:resnet18`` also works), any timm model as ``timm:<name>``
(``timm:resnet18``, ``timm:resnet18.a1_in1k`` with a pretrained tag). Each source is a
:class:`~finetune.models.sources.BackboneSource` registered under its prefix (``smallcnn.py``, ``tv.py``,
``timm_models.py``); :func:`register_source` adds one (``toy:tiny``) without editing this package.
"""

from __future__ import annotations

import logging
from typing import Any

from finetune.config.catalog import list_in
from finetune.models import weights as W
from finetune.errors import ModelError
from finetune.models.backbone import Backbone, init_new_head, is_under
from finetune.models.sources import BackboneSource, canonical, get_source, register_source, resolve, \
    registered_sources, unregister_source
# the built-in sources register themselves on import, in this order (a bare name goes to the first that has it)
from finetune.models import smallcnn, tv, timm_models  # noqa: F401

log = logging.getLogger("finetune")

__all__ = ["Backbone", "BackboneSource", "is_under", "build_model", "build_model_shapes", "canonical", "data_config",
           "get_source", "list_models", "parse_name", "register_source", "sources", "unregister_source"]


def parse_name(name: str) -> tuple[str, str]:
    """Split a model name into (source, arch) and check that it exists (``finetune.models.sources.resolve``)."""
    return resolve(name)


def torchvision_names() -> list[str]:
    """Torchvision's image-classification models (not detection/segmentation/video)."""
    return tv.names()


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
    src = get_source(source)
    rates = {k: v for k, v in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)) if v is not None}
    if rates and not src.rates:
        key = next(iter(rates))
        raise ModelError(f"model.{key} is passed to timm's create_model; '{name}' is not a timm model (use "
                         f"timm:<name>, or drop --{key.replace('_', '-')})")
    spec = W.parse_spec(weights, source, arch)
    bb = src.build(arch, num_classes, spec, **rates)
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
    cfg = get_source(source).data_config(arch, spec)
    if cfg is not None:
        return cfg
    return build_model_shapes(canonical(source, spec.tag_name or arch)).data_cfg


def list_models(pattern: str | None = None, pretrained_only: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"source", "name", "weights": [...]}`` for every model whose name matches ``pattern``.

    ``pattern`` is a glob (``resnet*``, ``timm:vit_*``) or, without glob characters, a substring; a pattern
    without a ``timm:``/``torchvision:`` prefix matches models of every source. (``finetune.api.list_models``
    answers the same without importing torch while only the built-in sources exist:
    :func:`finetune.config.catalog.list_models`.)
    """
    return list_in(registered_sources(), pattern, pretrained_only)
