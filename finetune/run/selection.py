"""Which epochs to keep: the monitored metric (Lightning's ``ModelCheckpoint(monitor, mode, save_top_k)``).

``train.monitor`` (``val_acc``, ``val_loss`` or ``val_f1``: macro-F1) picks ``best.pt``, the top-k files and early
stopping; ``train.monitor_mode`` ``auto`` maximises accuracy and F1 and minimises the loss. An epoch whose value is
not finite (a NaN val loss) is never "better". Without a val set every epoch is the best so far (``best.pt``
follows the latest epoch). An epoch that ties the best accuracy (or F1) exactly, at a lower val loss, becomes the best:
the same images right, more surely (a linear probe is as accurate after epoch 1 as after epoch 5, but its head is
far from trained). ``save_top_k`` K > 1 keeps the K best epochs as ``epochNNN.pt`` (weights and metadata,
like ``best.pt``) and lists them, best first, in ``metrics.json`` (``top_k``); ties keep the earlier epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Monitor:
    key: str = "val_acc"
    mode: str = "auto"

    @property
    def maximize(self) -> bool:
        return self.mode == "max" or (self.mode == "auto" and self.key != "val_loss")

    def value(self, row: dict[str, Any], prefix: str = "") -> float | None:
        v = row.get(prefix + self.key)
        return None if v is None else float(v)

    def better(self, new: float | None, old: float | None) -> bool:
        """``new`` beats ``old`` (None = no value yet); a non-finite ``new`` never does."""
        if new is None or not math.isfinite(new):
            return False
        if old is None or not math.isfinite(old):
            return True
        return new > old if self.maximize else new < old


def file_for(epoch: int) -> str:
    return f"epoch{epoch:03d}.pt"


def update_top_k(top: list[dict[str, Any]], epoch: int, value: float | None, k: int,
                 monitor: Monitor) -> tuple[list[dict[str, Any]], bool, list[str]]:
    """Add ``epoch`` to the ``k`` best (entries ``{"epoch", "value", "file"}``, best first); returns the new list,
    whether ``epoch`` is in it, and the files that dropped out."""
    if k <= 1 or value is None or not math.isfinite(value):
        return top, False, []
    entries = [*top, {"epoch": epoch, "value": value, "file": file_for(epoch)}]
    sign = -1.0 if monitor.maximize else 1.0
    entries.sort(key=lambda e: (sign * e["value"], e["epoch"]))
    kept, dropped = entries[:k], entries[k:]
    return kept, any(e["epoch"] == epoch for e in kept), [e["file"] for e in dropped]
