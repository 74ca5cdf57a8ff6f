"""A training run: recipe -> run directory, data, model, freeze plan, optimizer -> epochs.

The run is one :class:`RunState` (model, optimizer, data, loaders, history, best), built by :func:`start_run` (the
run directory is prepared and locked first, so a clash fails fast) or :func:`resume_run` (from ``last.pt``), then
advanced by :func:`fit`: per epoch, the unfreeze steps due, the :class:`Phase` (the head on cached features, or the
full model), one pass and an evaluation, the commit of the run state (``last.pt``, then ``best.pt`` and
``metrics.json``), and the listeners (:mod:`finetune.run.callbacks`: progress, TensorBoard, the report).

The run directory holds the resolved ``config.yaml`` (a valid recipe that reruns the same thing), ``metrics.json``,
``last.pt`` and ``best.pt`` (plain-dict checkpoints readable with ``weights_only=True``, see
:class:`finetune.run.checkpoint.Checkpoint`) and TensorBoard events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import __version__, files
from finetune.run import checkpoint as ck
from finetune.parallel import distributed as dist_
from finetune.config import Recipe, from_dict, validate
from finetune.config.preflight import budget_text
from finetune.data import provenance
from finetune.training.engine import (BNPolicy, EmaUpdate, LRSchedule, NonFiniteLoss, Step, evaluate, maybe_compile,
                                   resolve_device, resolve_precision, train_one_epoch)
from finetune.training.events import Callback, Callbacks, Reporter
from finetune.errors import CheckpointError, ConfigError, FinetuneError, Interrupted  # noqa: F401 - re-exported
from finetune.run import holdout, midepoch
from finetune.run.assemble import Parts, assemble, head_only_on_stored_features
from finetune.training import imbalance
from finetune.speedups import depthwise as dwgrad
from finetune.parallel import sharded, strategy
from finetune.run.selection import Monitor, file_for, update_top_k
from finetune.run import callbacks as C
from finetune.models import canonical, parse_name
from finetune.run.lr_find import resolve_auto_lr
from finetune.training import optim as O
from finetune.training.regularization import make_mixup
from finetune import data as D
from finetune.speedups.feature_cache import plan_cache
from finetune.models.stand_in import NeedsBackbone, is_stand_in

log = logging.getLogger("finetune")


class TrainingDiverged(FinetuneError):
    """Loss became NaN/inf; the last good checkpoint is kept."""



@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    best_val_acc: float | None
    epochs: list[dict[str, Any]]
    class_names: list[str]
    test: dict[str, Any] | None = None  # best.pt on the data's test/ folder, evaluated once at the end
    budget: dict[str, Any] | None = None  # --budget: how it was sized (finetune.run.budget.Sizing.to_dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch reseeds from (seed, epoch): augmentation and dropout after a resume match an uninterrupted run."""
    return (seed * 1_000_003 + epoch * 7919) % 2**63


@dataclass
class Phase:
    """What trains during an epoch: the model as the loop runs it, its loaders and step, and the module that
    evaluates (the full model, or the trainable part on cached features)."""

    name: str  # "cached head" (frozen-feature cache) or "full model"
    model: nn.Module
    train_loader: Any
    val_loader: Any
    step: Step
    eval_model: nn.Module


@dataclass
class Verdict:
    """What an epoch's row means for the files to write (see :meth:`RunState.record`)."""

    improved: bool = False
    ema_improved: bool = False
    in_top_k: bool = False
    dropped: list[str] = dataclasses.field(default_factory=list)  # top-k files to remove


def _best_value(best: dict[str, Any], m: Monitor) -> float | None:
    return best.get("val_acc") if m.key == "val_acc" else best.get("value")


