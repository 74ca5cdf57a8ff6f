"""Faster frozen inference: a conv+BatchNorm-folded COPY of a model in eval mode, for feature extraction, eval and
predict (``train.fast_inference: auto|off``, ``--fast-inference/--no-fast-inference``).

In eval mode a BatchNorm after a convolution is an affine map with fixed numbers, so it folds into the
convolution's weight and bias (``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``):
one pass over the activations less per BatchNorm. Which convolution feeds which BatchNorm is read from one traced
forward pass (forward hooks: the BatchNorm's input *is* the convolution's output tensor), so it works where
``torch.fx`` cannot trace (timm's EfficientNets with TF-same padding). Only a copy is folded, never the model that
trains or is saved; the copy's output is checked against the model's on the first batch (fp32, two images) and
the model itself runs when they differ by more than :data:`TOLERANCE` (relative to the output's largest value) or
nothing folds. timm's ``BatchNormAct2d`` keeps its activation (and drop), only the normalisation goes.

Measured on the shared 2-core AVX512-BF16 CPU (benchmarks/infer_bench.py, bf16 autocast + channels_last, batch 64,
one run): folding makes EfficientNet-Lite0 1.45x and resnet18 1.07x faster. Not adopted: bf16 weights on top of the
fold (1.00x: autocast's per-call weight cast is not where the time goes) and ``torch.compile`` (27-29 s to compile
for 0.97-1.05x: it never pays back within a run's inference passes on that CPU). See README "Speed and benchmarks".
"""

from __future__ import annotations

import copy
import logging
import sys

import torch
from torch import nn

from finetune.config import choices
from finetune.errors import ConfigError

log = logging.getLogger("finetune")

MODES = choices("train.fast_inference")  # written once: the type of TrainCfg.fast_inference
TOLERANCE = 1e-4  # folded vs eager, fp32, max |difference| / max |eager output|


def _pairs(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """``(conv name, bn name)`` where the BatchNorm's input is that convolution's output (each called once), and
    the model's fp32 output on ``x`` (the reference for the check)."""
    outs: dict[int, str] = {}
    calls: dict[str, int] = {}
    keep: list[torch.Tensor] = []  # holds the outputs alive, so no id() is reused during the pass
    found: list[tuple[str, str]] = []
    hooks = []

    def on_conv(name):
        def hook(_m, _args, out):
            calls[name] = calls.get(name, 0) + 1
            keep.append(out)
            outs[id(out)] = name
        return hook

    def on_bn(name):
        def hook(_m, args, _out):
            calls[name] = calls.get(name, 0) + 1
            if args and id(args[0]) in outs:
                found.append((outs[id(args[0])], name))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv(name)))
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            hooks.append(m.register_forward_hook(on_bn(name)))
    try:
        ref = model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(c, b) for c, b in found if calls[c] == 1 and calls[b] == 1], ref


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s eval-mode affine map into ``conv`` (in place; both belong to the copy)."""
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        w = conv.weight * scale.reshape(-1, 1, 1, 1)
        b = (bias - bn.running_mean) * scale + shift
    conv.weight = nn.Parameter(w, requires_grad=False)
    conv.bias = nn.Parameter(b, requires_grad=False)


def _after_fold(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or timm BatchNormAct2d's drop + activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def folded_copy(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every conv->BatchNorm pair folded, checked against ``model`` on the first
    two images of ``x`` in fp32: ``(copy, pairs folded)``, or ``(model, 0)`` when nothing folds or the check fails."""
    if not any(isinstance(m, nn.BatchNorm2d) and m.running_mean is not None for m in model.modules()):
        return model, 0  # nothing could fold (a ViT): no copy
    sample = x[:2].float()
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), torch.autocast(sample.device.type, enabled=False):  # the check runs in fp32
        pairs, ref = _pairs(clone, sample)
        if not pairs:
            return model, 0
        for c, b in pairs:
            bn = clone.get_submodule(b)
            _fold(clone.get_submodule(c), bn)
            _set(clone, b, _after_fold(bn))
        out = clone(sample)
    if not isinstance(ref, torch.Tensor) or out.shape != ref.shape:
        return model, 0
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12))
    if not err <= TOLERANCE:
        log.debug(f"fast inference: the folded copy differs by {err:.2e} from the model; running the model")
        return model, 0
    return clone, len(pairs)


def _unwrapped(model: nn.Module) -> nn.Module | None:
    """The module to fold: DDP's ``.module`` (eval needs no gradient sync); None for a ``torch.compile`` wrapper
    (run as compiled) and for an FSDP2-sharded model (its shards cannot be copied; finetune/parallel/strategy.py)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # a sharded model exists only once FSDP was imported (1 s)
    if hasattr(model, "_orig_mod") or (fsdp is not None and isinstance(model, fsdp.FSDPModule)):
        return None
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class FastInference:
    """Calls the folded copy of ``model`` (built on the first call from that batch) when ``mode`` is ``auto``,
    else ``model``. One per pass: the copy holds the weights as they were at its first call."""

    def __init__(self, model: nn.Module, mode: str = "auto"):
        self.model, self.mode = model, mode
        self.run: nn.Module | None = None
        self.folded = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.run is None:
            self.run = self.model
            inner = _unwrapped(self.model)
            if self.mode == "auto" and inner is not None and not self.model.training:
                self.run, self.folded = folded_copy(inner, x)
        return self.run(x)


def mode_of(ckpt: dict, given: str | None = None) -> str:
    """The fast-inference mode for eval/predict of a checkpoint: ``given``, else its recipe's
    ``train.fast_inference``; a checkpoint from before the key existed ran its val passes eagerly, so ``off``
    (eval then reproduces its recorded val accuracy bitwise)."""
    if given is not None:
        if given not in MODES:
            raise ConfigError(f"--fast-inference must be {' or '.join(MODES)}, got '{given}'")
        return given
    return str(((ckpt.get("recipe") or {}).get("train") or {}).get("fast_inference", "off"))
