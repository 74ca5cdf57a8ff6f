"""The held-out test split: which splits a data folder has, and the one-time test evaluation of ``best.pt`` at the
end of a run.

A folder ``ROOT/{train,val,test}/<class>/...`` trains on ``train``, selects the best epoch on ``val``, and at the
end evaluates ``best.pt`` once on ``test``: never during training, never for selection or early stopping, stored
apart in ``metrics.json`` under ``"test"``. When ``test/`` is the only held-out folder, training already uses it as
its val set (``ROOT/test`` counts as a val folder), so there is no separate test to report and nothing is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEST_NAMES = ("test", "testing")


def test_folder(path: str) -> Path | None:
    """``ROOT/test`` (or ``testing``) when the data at ``path`` has one *apart from* the val folder training uses;
    else None (CIFAR, a flat folder, or test/ doubling as val)."""
    from finetune.data import resolve_data_path
    from finetune.data.sources import split_dirs

    root = resolve_data_path(path)
    if not isinstance(root, Path) or not root.is_dir():
        return None
    train, val = split_dirs(root)
    if train is None:
        return None
    test = next((root / n for n in TEST_NAMES if (root / n).is_dir()), None)
    if test is None or val is None or val.resolve() == test.resolve():
        return None
    return test


def splits(path: str, val_split: float = 0.0) -> list[str]:
    """The splits ``finetune eval --split all`` reports for the data at ``path``, in order."""
    from finetune.data import resolve_data_path
    from finetune.data.sources import split_dirs

    root = resolve_data_path(path)
    if not isinstance(root, Path):  # CIFAR: train, and its test set (which is also what val means there)
        return ["train", "test"]
    train, val = split_dirs(root) if root.is_dir() else (None, None)
    if train is None:  # a flat folder: the run's stratified split, or the whole folder as one
        return ["train", "val"] if val_split > 0 else ["val"]
    out = ["train"] + (["val"] if val is not None else [])
    return out + (["test"] if test_folder(path) is not None else [])


def evaluate_best(run_dir: Path, cfg, device, reporter=None, batch_size: int = 64) -> dict[str, Any] | None:
    """Evaluate ``run_dir/best.pt`` on the data's test folder (see :func:`test_folder`) with the checkpoint's eval
    transform and precision, and store the result under ``"test"`` in ``metrics.json``; None when there is no
    separate test folder. Runs once, after the last epoch; batches of 64, as `finetune eval`, so that
    `finetune eval best.pt --split test` gives the same numbers bitwise."""
    import json

    from finetune import data as D
    from finetune.files import atomic_write_text
    from finetune.run.restore import eval_precision, restore_model
    from finetune.training.engine import evaluate

    if test_folder(cfg.data.path) is None or not (Path(run_dir) / "best.pt").is_file():
        return None
    model, ckpt = restore_model(Path(run_dir) / "best.pt", device)
    names = list(ckpt["class_names"])
    channels_last = bool(ckpt.get("channels_last"))
    ds = D.build_eval_dataset(cfg.data.path, "test", names, ckpt["transform"], labels=cfg.data.labels)
    loader = D.make_loader(ds, batch_size, shuffle=False, seed=0, device=device.type,
                           workers=0)
    res = evaluate(model, loader, len(names), device=device, precision=eval_precision(ckpt, device),
                   channels_last=channels_last)
    test = {"checkpoint": "best.pt", "epoch": ckpt.get("epoch"), "accuracy": res["accuracy"],
            "balanced_accuracy": res["balanced_accuracy"], "macro_f1": res["macro_f1"], "top5": res["top5"],
            "loss": res["loss"], "n": res["n"]}
    mp = Path(run_dir) / "metrics.json"
    metrics = json.loads(mp.read_text()) if mp.is_file() else {}
    metrics["test"] = test
    atomic_write_text(mp, json.dumps(metrics, indent=2))
    if reporter is not None:
        reporter.note(held_out_note(test))
    return test


def held_out_note(test: dict[str, Any]) -> str:
    """The line a run ends with when it has a test split: best.pt's test accuracy ± its 95% Wilson interval (the
    honest number: issue #30 items 3 and 10), balanced accuracy, the image count, and that selection never saw it."""
    from finetune.training.stats import pm_text

    pm = pm_text(test["accuracy"], test["n"])
    return (f"test split: best.pt (epoch {test['epoch']}) {100 * test['accuracy']:.2f}% accuracy"
            + (f" {pm} (95%)" if pm else "") + f", {100 * test['balanced_accuracy']:.2f}% balanced, on {test['n']} "
            "images (evaluated once, after training; never used for selection)")