@dataclass(kw_only=True)
class RunState(Parts):
    """One run, built by :func:`start` or :func:`resume`, advanced epoch by epoch by :func:`fit`: the assembled
    :class:`~finetune.run.assemble.Parts` (data, model, freeze plan, optimizer, where it runs) and what the run
    adds to them."""

    resolved: Recipe  # the recipe as it ran (config.yaml, the checkpoints)
    dd: dist_.Dist
    run_dir: Path
    scaler: Any
    step: Step
    train_loader: Any
    val_loader: Any
    feats: Any = None  # finetune.speedups.feature_cache.FeatureRun while the frozen-feature cache serves
    feats_info: str = "off"
    train_model: nn.Module | None = None  # DDP around `model` (or `model` itself)
    run_model: nn.Module | None = None  # train_model, compiled when train.compile
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epoch": 0, "val_acc": None})
    since_best: int = 0
    start_epoch: int = 0
    partial: dict[str, Any] | None = None  # an epoch saved mid-way (save_every_steps)
    resumed: bool = False
    reporter: Reporter = dataclasses.field(default_factory=Reporter)  # batch-level progress (rank 0's is the CLI's)
    monitor: Monitor = dataclasses.field(default_factory=Monitor)  # what "best" means (train.monitor)
    ema: Any = None  # timm ModelEmaV3 over `model` (train.ema)
    best_ema: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epoch": 0, "val_acc": None})
    top_k: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the K best epochs, best first
    last_eval: dict[str, Any] | None = None  # the latest epoch's evaluation (per-image results for the pictures)
    test: dict[str, Any] | None = None  # best.pt on the data's test/ folder (holdout.py), after the last epoch
    autotune: dict[str, Any] | None = None  # depthwise convs with an fp32 backward (finetune/speedups/depthwise.py)
    budget: Any = None  # finetune.run.budget.Guard: --budget sized the epochs and stops the run on schedule
    stop_note: str | None = None  # set by a listener that ends the run after this epoch (the budget's guard)

    def phase(self, epoch: int) -> Phase:
        if self.feats is not None and not self.feats.serves(epoch):
            self.feats = None  # an unfreeze changed what trains: from here on the full model runs
        f = self.feats
        if f is not None:
            return Phase("cached head", f.model, f.train_loader, f.val_loader, f.step, f.model)
        return Phase("full model", self.run_model, self.train_loader, self.val_loader, self.step, self.model)

    def rewrap(self) -> None:
        """DDP registers the parameters that require grad when it is built: rebuild it after an unfreeze."""
        self.train_model = dist_.wrap(self.model, self.dd, self.device)
        self.run_model = maybe_compile(self.train_model, self.cfg.train.compile)

    def checkpoint(self, epochs_done: int, val: dict[str, Any] | None, full=None) -> ck.Checkpoint:
        b = self.bundle
        return ck.Checkpoint(
            model=full[0] if full else self.model.state_dict(), class_names=self.classes, model_name=self.bb.name,
            num_classes=len(self.classes), transform=b.transform, precision=self.precision,
            channels_last=self.channels_last, epoch=epochs_done, plan=self.plan.to_dict(),
            trainable=[n for n, p in self.model.named_parameters() if p.requires_grad],
            recipe=self.resolved.to_dict(), metrics=self.history, best=self.best,
            data={"path": self.cfg.data.path, "labels": self.cfg.data.labels, "val_split": self.cfg.data.val_split,
                  "seed": self.cfg.train.seed, **provenance.identity(self.cfg.data, b)},
            val=val, finetune_version=__version__, world_size=self.dd.world_size,
            optimizer=full[1] if full else self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None,
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            best_ema=self.best_ema if self.ema is not None else None, top_k=self.top_k or None,
            autotune=self.autotune)

    def _tie_with_lower_loss(self, row: dict[str, Any], value: float | None) -> bool:
        """An epoch that equals the best's accuracy (or F1) exactly, at a lower val loss: the same images right, more
        surely (selection.py). A linear probe reaches its accuracy in epoch 1 with an undertrained head (val loss
        1.16 against 0.54 four epochs later on flowers12): keeping epoch 1 left predictions at 20-40% confidence."""
        m, best = self.monitor, self.best
        if m.key == "val_loss" or value is None or best.get("epoch") is None or row["val_loss"] is None:
            return False
        if value != _best_value(best, m):
            return False
        prev = next((r for r in self.history if r["epoch"] == best["epoch"]), None)
        return prev is not None and prev.get("val_loss") is not None and row["val_loss"] < prev["val_loss"]

    def record(self, row: dict[str, Any]) -> Verdict:
        """Append the epoch's row and judge it by the monitored metric (:mod:`finetune.run.selection`): the best so far
        (without a val set: always, best.pt follows the latest epoch and val_acc stays null), the EMA's best, and
        its place in the top-k."""
        self.history.append(row)
        m, v = self.monitor, Verdict()
        value = m.value(row)
        finite = row["val_loss"] is None or math.isfinite(row["val_loss"])  # a NaN val loss is never the best
        v.improved = row["val_acc"] is None or (finite and (m.better(value, _best_value(self.best, m))
                                                            or self._tie_with_lower_loss(row, value)))
        if v.improved:
            self.best = {"epoch": row["epoch"], "val_acc": row["val_acc"]}
            if m.key != "val_acc":
                self.best.update(monitor=m.key, value=value)
            self.since_best = 0
        else:
            self.since_best += 1
        row["best"] = v.improved
        if self.ema is not None and row.get("ema_val_acc") is not None:
            ema_value = m.value(row, "ema_")
            v.ema_improved = m.better(ema_value, _best_value(self.best_ema, m))
            if v.ema_improved:
                self.best_ema = {"epoch": row["epoch"], "val_acc": row["ema_val_acc"]}
                if m.key != "val_acc":
                    self.best_ema.update(monitor=m.key, value=ema_value)
        self.top_k, v.in_top_k, v.dropped = update_top_k(self.top_k, row["epoch"], value,
                                                          self.cfg.train.save_top_k, m)
        return v

    def commit(self, epochs_done: int, val: dict[str, Any] | None, v: Verdict) -> None:
        """The end-of-epoch writes (rank 0): last.pt first, the commit point (see ``checkpoint.repair_run``), then
        best.pt (weights + metadata: the optimizer state, 2x the weights for Adam, is for resuming), best_ema.pt,
        the top-k file, and metrics.json."""
        # FSDP: every rank joins the gather of the consolidated state, and writes its shards (parallel/sharded.py)
        full = strategy.full_state(self.model, self.optimizer, self.cfg, self.dd, v.improved or v.in_top_k)
        shards = strategy.save_shards(self.model, self.optimizer, self.cfg, self.dd, self.run_dir, epochs_done)
        if not self.dd.is_main:
            return
        ckpt = self.checkpoint(epochs_done, val, full)
        ck.save_checkpoint({**ckpt.to_dict(), "model": {}, "sharded": shards} if shards else ckpt.to_dict(),
                           self.run_dir / "last.pt")
        # the previous epoch's shards, now that last.pt is committed (all of them once a resume at 1 process or
        # with DDP wrote a consolidated last.pt)
        sharded.remove_stale(self.run_dir, shards["path"] if shards else None)
        if v.improved:
            ck.save_checkpoint(ckpt.slim(), self.run_dir / "best.pt")
        if v.ema_improved:
            ck.save_checkpoint({**ckpt.slim(), "model": ckpt.ema, "ema_weights": True}, self.run_dir / "best_ema.pt")
        if v.in_top_k:
            ck.save_checkpoint(ckpt.slim(), self.run_dir / file_for(epochs_done))
        for name in v.dropped:
            (self.run_dir / name).unlink(missing_ok=True)
        files.atomic_write_text(self.run_dir / "metrics.json", self.metrics_text())

    def metrics_text(self) -> str:
        return ck.metrics_text(self.best, self.history, best_ema=self.best_ema if self.ema is not None else None,
                               top_k=self.top_k or None, val_images=len(self.bundle.val) if self.bundle.val else None)

    def summary(self) -> dict[str, Any]:
        """The start-up lines (``Reporter.start``)."""
        cfg, b, m = self.cfg, self.bundle, self.model
        return {"run_dir": str(self.run_dir), "model": self.bb.name,
                "weights": self.bb.weights if not self.resumed else f"{cfg.model.weights}, resumed from last.pt",
                "device": str(self.device), "precision": self.precision, "channels_last": self.channels_last,
                "classes": self.classes, "train_images": len(b.train), "val_images": len(b.val) if b.val else 0,
                "skipped": len(b.skipped), "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                "total": sum(p.numel() for p in m.parameters()), "start_epoch": self.start_epoch,
                "epochs": cfg.train.epochs, "source": b.source, "world_size": self.dd.world_size,
                "strategy": "FSDP2" if strategy.uses_fsdp(cfg, self.dd) else "DDP",
                "global_batch": cfg.train.batch_size * self.dd.world_size, "feature_cache": self.feats_info,
                "compile": cfg.train.compile, "recipe": cfg.name, "description": cfg.description}


