"""Assembling what a recipe trains: data -> model -> freeze plan -> memory format -> optimizer, the one way that
``train`` (:mod:`finetune.run.runner`), the LR range test (:mod:`finetune.run.lr_find`) and the probe lab
(:mod:`finetune.tools.probe`) build it, so that what they measure is what ``train`` then runs.

What differs between them is a parameter, not a copy: a run gives its device and precision (from the process
group), a scratch folder for a disk image cache (its run directory), the checkpoint it resumes and the check of its
data against it, and wants the warnings about its freeze plan; the probe builds no optimizer (it trains its own heads)
and checks that its data has val images. Seeding stays with the caller (a run seeds before choosing ``--lr auto``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from finetune.config import Recipe
from finetune.errors import ConfigError, how_to_set
from finetune.training.engine import resolve_device, resolve_precision, wants_channels_last
from finetune.models import data_config, build_model
from finetune import data as D
from finetune.training import freeze as F, optim as O
from finetune.speedups import backbone_store
from finetune.speedups.feature_store import features_dir

log = logging.getLogger("finetune")


@dataclass
class Parts:
    """A recipe assembled: ``cfg`` as assembled (on tar shards the frozen-feature cache is off), where it runs, the
    data, the backbone (``bb``, whose ``model`` is ``model``), its freeze plan and the optimizer (None when not
    asked for)."""

    cfg: Recipe
    device: torch.device
    precision: str
    bundle: Any  # finetune.data.DataBundle
    classes: list[str]
    bb: Any  # finetune.models.Backbone
    plan: Any  # finetune.training.freeze.FreezePlan
    model: nn.Module
    channels_last: bool
    optimizer: torch.optim.Optimizer | None


def assemble(cfg: Recipe, *, device: torch.device | None = None, precision: str | None = None,
             scratch: Path | None = None, saved: Any = None, check_data: Callable[[Any], None] | None = None,
             optimizer: bool = True, warn: bool = False, stand_in: bool = False,
             cache_dir: str | Path | None = None) -> Parts:
    """Build ``cfg``'s data, model (with its dropout and stochastic depth), freeze plan, memory format and optimizer.

    ``device``/``precision``: where it runs (default: the recipe's, resolved on this machine). ``scratch``: where a
    disk image cache that is not kept lives. ``saved``: the checkpoint a run resumes (its model is built without
    weights, which the checkpoint replaces, and the data's classes must be its). ``check_data(bundle)`` runs once
    the data are read, before the model is built (and its weights perhaps downloaded). ``optimizer``: build it.
    ``warn``: log what the freeze plan will not do (a run's start-up; the LR test before it stays quiet).
    ``stand_in``: the caller trains only the head on stored features: a backbone kept in the cache
    (:mod:`finetune.speedups.backbone_store`) stands in for the model when there is one (the caller builds the real
    model if it turns out to need it: :class:`~finetune.models.stand_in.NeedsBackbone`), and the real model, when
    built, is kept there for the next such run (``cache_dir``: the cache root, default ``$FINETUNE_CACHE``). The
    stand-in's build warnings are the caller's to show (``bb.notes``) once it is sure not to build the model."""

    device = device if device is not None else resolve_device(cfg.train.device)
    precision = precision if precision is not None else resolve_precision(cfg.train.precision, device)
    cfg = D.check_stream_recipe(cfg)  # tar shards stream: no frozen-feature cache (it indexes images)
    stand_in = stand_in and saved is None
    dc = (stand_in and backbone_store.find_data_config(cfg, cache_dir)) or data_config(cfg.model.name,
                                                                                         cfg.model.weights)
    bundle = D.build_data(cfg.data, dc, seed=cfg.train.seed, scratch=scratch, listing_only=stand_in)
    if check_data is not None:
        check_data(bundle)
    classes = check_classes(cfg, list(bundle.class_names), saved)
    kept = backbone_store.load(cfg, len(classes), cache_dir) if stand_in else None
    if kept is not None and kept[1] == dc:
        bb = kept[0]
    else:
        bb = build_model(cfg.model.name, num_classes=len(classes), weights="none" if saved else cfg.model.weights,
                         drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
        if stand_in:
            backbone_store.save(cfg, bb, dc, cache_dir)
    plan = F.apply_freeze(bb, cfg.freeze)
    if warn:
        warn_plan(cfg, bb, plan, resumed=saved is not None)
    channels_last = wants_channels_last(bb.model, cfg.train.channels_last)
    model = bb.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = O.build_optimizer(bb, cfg.optimizer) if optimizer else None
    return Parts(cfg=cfg, device=device, precision=precision, bundle=bundle, classes=classes, bb=bb, plan=plan,
                 model=model, channels_last=channels_last, optimizer=opt)


def head_only_on_stored_features(cfg: Recipe, dd=None) -> bool:
    """Whether a new run of ``cfg`` may start on a stand-in for its backbone (:mod:`finetune.models.stand_in`): it
    trains only the head, every epoch on cached features, in one process, and nothing else runs the backbone (no
    EMA copy, no compile, no TensorBoard graph, no timm layer grouping); its weights are pretrained (random init is
    not kept) and the feature store persists. When some features turn out not to be stored, the run builds the real
    model (:class:`~finetune.models.stand_in.NeedsBackbone`) and goes on as it always did. ``dd``: the run's process
    group (None: one process)."""
    t, f = cfg.train, cfg.freeze
    one_process = dd is None or not dd.enabled
    return (one_process and f.backbone and not f.schedule and t.cache_features in ("auto", "on")
            and (t.cache_features == "on" or (D.is_deterministic(cfg.data.augment) and not t.mixup and not t.cutmix))
            and not t.ema and not t.compile and not t.graph and cfg.optimizer.layer_decay is None
            and cfg.model.weights not in ("none", "random", "") and features_dir() is not None)


def check_classes(cfg: Recipe, classes: list[str], saved: Any = None) -> list[str]:
    """The data's classes, when they are the resumed run's and as many as ``model.num_classes`` asks for."""
    if saved is not None and classes != list(saved.class_names):
        raise ConfigError(f"cannot resume: the data's classes {classes} differ from the run's "
                          f"{list(saved.class_names)}")
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(classes):
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the data has {len(classes)} classes "
                          f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); drop num_classes to "
                          "take it from the data")
    return classes


def warn_plan(cfg: Recipe, bb, plan, resumed: bool) -> None:
    """Warn about parameters frozen at random init and unfreeze steps after the last epoch."""
    if not resumed and bb.weights == "none" and plan.frozen:
        log.warning(f"{len(plan.frozen)} parameter tensors are frozen at random init (weights: none): they will "
                    f"stay random; {how_to_set('model.weights')} (pretrained or a file) or drop the freeze plan")
    for stp in cfg.freeze.schedule:
        if stp.epoch > cfg.train.epochs:
            log.warning(f"the unfreeze step at epoch {stp.epoch} ({', '.join(stp.layers)}) never runs: the run has "
                        f"{cfg.train.epochs} epochs (1..{cfg.train.epochs})")
