"""Transforms matched to the backbone: the eval transform is the pretrained one, the train one adds augmentation.

:func:`transform_config` turns the backbone's ``data_cfg`` (torchvision ``weights.transforms()``, timm
``resolve_data_config``, smallcnn's 32x32) plus the recipe's overrides into a JSON-serialisable dict that checkpoints
store, so evaluation and prediction later rebuild exactly the same transform.

Every pipeline starts the same way: to a uint8 CHW tensor, then ``Resize(resize)`` of the shorter side (the
"pre-crop size"). The decoded-image cache stores images after that step (or smaller: images already below
``resize`` are stored as they are and upsampled by this same step), so a cached and an uncached dataset give the
same tensors bit for bit, and the train crops come from the pre-crop-size image in both cases.

- eval: ``Resize(resize)`` -> ``CenterCrop(size)`` -> float in [0, 1] -> ``Normalize(mean, std)`` (an image beyond
  16:1 is centre-cropped to 16:1 before the resize: :func:`pre_resize`)
- ``none``: the eval transform (deterministic; the frozen-feature cache relies on that)
- ``light``: ``RandomResizedCrop(size, scale=(0.35, 1))`` + ``RandomHorizontalFlip`` (fastai's gentler
  fine-tuning scale: small data sets suffer from ImageNet's 8 % crops); for inputs of 64 px or less, CIFAR's
  augmentation instead: ``RandomCrop(size, padding=size // 8, padding_mode="reflect")`` + flip (a 35 % crop of a
  32 px image, upsampled, keeps little of the object)
- ``strong``: ``RandomResizedCrop(size, scale=(0.08, 1))`` (the ImageNet recipe) + ``RandomHorizontalFlip`` +
  ``TrivialAugmentWide`` (one random op of 14 at a random magnitude per image: RandAugment's quality without its
  two knobs), then after ``Normalize``: ``RandomErasing(p=0.25, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)``
  (DeiT's/timm's ``reprob 0.25``; 0 in normalized space is the mean colour), all torchvision transforms v2

``--image-size S`` sets the crop to S and the resize to ``floor(S / crop_pct)``, timm's rule (224 -> 256 for
crop_pct 0.875). Interpolations that tensors don't support map to the nearest one that they do (lanczos ->
bicubic; box, hamming, random -> bilinear).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from finetune.config import choices
from finetune.errors import DataError

AUGMENTS = choices("data.augment")  # written once: the type of DataCfg.augment
LIGHT_SCALE = (0.35, 1.0)
STRONG_SCALE = (0.08, 1.0)
ERASE_P = 0.25  # strong: RandomErasing probability (timm/DeiT reprob)
SMALL = 64  # crops up to this size get CIFAR-style light augmentation (pad + random crop)
_INTERP = {"nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic",
           "lanczos": "bicubic", "box": "bilinear", "hamming": "bilinear", "random": "bilinear"}
_DEFAULTS = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _triple(value: Any, key: str) -> list[float]:
    vals = [float(v) for v in value]
    if len(vals) != 3:
        raise DataError(f"data.{key} must have 3 values (R, G, B), got {len(vals)}")
    if key == "std" and any(v <= 0 for v in vals):
        raise DataError(f"data.std values must be greater than 0, got {vals}")
    return vals


def transform_config(cfg, model_data_cfg: dict) -> dict:
    """The eval transform as a plain dict: ``input_size`` [3, H, W], ``size`` (H, or [H, W] when not square),
    ``resize`` (shorter side before the crop), ``crop_pct``, ``interpolation``, ``mean``, ``std``.

    ``cfg`` is a :class:`~finetune.config.DataCfg` (``image_size``, ``mean``, ``std`` override the backbone's).
    """
    d = {**_DEFAULTS, **(model_data_cfg or {})}
    _, h, w = (int(v) for v in d["input_size"])
    resize = d.get("resize")
    crop_pct = float(d.get("crop_pct") or (h / resize if resize else _DEFAULTS["crop_pct"]))
    if not resize:
        resize = math.floor(h / crop_pct + 1e-6)
    if cfg.image_size:
        if cfg.image_size < 8:
            raise DataError(f"--image-size must be at least 8, got {cfg.image_size}")
        h = w = int(cfg.image_size)
        resize = math.floor(h / crop_pct + 1e-6)
    interp = str(getattr(d["interpolation"], "value", d["interpolation"])).lower()
    if interp not in _INTERP:
        raise DataError(f"unknown interpolation '{interp}'; use one of {', '.join(sorted(_INTERP))}")
    return {
        "input_size": [3, h, w],
        "size": h if h == w else [h, w],
        "resize": int(resize),
        "crop_pct": crop_pct,
        "interpolation": _INTERP[interp],
        "mean": _triple(cfg.mean if cfg.mean is not None else d["mean"], "mean"),
        "std": _triple(cfg.std if cfg.std is not None else d["std"], "std"),
    }


def is_deterministic(augment: str) -> bool:
    """True when ``train_transform(tf, augment)`` is the eval transform (no randomness)."""
    check_augment(augment)
    return augment == "none"


def check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise DataError(f"unknown augment '{augment}'; use one of {', '.join(AUGMENTS)}")


def _mode(tf: dict):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(tf["interpolation"])


def _crop_size(tf: dict) -> list[int]:
    return [int(tf["input_size"][1]), int(tf["input_size"][2])]


MAX_ASPECT = 16  # pre_resize caps the longer side at this many times the shorter one's target


def pre_resize(tf: dict):
    """The first geometric step of every pipeline: the shorter side to ``tf["resize"]``. An image longer than
    ``MAX_ASPECT``:1 is first centre-cropped to that ratio: a 100000x1 PNG would otherwise become a 3,200,000x32
    image (750 MB as floats) on its way to a 32 px crop. The centre, which the crops take, stays as it was; images
    up to 16:1 are resized exactly as before."""
    from torchvision.transforms import v2

    return AspectCappedResize(v2.Resize(int(tf["resize"]), interpolation=_mode(tf), antialias=True))


class AspectCappedResize:
    def __init__(self, resize):
        self.resize = resize

    def __call__(self, img):
        from torchvision.transforms.v2 import functional as TF

        h, w = TF.get_size(img)
        if w > MAX_ASPECT * h:
            img = TF.center_crop(img, [h, MAX_ASPECT * h])
        elif h > MAX_ASPECT * w:
            img = TF.center_crop(img, [MAX_ASPECT * w, w])
        return self.resize(img)

    def __repr__(self) -> str:
        return f"AspectCappedResize({self.resize!r}, max {MAX_ASPECT}:1)"


def _head(tf: dict) -> list:
    from torchvision.transforms import v2

    return [v2.ToImage(), pre_resize(tf)]


def _tail(tf: dict) -> list:
    import torch
    from torchvision.transforms import v2

    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(tf["mean"], tf["std"]), v2.ToPureTensor()]


class LazyTransform:
    """A torchvision transform built on first use. Building one imports torchvision (~1.7 s on a 2-core CPU, since
    torchvision imports ``torch._dynamo``), which a run whose features all come from the feature store never needs:
    it lists its images but decodes none. Calls and attributes (``.transforms``) go to the built transform."""

    def __init__(self, build: Callable, *args):
        self._build, self._args, self._built = build, args, None

    def _get(self):
        if self._built is None:
            self._built = self._build(*self._args)
        return self._built

    def __call__(self, x):
        return self._get()(x)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # pickling and copying look for dunders before __dict__ is set
            raise AttributeError(name)
        return getattr(self._get(), name)

    def __repr__(self) -> str:
        return repr(self._get())


def eval_transform(tf: dict) -> Callable:
    """PIL image or uint8 CHW tensor -> normalized float32 CHW tensor of ``tf["input_size"]`` (built on first use:
    :class:`LazyTransform`)."""
    return LazyTransform(_eval_compose, tf)


def train_transform(tf: dict, augment: str = "light") -> Callable:
    """Like :func:`eval_transform` plus ``augment`` (none | light | strong); randomness from torch's global RNG (at
    call time; building it draws nothing). Built on first use."""
    check_augment(augment)
    return LazyTransform(_train_compose, tf, augment)


def _eval_compose(tf: dict) -> Callable:
    from torchvision.transforms import v2

    return v2.Compose([*_head(tf), v2.CenterCrop(_crop_size(tf)), *_tail(tf)])


def _train_compose(tf: dict, augment: str) -> Callable:
    from torchvision.transforms import v2

    if augment == "none":
        return _eval_compose(tf)
    size = _crop_size(tf)
    if augment == "light" and max(size) <= SMALL:
        steps = [v2.CenterCrop(size), v2.RandomCrop(size, padding=max(1, max(size) // 8), padding_mode="reflect"),
                 v2.RandomHorizontalFlip()]
        return v2.Compose([*_head(tf), *steps, *_tail(tf)])
    scale = LIGHT_SCALE if augment == "light" else STRONG_SCALE
    steps = [v2.RandomResizedCrop(_crop_size(tf), scale=scale, interpolation=_mode(tf), antialias=True),
             v2.RandomHorizontalFlip()]
    if augment == "strong":
        steps.append(v2.TrivialAugmentWide(interpolation=_mode(tf)))
        *tail, pure = _tail(tf)  # erase on the normalized tensor (as torchvision's and timm's references do)
        return v2.Compose([*_head(tf), *steps, *tail, v2.RandomErasing(p=ERASE_P, value=0), pure])
    return v2.Compose([*_head(tf), *steps, *_tail(tf)])


# ------------------------------------------------------------------------------------- eval without torchvision

PLAIN_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")  # what torchvision resizes a tensor image with


class PlainEvalTransform:
    """:func:`eval_transform` and :func:`finetune.data.datasets.decode` in torch ops alone, equal bitwise to the
    torchvision pipeline (tests/test_plain_transform.py compares them over sizes, aspects and interpolations):
    ``decode(path)`` gives the uint8 CHW tensor ``datasets.decode`` gives (the shorter side brought down to
    ``tf["resize"]``), and calling it on such a tensor (or an RGB PIL image) gives what the eval transform gives
    (the aspect-capped shorter-side resize, CenterCrop, ToDtype with scale, Normalize). The resize follows
    torchvision 0.2x's tensor kernel: uint8 where its CPU kernel takes uint8 (bicubic; bilinear on AVX2/AVX512/ARM),
    else through float32 with clamp and round; the crop pads with 0 where the image is smaller.

    ``predict`` uses it with a model from the inference store (finetune/speedups/inference_store.py): importing
    torchvision costs ~1.7 s on a 2-core CPU, most of it ``torch._dynamo``, which ``torchvision.ops`` imports.
    :meth:`supports` says whether a transform config can be run so (tensor-image interpolations only)."""

    def __init__(self, tf: dict):
        self.tf = tf
        self.mode = str(tf["interpolation"])
        self.size = _crop_size(tf)

    @staticmethod
    def supports(tf: dict) -> bool:
        return str(tf.get("interpolation")) in PLAIN_MODES

    def decode(self, path):
        from finetune.data.images import load_image

        resize = int(self.tf["resize"])
        x = _pil_tensor(load_image(path, min_side=resize))
        if min(x.shape[-2:]) > resize:
            x = self._resize(x, resize)
        return x.contiguous()

    def __call__(self, img):
        import torch

        x = img if isinstance(img, torch.Tensor) else _pil_tensor(img)
        h, w = x.shape[-2:]
        if w > MAX_ASPECT * h:
            x = _center_crop(x, [h, MAX_ASPECT * h])
        elif h > MAX_ASPECT * w:
            x = _center_crop(x, [MAX_ASPECT * w, w])
        x = _center_crop(self._resize(x, int(self.tf["resize"])), self.size)
        x = x.to(torch.float32).mul_(1.0 / 255)
        mean = torch.as_tensor(self.tf["mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(self.tf["std"], dtype=torch.float32).view(-1, 1, 1)
        return x.sub(mean).div_(std)

    def _resize(self, x, size: int):
        import platform

        import torch
        import torch.nn.functional as F

        c, h, w = x.shape
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        if (nh, nw) == (h, w) or x.numel() == 0:
            return x
        if self.mode == "bilinear":
            uint8_ok = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                        or platform.machine() in ("aarch64", "arm64"))
        else:
            uint8_ok = True  # bicubic natively; nearest always takes uint8
        y = x.reshape(-1, c, h, w)
        strides = y.stride()
        if y.is_contiguous(memory_format=torch.channels_last) and y.shape[0] == 1 and y.numel() != strides[0]:
            y = y.as_strided((1, c, h, w), [y.numel(), *strides[1:]])  # keeps the output channels-last (as tv)
        cast = not uint8_ok
        if cast:
            y = y.to(torch.float32)
        smooth = self.mode in ("bilinear", "bicubic")
        y = F.interpolate(y, size=[nh, nw], mode=self.mode, align_corners=False if smooth else None,
                          antialias=smooth)
        if cast:
            if self.mode == "bicubic":
                y = y.clamp_(min=0, max=255)
            y = y.round_().to(torch.uint8)
        return y.reshape(c, nh, nw)


def _pil_tensor(img):
    """torchvision's ``pil_to_tensor``: a uint8 CHW view of the image's HWC pixels."""
    import numpy as np
    import torch

    return torch.as_tensor(np.array(img, copy=True)).view(img.size[1], img.size[0], -1).permute(2, 0, 1)


def _center_crop(x, size: list[int]):
    """torchvision's tensor center crop: pad with 0 (left/top get the smaller half) where the image is smaller, then
    the centred window (its anchor rounded half to even, as Python's round)."""
    import torch.nn.functional as F

    ch, cw = size
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        left, top = ((cw - w) // 2 if cw > w else 0), ((ch - h) // 2 if ch > h else 0)
        right, bottom = ((cw - w + 1) // 2 if cw > w else 0), ((ch - h + 1) // 2 if ch > h else 0)
        x = F.pad(x, [left, right, top, bottom], value=0.0)
        h, w = x.shape[-2:]
        if (ch, cw) == (h, w):
            return x
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]
