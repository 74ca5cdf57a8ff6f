"""Time budgets (``finetune train --budget 10m``, ``finetune auto``): measure how fast this machine trains and
evaluates the run's model, size the epochs so that the run ends inside the budget, and stop on schedule should it
still run slower than measured.

How a run uses its budget:

1. **Measure.** Once the run is built (data listed, features computed or read from the store), :func:`measure`
   times the model in the state of its fine-tuning phase: an inference pass and a training step (forward +
   backward, the parameters that train once every unfreeze step has run) on a batch of random images of the run's
   input size, in the run's precision and memory format. The weights, their ``requires_grad``, the modules'
   train/eval modes and every random generator are left as they were: the run is bitwise the one it would be
   without ``--budget`` and the same epoch count.
2. **Size.** :func:`plan_epochs` estimates each epoch (an epoch on cached features: a second; a full-model epoch:
   ``train images / training img/s + val images / inference img/s``, plus its checkpoint writes) and the end (the
   test split, the report) and keeps the largest number of epochs, up to the recipe's, that ends inside the
   budget, counting what the command already spent. The recipe's epochs become that number *before* the first
   update, so the LR schedule is the one of a run of that length (compressed, not cut), and ``config.yaml``
   reruns it.
3. **Guard.** :class:`Guard` watches the epochs: when the next epoch, at the pace of the last one, would end past
   the budget, the run stops after the epoch it finished (best.pt stays the best so far; ``--resume`` can go on).

The budget is a ceiling: a recipe that ends early is not stretched (a longer schedule is a different recipe; pass
``--epochs``). One process only (``--nproc`` with ``--budget`` is an error).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune.config.preflight import budget_text
from finetune.errors import ConfigError

CACHED_EPOCH_SECONDS = 1.0  # an epoch of the head on cached features, with its evaluation (measured: 0.1-0.6 s)
EPOCH_OVERHEAD_SECONDS = 2.0  # per epoch: last.pt and best.pt writes, metrics, TensorBoard
END_SECONDS = 3.0  # after the last epoch, besides the test split: the report, the summary


@dataclass
class Throughput:
    """Images per second on this machine: ``forward`` (inference, eval mode) and ``train`` (forward + backward of
    the fine-tuning phase's trainable parameters), each with reading the images (decode and transform, measured on
    the data set) counted in; ``batch`` images per measured call; ``seconds`` spent measuring."""

    forward: float
    train: float
    batch: int
    seconds: float

    def with_loading(self, train_load: float | None, val_load: float | None, overlap: int = 0) -> Throughput:
        """The rates once each image must also be read at ``*_load`` images/s: one after the other (``overlap``
        0: the CPU does both), or ``overlap`` loader processes in parallel with the device's compute."""
        def both(compute: float, load: float | None) -> float:
            if not load:
                return compute
            if overlap:
                return min(compute, load * overlap)
            return 1.0 / (1.0 / compute + 1.0 / load)

        return dataclasses.replace(self, forward=both(self.forward, val_load), train=both(self.train, train_load))


def measure(model, input_size, *, device, precision: str, channels_last: bool, batch: int,
            train_names: set[str], min_seconds: float = 1.0) -> Throughput:
    """Time an inference pass and a training step of ``model`` on ``batch`` random images of ``input_size``
    (C, H, W), with ``train_names`` (parameter names) trainable; nothing about the model or any generator changes."""
    import torch

    from finetune.training.engine import autocast

    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    modes = [(m, m.training) for m in model.modules()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *input_size), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(x)

    def train_step() -> None:
        with autocast(device, precision):
            out = model(x)
        out.float().logsumexp(1).mean().backward()

    try:
        model.eval()
        for n, p in params.items():
            p.requires_grad_(n in train_names)
        fwd = _rate(forward, batch, device, min_seconds)
        trn = _rate(train_step, batch, device, min_seconds)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
        for m, mode in modes:
            m.training = mode
    return Throughput(fwd, trn, batch, time.perf_counter() - t0)


