"""The library's front door: the same operations as the CLI, for notebooks and scripts, and everything the CLI
uses (it imports nothing else of the package).

    import finetune
    recipe = finetune.load_recipe("linear-probe")
    result = finetune.train(recipe, out="runs/probe")
    finetune.evaluate_checkpoint("runs/probe/best.pt")
    finetune.predict("runs/probe/best.pt", ["photo.jpg"])

Importing this module imports no torch (``finetune --help`` and ``finetune recipes`` must answer fast): recipes,
errors and the trust switch are plain imports; what needs torch is imported on first use (``_LAZY``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.run.checkpoint import EXPORT_SUFFIX, export_weights, finite_json  # noqa: F401 - torch only inside
from finetune.tools.export import FORMATS as EXPORT_FORMATS, export as export_model  # noqa: F401 - likewise
from finetune.config import (Recipe, apply_overrides, describe, load_recipe, many_errors,  # noqa: F401
                             recipe_flags, recipe_names, recipe_path, recipes_dir)
from finetune.config import catalog, preflight  # noqa: F401 - torch-free: names and the checks before a run
from finetune.errors import (CheckpointError, ConfigError, DataError, FinetuneError, FreezeError,  # noqa: F401
                             Interrupted, flag_names, shown, stopped_line)
from finetune.run.lr_find import FILES as LR_FIND_FILES, lr_find  # noqa: F401 - torch only inside the functions
from finetune.parallel.launcher import report_worker_error  # noqa: F401 - --nproc workers: errors reach the user once
from finetune.files import trusted  # noqa: F401
from finetune.parallel.signals import interrupted_as, sigterm_as_interrupt  # noqa: F401

if TYPE_CHECKING:
    import torch

    from finetune.parallel.distributed import launch, strip_nproc  # noqa: F401
    from finetune.training.engine import Reporter  # noqa: F401
    from finetune.training.events import Callback  # noqa: F401
    from finetune.data import resolve_data_path  # noqa: F401
    from finetune.speedups import feature_store as featstore  # noqa: F401
    from finetune.speedups import backbone_store  # noqa: F401
    from finetune.training.freeze import apply_freeze, from_recipe, model_stages  # noqa: F401
    from finetune.tools.probe import ProbeResult  # noqa: F401
    from finetune.config.preflight import parse_floats, parse_ints  # noqa: F401
    from finetune.models import Backbone, build_model, build_model_shapes, data_config  # noqa: F401
    from finetune.models.params import inspect_json, module_rows, parameter_rows  # noqa: F401
    from finetune.run.runner import RunResult  # noqa: F401
    from finetune.reporting.runs import compare_runs, list_runs, write_compare_html  # noqa: F401
    from finetune.training.stats import half_width, pm_text, tied, wilson  # noqa: F401

_MODULES = {"featstore": "finetune.speedups.feature_store", "backbone_store": "finetune.speedups.backbone_store"}
_LAZY = {
    "RunResult": "finetune.run.runner",
    "build_model": "finetune.models", "build_model_shapes": "finetune.models", "data_config": "finetune.models",
    "Backbone": "finetune.models",
    "apply_freeze": "finetune.training.freeze", "from_recipe": "finetune.training.freeze",
    "model_stages": "finetune.training.freeze",
    "resolve_data_path": "finetune.data",
    "parse_floats": "finetune.config.preflight", "parse_ints": "finetune.config.preflight",  # torch-free
    "featstore": None, "backbone_store": None,
    "inspect_json": "finetune.models.params", "module_rows": "finetune.models.params",
    "parameter_rows": "finetune.models.params",
    "Reporter": "finetune.training.engine", "Callback": "finetune.training.events",
    # the extension points: a backbone source by prefix, a freeze kind by name (docs/architecture.md)
    "BackboneSource": "finetune.models.sources", "register_source": "finetune.models.sources",
    "unregister_source": "finetune.models.sources", "FreezeKind": "finetune.training.freeze",
    "register_freeze_kind": "finetune.training.freeze", "unregister_freeze_kind": "finetune.training.freeze",
    "launch": "finetune.parallel.distributed", "strip_nproc": "finetune.parallel.distributed",
    "list_runs": "finetune.reporting.runs", "compare_runs": "finetune.reporting.runs",
    "write_compare_html": "finetune.reporting.runs",
    # the noise of an accuracy (torch-free: runs/compare use it): the Wilson interval, "± x", within-noise ties
    "wilson": "finetune.training.stats", "half_width": "finetune.training.stats", "pm_text": "finetune.training.stats",
    "tied": "finetune.training.stats",
    "AutoResult": "finetune.tools.auto", "SHELF": "finetune.tools.auto",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        if _LAZY[name] is None:  # a whole module (the feature store: list, clear, parse_age)
            return importlib.import_module(_MODULES[name])
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune.api' has no attribute '{name}'")


def train(recipe: Recipe | None = None, *, out: str | Path | None = None, overwrite: bool = False,
          resume: str | Path | None = None, epochs: int | None = None, reporter: Reporter | Callback | None = None,
          callbacks: list[Callback] | None = None, budget: str | float | None = None, min_epochs: int = 1,
          started: float | None = None) -> RunResult:
    """Run ``recipe`` and write the run directory (or continue the run in ``resume`` from its ``last.pt``; ``epochs``
    may extend it). ``reporter`` shows the progress: a :class:`Callback` (the CLI's :class:`finetune.cli.progress.
    RichReporter`) or, the older shape, a :class:`Reporter` (adapted onto the same hooks); silent without one. Its
    ``note(message)``, where it has one, also prints the test split's and the report's lines. ``callbacks``
    (:class:`Callback`: run, epoch and batch hooks, see :mod:`finetune.training.events`) listen after it,
    TensorBoard and the report's writer. ``budget`` (``"20m"`` or seconds; a new run): the epochs, up to the
    recipe's, are sized from measured speed to end inside it, and the run stops on schedule
    (:mod:`finetune.run.budget`), counted from ``started`` (``time.monotonic()``, default now); fewer than
    ``min_epochs`` fit: ``BudgetTooShort``. Returns the best epoch, its accuracy and the run directory
    (:class:`finetune.run.runner.RunResult`)."""
    import time

    started = time.monotonic() if started is None else started
    seconds = preflight.parse_budget(budget)
    if seconds is not None and resume is not None:
        raise ConfigError("budget= sizes a new run; drop it with resume= (pass epochs= to extend the run)")
    if resume is None and recipe is not None:
        preflight.check_recipe(recipe)  # a missing path or unknown model: the error before torch is imported
        if "LOCAL_RANK" not in os.environ:  # under torchrun, rank 0 may already have made --out: its check decides
            preflight.out_dir(out, overwrite)  # an existing run in --out without --overwrite, likewise
    from finetune.reporting import report
    from finetune.run import runner

    return runner.train(recipe, out=out, overwrite=overwrite, resume=resume, epochs=epochs, reporter=reporter,
                        callbacks=[report.ReportCallback(), *(callbacks or [])], figures=report.log_tensorboard,
                        budget=seconds, started=started, min_epochs=min_epochs)


def data_class_count(path: str, labels: str | None = None) -> int:
    """How many classes the data at ``path`` has (its train split), from the file list alone (nothing decoded)."""
    from finetune.data import resolve_data_path
    from finetune.data.sources import find

    root = resolve_data_path(path)
    if not isinstance(root, Path) or not root.is_dir():
        raise DataError(f"data folder '{path}' not found")
    return len({c for _, c in find(root, labels).train})


def list_models(pattern: str | None = None, pretrained_only: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"source", "name", "weights": [...]}`` for every model whose name matches ``pattern`` (a glob,
    ``resnet*``, ``timm:vit_*``, or a substring; without a prefix it matches every source). Answered from the cached
    name list without importing torch while only the built-in sources are registered
    (:mod:`finetune.config.catalog`)."""
    return catalog.list_models(pattern, pretrained_only)


def probe(models: Any, *, weights: str = "default", data: str = "sample", **kw: Any) -> list[ProbeResult]:
    """Probe each of ``models`` on ``data``: a grid of linear heads on frozen features, plus k-NN
    (:func:`finetune.tools.probe.probe`, which takes the other keywords). ``models``: names (each with
    ``weights``), or each with its own: ``["a=PATH", "b"]``, ``[("a", PATH), ("b", "default")]``, ``{"a": PATH}``
    or ``"a=PATH,b"``. Every model name, the data and each weights file are checked first, before torch is
    imported."""
    pairs = preflight.check_run(models, weights, data)
    from finetune.tools.probe import probe as run_probe

    return run_probe(pairs, weights=weights, data=data, **kw)


def auto(models: Any = None, *, data: str = "sample", budget: str | float | None = None, out: str | Path | None = None,
         overwrite: bool = False, cache_dir: str | Path | None = None, folds: int = 5, lrs: list[float] | None = None,
         wds: list[float] | None = None, progress=None, reporter: Any = None, **recipe_kw: Any):
    """Which backbone, which strategy, how good, within ``budget`` (``"20m"`` or seconds): probe each candidate
    (``models`` as for :func:`probe`; None: the default shelf, :data:`finetune.tools.auto.SHELF`, whose weights
    can be had), decide, and train the winner (LP-FT or the linear probe) into ``out`` (default
    ``runs/<time>-auto``), a normal run directory with ``auto.json``, ``recipe.yaml`` and the decision in
    report.html. ``recipe_kw``: ``labels``, ``val_split``, ``image_size``, ``batch_size``, ``seed``, ``device``,
    ``precision``. ``progress(line)``: the stage lines; ``reporter``: the training's (as :func:`train`). Returns
    :class:`finetune.tools.auto.AutoResult` (see :mod:`finetune.tools.auto`)."""
    import time

    started = time.monotonic()
    seconds = preflight.parse_budget(budget)
    if folds < 0 or folds == 1:
        raise ConfigError(f"folds must be 0 (the val split) or at least 2, got {folds}")
    pairs = preflight.model_pairs(models, "default") if models else None
    for m, _ in pairs or []:
        preflight.check_model(m)  # a typo is an error; a missing weights file only skips its candidate
    preflight.check_data(data)
    preflight.out_dir(out, overwrite)  # an existing run in out: the error now, not after the probe stage
    from finetune.run.checkpoint import default_run_dir
    from finetune.tools import auto as A

    kw = dict(recipe_kw)
    note = _auto_val_split(data, kw)
    say = progress or (lambda line: None)
    if note:
        say(note)
    res = A.run_auto(pairs or A.shelf_pairs(), data=data, budget=seconds,
                     out=Path(out) if out else default_run_dir("auto"), overwrite=overwrite, cache_dir=cache_dir,
                     folds=folds, recipe_kw=kw, lrs=lrs, wds=wds, progress=say, train_fn=train,
                     report_fn=write_report, reporter=reporter, started=started)
    A.write_outputs(res, write_report)
    return res


def _auto_val_split(data: str, kw: dict[str, Any]) -> str | None:
    """Data without a val folder and no ``val_split`` given: hold out 20% of each class (auto needs val to select
    best.pt); the line that says so."""
    from finetune.data import resolve_data_path
    from finetune.data.sources import split_dirs

    root = resolve_data_path(data)
    if kw.get("val_split") is not None or not isinstance(root, Path) or split_dirs(root)[1] is not None:
        return None
    kw["val_split"] = 0.2
    return f"no val folder in '{data}': 20% of each class is held out for validation (--val-split to change)"


def shutdown_distributed() -> None:
    """Leave the torchrun process group if this process joined one (a no-op otherwise)."""
    import sys

    if "finetune.parallel.distributed" not in sys.modules:  # never loaded: no group joined (and no torch to import)
        return
    from finetune.parallel import distributed

    distributed.shutdown(distributed.from_env())


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a finetune checkpoint alone (no recipe needed); returns (model in eval mode, ckpt)."""
    preflight.checkpoint_file(checkpoint)
    from finetune.run.restore import restore_model
    from finetune.training.engine import resolve_device

    return restore_model(checkpoint, resolve_device(device))


def _fast(ckpt: dict[str, Any], given: str | None) -> str:
    """eval/predict's fast-inference mode: ``given``, else the checkpoint's (see finetune/models/fold.py)."""
    from finetune.models.fold import mode_of

    return mode_of(ckpt, given)


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, split: str = "val", *,
                        device: str = "auto", batch_size: int = 64, precision: str | None = None,
                        labels: str | None = None, report: str | Path | None = None,
                        fast_inference: str | None = None) -> dict[str, Any]:
    """Accuracy, top-5, loss, per-class accuracy and confusion of a checkpoint on ``data`` (default: the data it
    was trained on), with the checkpoint's own eval transform and precision — so it reproduces the val accuracy
    that training recorded for that epoch. ``split="all"``: a mapping split -> that result for every split the data
    has (train, val, test). ``report``: also write that HTML file (confusion heat map, per-class
    precision/recall/F1, the most confidently wrong images)."""
    if split == "all":  # every split the data has, each on its own: {"train": {...}, "val": {...}, "test": {...}}
        if report is not None:
            raise ConfigError("--report describes one split; pass --split val, train or test with it")
        return _evaluate_all(checkpoint, data, device=device, batch_size=batch_size, precision=precision,
                             labels=labels)
    if report is not None:  # a bad report path fails before the evaluation, not after it
        from finetune.reporting.html import check_out

        check_out(report)
    preflight.checkpoint_file(checkpoint)  # the errors the evaluation would meet first, before torch is imported
    if data is not None:
        preflight.check_data(data)
    from finetune import data as D
    from finetune.run.restore import eval_precision
    from finetune.training.engine import evaluate, resolve_device

    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, device=str(dev))
    from finetune.data import provenance

    info = ckpt.get("data") or {}
    path = data if data is not None else info.get("root") or info.get("path", "sample")
    own = data is None or data == info.get("path") or provenance.absolute(data) == info.get("root")
    # the run's data: its labels and its train/val split
    ds = D.build_eval_dataset(path, split, list(ckpt["class_names"]), ckpt["transform"],
                              labels=labels or (info.get("labels") if own else None),
                              val_split=info.get("val_split", 0.2) if own else 0.0, seed=info.get("seed", 0),
                              allow_outside=bool(info.get("allow_outside")) and own)
    if own and split == "val":
        provenance.check_eval(info, ds, path)
    loader = D.make_loader(ds, batch_size, shuffle=False, seed=0, device=dev.type)
    res = evaluate(model, loader, int(ckpt["num_classes"]), device=dev,
                   precision=eval_precision(ckpt, dev, precision),
                   channels_last=bool(ckpt.get("channels_last")), fast=_fast(ckpt, fast_inference))
    names = list(ckpt["class_names"])
    out = {"accuracy": res["accuracy"], "balanced_accuracy": res["balanced_accuracy"], "macro_f1": res["macro_f1"],
           "top5": res["top5"], "loss": res["loss"], "n": res["n"],
           "per_class": dict(zip(names, res["per_class"])), "confusion": res["confusion"],
           "class_names": names, "checkpoint": ckpt["_path"], "epoch": ckpt.get("epoch"), "split": split,
           "data": str(path)}
    if report is not None:  # the evaluation part of the run report, for any checkpoint and data
        from finetune.reporting.report import write_eval_report

        out["report"] = str(write_eval_report(report, {**out, "samples": res["samples"]}, ds, ckpt))
    return out


def check_report_path(out: str | Path) -> Path:
    """Where an HTML report may be written (an .html file, its folder exists, never over a non-report file)."""
    from finetune.reporting.html import check_out

    return check_out(out)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) for a finished or running run: learning curves, confusion
    matrix, per-class metrics, the most confidently wrong val images, the freeze plan, recipe and environment."""
    run_dir = preflight.run_dir(run_dir)  # a missing folder: the error before torch is imported
    from finetune.reporting.report import write_run_report

    return write_run_report(run_dir, out)


def _evaluate_all(checkpoint, data, **kw) -> dict[str, dict[str, Any]]:
    preflight.checkpoint_file(checkpoint)  # before torch is imported
    if data is not None:
        preflight.check_data(data)
    from finetune.run.checkpoint import load_checkpoint
    from finetune.data import provenance
    from finetune.run.holdout import splits

    info = load_checkpoint(checkpoint).get("data") or {}
    own = data is None or data == info.get("path") or provenance.absolute(data) == info.get("root")
    path = data if data is not None else info.get("root") or info.get("path", "sample")
    return {s: evaluate_checkpoint(checkpoint, data, s, **kw)
            for s in splits(str(path), info.get("val_split", 0.2) if own else 0.0)}


def predict(checkpoint: str | Path, paths: str | os.PathLike | Iterable[str | os.PathLike], top_k: int = 5, *,
            device: str = "auto", batch_size: int = 32, strict: bool = False,
            fast_inference: str | None = None,
            min_confidence: float | str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    """Top-k labels and probabilities for each image (files or folders) with the checkpoint's eval transform.

    ``paths``: one path (a ``str`` or ``os.PathLike``: an image file or a folder of images, as the CLI takes) or a
    list (any iterable) of them. What comes back:

    - one image file, ``predict(ckpt, "img.png")``: its row, a dict;
    - one folder, ``predict(ckpt, "photos/")``, or a list, ``predict(ckpt, ["a.png", "photos/"])``: a list of rows,
      one per image found, in the order found.

    A row: ``{"path", "name", "top": [{"label", "prob"}]}``, ``top`` best first; ``name`` is relative to the folder
    given (or the file as given). ``bytes`` or anything that is neither a path nor an iterable of paths is a
    ``TypeError``. An unreadable file is skipped with a warning, as in train and eval (``strict=True``: an error);
    when no file is readable, that is an error naming the first.

    ``min_confidence``: also mark each row ``low_confidence`` (its top-1 probability below the threshold, which the
    row carries as ``min_confidence``). ``"auto"``: the checkpoint's own calibration, the top-1 probability that 95%
    of its correctly classified val images reach (:func:`confidence_floor`; a model trained briefly is unsure even
    when right, so a fixed 50% would mark nearly everything); a number: that probability; None or 0: no marks.
    """
    items, single_file = _predict_inputs(paths)
    preflight.checkpoint_file(checkpoint)  # before torch is imported: the checkpoint, then the images' paths
    preflight.image_paths(items)
    from finetune import data as D
    from finetune.run.checkpoint import load_checkpoint
    from finetune.run.restore import eval_precision
    from finetune.training.engine import resolve_device

    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    class_names = list(ckpt["class_names"])
    named = D.named_images(items)
    if not named:
        raise DataError(f"no images found in {', '.join(shown(p) for p in items) or 'an empty list'}; pass image "
                        "files or folders of images")
    k = max(1, min(top_k, len(class_names)))
    prec = eval_precision(ckpt, dev)
    mode = _fast(ckpt, fast_inference)
    run, tf, keep = _predictor(ckpt, dev, prec, mode)
    floor = confidence_floor(ckpt) if min_confidence == "auto" else float(min_confidence or 0.0)
    skipped: list[str] = []
    out = _predict_rows(run, named, ckpt, dev, prec, tf, skipped, k=k, batch_size=batch_size, strict=strict,
                        min_confidence=min_confidence, floor=floor)
    _settle_skipped(out, skipped)
    keep()
    return out[0] if single_file else out


def _predictor(ckpt: dict[str, Any], dev, prec: str, mode: str):
    """``(run, transform, keep)`` for :func:`predict`: the checkpoint's model, run as ``mode`` says, with its eval
    transform; ``keep()`` afterwards marks the checkpoint as predicted, or at its second predict stores what ran in
    the inference store. A checkpoint predicted twice before (the same file, mode and device; fp32; a resize
    :class:`PlainEvalTransform` supports) runs its stored graph instead, with that torch-only transform: no timm,
    torchvision or model build (finetune/speedups/inference_store.py)."""
    from finetune import data as D
    from finetune.data.transforms import PlainEvalTransform
    from finetune.files import cache_root
    from finetune.models.fold import FastInference
    from finetune.run.restore import restore_model
    from finetune.speedups import inference_store as IS

    key = None
    if (prec == "fp32" and ckpt["model_name"] != "smallcnn" and not ckpt.get("sharded")
            and PlainEvalTransform.supports(ckpt["transform"]) and cache_root() is not None):
        key = IS.key_of(Path(ckpt["_path"]), mode, dev)
        graph = IS.load(key, dev)
        if graph is not None:
            return _GraphOrModel(graph, ckpt, dev, mode), PlainEvalTransform(ckpt["transform"]), lambda: None
    model, _ = restore_model(ckpt, dev)
    fast = FastInference(model, mode)
    first: list = []

    def run(x):
        if not first:
            first.append(x)
        return fast(x)

    def keep():  # the second predict of a checkpoint keeps its graph; the first leaves a mark
        if key is None or not first:
            return
        if IS.seen(key):
            IS.store(key, fast.run, first[0])
        else:
            IS.mark(key)

    return run, D.eval_transform(ckpt["transform"]), keep


def _predict_rows(run, named: dict, ckpt: dict[str, Any], dev, prec: str, tf, skipped: list[str], *, k: int,
                  batch_size: int, strict: bool, min_confidence: float | str | None,
                  floor: float) -> list[dict[str, Any]]:
    """:func:`predict`'s rows, one per readable image of ``named`` in order: the images decoded ``batch_size`` at
    a time (an unreadable one goes to ``skipped``, or raises with ``strict``), run through ``run`` in eval
    precision, and their top-``k`` labels kept; with ``min_confidence``, each row also says whether its top-1
    probability is below ``floor``. Kept apart from predict's setup so that the batch loop reads as one step."""
    import torch

    from finetune.training.engine import autocast

    class_names = list(ckpt["class_names"])
    tf_cfg = ckpt["transform"]
    out: list[dict[str, Any]] = []
    files = list(named)
    for i in range(0, len(files), batch_size):
        chunk, xs = _decode_batch(files[i:i + batch_size], tf, tf_cfg, strict, skipped)
        if not xs:
            continue
        x = torch.stack(xs).to(dev)
        if ckpt.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(dev, prec):
            probs = run(x).float().softmax(dim=1)
        p, idx = probs.topk(k, dim=1)
        for f, pr, ix in zip(chunk, p.tolist(), idx.tolist()):
            out.append({"path": str(f), "name": named[f],
                        "top": [{"label": class_names[j], "prob": q} for j, q in zip(ix, pr)]})
            if min_confidence not in (None, 0):
                out[-1].update(low_confidence=floor > 0 and not pr[0] >= floor, min_confidence=floor)
    return out


def _settle_skipped(out: list[dict[str, Any]], skipped: list[str]) -> None:
    """The unreadable images :func:`predict` passed over: when none could be read at all (``out`` empty), an error
    naming the first (and how many more); otherwise one warning each, as train and eval give, so a skipped file
    is never silent."""
    import logging

    if not out:
        more = f" (and {len(skipped) - 1} more unreadable)" if len(skipped) > 1 else ""
        raise DataError(f"{skipped[0]}{more}; no image could be read")
    log = logging.getLogger("finetune")
    for msg in skipped:
        log.warning(msg.replace("cannot read image", "skipping unreadable image", 1))


CONFIDENCE_QUANTILE = 0.05  # "auto": below what 95% of the correctly classified val images reach
FALLBACK_CONFIDENCE = 0.5  # "auto" for a checkpoint without per-image val results


def confidence_floor(ckpt: dict[str, Any]) -> float:
    """The top-1 probability below which a prediction of ``ckpt``'s model is unusually unsure: the 5% quantile of the
    top-1 probabilities of the val images it classified correctly at its epoch (``val.samples``, recorded in every
    checkpoint a single-process run or a probe writes); with fewer than 20 such images, or none recorded, 0.5."""
    s = (ckpt.get("val") or {}).get("samples") if isinstance(ckpt.get("val"), dict) else None
    try:
        right = [float(c) for c, t, p in zip(s["conf"].tolist(), s["target"].tolist(), s["pred"].tolist()) if t == p]
    except (TypeError, KeyError, AttributeError):
        return FALLBACK_CONFIDENCE
    right = sorted(c for c in right if c == c)
    if len(right) < 20:
        return FALLBACK_CONFIDENCE
    return right[int(CONFIDENCE_QUANTILE * (len(right) - 1))]


class _GraphOrModel:
    """A stored inference graph that gives way to the checkpoint's model (built then, run as ``mode`` says) should it
    fail or answer in the wrong shape: an entry that passed the load checks may still be tampered with. The inputs
    are the same either way (PlainEvalTransform equals the torchvision transform bitwise)."""

    def __init__(self, graph, ckpt: dict[str, Any], dev, mode: str):
        self.graph, self.ckpt, self.dev, self.mode = graph, ckpt, dev, mode

    def __call__(self, x):
        import torch

        if self.graph is not None:
            try:
                out = self.graph(x)
                if isinstance(out, torch.Tensor) and out.is_floating_point() and \
                        tuple(out.shape) == (x.shape[0], int(self.ckpt["num_classes"])):
                    return out
                why = "an output of the wrong shape"
            except Exception as e:  # noqa: BLE001 - a damaged entry: the model answers instead
                why = f"{type(e).__name__}"
            import logging

            from finetune.models.fold import FastInference
            from finetune.run.restore import restore_model

            logging.getLogger("finetune").debug(f"inference store: the stored graph failed ({why}); building the model")
            self.graph = None
            self.model = FastInference(restore_model(self.ckpt, self.dev)[0], self.mode)
        return self.model(x)


def _decode_batch(files: list, tf, tf_cfg: dict[str, Any], strict: bool, skipped: list[str]) -> tuple[list, list]:
    """The files of one batch that decode, and their tensors (exactly what eval sees); an unreadable file's error is
    added to ``skipped`` (``strict``: raised)."""
    from finetune import data as D

    decode = getattr(tf, "decode", None) or (lambda f: D.decode(f, tf_cfg))  # PlainEvalTransform decodes itself
    chunk, xs = [], []
    for f in files:
        try:
            xs.append(tf(decode(f)))
            chunk.append(f)
        except DataError as e:
            if strict:
                raise DataError(f"{e} (--strict; without it the file is skipped)") from None
            skipped.append(str(e))
    return chunk, xs


def _predict_inputs(paths: Any) -> tuple[list[str | os.PathLike], bool]:
    """:func:`predict`'s ``paths`` as a list, and whether it was one image file (then one row comes back). A
    string is one path, never its characters (``"/"`` must not become a scan of the whole file system)."""
    what = ("predict() takes a path (str or os.PathLike: an image file or a folder) or a list of paths, got "
            "{}")
    if isinstance(paths, (str, os.PathLike)) and isinstance(os.fspath(paths), str):
        return [paths], not Path(os.fspath(paths)).expanduser().is_dir()
    if isinstance(paths, (bytes, bytearray, memoryview, os.PathLike)):
        raise TypeError(what.format(f"{type(paths).__name__}; decode it: os.fsdecode(path)"))
    try:
        items = list(paths)
    except TypeError:
        raise TypeError(what.format(type(paths).__name__)) from None
    for p in items:
        if not isinstance(p, (str, os.PathLike)) or isinstance(os.fspath(p), bytes):
            raise TypeError(what.format(f"a list holding {type(p).__name__} {p!r:.60}"))
    return items, False