def train(recipe: Recipe | None, *, out: str | Path | None = None, overwrite: bool = False,
          resume: str | Path | None = None, epochs: int | None = None,
          reporter: Reporter | None = None, callbacks: list | None = None, figures=None,
          budget: float | None = None, started: float | None = None, min_epochs: int = 1) -> RunResult:
    """Run ``recipe`` and write the run directory.

    ``resume`` continues the run in that directory from its ``last.pt`` with the recipe stored there (``recipe``
    is ignored); ``epochs`` may extend it. ``callbacks`` (:class:`finetune.run.callbacks.Callback`) listen beside the
    reporter and TensorBoard; ``figures`` draws TensorBoard's per-epoch pictures (:func:`finetune.api.train` passes
    the report's, and adds the report callback). The run directory is prepared (and locked) before anything slow,
    so a clash on
    ``out`` is reported at once. A new run that stops before its first checkpoint (an error while data or model
    load, or Ctrl-C) removes its directory: nothing in it could be resumed, and keeping it would make the same
    command fail with "already exists". ``budget`` (seconds, a new run only): the epochs are sized to end inside it,
    counted from ``started`` (``time.monotonic()``; default now), and the run stops on schedule
    (:mod:`finetune.run.budget`); fewer than ``min_epochs`` fit: :class:`~finetune.run.budget.BudgetTooShort`.
    """
    made: dict[str, Any] = {"lock": ck.RunLock(), "reporter": reporter}  # the lock is held until the run ends
    started = time.monotonic() if started is None else started
    try:
        if resume is not None:
            st = resume_run(Path(resume), epochs, made)
        else:
            if recipe is None:
                raise ConfigError("no recipe given; pass a Recipe (finetune.load_recipe('default')) or "
                                  "resume=RUN_DIR")
            st = start_run(recipe, out, overwrite, made)
            if budget is not None:
                _size_to_budget(st, budget, started, min_epochs)
        made["training"] = True
        if st.dd.is_main and reporter is not None:
            st.reporter = reporter
        return fit(st, _listeners(st, st.reporter, callbacks, figures))
    except KeyboardInterrupt:
        raise _interrupted(made, resume) from None
    except BaseException:
        if not made.get("training"):
            _remove_new_run_dir(made)
        raise
    finally:
        made["lock"].release()


