"""The library's front door: the same operations as the CLI, for notebooks and scripts.

    import finetune
    recipe = finetune.load_recipe("linear-probe")
    result = finetune.train(recipe, out="runs/probe")
    finetune.evaluate_checkpoint("runs/probe/best.pt")
    finetune.predict("runs/probe/best.pt", ["photo.jpg"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finetune.checkpoint import load_checkpoint
from finetune.engine import evaluate, resolve_device
from finetune.errors import DataError


def _precision_on(dev: torch.device, precision: str) -> str:
    """The checkpoint's precision where ``dev`` can run it (fp16 autocast has no CPU path: fp32 there)."""
    return "fp32" if precision == "fp16" and dev.type == "cpu" else precision


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a finetune checkpoint alone (no recipe needed); returns (model in eval mode, ckpt)."""
    from finetune.models import build_model

    ckpt = load_checkpoint(checkpoint)
    bb = build_model(ckpt["model_name"], num_classes=int(ckpt["num_classes"]), weights="none")
    bb.model.load_state_dict(ckpt["model"])
    model = bb.model.to(resolve_device(device)).eval()
    if ckpt.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, split: str = "val", *,
                        device: str = "auto", batch_size: int = 64, precision: str | None = None,
                        labels: str | None = None) -> dict[str, Any]:
    """Accuracy, top-5, loss, per-class accuracy and confusion of a checkpoint on ``data`` (default: the data it
    was trained on), with the checkpoint's own eval transform and precision — so it reproduces the val accuracy
    that training recorded for that epoch."""
    from finetune import data as D

    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, device=str(dev))
    info = ckpt.get("data") or {}
    path = data if data is not None else info.get("path", "sample")
    own = data is None or data == info.get("path")  # the run's data: its labels and its train/val split
    ds = D.build_eval_dataset(path, split, list(ckpt["class_names"]), ckpt["transform"],
                              labels=labels or (info.get("labels") if own else None),
                              val_split=info.get("val_split", 0.2) if own else 0.0, seed=info.get("seed", 0))
    loader = D.make_loader(ds, batch_size, shuffle=False, seed=0, device=dev.type)
    res = evaluate(model, loader, int(ckpt["num_classes"]), device=dev,
                   precision=_precision_on(dev, precision or ckpt.get("precision", "fp32")),
                   channels_last=bool(ckpt.get("channels_last")))
    names = list(ckpt["class_names"])
    return {"accuracy": res["accuracy"], "top5": res["top5"], "loss": res["loss"], "n": res["n"],
            "per_class": dict(zip(names, res["per_class"])), "confusion": res["confusion"],
            "class_names": names, "checkpoint": ckpt["_path"], "epoch": ckpt.get("epoch"), "split": split,
            "data": str(path)}


def predict(checkpoint: str | Path, paths: list[str], top_k: int = 5, *, device: str = "auto",
            batch_size: int = 32, strict: bool = False) -> list[dict[str, Any]]:
    """Top-k labels and probabilities for each image (files or folders) with the checkpoint's eval transform.

    Rows: ``{"path", "name", "top": [{"label", "prob"}]}``; ``name`` is relative to the folder given (or the file
    as given). An unreadable file is skipped with a warning, as in train and eval (``strict=True``: an error);
    when no file is readable, that is an error naming the first.
    """
    import logging

    from finetune import data as D
    from finetune.engine import autocast

    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, device=str(dev))
    class_names = list(ckpt["class_names"])
    named = D.named_images(paths)
    if not named:
        raise DataError(f"no images found in {', '.join(paths)}; pass image files or folders of images")
    tf_cfg = ckpt["transform"]
    tf = D.eval_transform(tf_cfg)
    k = max(1, min(top_k, len(class_names)))
    prec = _precision_on(dev, ckpt.get("precision", "fp32"))
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    files = list(named)
    for i in range(0, len(files), batch_size):
        chunk, xs = [], []
        for f in files[i:i + batch_size]:
            try:
                xs.append(tf(D.decode(f, tf_cfg)))  # exactly what eval sees
                chunk.append(f)
            except DataError as e:
                if strict:
                    raise DataError(f"{e} (--strict; without it the file is skipped)") from None
                skipped.append(str(e))
        if not xs:
            continue
        x = torch.stack(xs).to(dev)
        if ckpt.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(dev, prec):
            probs = model(x).float().softmax(dim=1)
        p, idx = probs.topk(k, dim=1)
        for f, pr, ix in zip(chunk, p.tolist(), idx.tolist()):
            out.append({"path": str(f), "name": named[f],
                        "top": [{"label": class_names[j], "prob": q} for j, q in zip(ix, pr)]})
    if not out:
        more = f" (and {len(skipped) - 1} more unreadable)" if len(skipped) > 1 else ""
        raise DataError(f"{skipped[0]}{more}; no image could be read")
    log = logging.getLogger("finetune")
    for msg in skipped:
        log.warning(msg.replace("cannot read image", "skipping unreadable image", 1))
    return out
