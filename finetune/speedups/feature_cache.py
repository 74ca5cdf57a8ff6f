"""Frozen-feature cache: run the frozen part of the model once, then train the head on its outputs.

A linear probe re-runs the frozen backbone every epoch although its output never changes; the floor is one forward
pass over the data. When only the head trains, :func:`plan_cache` splits the model at the head's input
(:func:`split_frozen_prefix`), :func:`compute_features` runs the frozen part once over train and val in eval mode
under ``torch.inference_mode()`` (with the run's precision and memory layout), and the epoch loop trains the head in
fp32 on those features (:class:`FeatureRun`). The head module is the model's own, so the optimizer, the LR schedule
and the checkpoints (the FULL model's ``state_dict``, same keys) are unaffected.

When it is the same computation (``cache_features: auto``): the trainable parameters all belong to the head; the
train transform is deterministic (``augment: none``); nothing in the frozen part acts differently in train mode
(dropout or drop-path with p > 0, BatchNorm that the ``train`` BN policy lets update its statistics); and no unfreeze
step happens at the first epoch. With an unfreeze schedule the cache serves until the first unfreeze, then the loop
runs the full model. ``on`` caches whenever the split exists, with the eval transform instead of a random
augmentation and eval-mode behaviour in the frozen part (the run says so in a note); ``off`` never caches.

Features (float32; 512 numbers per image for resnet18) go through the persistent store of
:mod:`.feature_store`: a later run on the same images, backbone, split point, transform and precision reads
them back instead of running the frozen part (``FINETUNE_CACHE=off``: in memory only). With N processes each rank
computes the features of its shard of the images and they are all-gathered (:mod:`finetune.speedups.feature_shards`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from finetune.config import choices
from finetune.errors import ConfigError, option
from finetune.models.backbone import is_under
from finetune.models.stand_in import NeedsBackbone, is_stand_in
from finetune.data import is_deterministic, make_loader, eval_transform
from finetune.speedups.feature_store import stream_features
from finetune.parallel.strategy import uses_fsdp
from finetune.training.imbalance import sample_weights
from finetune.training.engine import autocast

log = logging.getLogger("finetune")

MODES = choices("train.cache_features")  # written once: the type of TrainCfg.cache_features


class _Stop(Exception):
    """Raised by the head's pre-hook: the head's input is all we need, the head itself need not run."""


class UpToHead(nn.Module):
    """``model`` run up to the input of its ``head`` module (captured by a forward pre-hook).

    Works for any architecture whose output is ``head(input)`` (checked by :func:`check_split`), without copying
    the model or changing its module tree.
    """

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model = model
        self._head = [head]  # a list, so the head is not registered as a submodule twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box: dict[str, Any] = {}

        def hook(_module, args):
            box["x"] = args[0]
            raise _Stop

        handle = self._head[0].register_forward_pre_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "x" not in box:
            raise RuntimeError("the head was never called")
        return box["x"]


@dataclass
class Split:
    """The model cut in two: ``frozen`` (images -> features) and ``trainable`` (features -> logits)."""

    frozen: nn.Module
    trainable: nn.Module
    where: str  # the head's dotted path: the features are its input


def split_frozen_prefix(bb, sample: torch.Tensor | None = None) -> Split | None:
    """Split ``bb.model`` where the trainable part starts, or None.

    When every trainable parameter belongs to the head, the cut is the head's input (any architecture). Otherwise,
    for models that ``torch.fx`` can trace, the cut is just before the first module with trainable parameters
    (resnet18 with conv1..layer3 frozen: the features are layer3's output and layer4 + fc train on them), provided
    one tensor alone crosses the cut. When fx cannot trace the model, :func:`split_at_block` cuts at a block of a
    sequential stage instead (needs ``sample``, one input batch).
    """

    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    if not trainable:
        return None
    if len(bb.head) == 1 and all(is_under(n, bb.head) for n in trainable):
        head = dict(bb.model.named_modules())[bb.head[0]]
        return Split(UpToHead(bb.model, head), head, bb.head[0])
    return split_trailing(bb.model, trainable) or (split_at_block(bb.model, trainable, sample)
                                                   if sample is not None else None)


def split_at_block(model: nn.Module, trainable: list[str], sample: torch.Tensor) -> Split | None:
    """Without fx (timm's TF-same padding, ViTs' control flow): cut at the input of a block of a sequential stage
    (``blocks.N``, ``stages.N``, ``layer3.0``) when every module that runs before it is frozen.

    The frozen part is the model run up to that block's input (a forward pre-hook, as for the head). The trainable
    part runs the model on one blank image (an empty batch breaks reshapes such as timm's ``view(B, -1, C)``),
    and a pre-hook swaps the block's input for the cached features: everything from the block on is the model's
    own forward code. :func:`check_split` verifies the result equals the full model's output.
    """
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, m in modules.items() if n]
    was = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(sample[:1])
    except Exception:  # noqa: BLE001 - no order, no cut
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    first_call = {}
    for i, n in enumerate(order):
        first_call.setdefault(n, i)
    from finetune.models import is_under

    owners = {n.rpartition(".")[0] for n in trainable}
    if "" in owners:  # a trainable parameter of the root (cls_token, pos_embed): used before any block
        return None
    start = min(first_call.get(o, len(order)) for o in owners)
    # the cut: the outermost block (a child of a Sequential/ModuleList) that contains the first trainable module
    path = order[start] if start < len(order) else ""
    cut = next((p for p in _ancestors(path) if isinstance(modules.get(p.rpartition(".")[0] or "", None),
                                                           (nn.Sequential, nn.ModuleList))
                and p.rpartition(".")[0]), None)
    if cut is None or order.count(cut) != 1:
        return None
    before = {n for n in order[:first_call[cut]] if not is_under(n, [cut]) and not is_under(cut, [n])}
    if any(p.requires_grad for n in before for p in modules[n].parameters(recurse=False)):
        return None
    rest = FromBlock(model, modules[cut], sorted(before))
    rest.in_shape = tuple(sample.shape[1:])
    return Split(UpToHead(model, modules[cut]), rest, cut)


def _ancestors(path: str) -> list[str]:
    """``blocks.3.conv`` -> ``blocks``, ``blocks.3``, ``blocks.3.conv`` (outermost first)."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if path else []


class FromBlock(nn.Module):
    """``model`` from ``block`` on, fed with ``block``'s input (see :func:`split_at_block`)."""

    def __init__(self, model: nn.Module, block: nn.Module, before: list[str]):
        super().__init__()
        self.model = model
        self._block = [block]
        self._before = before  # modules that run before the cut: held in eval mode on their blank image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        def hook(_module, args):
            return (features, *args[1:])

        modules = dict(self.model.named_modules())
        # (a folded copy for fast inference, finetune/models/fold.py, has replaced some of them: BN+act -> act)
        training = [n for n in self._before if n in modules and modules[n].training]
        for n in training:
            modules[n].eval()  # frozen: no BatchNorm statistics updated by the blank image
        handle = self._block[0].register_forward_pre_hook(hook)
        try:
            return self.model(torch.zeros((1, *self.in_shape), dtype=features.dtype, device=features.device))
        finally:
            handle.remove()
            for n in training:
                modules[n].train()

    in_shape: tuple[int, ...] = (3, 32, 32)


def split_trailing(model: nn.Module, trainable: list[str]) -> Split | None:
    """Cut ``model``'s fx graph before the first node that uses a trainable parameter (see split_frozen_prefix)."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: no trailing split
        return None
    owners = {n.rpartition(".")[0] for n in trainable}

    def trains(node) -> bool:
        if node.op in ("call_module", "get_attr"):
            return any(is_under(o, [node.target]) or is_under(node.target, [o]) for o in owners if o) or \
                (node.op == "get_attr" and node.target in trainable)
        return False

    nodes = list(gm.graph.nodes)
    first = next((i for i, n in enumerate(nodes) if trains(n)), None)
    if first is None or first == 0:
        return None
    before, after = nodes[:first], set(nodes[first:])
    live = [n for n in before if any(u in after for u in n.users)]
    if len(live) != 1 or live[0].op == "placeholder" or sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    g0, env0 = fx.Graph(), {}
    for n in before:
        env0[n] = g0.node_copy(n, lambda a: env0[a])
    g0.output(env0[live[0]])
    g1, env1 = fx.Graph(), {}
    env1[live[0]] = g1.placeholder("features")
    for n in nodes[first:]:
        env1[n] = g1.node_copy(n, lambda a: env1[a])
    where = nodes[first].target if nodes[first].op == "call_module" else str(nodes[first].target)
    # GraphModule(root, graph) takes the root's submodules by reference: the parameters stay the model's own
    return Split(fx.GraphModule(gm, g0), fx.GraphModule(gm, g1), where)


def check_split(split: Split, model: nn.Module, x: torch.Tensor) -> bool:
    """True when ``model(x) == trainable(frozen(x))`` in eval mode (the head's output is the model's output)."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            full = model(x)
            parts = split.trainable(split.frozen(x))
        return full.shape == parts.shape and bool(torch.allclose(full, parts, rtol=1e-4, atol=1e-5))
    except Exception:  # noqa: BLE001 - a model the hook cannot cut (the head is called twice, ...)
        return False
    finally:
        model.train(was)


def train_mode_effects(module: nn.Module, bn_policy: str) -> list[str]:
    """Modules of the frozen part that would act differently in train mode than in the eval-mode cache."""
    out = []
    for name, m in module.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            out.append(f"{name} ({kind} p={m.p:g})")
        elif kind == "DropPath" and getattr(m, "drop_prob", 0.0):
            out.append(f"{name} (DropPath p={m.drop_prob:g})")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and bn_policy == "train":
            out.append(f"{name} (BatchNorm with --bn train)")
    return out


@dataclass
class Decision:
    use: bool
    reason: str  # why (not); shown in the run summary
    forced: list[str] = dataclasses.field(default_factory=list)  # what 'on' changed relative to the uncached run


def decide(cfg, bb, start_epoch: int = 0, sample: torch.Tensor | None = None,
           sharded: bool = False) -> tuple[Decision, Split | None]:
    """Whether the run can train on cached frozen features (see the module docstring for the rules)."""

    mode = cfg.train.cache_features
    if mode not in MODES:
        raise ConfigError(f"train.cache_features must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == "off":
        return Decision(False, "off"), None
    if sharded:  # FSDP shards the model the cache would cut (strategy.check refuses 'on')
        return Decision(False, "not used: --strategy fsdp shards the model (a probe on cached features needs no "
                        "sharding: use ddp)"), None
    until = first_unfreeze(cfg)
    if start_epoch >= until:
        return Decision(False, f"not used: the unfreeze schedule starts at epoch {until + 1}"), None
    if all(p.requires_grad for p in bb.model.parameters()):
        if mode == "on":
            raise ConfigError("--cache-features on needs frozen layers, but the whole model trains; freeze the "
                              "backbone (--freeze-backbone) or use --cache-features auto/off")
        return Decision(False, "not used: nothing is frozen"), None
    split = split_frozen_prefix(bb, sample)
    if is_stand_in(bb.model) and (split is None or not isinstance(split.frozen, UpToHead)):
        raise NeedsBackbone("a cut other than the head's input is found by tracing the model")
    if split is not None and sample is not None and not check_split(split, bb.model, sample):
        split = None
    if split is None:
        why = ("the model cannot be cut into a frozen part and a trainable part: torch.fx cannot trace it, or "
               "the first trainable module is not a block of a sequential stage (blocks.N), or a module that runs "
               "before it trains, or more than one tensor crosses the cut")
        if mode == "on":
            raise ConfigError(f"--cache-features on needs a run where only the head trains: {why}; freeze the "
                              "backbone (--freeze-backbone) or use --cache-features auto/off")
        return Decision(False, f"not used: {why}"), None
    forced = []
    if not is_deterministic(cfg.data.augment):
        forced.append(f"augment {cfg.data.augment} is random; the cache uses the eval transform")
    if getattr(cfg.train, "mixup", 0) or getattr(cfg.train, "cutmix", 0):
        forced.append("mixup/cutmix mixes the images; the cached head trains unmixed")
    if is_stand_in(bb.model):  # what the real model's modules said, recorded when it was kept
        effects = list(bb.model.train_effects["train" if cfg.freeze.bn == "train" else "other"])
    else:
        effects = train_mode_effects(split.frozen, cfg.freeze.bn)
    rate = float(getattr(bb.model, "drop_rate", 0.0) or 0.0)  # timm: F.dropout before the classifier (no module)
    if rate > 0:
        effects.append(f"dropout p={rate:g} before the classifier (model.drop_rate)")
    if effects:
        forced.append("the frozen part acts differently in train mode: " + ", ".join(effects[:3])
                      + (f" and {len(effects) - 3} more" if len(effects) > 3 else "") + "; the cache runs it in eval "
                      "mode")
    if forced and mode == "auto":
        return Decision(False, "not used: " + "; ".join(forced) + " (--cache-features on forces it)"), None
    return Decision(True, f"the input of '{split.where}'", forced), split


def forced_note(forced: list[str]) -> str:
    """The end of the cache's note when ``cache_features: on`` made it serve a run that ``auto`` would train
    uncached: what changes, and the setting by its name (it may come from the recipe, lp-ft's, not a flag)."""
    if not forced:
        return ""
    return (f"; {'; '.join(forced)} (cache_features: on; with {option('train.cache_features', 'auto')} this run "
            "would train without the cache)")


def first_unfreeze(cfg) -> int:
    """The 0-based loop index of the first unfreeze step (schedule epochs are 1-based; the run's epoch count when
    there is none)."""
    return min([s.epoch - 1 for s in cfg.freeze.schedule] + [cfg.train.epochs])


# ----------------------------------------------------------------------------------------------- features


class FeatureDataset(Dataset):
    """``(features[i], label[i])``; plain indices, so :func:`~finetune.data.make_loader` gives the same order
    (``EpochSampler``'s permutation for ``(seed, epoch)``) as for the image data set."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.features[i], int(self.targets[i])


def compute_features(frozen: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
                     precision: str = "fp32", channels_last: bool = False, workers: int | None = None,
                     fast: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``frozen`` once over ``dataset`` (in order) in eval mode under ``inference_mode``; float32 CPU features.

    Labels come from the data set's items (an unreadable file is replaced by the next readable one, as in training).
    """

    feats, labels = [], []
    for f, y in stream_features(frozen, dataset, batch_size=batch_size, device=device, precision=precision,
                                channels_last=channels_last, workers=workers, fast=fast):
        feats.append(f)
        labels.append(y)
    # clone outside inference mode: inference tensors cannot be saved for the head's backward
    return torch.cat(feats).clone(), torch.cat(labels).clone()


@dataclass
class FeatureRun:
    """What the epoch loop runs while the cache serves (epochs ``< until``): the head, feature loaders, a Step."""

    model: nn.Module
    train_loader: Any
    val_loader: Any
    step: Any
    until: int
    seconds: float
    note: str

    def serves(self, epoch: int) -> bool:
        return epoch < self.until


def plan_cache(cfg, bb, bundle, step, *, device: torch.device, precision: str, channels_last: bool,
               start_epoch: int = 0, reporter=None, dd=None) -> tuple[FeatureRun | None, str]:
    """Decide, and when the cache is used compute the features: ``(FeatureRun or None, a line for the summary)``."""

    sample = None if is_stand_in(bb.model) else _sample(bundle.train, device)  # a stand-in: nothing to check

    decision, split = decide(cfg, bb, start_epoch, sample, sharded=dd is not None and uses_fsdp(cfg, dd))
    if not decision.use or split is None:
        return None, decision.reason
    t0 = time.perf_counter()
    (ftr, ytr), val, hit = bundle_features(split, bb, bundle, cfg, device=device, precision=precision,
                                           channels_last=channels_last, dd=dd)
    val_loader = None
    if val is not None:
        val_loader = make_loader(FeatureDataset(*val), cfg.train.batch_size, shuffle=False, seed=cfg.train.seed,
                                 workers=0)

    weights = sample_weights(cfg.data.sampler, ytr.tolist(), len(bundle.class_names))  # data.sampler: balanced
    train_loader = make_loader(FeatureDataset(ftr, ytr), cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                               workers=0, weights=weights)
    secs = time.perf_counter() - t0
    until = first_unfreeze(cfg)
    span = "every epoch" if until >= cfg.train.epochs else f"until the unfreeze at epoch {until + 1}"
    # a head alone trains in fp32 on float32 features; a trailing conv block keeps the run's precision and layout
    convs = any(isinstance(m, nn.Conv2d) for m in split.trainable.modules())
    part_step = step if convs else dataclasses.replace(step, precision="fp32", channels_last=False, scaler=None)
    note = (f"frozen-feature cache: {decision.reason} ({ftr.shape[0]} train / "
            f"{val_loader.dataset.features.shape[0] if val_loader else 0} val, {list(ftr.shape[1:])} each, "
            f"{precision}), {'read from the feature cache' if hit else 'computed once'} in {secs:.1f} s; the "
            f"trainable part trains on them in {part_step.precision} {span}")
    note += forced_note(decision.forced)
    return FeatureRun(split.trainable, train_loader, val_loader, part_step, until, secs, note), "used"


# The frozen-feature pass's batch on a CPU. benchmarks/feature_batch_bench.py (2-core AVX2 CPU, fp32, folded,
# channels-last): batch 8 was the fastest or within 3% of it for Lite0, Lite1, EfficientNet-B0, ResNet-18/50 and
# ConvNeXt-T, 1.1-2.3x the images/s of batch 64 (a small batch's activations stay in the CPU's caches). A sample's
# features do not depend on the batch it ran in (checked bitwise for those models on that CPU).
CPU_FEATURE_BATCH = 8


def feature_batch_size(batch_size: int, device: torch.device) -> int:
    """The batch of the frozen-feature pass: :data:`CPU_FEATURE_BATCH` on a CPU; elsewhere (GPUs fill their cores
    with bigger batches) the run's, at least 64. Inference only: it changes no result."""
    return CPU_FEATURE_BATCH if torch.device(device).type == "cpu" else max(batch_size, 64)


def bundle_features(split, bb, bundle, cfg, *, device: torch.device, precision: str, channels_last: bool,
                    dd=None, cache_dir=None):
    """The frozen part's features of the data's train images (eval transform) and val images, through the
    persistent store (speedups/feature_store.py: a later run on the same data and backbone reads them):
    ``((train features, labels), (val features, labels) or None, whether every split was a store hit)``."""

    kw = dict(batch_size=feature_batch_size(cfg.train.batch_size, device), device=device, precision=precision,
              channels_last=channels_last,
              workers=cfg.data.workers, dd=dd, fast=cfg.train.fast_inference, cache_dir=cache_dir)
    tr_ds = bundle.train.with_transform(eval_transform(bundle.transform))
    ftr, ytr, hit = split_features(split, bb, tr_ds, bundle.transform, **kw,
                                   describe={"data": cfg.data.path, "split_of_data": "train"})
    if bundle.val is None:
        return (ftr, ytr), None, hit
    fva, yva, hit_val = split_features(split, bb, bundle.val, bundle.transform, **kw,
                                       describe={"data": cfg.data.path, "split_of_data": "val"})
    return (ftr, ytr), (fva, yva), hit and hit_val


def _sample(ds, device: torch.device) -> torch.Tensor | None:
    """Two images for :func:`check_split` (None for an empty data set); ``(i, 0)`` keys leave torch's RNG alone."""
    try:
        n = min(2, len(ds))
        return torch.stack([ds[(i, 0)][0] for i in range(n)]).to(device) if n else None
    except Exception:  # noqa: BLE001 - the check is a safety net; no sample, no check
        return None


def split_features(split, bb, dataset, transform: dict, *, batch_size: int = 64, device="cpu",
                   precision: str = "fp32", channels_last: bool = False, workers: int | None = None,
                   cache_dir: str | None = None, describe: dict[str, Any] | None = None, dd=None,
                   fast: str = "auto"):
    """The features of ``split.frozen`` over ``dataset`` (``(features, labels, hit)``), through the store.

    The key: model, weights identity, the split point, the eval ``transform``, precision, layout, device type and the
    images (paths, sizes, mtimes, content digests, labels). The frozen part's own tensors are part of the weights
    identity only for random init; with a weights file or a pretrained name the file/name stands for them. ``dd``
    (:class:`finetune.parallel.distributed.Dist`) of a distributed run: each rank computes its shard, all ranks get all.
    """
    import torch

    from finetune.speedups.feature_store import (_versions, features_dir, get_features, items_identity,
                                                 stream_features, weights_identity)

    kw = dict(batch_size=batch_size, device=device, precision=precision, channels_last=channels_last,
              workers=workers, fast=fast)
    store = features_dir(cache_dir)
    items = items_identity(dataset, store.parent) if store is not None else None
    parts = None
    if items is not None:
        parts = {"model": bb.name, "weights": weights_identity(bb.weights, split.frozen), "split": split.where,
                 "versions": _versions(bb.source),
                 "transform": transform, "precision": precision, "channels_last": bool(channels_last),
                 "device": torch.device(device).type, "items": items}
        if fast != "off":  # folded features differ from eager ones in the last bits: a key of their own
            parts["fast_inference"] = fast

    stand_in = is_stand_in(bb.model)

    def compute():
        if stand_in:  # the features are not stored: the real backbone must run (the caller builds it)
            raise NeedsBackbone(f"the features of {bb.name} on this data are not in the feature store")
        f, y = compute_features(split.frozen, dataset, **kw)
        return f, y

    def batches():
        if stand_in:
            raise NeedsBackbone(f"the features of {bb.name} on this data are not in the feature store")
        return stream_features(split.frozen, dataset, **kw)

    def row_shape():  # what a stored entry's rows must be (checked on a hit)
        if isinstance(split.frozen, UpToHead) and isinstance(split.trainable, nn.Linear):
            return (split.trainable.in_features,)  # a Linear head's input: no image decoded, no backbone run
        return _row_shape(split.frozen, dataset, device, precision)  # one image through the frozen part

    info = {"model": bb.name, "weights": bb.weights, "split": split.where, "precision": precision, **(describe or {})}
    if dd is not None and dd.enabled:  # each rank computes its shard once; all-gathered (feature_shards.py)
        from finetune.speedups.feature_shards import sharded_features

        return sharded_features(lambda w, r: stream_features(split.frozen, dataset, **kw, num_replicas=w, rank=r),
                                len(dataset), parts, dd, cache_dir=cache_dir, info=info, row_shape=row_shape)
    return get_features(compute, batches, len(dataset), parts, cache_dir=cache_dir, info=info, row_shape=row_shape)


def _row_shape(frozen: nn.Module, dataset, device, precision: str) -> tuple[int, ...] | None:
    """The shape of one feature row: the data set's first image through ``frozen`` (eval mode, no grad); None when
    there is no readable image (then the shape is not checked)."""

    try:
        x = dataset[(0, 0)][0].unsqueeze(0).to(device)
        was = frozen.training
        frozen.eval()
        try:
            with torch.inference_mode(), autocast(torch.device(device), precision):
                return tuple(frozen(x).shape[1:])
        finally:
            frozen.train(was)
    except Exception:  # noqa: BLE001 - a safety net: no image, no check
        return None