def _size_to_budget(st: RunState, budget: float, started: float, min_epochs: int = 1) -> None:
    """``--budget``: measure, size the epochs, rewrite config.yaml with the size, and guard the schedule."""
    from finetune.run import budget as B

    if st.dd.enabled:
        raise ConfigError("--budget sizes a run in one process; drop --nproc, or drop --budget and pass --epochs")
    sizing = B.size_run(st, budget, started, min_epochs)
    st.budget = B.Guard(sizing, started)
    _write_config(st, {"budget": f"{budget_text(budget)} -> {sizing.epochs} of {sizing.asked} epochs"})


def _interrupted(made: dict, resume) -> Interrupted:
    run_dir = made.get("run_dir")
    if resume is not None:
        return Interrupted(f"interrupted; continue with finetune train --resume {resume}")
    if run_dir is None:
        return Interrupted("interrupted before the run directory was created; nothing was written")
    if _remove_new_run_dir(made):
        return Interrupted(f"interrupted before the first checkpoint; removed the new run directory '{run_dir}' "
                           "(nothing to resume); run the same command to start again")
    return Interrupted(f"interrupted before the first checkpoint; nothing to resume in '{run_dir}'")


def _remove_new_run_dir(made: dict) -> bool:
    """Remove the directory of a new run that saved no checkpoint (only what this run wrote); True if removed."""
    run_dir = made.get("run_dir")
    if run_dir is None or (run_dir / "last.pt").exists():
        return False
    made["lock"].release()
    ck.clear_run_dir(run_dir)  # only what this run wrote: it made the directory, or emptied it (a run's, or empty)
    with contextlib.suppress(OSError):
        (run_dir / ck.LOCK).unlink()
        if not made.get("existed"):
            run_dir.rmdir()
    return True


def _listeners(st: RunState, reporter, extra: list | None, figures=None) -> Callbacks:
    """The run's listeners, called in this order. Rank 0: the progress (``reporter``: a Callback such as the CLI's,
    or a :class:`Reporter`, adapted), TensorBoard with its per-update scalars, the caller's ``extra``. Every rank:
    the mid-epoch saves (their gather is a collective)."""

    cfg, items = st.cfg, []
    if st.dd.is_main:  # only rank 0 prints, writes TensorBoard and the report
        if isinstance(reporter, Callback):
            items.append(reporter)
        elif reporter is not None and type(reporter) is not Reporter:  # the default Reporter() says nothing
            items.append(C.ReporterCallback(reporter))
        if cfg.train.tensorboard:
            tb = C.TensorBoard(st.run_dir, log_every=cfg.train.log_every, figures=figures)
            items += [tb] if tb.steps is None else [tb, tb.steps]
        items += list(extra or [])
    if cfg.train.save_every_steps:
        items.append(midepoch.MidEpochSaves())
    if st.budget is not None:
        items.append(st.budget)
    return Callbacks(items)


# ----------------------------------------------------------------------------------------------- building a run


