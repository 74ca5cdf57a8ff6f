"""timm models as ``timm:<name>``: create_model with the new class count, so timm swaps the classifier itself
(``reset_classifier`` semantics) and skips the pretrained head when the class count differs."""

from __future__ import annotations

from typing import Any

from finetune.config import catalog
from finetune.config.catalog import timm_parse as parse
from finetune.errors import ModelError, WeightsError
from finetune.models.backbone import Backbone, init_new_head
from finetune.models.sources import BackboneSource, register_source
from finetune.models.weights import WeightsSpec, fetch_timm


def listing() -> dict[str, list[str]]:
    """Every timm architecture with its pretrained tags."""
    return catalog.listing("timm")


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
    head = head_paths(model)
    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes", 1000)
    if spec.kind == "timm" and model.num_classes != pretrained_classes:  # timm's head init suits scratch training
        init_new_head(model, head)  # (a file: build_model zeroes the head before loading it)
    return Backbone(model, f"timm:{arch}", "timm", arch, model.num_classes, head, data_cfg=data_cfg(model))


def weights_spec(w: str, arch: str) -> WeightsSpec:
    """``pretrained``/``default`` (the arch's default tag, or the one in the name) or a tag, checked against
    timm's pretrained list."""
    import timm

    base, _, given_tag = arch.partition(".")
    if w.lower() in ("default", "pretrained", "true"):
        cfg = timm.models.get_pretrained_cfg(arch)
        name = arch if given_tag or not cfg or not cfg.tag else f"{base}.{cfg.tag}"
    else:
        tag = w[len(base) + 1:] if w.startswith(base + ".") else w
        name = f"{base}.{tag}"
    avail = timm.list_pretrained(base + ".*") + timm.list_pretrained(base)
    if not avail:
        raise WeightsError(f"timm has no pretrained weights for '{base}'; pass --weights none or a file")
    if "." in name and name not in avail:
        tags = ", ".join(a.partition(".")[2] for a in avail)
        raise WeightsError(f"unknown timm weights '{w}' for {base}; valid tags: {tags}, or pretrained")
    return WeightsSpec("timm", f"timm:{name}", tag_name=name)


def data_config(arch: str, spec: WeightsSpec) -> dict[str, Any] | None:
    return data_cfg_of(spec.tag_name or arch)


# the names (parse, listing) come from the torch-free catalog: cached per timm version, no import of timm
register_source("timm", BackboneSource(parse, build, data_config, listing, weights_spec, packages=("timm",),
                                       group_matcher=True, rates=True, title="timm"))
