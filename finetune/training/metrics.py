"""Classification metrics from a confusion matrix (rows = true class, columns = predicted): the counts, per-class
precision / recall / F1 / support, and the two summaries that a majority-class guess can't inflate, balanced accuracy
and macro-F1. One place for them: the evaluation loop (:func:`finetune.training.engine.evaluate`), the report and the
imbalance options all read these.

- Precision of class ``c``: of the images predicted as ``c``, how many are ``c``; recall: of the images of ``c``, how
  many were predicted ``c``; F1 = ``2PR / (P + R)``. Each is 0 where undefined (nothing predicted, no images), as
  scikit-learn's ``zero_division=0``.
- Balanced accuracy = the mean recall over the classes present in the data; macro-F1 = the mean F1 over the classes
  in the data or predicted, as scikit-learn's ``balanced_accuracy_score`` and ``f1_score(average="macro")``
  (``labels=None``) compute them.

The per-class values and the summaries come from one float64 computation (:func:`per_class`): a division in
float64 is the same in Python and torch, so the report's table and the recorded summaries agree to the bit.
"""

from __future__ import annotations

from typing import Sequence

import torch


def confusion_counts(targets: Sequence[int], preds: Sequence[int], num_classes: int) -> list[list[int]]:
    """``m[t][p]`` = how many images of true class ``t`` were predicted ``p`` (rows = true classes)."""
    m = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(targets, preds):
        m[int(t)][int(p)] += 1
    return m


def confusion_update(confusion: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor) -> None:
    """Add a batch's (target, prediction) pairs to ``confusion`` (a ``[C, C]`` long tensor on the CPU), in place."""
    c = confusion.shape[0]
    confusion += torch.bincount((targets * c + preds).cpu(), minlength=c ** 2).view(c, c)


def per_class(confusion) -> dict[str, torch.Tensor]:
    """Per class, as float64 tensors: ``precision``, ``recall``, ``f1``, ``support`` and ``predicted`` (counts)."""
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    tp = cm.diag()
    support, predicted = cm.sum(dim=1), cm.sum(dim=0)
    recall = tp / support.clamp(min=1)
    precision = tp / predicted.clamp(min=1)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(denom))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def per_class_metrics(confusion) -> list[dict[str, float | int]]:
    """Per class: precision, recall, F1 and support (the report's table), one dict per class."""
    pc = per_class(confusion)
    return [{"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for p, r, f, s in zip(pc["precision"].tolist(), pc["recall"].tolist(), pc["f1"].tolist(),
                                  pc["support"].tolist())]


def confusion_metrics(confusion) -> dict[str, float]:
    """Balanced accuracy and macro-F1 from a confusion matrix."""
    pc = per_class(confusion)
    present = pc["support"] > 0  # balanced accuracy: classes in the data; F1: classes in the data or predicted
    if not bool(present.any()):
        return {"balanced_accuracy": 0.0, "macro_f1": 0.0}
    return {"balanced_accuracy": float(pc["recall"][present].mean()),
            "macro_f1": float(pc["f1"][present | (pc["predicted"] > 0)].mean())}


def accuracy(confusion) -> float:
    """Top-1 accuracy: the diagonal over the total (0 for an empty matrix)."""
    n = len(confusion)
    return sum(confusion[i][i] for i in range(n)) / max(1, sum(map(sum, confusion)))