def start_run(recipe: Recipe, out, overwrite: bool, made: dict) -> RunState:
    """A new run: its directory first (fail fast), then data, model, freeze plan, optimizer."""

    cfg = validate(recipe)  # a recipe built or edited in Python meets the same rules as a YAML file
    seed_everything(cfg.train.seed)
    dd, device, precision = _runtime(cfg)
    out_dir = Path(out) if out else ck.default_run_dir(canonical(*parse_name(cfg.model.name)))
    existed = bool(out) and out_dir.is_dir()  # a default name is always a new directory (claimed, below)
    run_dir = _prepare_shared_run_dir(dd, out_dir, overwrite, made["lock"], claim=not out)
    if dd.is_main:
        made["run_dir"], made["existed"] = run_dir, existed  # removed if the run stops before its first checkpoint
    cfg, found = _auto_lr(cfg, dd, made.get("reporter"))  # optimizer.lr: auto -> the LR range test's suggestion
    st = None
    if found is None and head_only_on_stored_features(cfg, dd):
        try:  # a backbone kept beside its stored features stands in for the model (speedups/backbone_store.py)
            st = _build(cfg, None, dd, device, precision, run_dir, stand_in=True)
        except NeedsBackbone:  # some features are not stored: the real model computes them, as without it
            seed_everything(cfg.train.seed)
    if st is None:
        st = _build(cfg, None, dd, device, precision, run_dir)
    if found is not None:
        found.save(run_dir)  # lr_find.png / lr_find.json: the curve behind --lr auto
    return st


def _auto_lr(cfg: Recipe, dd: dist_.Dist, reporter):
    """``optimizer.lr: auto``: rank 0 runs the LR range test (finetune/run/lr_find.py), every rank trains with its
    suggestion (broadcast), so the processes of a DDP run agree; returns the recipe and the test (rank 0) or None."""
    if cfg.optimizer.lr != "auto":
        return cfg, None

    cfg, found = resolve_auto_lr(cfg, reporter) if dd.is_main else (cfg, None)
    lr = dist_.broadcast_object(cfg.optimizer.lr, dd)
    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=lr)), found


def _prepare_shared_run_dir(dd: dist_.Dist, out_dir: Path, overwrite: bool, lock: ck.RunLock,
                            claim: bool = False) -> Path:
    """Rank 0 picks, prepares and locks the run directory; every rank gets the same path, or the same error.
    ``claim``: a default name, made unique (``-2``, ``-3``, ...) when another run took it in the same second."""
    def prepare() -> Path:
        return ck.prepare_run_dir(ck.claim_run_dir(out_dir) if claim else out_dir, overwrite=overwrite, lock=lock)

    if not dd.enabled:
        return prepare()
    result: tuple[str, str | None] = (str(out_dir), None)
    if dd.is_main:
        try:
            result = (str(prepare()), None)
        except FinetuneError as e:
            result = (str(out_dir), str(e))
    path, error = dist_.broadcast_object(result, dd)
    if error:
        raise CheckpointError(error)
    return Path(path)


def resume_run(run_dir: Path, epochs: int | None, made: dict) -> RunState:
    """Continue ``run_dir`` from its ``last.pt`` with the recipe stored there (``epochs`` may extend it)."""
    last = run_dir / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"cannot resume: '{last}' not found; --resume takes a run directory that holds "
                              "last.pt")
    if dist_.from_env().is_main:  # one writer per run directory; then mend what a kill left
        made["lock"].acquire(run_dir)
        ck.remove_temp_files(run_dir)  # left by a write that a kill interrupted; last.pt itself is whole
        fixed = ck.repair_run(run_dir)
        if fixed:
            log.warning(f"repaired {' and '.join(fixed)} from last.pt: a stop between the writes at the end of "
                        "an epoch had left them behind")
    saved = ck.Checkpoint.from_dict(ck.load_checkpoint(last, materialize=False))  # shards: loaded sharded
    if saved.sharded:
        sharded.path_of(run_dir, saved.sharded)  # its shards are there (else one error, before anything is written)
        if dist_.from_env().is_main:  # the shards of an epoch a kill kept from being committed
            sharded.remove_stale(run_dir, saved.sharded["path"])
    data = saved.recipe
    if saved.epoch_base != 1 and data["freeze"]["schedule"]:  # written when schedules were 0-based
        data = {**data, "freeze": {**data["freeze"], "schedule": [{**s, "epoch": s["epoch"] + 1}
                                                                  for s in data["freeze"]["schedule"]]}}
    if epochs is not None:  # validated with the rest: --epochs 0 is an error, not an empty run
        data = {**data, "train": {**data["train"], "epochs": epochs}}
    cfg = from_dict(provenance.resume_recipe(saved.to_dict(), data))  # the run's data by absolute path
    if saved.epoch >= cfg.train.epochs and saved.partial:  # only --epochs can do that
        raise CheckpointError(f"cannot resume with --epochs {cfg.train.epochs}: '{run_dir}' has already trained "
                              f"{saved.epoch} epochs (and part of epoch {saved.epoch + 1}); pass --epochs N with "
                              f"N > {saved.epoch}")
    if saved.epoch >= cfg.train.epochs and not saved.partial:
        raise CheckpointError(f"nothing to resume: '{run_dir}' already finished {saved.epoch} of "
                              f"{cfg.train.epochs} epochs; pass --epochs N with N > {saved.epoch} to train longer")
    seed_everything(cfg.train.seed)
    dd, device, precision = _runtime(cfg)
    return _build(cfg, saved, dd, device, precision, run_dir)


