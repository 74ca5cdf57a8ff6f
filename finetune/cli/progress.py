"""The CLI's progress, a run listener (:class:`finetune.api.Callback`): rich progress bars on a terminal, plain
lines otherwise (a log file, a CI job, ``nohup``): one line per epoch and, within an epoch, a progress line with
its ETA every :data:`PROGRESS_SECONDS`; nothing with --quiet. Everything goes to stderr; the final table of epochs
goes to stdout (it is the command's result)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from finetune.api import Callback, shown
from finetune.cli.render import term


PROGRESS_SECONDS = 30.0  # without a terminal: seconds between two progress lines (env FINETUNE_PROGRESS_SECONDS)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pct_pm(acc: float, n: int | None) -> str:
    """``"96.7% ± 2.4 (95%, 240 val images)"``: the accuracy and the noise of its ``n`` val images (#30 item 3)."""
    from finetune.api import pm_text

    pm = pm_text(acc, n)
    return _pct(acc) + (f" {pm} (95%, {n} val images)" if pm else "")


def duration(seconds: float) -> str:
    """``45s``, ``4m10s``, ``1h05m``: an ETA at the precision it has."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(images_per_sec: float) -> str:
    return f"{images_per_sec:.1f}" if images_per_sec < 10 else f"{images_per_sec:.0f}"


def progress_seconds() -> float:
    """:data:`PROGRESS_SECONDS`, or ``$FINETUNE_PROGRESS_SECONDS`` where set."""
    from finetune.api import ConfigError

    raw = os.environ.get("FINETUNE_PROGRESS_SECONDS")
    if raw is None or not raw.strip():
        return PROGRESS_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"FINETUNE_PROGRESS_SECONDS must be a positive number of seconds, got '{raw}'")
    return value


class RichReporter(Callback):
    """The run's hooks as the CLI's output. ``note(message)`` is also what the run's other writers (the test split,
    the report) print their one line with."""

    def __init__(self, quiet: bool = False, console: Console | None = None, *, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self.err = console or Console(stderr=True, emoji=False)  # ":x:" in a name prints as written
        self.live = self.err.is_terminal and not quiet
        self.progress = None
        self.task = None
        self.every = progress_seconds() if every is None else every  # plain lines: seconds between two
        self.clock = clock
        self.epoch, self.epochs = 0, 0
        self._last_line = 0.0
        self._epoch_t0 = 0.0
        self._first_batch: int | None = None  # this session's first batch of the epoch (a resume starts mid-way)
        self._phase = ""
        self._later: list[str] = []  # the phase of each epoch after this one
        self._seconds: dict[str, list[float]] = {}  # phase -> wall seconds of its finished epochs (with validation)
        self._val_images: int | None = None  # the run's val count, for the interval beside the best accuracy

    # -- lifecycle
    def on_run_start(self, run: Any) -> None:
        self.start(run.summary())
        if run.feats is not None:
            self.note(run.feats.note)
        elif run.cfg.train.cache_features != "off":
            self.note(f"frozen-feature cache {run.feats_info}")

    def start(self, info: dict[str, Any]) -> None:
        self._val_images = info.get("val_images") or None
        if self.quiet:
            return
        n_bad = info.get("skipped") or 0
        skipped = f", {n_bad} unreadable file{'s' * (n_bad != 1)} skipped" if n_bad else ""
        self.err.print(
            f"run: {term(info['run_dir'])}\n"
            + (f"recipe: {term(info['recipe'])}" + (f" ({term(info['description'])})" if info.get("description")
                                                    else "") + "\n"
               if info.get("recipe") else "")
            + f"model: {term(info['model'])} (weights: {term(info['weights'])}), "
            f"{info['trainable']:,} of {info['total']:,} parameters trainable\n"
            f"data: {term(info['source'])}: {info['train_images']} train / {info['val_images']} val images, "
            f"{len(info['classes'])} classes{skipped}\n"
            f"device: {info['device']}, precision: {info['precision']}, channels_last: {info['channels_last']}"
            + (f"\nprocesses: {info['world_size']} ({info.get('strategy', 'DDP')}), global batch {info['global_batch']}"
               if info.get("world_size", 1) > 1 else "")
            + (f"\nresuming at epoch {info['start_epoch'] + 1} of {info['epochs']}" if info["start_epoch"] else ""),
            highlight=False, soft_wrap=True)

    def on_epoch_start(self, run: Any, epoch: int, phase: Any) -> None:
        self.epoch, self.epochs, batches = epoch, run.cfg.train.epochs, len(phase.train_loader)
        self._epoch_t0 = self._last_line = self.clock()
        self._first_batch = None
        self._phase = getattr(phase, "name", "")
        feats = getattr(run, "feats", None)  # the cached head serves until the first unfreeze, then the full model
        until = feats.until if feats is not None and self._phase == "cached head" else self.epochs
        self._later = [self._phase if e < until else "full model" for e in range(epoch + 1, self.epochs)]
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), console=self.err, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("train", total=batches, epoch=f"{epoch + 1}/{self.epochs}", info="")

    def on_train_batch_end(self, i: int, batches: int, loss: float, acc: float, images_per_sec: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=i + 1,
                                 info=f"loss {loss:.4f} acc {_pct(acc)} {_rate(images_per_sec)} img/s")
            return
        if self.quiet:
            return
        if self._first_batch is None:
            self._first_batch = i
        now = self.clock()
        if now - self._last_line < self.every or i + 1 == batches:  # validation, then the epoch's row, come next
            return
        self._last_line = now
        print(f"epoch {self.epoch + 1}/{self.epochs}  batch {i + 1}/{batches} ({100 * (i + 1) // batches}%)  "
              f"loss {loss:.4f}  acc {_pct(acc)}  {_rate(images_per_sec)} img/s  {self.eta(i, batches, now)}",
              file=sys.stderr, flush=True)

    def eta(self, i: int, batches: int, now: float) -> str:
        """``ETA epoch 4m10s, run 18m02s`` after batch ``i``: this epoch's rest at its pace so far; the run's adds
        each later epoch at the mean wall time of the finished epochs of its phase (while none has finished, this
        epoch's batches at its pace so far). Without a measure for a later phase (the full model after the cached head),
        the run's ETA is left out."""
        per_batch = (now - self._epoch_t0) / max(i + 1 - (self._first_batch or 0), 1)
        left = (batches - i - 1) * per_batch
        text = f"ETA epoch {duration(left)}"
        run_left = left
        for phase in self._later:
            past = self._seconds.get(phase)
            if past:
                run_left += sum(past) / len(past)
            elif phase == self._phase:
                run_left += batches * per_batch
            else:
                return text
        return text + (f", run {duration(run_left)}" if self._later else "")

    def on_eval_start(self, batches: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, info="validating...")

    def on_eval_batch(self, i: int, batches: int) -> None:
        if self.progress is not None or self.quiet or not self.epochs or i + 1 == batches:  # the row comes next
            return
        now = self.clock()
        if now - self._last_line >= self.every:
            self._last_line = now
            print(f"epoch {self.epoch + 1}/{self.epochs}  validating: batch {i + 1}/{batches} "
                  f"({100 * (i + 1) // batches}%)", file=sys.stderr, flush=True)

    def on_epoch_end(self, run: Any, row: dict[str, Any]) -> None:
        self._seconds.setdefault(self._phase, []).append(self.clock() - self._epoch_t0)
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.quiet:
            return
        star = " *" if row.get("best") else ""
        val = "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        print(f"epoch {row['epoch']}/{self.epochs}  train loss {row['train_loss']:.4f} acc {_pct(row['train_acc'])}"
              f"  val loss {val} acc {_pct(row['val_acc'])}  lr {row['lr']:.3g}  {row['seconds']:.1f}s "
              f"{row['images_per_sec']:.0f} img/s{star}", file=sys.stderr, flush=True)

    def on_note(self, run: Any, message: str) -> None:
        self.note(message)

    def note(self, message: str) -> None:
        if not self.quiet:  # notes name paths: control characters escaped, line by line
            print("\n".join(shown(line) for line in str(message).split("\n")), file=sys.stderr, flush=True)

    def on_run_end(self, run: Any) -> None:
        if not self.quiet:
            self.table({"run_dir": str(run.run_dir), "best": run.best, "epochs": run.history,
                        "val_images": self._val_images})

    def table(self, summary: dict[str, Any]) -> None:
        t = Table(title="epochs", title_justify="left")
        for col in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr", "s", "img/s"):
            t.add_column(col, justify="right")
        for r in summary["epochs"]:
            mark = " *" if r["epoch"] == summary["best"]["epoch"] else ""
            t.add_row(f"{r['epoch']}{mark}", f"{r['train_loss']:.4f}", _pct(r["train_acc"]),
                      "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}", _pct(r["val_acc"]),
                      f"{r['lr']:.3g}", f"{r['seconds']:.1f}", f"{r['images_per_sec']:.0f}")
        out = Console(emoji=False)
        out.print(t)
        best = summary["best"]
        what = (f"val acc {_pct_pm(best['val_acc'], summary.get('val_images'))}" if best["val_acc"] is not None
                else "no val set, so best.pt is the last epoch")
        out.print(f"best: epoch {best['epoch']}, {what}; checkpoints and TensorBoard logs in "
                  f"{term(summary['run_dir'])}", highlight=False, soft_wrap=True)
