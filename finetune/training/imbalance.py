"""Imbalanced data: class weights for the loss, a class-balanced sampler's weights, and the metrics that don't
reward predicting the majority class (balanced accuracy, macro-F1, computed in :mod:`finetune.training.metrics`).

- ``train.class_weights: auto`` is scikit-learn's ``class_weight="balanced"``: ``w_c = n / (C * n_c)`` from the
  train split's counts (inverse frequency, scaled so that the mean weight over the training *samples* is 1: the loss
  keeps its scale and the LR its meaning). ``none`` (default): unweighted. A FILE (``.json`` / ``.yaml``): a mapping
  ``class name -> weight`` naming every class, or a list in class order. The weights go into
  ``nn.CrossEntropyLoss(weight=...)`` (which also makes the batch mean a weighted mean, as PyTorch defines it).
- ``data.sampler: balanced`` draws each epoch's ``n`` training samples *with replacement* with probability
  proportional to ``1 / n_class`` (``torch.utils.data.WeightedRandomSampler``'s rule: every class equally likely per
  draw), inside :class:`finetune.data.loader.EpochSampler`, so the draw is a function of ``(seed, epoch)``: the
  same for any number of workers and exact on resume. Use one or the other: both together over-correct.
- Balanced accuracy = the mean per-class recall (classes present in the data); macro-F1 = the mean per-class F1
  (``2PR / (P + R)``; 0 for a class never predicted right), as scikit-learn's ``balanced_accuracy_score`` and
  ``f1_score(average="macro")`` compute them: :func:`finetune.training.metrics.confusion_metrics`, which every
  evaluation records (``val_balanced_acc``, ``val_f1``) and ``train.monitor`` may select by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from finetune.errors import ConfigError, DataError


def class_counts(targets: Sequence[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for t in targets:
        counts[int(t)] += 1
    return counts


def class_weights(spec: str, targets: Sequence[int], class_names: list[str]) -> list[float] | None:
    """The loss's per-class weights for ``spec`` (``auto | none | FILE``), or None for unweighted."""
    if spec in ("none", "", None):
        return None
    c = len(class_names)
    if spec == "auto":
        counts = class_counts(targets, c)
        n = sum(counts)
        missing = [class_names[i] for i, k in enumerate(counts) if k == 0]
        if missing:
            raise DataError(f"--class-weights auto: class '{missing[0]}' has no training images; its weight would "
                            "be infinite")
        return [n / (c * k) for k in counts]
    return _weights_file(Path(spec), class_names)


def _weights_file(path: Path, class_names: list[str]) -> list[float]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"--class-weights: '{path}' is neither auto, none nor a file; pass auto, none or a "
                          ".json/.yaml file mapping class names to weights")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--class-weights: '{path}' is not valid JSON/YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, list):
        if len(data) != len(class_names):
            raise ConfigError(f"--class-weights: '{path}' lists {len(data)} weights but the data has "
                              f"{len(class_names)} classes ({', '.join(class_names)})")
        values = data
    elif isinstance(data, dict):
        unknown = [str(k) for k in data if str(k) not in class_names]
        missing = [n for n in class_names if n not in {str(k) for k in data}]
        if unknown or missing:
            what = f"unknown class '{unknown[0]}'" if unknown else f"no weight for class '{missing[0]}'"
            raise ConfigError(f"--class-weights: '{path}' has {what}; classes: {', '.join(class_names)}")
        values = [data[n] if n in data else data[_key(data, n)] for n in class_names]
    else:
        raise ConfigError(f"--class-weights: '{path}' must hold a mapping class -> weight or a list of weights")
    out = []
    for name, v in zip(class_names, values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ConfigError(f"--class-weights: '{path}': the weight of '{name}' must be a finite number >= 0, "
                              f"got {v!r}")
        out.append(float(v))
    if not any(out):
        raise ConfigError(f"--class-weights: '{path}': every weight is 0")
    return out


def _key(data: dict, name: str) -> Any:
    return next(k for k in data if str(k) == name)


def sample_weights(sampler: str, targets: Sequence[int], num_classes: int) -> list[float] | None:
    """Per-sample draw weights for ``data.sampler`` (``balanced``: 1 / count of the sample's class), or None."""
    if sampler != "balanced":
        return None
    counts = class_counts(targets, num_classes)
    return [1.0 / counts[int(t)] for t in targets]


def loss_fn(cfg, targets: Sequence[int], class_names: list[str], device=None):
    """The run's loss: cross-entropy with the recipe's label smoothing and class weights."""
    import torch
    from torch import nn

    w = class_weights(cfg.train.class_weights, targets, class_names)
    weight = torch.tensor(w, dtype=torch.float32, device=device) if w is not None else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)