def _runtime(cfg: Recipe) -> tuple[dist_.Dist, torch.device, str]:
    dd = dist_.from_env()  # torchrun sets RANK/WORLD_SIZE; a plain run is rank 0 of 1
    device = dist_.init(dd, resolve_device(cfg.train.device), cfg.train.dist_timeout)
    return dd, device, resolve_precision(cfg.train.precision, device)


def _build(cfg: Recipe, saved: ck.Checkpoint | None, dd, device, precision: str, run_dir: Path,
           stand_in: bool = False) -> RunState:
    """The run state: :func:`finetune.run.assemble.assemble` in the run directory (``saved``: the checkpoint a resume
    continues), then the process group's wrapping, the last.pt state, config.yaml, the step and the loaders.
    ``stand_in``: see :func:`head_only_on_stored_features` (raises NeedsBackbone when the model must be built)."""

    def check_data(bundle) -> None:  # a resume: the same val images, or the recorded best compares different things
        if saved is not None:
            provenance.check_resume(saved.to_dict(), bundle, run_dir, dd.world_size, cfg.train.batch_size)

    # scratch: a disk image cache that is not kept lives in the run dir
    parts = assemble(cfg, device=device, precision=precision, scratch=run_dir, saved=saved, check_data=check_data,
                     warn=True, stand_in=stand_in)
    cfg, model = parts.cfg, parts.model
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    st = RunState(**{f.name: getattr(parts, f.name) for f in dataclasses.fields(Parts)},
                  resolved=_resolved_recipe(cfg, parts.bb, resumed=saved is not None), dd=dd, run_dir=run_dir,
                  scaler=scaler, step=None, train_loader=None, val_loader=None, resumed=saved is not None)
    st.monitor = Monitor(cfg.train.monitor, cfg.train.monitor_mode)
    st.autotune = dwgrad.setup(model, saved.autotune if saved is not None else None, cfg=cfg, device=device,
                               precision=precision, dd=dd, input_size=parts.bundle.transform["input_size"],
                               channels_last=parts.channels_last)  # CPU bf16 depthwise backward
    if cfg.train.ema:
        from finetune.training.regularization import make_ema

        st.ema = make_ema(model, cfg.train.ema_decay)
    if saved is not None:
        _restore(st, saved)
    if cfg.train.sync_bn and dd.enabled:
        st.model = dist_.sync_batchnorm(model, device)  # same Parameters: optimizer and state_dict unchanged
    # DDP, or FSDP2 sharding the model in place (finetune/parallel/strategy.py)
    st.train_model = strategy.wrap(st.model, st.optimizer, cfg, dd, device, precision)
    if saved is not None and saved.sharded:  # each rank reads its part, at this run's world size
        sharded.load_into(st.model, st.optimizer, run_dir, saved.sharded)
    if dd.is_main:  # once last.pt's state has loaded: a failed resume leaves the run as it was
        _write_config(st)
    st.step = _make_step(st)
    _make_loaders(st)
    if is_stand_in(model):  # the features were all stored: say what building the backbone said
        for note in parts.bb.notes:
            log.warning(note)
    st.run_model = maybe_compile(st.train_model, cfg.train.compile)  # checkpoints save `model`'s own state_dict
    return st


def _write_config(st: RunState, extra: dict[str, Any] | None = None) -> None:
    """config.yaml: the resolved recipe, with what was picked on this machine as comments."""
    files.atomic_write_text(st.run_dir / "config.yaml", _yaml(st.resolved, {
        "device": str(st.device), "precision": st.precision, "channels_last": st.channels_last,
        "processes": st.dd.world_size, "classes": st.classes, **dwgrad.picked(st.autotune), **(extra or {})}))


def _restore(st: RunState, saved: ck.Checkpoint) -> None:
    """Weights, the unfreeze steps already taken, optimizer/scaler state, history and best from ``last.pt``."""

    meta = {"_path": str(st.run_dir / "last.pt"), "model_name": saved.model_name}
    if not saved.sharded:  # sharded weights and optimizer state load after the model is sharded (_build)
        ck.load_weights(st.model, saved.model, meta)
    st.start_epoch = int(saved.epoch)
    st.partial = saved.partial
    for stp in sorted(st.cfg.freeze.schedule, key=lambda s: s.epoch):
        if stp.epoch - 1 < st.start_epoch or (st.partial and stp.epoch - 1 == st.start_epoch):  # 1-based steps
            O.unfreeze_step(st.bb, st.optimizer, stp, st.cfg.optimizer)
    if not saved.sharded:
        ck.load_weights(st.optimizer, saved.optimizer, meta, "an optimizer state")
    if st.scaler is not None and saved.scaler:
        st.scaler.load_state_dict(saved.scaler)
    st.history = list(saved.metrics)
    st.best = dict(saved.best)
    if st.ema is not None and saved.ema is not None:
        st.ema.module.load_state_dict(saved.ema)
        st.best_ema = dict(saved.best_ema or st.best_ema)
    st.top_k = list(saved.top_k or [])
    st.since_best = st.history[-1]["epoch"] - st.best["epoch"] if st.history else 0  # early stop spans resumes


