"""The tutorial's ``named_parameters()`` listing as rows, shared by ``finetune inspect`` and the tests."""

from __future__ import annotations

from typing import Any

from torch import nn


def parameter_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One row per parameter tensor, in ``named_parameters()`` order: index, name, shape, numel, trainable."""
    return [
        {"index": i, "name": n, "shape": list(p.shape), "numel": p.numel(), "trainable": p.requires_grad}
        for i, (n, p) in enumerate(model.named_parameters())
    ]


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    total = sum(r["numel"] for r in rows)
    trainable = sum(r["numel"] for r in rows if r["trainable"])
    return {"tensors": len(rows), "total": total, "trainable": trainable, "frozen": total - trainable}


def inspect_json(name: str, model: nn.Module) -> dict[str, Any]:
    """The ``finetune inspect --json`` document."""
    rows = parameter_rows(model)
    t = totals(rows)
    return {"model": name, "parameters": rows, "total": t["total"], "trainable": t["trainable"],
            "frozen": t["frozen"]}


def module_rows(model: nn.Module, depth: int = 2) -> list[dict[str, Any]]:
    """Modules down to ``depth`` dots, with their dotted names (what layer freezing takes) and parameter counts."""
    rows = []
    for name, mod in model.named_modules():
        if not name:
            continue
        level = name.count(".") + 1
        if level > depth:
            continue
        params = list(mod.parameters())
        rows.append({
            "name": name,
            "type": type(mod).__name__,
            "depth": level,
            "numel": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        })
    return rows
