"""Datasets that yield ``(normalized float32 CHW tensor, int label)``.

Two stages per item: *decode* (file -> RGB -> uint8 CHW tensor, shorter side brought down to the pre-crop size
``tf["resize"]``) and *transform* (crop/augment/normalize on the tensor). The decoded-image cache memoizes the first
stage in RAM, so epochs after the first decode no JPEG; since the transform starts with the same resize, which is a
no-op on an image already at that size, cached and uncached items are bitwise equal.

Seeded items: ``ds[(i, s)]`` returns item ``i`` with torch's RNG seeded by ``s`` for the transform (and restored
afterwards). :class:`~finetune.data.loader.EpochSampler` yields such keys, so the augmentation of sample ``i`` in
epoch ``e`` depends only on ``(seed, e, i)``: not on the number of workers, their persistence, or a resume.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from finetune.data.images import load_image
from finetune.errors import DataError
from finetune.data.transforms import _mode

log = logging.getLogger("finetune")


def decode(path: str | Path, tf: dict) -> torch.Tensor:
    """Read ``path`` as a uint8 CHW RGB tensor whose shorter side is at most ``tf["resize"]``.

    This is what datasets (and the cache) hold; ``eval_transform(tf)(decode(path, tf))`` is therefore exactly the
    tensor evaluation sees, which is what ``finetune predict`` should use too.
    """
    from torchvision.transforms.v2 import functional as F

    return to_precrop(F.pil_to_tensor(load_image(path, min_side=int(tf["resize"]))), tf)


def to_precrop(img: torch.Tensor, tf: dict) -> torch.Tensor:
    """A decoded uint8 CHW image with its shorter side brought down to ``tf["resize"]`` (the cached form)."""
    from torchvision.transforms.v2 import functional as F

    if min(img.shape[-2:]) > int(tf["resize"]):
        img = F.resize(img, [int(tf["resize"])], interpolation=_mode(tf), antialias=True)
    return img.contiguous()


class _Seeded(Dataset):
    """Base: the ``(index, seed)`` key protocol and transform swapping."""

    transform: Callable
    targets: list[int]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                return self._item(int(index))
        return self._item(int(key))

    def _item(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def with_transform(self, transform: Callable) -> _Seeded:
        """A shallow copy that shares the samples and the cache but applies ``transform``."""
        other = copy.copy(self)
        other.transform = transform
        return other


class ImageDataset(_Seeded):
    """Image files with integer labels; ``.samples`` are ``(path, label)`` pairs as in torchvision's ImageFolder.

    ``cache``: decoded uint8 tensors aligned with ``samples`` (see :func:`decode`), or None to read files on each
    access. An uncached file that turns out unreadable at training time (a truncated JPEG passes the header check)
    is skipped with one warning and replaced by the next readable sample, or raises with ``strict``.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], class_names: list[str], tf: dict,
                 transform: Callable, *, cache: list[torch.Tensor] | None = None, strict: bool = False):
        self.samples = [(Path(p), int(t)) for p, t in samples]
        self.targets = [t for _, t in self.samples]
        self.class_names = list(class_names)
        self.tf = tf
        self.transform = transform
        self.cache = cache
        self.strict = strict
        self._bad: set[int] = set()
        if cache is not None and len(cache) != len(self.samples):
            raise ValueError("cache and samples differ in length")

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def raw(self, index: int) -> torch.Tensor:
        """The decoded uint8 tensor of sample ``index`` (from the cache when there is one)."""
        if self.cache is not None:
            return self.cache[index]
        return decode(self.samples[index][0], self.tf)

    def _item(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                img = self.raw(i)
            except DataError as e:
                if self.strict:
                    raise DataError(f"{e} (--strict; remove the file, or drop --strict to skip it)") from None
                self._bad.add(i)
                log.warning("skipping unreadable image '%s'", self.samples[i][0])
                continue
            return self.transform(img), self.targets[i]
        raise DataError("no readable images left in the data set")


class TensorImageDataset(_Seeded):
    """Images already in memory as one uint8 NCHW tensor (CIFAR)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], class_names: list[str], transform: Callable):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.class_names = list(class_names)
        self.transform = transform
        self.samples = None

    cached = True

    def _item(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.targets[index]
