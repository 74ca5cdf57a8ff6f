"""The run's listeners: the progress adapter, TensorBoard (the report is the reporting layer's callback).

Every listener is a :class:`Callback` (:mod:`finetune.training.events`: the hooks, and when each is called), called by
name through a :class:`Callbacks` dispatcher: the epoch loop (:mod:`finetune.run.runner`) calls the run-level hooks
with the run's state, ``train_one_epoch`` and ``evaluate`` the batch-level ones. A :class:`Reporter` (the older
progress shape) is adapted by :class:`ReporterCallback`. Only rank 0 of a distributed run gets these listeners;
the mid-epoch saves (:class:`finetune.run.midepoch.MidEpochSaves`) listen on every rank.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from finetune.parallel.strategy import uses_fsdp
from finetune.training.events import Callback, Callbacks, Reporter, ReporterHooks  # noqa: F401 - re-exported
from finetune import data as D

log = logging.getLogger("finetune")


class ReporterCallback(ReporterHooks):
    """A :class:`~finetune.training.events.Reporter` as a listener: the run-level hooks become its ``start``/``note``/
    ``epoch_start``/``epoch_end``/``end`` calls, the batch-level ones its ``batch``/``update``/``eval_*`` methods."""

    def on_run_start(self, run):
        self.reporter.start(run.summary())
        if run.feats is not None:
            self.reporter.note(run.feats.note)
        elif run.cfg.train.cache_features != "off":
            self.reporter.note(f"frozen-feature cache {run.feats_info}")

    def on_epoch_start(self, run, epoch, phase):
        self.reporter.epoch_start(epoch, run.cfg.train.epochs, len(phase.train_loader))

    def on_note(self, run, message):
        self.reporter.note(message)

    def on_epoch_end(self, run, row):
        self.reporter.epoch_end(row)

    def on_run_end(self, run):
        self.reporter.end({"run_dir": str(run.run_dir), "best": run.best, "epochs": run.history})


class TensorBoard(Callback):
    """Scalars per epoch (loss, accuracy, LR per group, images/s), the first training batch and the model graph
    (the tutorial's ``add_images``/``add_graph``), and the hyper-parameters with the best accuracy at the end."""

    SCALARS = (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("train_acc", "accuracy/train"),
               ("val_acc", "accuracy/val"), ("val_f1", "f1/val"), ("lr", "lr"), ("images_per_sec", "images_per_sec"),
               ("ema_val_acc", "accuracy/val_ema"), ("ema_val_loss", "loss/val_ema"))

    def __init__(self, log_dir, log_every: int | None = None, figures=None):
        """``figures(writer, evaluation, val_dataset, classes, step)`` adds the epoch's pictures (the reporting
        layer's confusion matrix and mistakes; :func:`finetune.reporting.report.log_tensorboard`)."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.figures = figures
        self.first_batch_logged = False
        self.steps = StepScalars(self.writer, log_every) if log_every else None

    def on_run_start(self, run):
        self.first_batch_logged = run.start_epoch > 0

    def on_epoch_start(self, run, epoch, phase):
        if self.first_batch_logged:
            return

        D.set_epoch(run.train_loader, epoch)
        self.log_first_batch(run)
        self.first_batch_logged = True

    def on_epoch_end(self, run, row):
        step = row["epoch"]
        for key, tag in self.SCALARS:
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], step)
        for name, lr in (row.get("lrs") or {}).items():  # each group's LR at the epoch's first update
            self.writer.add_scalar("lr_group/" + name.replace(" ", "_"), lr, step)
        if self.figures is not None:  # confusion matrix, mistakes
            self.figures(self.writer, run.last_eval, run.bundle.val, run.classes, step)

    def on_run_end(self, run):
        cfg = run.resolved
        hp = {"model": cfg.model.name, "weights": cfg.model.weights, "optimizer": cfg.optimizer.name,
              "lr": cfg.optimizer.lr, "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
              "scheduler": cfg.scheduler.name, "precision": cfg.train.precision, "bn": cfg.freeze.bn}
        last = run.history[-1] if run.history else {}
        best = run.best["val_acc"]
        metrics = {"hparam/best_val_acc": best if best is not None else 0.0,
                   "hparam/final_train_loss": last.get("train_loss") or 0.0}
        self.writer.add_hparams(hp, metrics, run_name="hparams")

    def on_close(self, run):
        self.writer.flush()
        self.writer.close()

    def log_first_batch(self, run) -> None:
        """The first training batch, un-normalized; and the model graph (``train.graph``)."""
        try:
            x, _ = next(iter(run.train_loader))
        except StopIteration:
            return
        tf = run.bundle.transform
        mean = torch.tensor(tf.get("mean", (0.0, 0.0, 0.0))).view(1, -1, 1, 1)
        std = torch.tensor(tf.get("std", (1.0, 1.0, 1.0))).view(1, -1, 1, 1)
        self.writer.add_images("train/first_batch", (x[:32].float() * std + mean).clamp(0, 1), 0)
        if run.cfg.train.graph and not uses_fsdp(run.cfg, run.dd):  # FSDP: a forward on rank 0 alone would hang
            self.log_graph(run.model, x[:1].to(run.device), run.channels_last)

    def log_graph(self, model, sample: torch.Tensor, channels_last: bool) -> None:
        was = model.training
        try:
            model.eval()
            if channels_last:
                sample = sample.contiguous(memory_format=torch.channels_last)
            with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
                warnings.simplefilter("ignore")
                self.writer.add_graph(model, sample)
        except Exception as e:  # noqa: BLE001 - some models don't trace; the graph is optional
            log.warning(f"TensorBoard graph skipped: the model does not trace ({type(e).__name__}); "
                        "leave --graph off (train.graph: false) to silence this")
        finally:
            model.train(was)


class StepScalars(Callback):
    """``train.log_every`` N: every N-th optimizer update (counted over the run), the update's loss, each group's LR
    and the epoch's images/s so far, under ``step/`` with the update count as the step."""

    def __init__(self, writer, every: int):
        self.writer, self.every = writer, every

    def on_update(self, info: dict[str, Any]) -> None:
        n = info["update"]
        if n % self.every:
            return
        self.writer.add_scalar("step/loss", float(info["loss"]), n)  # the one read of the loss: every N updates
        self.writer.add_scalar("step/images_per_sec", info["images_per_sec"], n)
        for name, lr in info["lrs"].items():
            self.writer.add_scalar("step/lr_group/" + name.replace(" ", "_"), lr, n)
