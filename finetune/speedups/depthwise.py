"""Depthwise convolutions trained with a bf16 forward and an fp32 backward where that is faster on this CPU
(``train.autotune: auto|off``, ``--autotune auto|off``).

Why: under bf16 autocast every convolution runs forward and backward in bf16. On the CPU (oneDNN), the bf16
*backward* of many depthwise convolutions (``groups == in_channels``: the 5x5 and strided ones of
EfficientNet/MobileNet blocks) is 2-5x slower than the fp32 backward of the same layer, while their bf16 forward is
faster than fp32's. EfficientNet-Lite0's training step on a 2-core AVX512-BF16 CPU spent 65% of its time in
``convolution_backward``; see benchmarks/RESULTS.md.

What: for each depthwise ``Conv2d`` of the model (and subclasses, e.g. timm's ``Conv2dSame``), on its real input
shape (one forward of a synthetic batch at the run's image size captures them), the layer's forward + backward is
timed both ways (bf16 throughout; bf16 forward with fp32 backward) and the second is adopted where it is faster by
more than 10%: on up to 8 images, best of 2 after a warm-up, about 2 s for Lite0; layers of one configuration are
timed once. Decisions are kept in ``$FINETUNE_CACHE/autotune.json`` per CPU, torch version and thread count, so
later runs on the machine skip the timing and pick the same layers; a resume takes the run's own from ``last.pt``.
Like ``cudnn.benchmark``, a timing decides: on another machine, or with an empty cache, a layer near the margin may
go either way (the gradients differ in their last bits, not in what is computed).

How: an adopted layer's class becomes a subclass whose forward, while it trains under bf16 autocast on the CPU
with gradients on, sends its ``conv2d`` through :class:`_Conv`: the forward in bf16 exactly as autocast computes it
(bitwise the same output), the backward in fp32 from the same bf16 input and the fp32 weight (gradients at least as
precise as bf16's). Evaluation, ``no_grad``, fp32 and GPU runs take the original forward. Parameters,
``state_dict`` and checkpoints are unchanged.

Applied on the CPU with bf16 only, and not with ``torch.compile`` or FSDP; ``off`` keeps autocast's kernels.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from finetune.parallel import distributed as dist_, strategy
from finetune.speedups.feature_store import cache_root
from finetune import files

REPEATS = 2
TIMING_BATCH = 8  # layers are timed on up to this many images
log = logging.getLogger("finetune")
MARGIN = 1.10  # adopted when bf16-throughout takes more than 1.1x the mixed layer's time
_DECIDED: dict[str, bool] = {}  # "in [shape] w [shape] s .. p .. d .. Class ..." -> adopt
_CLASSES: dict[type, type] = {}


class _Conv(torch.autograd.Function):
    """``conv2d`` with the forward in bf16 (as autocast runs it) and the backward in fp32."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        xb = x.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            y = F.conv2d(xb, w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16), stride, padding,
                         dilation, groups)
        ctx.save_for_backward(xb, w)
        ctx.conf = (stride, padding, dilation, groups, x.dtype, b is not None)
        return y

    @staticmethod
    def backward(ctx, go):
        xb, w = ctx.saved_tensors
        stride, padding, dilation, groups, x_dtype, has_bias = ctx.conf
        fmt = torch.channels_last if xb.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        gi, gw, gb = torch.ops.aten.convolution_backward(
            go.float().contiguous(memory_format=fmt), xb.float(), w, [w.shape[0]] if has_bias else None, stride,
            padding, dilation, False, [0, 0], groups, need)
        return (gi.to(x_dtype) if gi is not None else None), gw, gb, None, None, None, None


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Route(TorchFunctionMode):
    """Inside an adopted layer's forward: its ``conv2d`` call goes through :class:`_Conv`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            v = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args), **kwargs)
            if not isinstance(v.get("padding", 0), str):  # 'same'/'valid' strings: autocast's own path
                return _Conv.apply(v["input"], v["weight"], v.get("bias"), _pair(v.get("stride", 1)),
                                   _pair(v.get("padding", 0)), _pair(v.get("dilation", 1)), v.get("groups", 1))
        return func(*args, **kwargs)


def _mixed(cls: type) -> type:
    if cls not in _CLASSES:
        def forward(self, x):
            if self.training and torch.is_grad_enabled() and x.device.type == "cpu" and \
                    torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
                with _Route():
                    return cls.forward(self, x)
            return cls.forward(self, x)

        _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "_ft_mixed_backward": True,
                                                    "__module__": cls.__module__})
    return _CLASSES[cls]


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels and m.padding_mode == "zeros"


def applies(cfg, device: torch.device, precision: str, fsdp: bool) -> bool:
    return (getattr(cfg.train, "autotune", "auto") == "auto" and device.type == "cpu" and precision == "bf16"
            and not cfg.train.compile and not fsdp)


def setup(model: nn.Module, saved: dict[str, Any] | None, *, cfg, device: torch.device, precision: str, dd,
          input_size, channels_last: bool) -> dict[str, Any] | None:
    """A run's hook: tune ``model``'s depthwise convs for ``cfg.train.batch_size`` images of ``input_size``, or on
    resume switch the layers the run switched before (``saved``, from last.pt: a resume repeats the run's numerics,
    not a new timing). Under DDP (``dd``, the process group) rank 0 decides and every rank follows. None when it
    does not apply."""

    if not applies(cfg, device, precision, strategy.uses_fsdp(cfg, dd)):
        return None
    if not cfg.freeze.schedule and not any(p.requires_grad for m in model.modules() if is_depthwise(m)
                                           for p in m.parameters()):
        return None  # no depthwise conv ever trains (a linear probe): their backward never runs
    if saved is None:
        shape = (cfg.train.batch_size, *input_size)
        saved = _tune_remembered(model, shape, channels_last) if dd.is_main else None
        saved = dist_.broadcast_object(saved, dd) if dd.enabled else saved
    switch(model, saved["switched"])
    return saved


def picked(info: dict[str, Any] | None) -> dict[str, str]:
    """config.yaml's note of what autotune picked."""
    if not info or not info["layers"]:
        return {}
    return {"autotune": f"{len(info['switched'])} of {info['layers']} depthwise convs train with an fp32 backward "
                        f"(timed in {info['seconds']:.1f} s)"}


