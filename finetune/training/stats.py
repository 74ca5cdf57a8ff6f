"""How much an accuracy measured on n images can be trusted: the Wilson score interval, and whether two accuracies
differ by more than their noise. No torch (``finetune runs`` and ``compare`` use it without importing torch)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson(acc: float | None, n: int | None, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of an accuracy ``acc`` measured on ``n`` images, as (low, high)
    fractions; None when there is nothing to bound (no accuracy, or no images). Unlike the normal approximation
    p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at 0% or 100%."""
    if acc is None or not n or n < 1 or not math.isfinite(acc):
        return None
    p = min(max(float(acc), 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def half_width(acc: float | None, n: int | None, z: float = Z95) -> float | None:
    """Half the Wilson interval's width: the "± x points" shown beside an accuracy (a fraction; None if unknown)."""
    ci = wilson(acc, n, z)
    return None if ci is None else (ci[1] - ci[0]) / 2


def pm_text(acc: float | None, n: int | None) -> str:
    """``"± 3.7"``: the interval's half width in percentage points, or "" when it is unknown."""
    h = half_width(acc, n)
    return "" if h is None else f"± {100 * h:.1f}"


def tied(a: float | None, b: float | None, n: int | None, z: float = Z95) -> bool:
    """Whether accuracies ``a`` and ``b``, each measured on ``n`` images, are within noise of each other: each lies
    inside the other's Wilson interval. (The same images for both, so this is conservative: a paired test would
    separate more, but it needs the per-image results, which runs do not keep.)"""
    if a is None or b is None:
        return False
    ca, cb = wilson(a, n, z), wilson(b, n, z)
    if ca is None or cb is None:
        return a == b
    return ca[0] <= b <= ca[1] and cb[0] <= a <= cb[1]
