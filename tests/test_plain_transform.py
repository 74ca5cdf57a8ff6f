"""The torchvision-free eval transform (predict with a stored inference graph) equals torchvision's bitwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.transforms import PlainEvalTransform, eval_transform


def _tf(interp: str, resize: int, crop: int) -> dict:
    return {"input_size": [3, crop, crop], "size": crop, "resize": resize, "crop_pct": crop / resize,
            "interpolation": interp, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


SIZES = [(224, 224), (300, 200), (201, 299), (64, 48), (17, 23), (33, 32), (40, 700), (700, 41), (9, 9)]


@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "nearest", "nearest-exact"])
@pytest.mark.parametrize("resize,crop", [(256, 224), (36, 32), (32, 32), (20, 32)])
def test_plain_eval_transform_equals_torchvision(interp, resize, crop):
    rng = np.random.default_rng(resize * 7 + crop)
    tf = _tf(interp, resize, crop)
    plain, tv = PlainEvalTransform(tf), eval_transform(tf)
    assert PlainEvalTransform.supports(tf)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        a, b = plain(img), tv(img)
        assert a.shape == b.shape == (3, crop, crop), (w, h)
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b), (interp, resize, crop, w, h, (a - b).abs().max())


def test_plain_eval_transform_supports_tensor_interpolations_only():
    assert not PlainEvalTransform.supports(_tf("lanczos", 256, 224))
    assert not PlainEvalTransform.supports({"interpolation": None})


@pytest.mark.parametrize("interp,resize,crop", [("bicubic", 256, 224), ("bilinear", 36, 32), ("nearest", 20, 32)])
def test_plain_decode_then_transform_equals_decode_then_eval_transform(tmp_path, interp, resize, crop):
    """What predict runs per file: ``decode`` (the draft-scaled JPEG, the shorter side down to ``resize``) and the
    eval transform, the plain pair against datasets.decode + torchvision's."""
    from finetune.data.datasets import decode

    rng = np.random.default_rng(0)
    tf = _tf(interp, resize, crop)
    plain, tv = PlainEvalTransform(tf), eval_transform(tf)
    for i, (w, h) in enumerate(SIZES + [(900, 600)]):
        for ext in ("png", "jpg"):
            path = tmp_path / f"{i}.{ext}"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
            a, b = plain.decode(path), decode(path, tf)
            assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b), (w, h, ext)
            assert torch.equal(plain(a), tv(b)), (w, h, ext)