def switch(model: nn.Module, names: list[str]) -> None:
    mods = dict(model.named_modules())
    for n in names:
        if n in mods and is_depthwise(mods[n]):
            mods[n].__class__ = _mixed(type(mods[n]))


def _tune_remembered(model: nn.Module, shape, channels_last: bool) -> dict[str, Any]:
    """:func:`tune` with the decisions kept on disk beside the feature store (``$FINETUNE_CACHE/autotune.json``, per
    CPU, torch version and thread count): the next run on this machine reuses them (no timing, and the same layers
    as before: runs of one command stay bitwise reproducible). ``FINETUNE_CACHE=off``: this process only."""

    root = cache_root()
    path = root / "autotune.json" if root is not None else None
    machine = _machine()
    disk, sound = read_decisions(path) if path is not None else ({}, True)
    known = disk.get(machine, {})
    for k, v in known.items():
        _DECIDED.setdefault(k, v)
    out = tune(model, shape, channels_last)
    fresh = {k: v for k, v in _DECIDED.items() if k not in known}
    if path is not None and (fresh or not sound):
        remember(path, machine, fresh)
    return out


def read_decisions(path: Path) -> tuple[dict[str, dict[str, bool]], bool]:
    """``autotune.json`` as ``{machine: {layer key: adopt}}`` and whether the file is sound. A missing file is
    empty; a file of another shape (not JSON, nested too deeply, a list, a machine whose entry is not an object of
    booleans) counts as empty for the parts that are wrong (they are rewritten by the next :func:`remember`)."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, True
    except (OSError, UnicodeDecodeError):
        return {}, False
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return {}, False
    if not isinstance(doc, dict):
        return {}, False
    good = {m: dict(v) for m, v in doc.items()
            if isinstance(v, dict) and all(isinstance(k, str) and isinstance(b, bool) for k, b in v.items())}
    return good, len(good) == len(doc)


def remember(path: Path, machine: str, fresh: dict[str, bool]) -> None:
    """Add ``fresh`` decisions of ``machine`` to ``path``: under an exclusive ``flock`` on ``path.lock``, re-read
    the file, merge, write atomically (two runs tuning at the same time both keep their entries; a damaged file is
    replaced by what was sound in it plus ``fresh``). A read-only cache costs a timing next time, nothing else."""
    import fcntl
    import json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        log.debug(f"autotune decisions not saved to {path}: {e}")
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        disk, _ = read_decisions(path)
        disk[machine] = {**disk.get(machine, {}), **fresh}
        files.atomic_write_text(path, json.dumps(disk, indent=1, sort_keys=True))
    except Exception as e:  # noqa: BLE001 - see above
        log.debug(f"autotune decisions not saved to {path}: {e}")
    finally:
        os.close(fd)  # (drops the lock)


def _machine() -> str:
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def tune(model: nn.Module, input_shape: tuple[int, ...], channels_last: bool) -> dict[str, Any]:
    """Time each depthwise layer both ways on its input shape (the model is left as it was); returns
    ``{"layers": N depthwise, "switched": [names], "seconds": tuning time}``."""
    convs = {n: m for n, m in model.named_modules() if is_depthwise(m) and not getattr(m, "_ft_mixed_backward", False)}
    if not convs:
        return {"layers": 0, "switched": [], "seconds": 0.0}
    t0 = time.perf_counter()
    input_shape = (min(input_shape[0], TIMING_BATCH), *input_shape[1:])  # the ranking, at a fraction of the cost
    shapes = _input_shapes(model, convs, input_shape, channels_last)
    switched = []
    for name, m in convs.items():
        if name not in shapes:
            continue
        key = (f"in {list(shapes[name])} w {list(m.weight.shape)} s {list(m.stride)} p {list(m.padding)} d "
               f"{list(m.dilation)} {type(m).__name__}{' bias' if m.bias is not None else ''}"
               f"{' channels_last' if channels_last else ''}")
        if key not in _DECIDED:
            _DECIDED[key] = _time(m, shapes[name], channels_last, mixed=False) > MARGIN * _time(
                m, shapes[name], channels_last, mixed=True)
        if _DECIDED[key]:
            switched.append(name)
    return {"layers": len(convs), "switched": switched, "seconds": time.perf_counter() - t0}


def _input_shapes(model: nn.Module, convs: dict[str, nn.Module], input_shape, channels_last: bool) -> dict:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: shapes.setdefault(n, tuple(a[0].shape)) and None)
             for n, m in convs.items()]
    x = torch.zeros(input_shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was = model.training
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.eval()(x)  # eval: the BatchNorm running statistics stay as they are
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return shapes


def _time(m: nn.Module, shape: tuple[int, ...], channels_last: bool, mixed: bool) -> float:
    """Best of REPEATS (after a warm-up) forward+backward seconds of ``m`` on random input of ``shape``; the layer's own
    weight gradient is restored afterwards (whatever it was)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    saved = {n: p.grad for n, p in m.named_parameters()}
    need = {n: p.requires_grad for n, p in m.named_parameters()}
    cls = type(m)
    was = m.training
    best = float("inf")
    try:
        if mixed:
            m.__class__ = _mixed(cls)
        m.train()
        for p in m.parameters():
            p.requires_grad_(True)
            p.grad = None  # (backward would add into the tensor kept in `saved`)
        for i in range(REPEATS + 1):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(x)
            y.backward(torch.ones_like(y))
            if i:
                best = min(best, time.perf_counter() - t)
    finally:
        m.__class__ = cls
        m.train(was)
        for n, p in m.named_parameters():
            p.grad = saved[n]
            p.requires_grad_(need[n])
    return best