def _make_step(st: RunState) -> Step:
    """The full model's step, with its named collaborators: the BN policy, the LR schedule, the DDP sum, Mixup,
    the EMA update."""

    cfg, opt = st.cfg, st.optimizer
    mix, mix_loss = make_mixup(cfg, len(st.classes))
    loss_fn = imbalance.loss_fn(cfg, st.bundle.train.targets, st.classes, st.device)  # + train.class_weights
    return Step(optimizer=opt, loss_fn=loss_fn,
                device=st.device, precision=st.precision, channels_last=st.channels_last,
                accumulate=cfg.train.accumulate, clip_grad=cfg.train.clip_grad, scaler=st.scaler,
                after_train_mode=BNPolicy(cfg.freeze.bn), schedule=LRSchedule(opt, cfg.scheduler, cfg.train.epochs),
                reduce=functools.partial(dist_.all_reduce_sum, d=st.dd) if st.dd.enabled else None,
                mix=mix, mix_loss=mix_loss, after_update=EmaUpdate(st) if st.ema is not None else None)


def _make_loaders(st: RunState) -> None:
    """The image loaders (sharded per rank; batch_size is per process), then the frozen-feature cache: while it
    serves, the epochs train the head alone on features computed once. Under DDP each rank computes its shard, and
    every rank trains on all of them (same data, same seed: the same weights on every rank)."""

    cfg, b = st.cfg, st.bundle
    kw = dict(seed=cfg.train.seed, device=st.device.type, workers=cfg.data.workers,
              num_replicas=st.dd.world_size, rank=st.dd.rank)
    st.val_loader = D.make_loader(b.val, cfg.train.batch_size, shuffle=False, **kw) if b.val is not None else None
    st.train_loader = D.make_loader(b.train, cfg.train.batch_size, shuffle=True, **kw,
                                    weights=imbalance.sample_weights(cfg.data.sampler, b.train.targets,
                                                                     len(st.classes)))
    st.feats, st.feats_info = plan_cache(cfg, st.bb, b, st.step, device=st.device, precision=st.precision,
                                         channels_last=st.channels_last, start_epoch=st.start_epoch, dd=st.dd)
    if st.feats is not None:  # the head on cached features: no mixing of features; each rank has all of them
        st.feats.step = dataclasses.replace(st.feats.step, mix=None, mix_loss=None,
                                            reduce=None if st.dd.enabled else st.feats.step.reduce)


# ----------------------------------------------------------------------------------------------- the epoch loop


def fit(st: RunState, events: Callbacks) -> RunResult:
    """Train from ``st.start_epoch`` to ``train.epochs``: per epoch, the unfreeze steps due, the phase, one pass,
    evaluation, the commit of the run state, the listeners (``events``, called by hook name); stop early when
    asked."""
    events.call("on_run_start", st)
    if st.budget is not None:
        events.call("on_note", st, st.budget.sizing.note())
    try:
        for epoch in range(st.start_epoch, st.cfg.train.epochs):
            resuming = st.partial if epoch == st.start_epoch else None
            _unfreeze_due(st, epoch, resuming, events)
            phase = st.phase(epoch)
            events.call("on_epoch_start", st, epoch, phase)
            row, st.last_eval = _run_epoch(st, phase, epoch, resuming, events)
            st.commit(epoch + 1, st.last_eval, st.record(row))
            events.call("on_epoch_end", st, row)
            if st.cfg.train.early_stop and st.since_best >= st.cfg.train.early_stop:
                events.call("on_note", st, f"early stop: no better {st.monitor.key} for {st.since_best} epochs")
                break
            if st.stop_note:
                events.call("on_note", st, st.stop_note)
                break
        if st.dd.is_main:  # data with a test/ folder: best.pt on it, once, never used for selection
            st.test = holdout.evaluate_best(st.run_dir, st.cfg, st.device, st.reporter)
        if st.budget is not None:
            events.call("on_note", st, st.budget.summary())
        events.call("on_run_end", st)
    except NonFiniteLoss as e:
        kept = (f"; the last good checkpoint is in '{st.run_dir}'" if (st.run_dir / "last.pt").is_file()
                else ", before the first checkpoint (nothing was saved)")
        raise TrainingDiverged(f"training diverged: {e}{kept}; lower --lr or use --clip-grad") from None
    except KeyboardInterrupt:
        if (st.run_dir / "last.pt").is_file():
            raise Interrupted(f"interrupted; the last checkpoint is in '{st.run_dir}': continue with "
                              f"finetune train --resume {st.run_dir}") from None
        raise  # before the first checkpoint: train() removes a new run's directory
    finally:
        events.call("on_close", st)
        dist_.barrier(st.dd)  # no rank leaves (or reads a checkpoint) before rank 0 has written it
    return RunResult(st.run_dir, st.best["epoch"], st.best["val_acc"], st.history, st.classes, st.test,
                     st.budget.sizing.to_dict() if st.budget is not None else None)


