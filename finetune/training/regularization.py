"""Training tricks from timm, used as timm ships them: mixup/cutmix (``timm.data.Mixup`` with its soft-target loss)
and a moving average of the weights (``timm.utils.ModelEmaV3``).

- **Mixup / CutMix** (``train.mixup`` / ``train.cutmix``: the Beta alphas; 0 = off; with both, each batch picks one,
  50/50): a batch is mixed with its own reverse, the targets become soft (with ``train.label_smoothing``), the loss is
  ``SoftTargetCrossEntropy``. timm's Mixup needs an even batch: an odd last batch trains unmixed. It draws from
  NumPy's global RNG, which the run reseeds per epoch (and saves mid-epoch), so a resumed run mixes the same way.
  The frozen-feature cache does not mix (``auto`` then does not cache; ``on`` trains the cached head unmixed).
  Train accuracy is measured against the unmixed labels.
- **EMA** (``train.ema``, ``train.ema_decay``): after every optimizer update the average moves towards the weights
  with timm's warm-up (``decay_t = min(ema_decay, 1 - (1 + t) ** -2/3)``: short fine-tunes average over a short
  window at first). It is evaluated on the val images after each epoch (the full model, also while the head trains
  on cached features), reported as ``ema_val_acc``/``ema_val_loss``/``ema_val_f1``, saved as ``best_ema.pt`` when its
  monitored value improves, and kept in ``last.pt`` for an exact resume.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def make_mixup(cfg, num_classes: int):
    """``(mix, loss)`` for :class:`finetune.training.engine.Step`, or ``(None, None)`` when mixup and cutmix are off."""
    if not (cfg.train.mixup or cfg.train.cutmix):
        return None, None
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mix = Mixup(mixup_alpha=cfg.train.mixup, cutmix_alpha=cfg.train.cutmix, prob=1.0, switch_prob=0.5,
                mode="batch", label_smoothing=cfg.train.label_smoothing, num_classes=num_classes)
    return mix, SoftTargetCrossEntropy()


def make_ema(model: nn.Module, decay: float):
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


def numpy_rng_state() -> dict[str, Any]:
    """NumPy's global RNG state as tensors and numbers (checkpoints load with ``weights_only=True``)."""
    import numpy as np

    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    np.random.set_state(("MT19937", state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["gauss"]))


def seed_numpy(seed: int) -> None:
    import numpy as np

    np.random.seed(seed % 2**32)
