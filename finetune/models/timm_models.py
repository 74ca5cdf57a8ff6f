"""timm models as ``timm:<name>``: create_model with the new class count, so timm swaps the classifier itself
(``reset_classifier`` semantics) and skips the pretrained head when the class count differs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.errors import ModelError
from finetune.models.backbone import Backbone

if TYPE_CHECKING:
    from finetune.models.weights import WeightsSpec


def data_cfg(model) -> dict:
    """The input config of a built timm model."""
    from timm.data import resolve_data_config

    return _ours(resolve_data_config({}, model=model))


def data_cfg_of(name: str) -> dict | None:
    """The input config of ``name`` (``arch`` or ``arch.tag``) from timm's registry alone, without building the
    model (``resolve_data_config(pretrained_cfg=...)``); None when timm has no pretrained config for it."""
    import timm
    from timm.data import resolve_data_config

    cfg = timm.models.get_pretrained_cfg(name)
    return None if cfg is None else _ours(resolve_data_config(pretrained_cfg=cfg.to_dict()))


def _ours(cfg: dict) -> dict:
    size = cfg["input_size"][-1]
    crop_pct = cfg.get("crop_pct", 0.875) or 1.0
    return {
        "input_size": tuple(cfg["input_size"]),
        "resize": int(size / crop_pct),
        "crop_pct": crop_pct,
        "interpolation": cfg.get("interpolation", "bilinear"),
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
    }


def head_paths(model) -> list[str]:
    cls = getattr(model, "pretrained_cfg", {}).get("classifier") or "fc"
    paths = [cls] if isinstance(cls, str) else list(cls)
    names = dict(model.named_modules())
    found = [p for p in paths if p in names]
    if not found:
        raise ModelError(f"cannot find the classifier of timm model {type(model).__name__} (looked for {paths})")
    return found


def build(arch: str, num_classes: int | None, spec: WeightsSpec, **rates: float) -> Backbone:
    """``rates``: ``drop_rate`` / ``drop_path_rate`` for ``create_model`` (models that lack one raise a TypeError,
    reported as a one-line error)."""
    import timm

    from finetune.models.weights import fetch_timm

    kwargs = {**rates} if num_classes is None else {"num_classes": num_classes, **rates}
    name = arch
    if spec.kind == "timm":
        name = spec.tag_name
        model = fetch_timm(lambda: timm.create_model(name, pretrained=True, **kwargs), name)
    else:
        try:
            model = timm.create_model(arch, pretrained=False, **kwargs)
        except RuntimeError as e:  # e.g. an unknown pretrained tag
            raise ModelError(f"cannot build timm model '{arch}': {e}") from None
        except TypeError as e:  # a rate the architecture's constructor doesn't take
            if not rates:
                raise
            raise ModelError(f"timm model '{arch}' does not take {', '.join(rates)}: {e}") from None
    from finetune.models.backbone import init_new_head

    head = head_paths(model)
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes", 1000)
    if spec.kind == "timm" and model.num_classes != pretrained_classes:  # timm's head init suits scratch training
        init_new_head(model, head)  # (a file: build_model zeroes the head before loading it)
    return Backbone(model, f"timm:{arch}", "timm", arch, model.num_classes, head, data_cfg=data_cfg(model))
