"""A model restored from a checkpoint alone (no recipe): the one way eval, predict, the report, export and the
end-of-run test split rebuild a trained model, so that each runs what the checkpoint recorded (its architecture,
weights, memory format and precision) and none drifts from the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.models import build_model
from finetune.run.checkpoint import load_checkpoint, load_weights


def restore_model(checkpoint: str | Path | dict[str, Any], device: torch.device | str = "cpu", *,
                  channels_last: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, ckpt)``: the checkpoint's model (built without pretrained weights, then its own loaded) in eval mode
    on ``device``, channels-last when the checkpoint trained so (``channels_last`` overrides: export wants the plain
    layout); ``ckpt`` is the checkpoint dict (``checkpoint`` may be one already loaded)."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    bb = build_model(str(ckpt["model_name"]), num_classes=int(ckpt["num_classes"]), weights="none")
    load_weights(bb.model, ckpt["model"], ckpt)
    model = bb.model.to(torch.device(device)).eval()
    if bool(ckpt.get("channels_last")) if channels_last is None else channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def precision_on(device: torch.device, precision: str) -> str:
    """The checkpoint's precision where ``device`` can run it (fp16 autocast has no CPU path: fp32 there)."""
    return "fp32" if precision == "fp16" and device.type == "cpu" else precision


def eval_precision(ckpt: dict[str, Any], device: torch.device, given: str | None = None) -> str:
    """The precision to evaluate ``ckpt`` in on ``device``: ``given``, else the checkpoint's, where it can run."""
    return precision_on(device, given or ckpt.get("precision", "fp32"))