def _unfreeze_due(st: RunState, epoch: int, resuming, events) -> None:
    """The (1-based) unfreeze steps of this epoch; steps before a resumed start were re-applied by _restore."""

    for stp in st.cfg.freeze.schedule:
        if stp.epoch - 1 == epoch and not resuming:
            names = O.unfreeze_step(st.bb, st.optimizer, stp, st.cfg.optimizer)
            st.rewrap()
            events.call("on_note", st, f"epoch {epoch + 1}: unfroze {', '.join(stp.layers)} ({len(names)} "
                                       f"tensors, lr x {stp.lr_mult})")


def _run_epoch(st: RunState, phase: Phase, epoch: int, resuming, events: Callbacks
               ) -> tuple[dict[str, Any], dict | None]:
    """One pass over the phase's training data and one evaluation; returns the metrics row and the evaluation."""
    resume = midepoch.enter_epoch(phase.train_loader, epoch, epoch_seed(st.cfg.train.seed, epoch), resuming,
                                  mixing=phase.step.mix is not None, dd=st.dd, summed=phase.step.reduce is not None)
    tr = train_one_epoch(phase.model, phase.train_loader, phase.step, epoch, callbacks=events, resume=resume)
    # val runs in the run's precision even on cached features (the head trains in fp32 there): the recorded
    # accuracy is what `finetune eval best.pt` computes with the full model
    ev = (evaluate(phase.eval_model, phase.val_loader, len(st.classes), device=st.device, precision=st.precision,
                   channels_last=phase.step.channels_last, label_smoothing=0.0, reporter=events,
                   reduce=phase.step.reduce, fast=st.cfg.train.fast_inference)
          if phase.val_loader is not None else None)
    row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"],
           "val_loss": ev["loss"] if ev else None, "val_acc": ev["accuracy"] if ev else None,
           "lr": tr["lr"], "lrs": tr["lrs"], "seconds": tr["seconds"], "images_per_sec": tr["images_per_sec"]}
    if ev:  # beside accuracy: what a majority-class guess can't inflate (finetune/training/imbalance.py)
        row.update(val_f1=ev["macro_f1"], val_balanced_acc=ev["balanced_accuracy"])
    if ev and ev["top5"] is not None:
        row["val_top5"] = ev["top5"]
    if st.ema is not None and st.val_loader is not None:  # the average of the full model, on the val images
        ee = evaluate(st.ema.module, st.val_loader, len(st.classes), device=st.device, precision=st.precision,
                      channels_last=st.channels_last, reporter=events, reduce=st.step.reduce,
                      fast=st.cfg.train.fast_inference)
        row.update(ema_val_loss=ee["loss"], ema_val_acc=ee["accuracy"], ema_val_f1=ee["macro_f1"])
    return row, ev


def _resolved_recipe(cfg: Recipe, bb, resumed: bool = False) -> Recipe:
    """``cfg`` as it ran. A resumed run's model was built without weights (last.pt replaces them): its recipe
    already names the original weights, and keeps naming them through any number of resumes."""
    r = from_dict(cfg.to_dict())
    if not resumed:
        r.model.weights = cfg.model.weights if cfg.model.weights == "default" else bb.weights
    r.model.num_classes = bb.num_classes
    return r  # device/precision stay as asked ("auto" travels to a GPU box); config.yaml notes what was picked


def _yaml(recipe: Recipe, picked: dict[str, Any]) -> str:
    import yaml

    notes = "".join(f"#   {k}: {v}\n" for k, v in picked.items())
    return ("# the resolved configuration of this run: finetune train --recipe THIS_FILE reruns it\n"
            "# picked on this machine (the 'auto' values below are resolved again where it reruns):\n" + notes
            + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