def load_rate(dataset, samples: int = 12) -> float | None:
    """Images/s at which ``dataset`` reads images (decode, augment): ``samples`` spread over it, every random
    generator restored afterwards (augmentation draws from them); None for an empty or non-indexable data set."""
    import random

    import numpy as np
    import torch

    try:
        n = len(dataset)
    except TypeError:  # a stream (tar shards)
        return None
    if n == 0:
        return None
    idx = sorted({i * n // samples for i in range(min(samples, n))})
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            dataset[idx[0]]  # warm-up: the first read opens files and builds the transform
            t0 = time.perf_counter()
            for i in idx:
                dataset[i]
            elapsed = time.perf_counter() - t0
        finally:
            random.setstate(py)
            np.random.set_state(npy)
    return len(idx) / max(elapsed, 1e-9)


def _rate(fn: Callable[[], None], batch: int, device, min_seconds: float) -> float:
    """Images/s of ``fn`` after one warm-up call: as many calls as fit in ``min_seconds`` (at least one)."""
    import torch

    def sync() -> None:
        if getattr(device, "type", str(device)) == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        sync()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or calls >= 50:
            return batch * calls / max(elapsed, 1e-9)


@dataclass
class Sizing:
    """What fits: ``epochs`` of the ``asked``, from the estimated cost of each epoch and the end."""

    budget: float
    spent: float  # already used by the command when the run was sized
    asked: int
    epochs: int
    epoch_seconds: list[float]  # the estimate of each of the asked epochs
    end_seconds: float
    throughput: Throughput | None  # None: every epoch trains a head on cached features

    @property
    def estimate(self) -> float:
        return self.spent + sum(self.epoch_seconds[:self.epochs]) + self.end_seconds

    def note(self) -> str:
        """One line for the run's start: how the budget was used."""
        tp = self.throughput
        pace = ("every epoch trains the head on cached features" if tp is None else
                f"a full-model epoch ~{budget_text(max(self.epoch_seconds))} at {tp.train:.3g} img/s training, "
                f"{tp.forward:.3g} img/s inference, measured")
        fit = (f"all {self.asked} epochs fit" if self.epochs == self.asked else
               f"{self.epochs} of the recipe's {self.asked} epochs fit (the LR schedule spans {self.epochs})")
        return (f"budget {budget_text(self.budget)}: {fit} ({pace}); expected to end after "
                f"~{budget_text(self.estimate)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["estimate"] = self.estimate
        return d


def plan_epochs(budget: float, spent: float, asked: int, *, n_train: int, n_val: int, n_test: int,
                throughput: Throughput | None, cached_epochs: int) -> Sizing:
    """The largest number of epochs (up to ``asked``) whose estimate, with what is ``spent``, ends inside ``budget``.
    The first ``cached_epochs`` train a head on cached features; the others run the full model."""
    costs = []
    for e in range(asked):
        if e < cached_epochs or throughput is None:
            costs.append(CACHED_EPOCH_SECONDS + EPOCH_OVERHEAD_SECONDS)
        else:
            costs.append(n_train / throughput.train + n_val / throughput.forward + EPOCH_OVERHEAD_SECONDS)
    end = END_SECONDS + (n_test / throughput.forward if throughput is not None and n_test else 0.0)
    epochs = 0
    while epochs < asked and spent + sum(costs[:epochs + 1]) + end <= budget:
        epochs += 1
    return Sizing(budget, spent, asked, epochs, costs, end, throughput)


class BudgetTooShort(ConfigError):
    """Fewer epochs fit than the caller needs (``min_epochs``); ``fits`` says how many did."""

    fits = ""


def too_short(s: Sizing, min_epochs: int = 1) -> ConfigError:
    """The error for a budget that leaves fewer than ``min_epochs`` epochs."""
    if min_epochs > 1:
        e = BudgetTooShort(f"--budget {budget_text(s.budget)} holds {s.epochs} of the {min_epochs} epochs this run "
                           f"needs at least (a full-model epoch ~{budget_text(max(s.epoch_seconds))} here)")
        e.fits = (f"only {s.epochs} epoch{'s' * (s.epochs != 1)} fit the {budget_text(s.budget - s.spent)} left "
                  f"(a fine-tuning epoch ~{budget_text(max(s.epoch_seconds))})")
        return e
    need = s.spent + s.epoch_seconds[0] + s.end_seconds
    return BudgetTooShort(f"--budget {budget_text(s.budget)} is too short for one epoch: {budget_text(s.spent)} went "
                          f"to setting up and one epoch takes ~{budget_text(s.epoch_seconds[0])} here; give --budget "
                          f"{budget_text(need * 1.1 + 1)} or more, or fewer images")


class Guard:
    """Stops a run after the epoch whose successor, at its pace, would end past the deadline (a callback)."""

    def __init__(self, sizing: Sizing, started: float):
        self.sizing, self.started = sizing, started
        self.deadline = started + sizing.budget
        self.t_epoch: float | None = None
        self.stopped_after: int | None = None

    def on_epoch_start(self, run, epoch: int, phase) -> None:
        self.t_epoch = time.monotonic()

    def on_epoch_end(self, run, row: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.t_epoch is None or row["epoch"] >= run.cfg.train.epochs:
            return
        nxt = row["epoch"]  # 0-based index of the next epoch
        est = self.sizing.epoch_seconds[nxt] if nxt < len(self.sizing.epoch_seconds) else 0.0
        pace = max(now - self.t_epoch, est)  # the estimate, or the last epoch's pace when that was slower
        if now + pace + self.sizing.end_seconds > self.deadline:
            self.stopped_after = row["epoch"]
            run.stop_note = (f"budget: stopped after epoch {row['epoch']} of {run.cfg.train.epochs}: the next epoch "
                             f"(~{budget_text(pace)}) would end past the {budget_text(self.sizing.budget)} budget; "
                             f"best.pt is the best epoch so far (continue with finetune train --resume "
                             f"{run.run_dir})")

    def summary(self) -> str:
        used = time.monotonic() - self.started
        over = used - self.sizing.budget
        how = f"{budget_text(-over)} to spare" if over <= 0 else f"over by {budget_text(over)}"
        return f"budget {budget_text(self.sizing.budget)}: used {budget_text(used)} ({how})"


def count_images(folder: Path | None) -> int:
    """Image files under ``folder`` (0 for None)."""
    if folder is None:
        return 0
    from finetune.data.images import is_image_file

    return sum(1 for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p))


def size_run(st, budget: float, started: float, min_epochs: int = 1) -> Sizing:
    """Measure ``st``'s model, size its epochs to ``budget`` (seconds since ``started``, ``time.monotonic()``), and
    apply the size to the run before its first update: the recipe, the LR schedule, the feature cache's span."""
    from finetune.models.stand_in import is_stand_in
    from finetune.run.holdout import test_folder
    from finetune.training import freeze as F

    cfg, bb = st.cfg, st.bb
    cached = st.feats.until if st.feats is not None else 0
    tp = None
    if not is_stand_in(st.model) and cached < cfg.train.epochs:
        names = {n for n, p in st.model.named_parameters() if p.requires_grad}
        for stp in cfg.freeze.schedule:
            names.update(F.select_unfreeze(bb, stp.layers))
        batch = cfg.train.batch_size if st.device.type == "cuda" else min(cfg.train.batch_size, 16)
        tp = measure(st.model, st.bundle.transform["input_size"], device=st.device, precision=st.precision,
                     channels_last=st.channels_last, batch=batch, train_names=names)
        # reading the images: on the CPU it takes turns with the compute; a GPU computes while loaders read
        workers = st.train_loader.num_workers if st.device.type == "cuda" else 0
        tp = tp.with_loading(load_rate(st.bundle.train),
                             load_rate(st.bundle.val) if st.bundle.val is not None else None, overlap=workers)
    n_val = len(st.bundle.val) if st.bundle.val is not None else 0
    sizing = plan_epochs(budget, time.monotonic() - started, cfg.train.epochs, n_train=len(st.bundle.train),
                         n_val=n_val, n_test=count_images(test_folder(cfg.data.path)), throughput=tp,
                         cached_epochs=cached)
    if sizing.epochs < min(min_epochs, cfg.train.epochs):
        raise too_short(sizing, min_epochs)
    if sizing.epochs < cfg.train.epochs:
        st.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=sizing.epochs))
        st.resolved.train.epochs = sizing.epochs
        st.step.schedule.total = sizing.epochs  # shared with the cached head's step
        if st.feats is not None:
            st.feats.until = min(st.feats.until, sizing.epochs)
    return sizing
