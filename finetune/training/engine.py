"""Training and evaluation: the tutorial's loop done properly.

``model.train()`` then the BN policy, forward, CrossEntropyLoss, ``zero_grad``, backward, step — over the
trainable parameters only; evaluation under ``model.eval()`` and ``torch.inference_mode()``, accuracy by argmax.
Nothing here prints: progress goes to the callbacks' batch-level hooks (:mod:`finetune.training.events`; the CLI's
draw rich bars; none: silent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from finetune.config import SchedulerCfg
from finetune.errors import ConfigError
from finetune.training.events import Callback, Callbacks, Reporter, as_callbacks  # noqa: F401 - Reporter: its old home
from finetune.training.freeze import apply_bn_policy
from finetune.training.metrics import confusion_metrics, confusion_update
from finetune.models.fold import FastInference

# ----------------------------------------------------------------------------------------------- device, precision


def resolve_device(name: str = "auto") -> torch.device:
    """auto = cuda > mps > cpu; asking for a device that isn't there is a user error."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but CUDA is not available (no NVIDIA GPU or a CPU-only torch "
                          "build); use --device auto or cpu")
    if name == "mps" and not has_mps:
        raise ConfigError("--device mps was requested but MPS is not available (Apple silicon only); use --device "
                          "auto or cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or mps")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 matmuls/convs are faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(name: str, device: torch.device) -> str:
    """auto = bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def wants_channels_last(model: nn.Module, setting: bool | None) -> bool:
    """Conv nets run faster in channels_last on modern CPUs and GPUs; transformers don't care."""
    if setting is not None:
        return setting
    if hasattr(model, "has_conv"):  # a stand-in for a stored backbone (finetune/models/stand_in.py)
        return bool(model.has_conv)
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when ``enabled`` (opt-in: the first batches pay the compile time), else ``model``.

    The compiled wrapper shares the parameters; save ``model.state_dict()``, not the wrapper's (``_orig_mod.``).
    """
    return torch.compile(model) if enabled else model


# ----------------------------------------------------------------------------------------------- LR schedule


def lr_factor(cfg: SchedulerCfg, t: float, total: float, base_lr: float = 1.0, dt: float = 0.0) -> float:
    """Multiplier on each group's ``base_lr`` for the update that starts at ``t`` of ``total`` epochs.

    ``t`` is the position where the update's interval *starts* (update k of K per epoch: ``epoch + k / K``), the
    convention of PyTorch's LambdaLR stepped per update and of timm's per-update schedulers: the first update uses
    the base LR (or the first warm-up value) and the last one of a cosine run is still above ``min_lr``. ``dt`` is the
    length of one update in epochs (``1 / K``): linear warm-up over ``warmup_epochs`` gives update k the factor
    ``(t + dt) / warmup`` (``(k + 1) / W`` in updates), so it starts above 0 and reaches 1 at its last update
    (onecycle: 30% of the run when no warm-up is given). After it: constant, step (``gamma`` every ``step_size``
    epochs), or cosine to ``min_lr``. Computed from the position alone, so parameter groups added by an unfreeze
    and resumed runs follow the same curve.
    """
    warm = cfg.warmup_epochs or (0.3 * total if cfg.name == "onecycle" else 0.0)
    if warm and t < warm:
        return min(max((t + dt) / warm, 1e-3), 1.0)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** math.floor(t / max(cfg.step_size, 1))
    floor = cfg.min_lr / base_lr if base_lr else 0.0
    if cfg.name == "onecycle":
        floor = min(floor, 1e-4)
    span = max(total - warm, 1e-8)
    progress = min(max((t - warm) / span, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, cfg: SchedulerCfg, t: float, total: float, dt: float = 0.0) -> float:
    """Apply the schedule to every group (``lr = base_lr x factor``) for the update starting at ``t`` (see
    :func:`lr_factor`); returns the largest LR."""
    top = 0.0
    for g in optimizer.param_groups:
        base = g.get("base_lr", g["lr"])
        g.setdefault("base_lr", base)
        g["lr"] = base * lr_factor(cfg, t, total, base_lr=base, dt=dt)
        top = max(top, g["lr"])
    return top


def updates_per_epoch(n_batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``n_batches`` micro-batches (a last partial accumulation group steps too)."""
    return max(1, -(-n_batches // max(accumulate, 1)))


# ----------------------------------------------------------------------------------------------- loops


@dataclass
class Step:
    """What the train loop needs besides the model and data: the optimizer and loss, where and how it runs, and the
    loop's named collaborators, each optional:

    - ``after_train_mode(model)``: the BN policy, applied after every ``.train()`` (:class:`BNPolicy`)
    - ``schedule(t, dt)``: sets every group's LR for the update starting at ``t`` epochs, of length ``dt``; returns
      the largest (:class:`LRSchedule`)
    - ``reduce(tensor)``: sums a tensor over the DDP ranks (``all_reduce``)
    - ``mix(x, y)`` and ``mix_loss``: timm's Mixup/CutMix and the loss on its soft targets
    - ``after_update(n)``: after each optimizer update, with the run's update count (:class:`EmaUpdate`)
    """

    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    accumulate: int = 1
    clip_grad: float | None = None
    scaler: Any = None  # torch.amp.GradScaler for fp16
    after_train_mode: Callable[[nn.Module], None] = lambda m: None
    schedule: Callable[[float, float], float] | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    mix_loss: nn.Module | None = None
    after_update: Callable[[int], None] | None = None


@dataclass
class LRSchedule:
    """``scheduler`` over a run of ``total`` epochs, applied to ``optimizer``'s groups (:func:`set_lr`)."""

    optimizer: torch.optim.Optimizer
    cfg: SchedulerCfg
    total: float

    def __call__(self, t: float, dt: float) -> float:
        return set_lr(self.optimizer, self.cfg, t, self.total, dt)


@dataclass
class BNPolicy:
    """``freeze.bn`` applied after ``model.train()`` (:func:`finetune.training.freeze.apply_bn_policy`)."""

    policy: str

    def __call__(self, model: nn.Module) -> None:
        apply_bn_policy(model, self.policy)


@dataclass
class EmaUpdate:
    """The weight average (timm's ModelEmaV3, ``run.ema``) moves toward ``run.model`` after each update."""

    run: Any

    def __call__(self, n: int) -> None:
        self.run.ema.update(self.run.model, step=n)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    nb = device.type == "cuda"
    x = x.to(device, non_blocking=nb)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=nb)


def train_one_epoch(model: nn.Module, loader: Iterable, step: Step, epoch: int,
                    reporter: Reporter | None = None, *, resume: dict[str, Any] | None = None,
                    on_step: Callable[[dict[str, Any]], None] | None = None,
                    callbacks: Callbacks | Iterable[Callback] | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, argmax accuracy, images, seconds, images/s, ``lr``: the LR the
    epoch's first optimizer step applied (the largest across groups, as timm logs it) and ``lrs``: that step's LR
    per parameter group (by group name).

    ``callbacks`` get the batch-level hooks (:mod:`finetune.training.events`): ``on_train_batch_end``, ``on_update``,
    ``on_save_point``; ``reporter`` (a :class:`Reporter`) and ``on_step`` (a save-point function) are the older
    shapes of the same. ``resume`` continues an epoch saved mid-way: ``{"batches", "loss_sum", "correct", "seen"}``
    from an ``on_save_point`` call; the loader must then yield only the remaining batches
    (``data.set_epoch(loader, e, skip)``), while ``len(loader)`` stays the full epoch's count.
    """
    events = as_callbacks(callbacks, reporter, on_step)
    batch_end, update_end, save_point = (events.hook(h) for h in ("on_train_batch_end", "on_update", "on_save_point"))
    model.train()
    step.after_train_mode(model)
    n_batches, acc = len(loader), step.accumulate  # type: ignore[arg-type]
    pos = EpochProgress.resumed(resume, step.device)
    n_updates = updates_per_epoch(n_batches, acc)
    lr = max((g["lr"] for g in step.optimizer.param_groups), default=0.0)
    t0, seen0 = time.perf_counter(), pos.sums.seen
    step.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader, start=pos.batches):
        x, y = to_device(x, y, step.device, step.channels_last)
        last = i + 1 == n_batches
        sync = (i + 1) % acc == 0 or last
        logits, loss = forward_backward(model, x, y, step, sync, (epoch, i))
        if sync:  # update k of K in this epoch trains at the schedule's value at epoch + k / K
            k = i // acc
            lr = _update(step, pos, epoch + k / n_updates, 1.0 / n_updates, epoch * n_updates + k + 1, lr)
        pos.sums.add(loss, logits, y)
        if batch_end:
            # the running means over the epoch's images as of the latest read (at most 4 device reads a second)
            shown_loss, shown_correct, shown_seen = pos.sums.shown(last)
            rate = (pos.sums.seen - seen0) / (time.perf_counter() - t0)
            for fn in batch_end:
                fn(i, n_batches, shown_loss / shown_seen, shown_correct / shown_seen, rate)
        if sync and update_end:
            info = {"update": epoch * n_updates + k + 1, "loss": loss.detach(), "lrs": _group_lrs(step.optimizer),
                    "images_per_sec": (pos.sums.seen - seen0) / (time.perf_counter() - t0)}
            for fn in update_end:
                fn(info)
        if save_point and not last and (i + 1) % acc == 0:
            progress = pos.at(i + 1)  # the exact sums: a device read, only when someone saves
            for fn in save_point:
                fn(progress)
    secs = time.perf_counter() - t0
    loss_sum, correct, seen = _sum_over_ranks(step, *pos.sums.read())
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "n": seen, "seconds": secs,
            "images_per_sec": seen / secs if secs > 0 else 0.0, "lr": lr if pos.first_lr is None else pos.first_lr,
            "lrs": pos.first_lrs}


def _group_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {g.get("name", str(j)): g["lr"] for j, g in enumerate(opt.param_groups)}


def _update(step: Step, pos: EpochProgress, t: float, dt: float, n: int, lr: float) -> float:
    """One optimizer update, the ``n``-th of the run, starting at ``t`` epochs: the schedule sets the LRs (the
    epoch's first update's are kept for its row), step, then ``after_update`` (the EMA). Returns the LR applied."""
    if step.schedule:
        lr = step.schedule(t, dt)
    if pos.first_lr is None:
        pos.first_lr, pos.first_lrs = lr, _group_lrs(step.optimizer)
    optimizer_step(step)
    if step.after_update is not None:
        step.after_update(n)
    return lr


PROGRESS_EVERY = 0.25  # seconds between two reads of the running loss/accuracy for the progress bar


class RunningSums:
    """An epoch's loss sum and correct count, kept as tensors on the device, so a step does not wait for the device
    (``.item()`` is a host sync on CUDA). Float64 arithmetic as with Python floats: ``read()`` gives the same numbers
    a per-step ``loss.item() * n`` sum gives (bitwise; resumed sums continue exactly). ``shown`` is for progress
    bars: the values read at most every ``every`` seconds (always on ``force``), with the image count of that read:
    the running loss and accuracy are then means over the same images (dividing sums read earlier by the current
    count shrank both by the images trained since: a near-perfect epoch showed "loss 0.0467 acc 32.3%")."""

    def __init__(self, loss_sum: float, correct: int, seen: int, device: torch.device, every: float | None = None):
        self.loss = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        self.correct = torch.tensor(correct, dtype=torch.int64, device=device)
        self.seen, self.every = seen, PROGRESS_EVERY if every is None else every
        self._shown, self._at = (loss_sum, correct, seen), -math.inf

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach().double() * y.numel()
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.seen += y.numel()

    def read(self) -> tuple[float, int, int]:
        self._shown, self._at = (float(self.loss), int(self.correct), self.seen), time.perf_counter()
        return self._shown

    def shown(self, force: bool = False) -> tuple[float, int, int]:
        """``(loss_sum, correct, seen)`` as of the latest read (a new read when ``every`` seconds have passed)."""
        if force or time.perf_counter() - self._at >= self.every:
            return self.read()
        return self._shown


@dataclass
class EpochProgress:
    """Where an epoch is, for a mid-epoch save and its resume: batches done, the running sums (on the device), the
    LRs of the epoch's first update. ``at(batches)`` is the save point's dict (the ``"partial"`` of ``last.pt``);
    ``resumed(partial)`` continues from one."""

    sums: RunningSums
    batches: int = 0
    first_lr: float | None = None
    first_lrs: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def resumed(cls, resume: dict[str, Any] | None, device: torch.device) -> EpochProgress:
        r = resume or {}
        sums = RunningSums(float(r.get("loss_sum", 0.0)), int(r.get("correct", 0)), int(r.get("seen", 0)), device)
        return cls(sums, int(r.get("batches", 0)), r.get("first_lr"), dict(r.get("first_lrs") or {}))

    def at(self, batches: int) -> dict[str, Any]:
        loss_sum, correct, seen = self.sums.read()
        return {"batches": batches, "loss_sum": loss_sum, "correct": correct, "seen": seen,
                "first_lr": self.first_lr, "first_lrs": self.first_lrs}


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step, sync: bool,
                     where: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (autocast), the loss (on mixed targets when ``step.mix`` is set and the batch is even: timm's Mixup
    pairs image i with image n-1-i), the finiteness check, backward of ``loss / accumulate``. Under DDP a
    micro-batch that doesn't step (``sync`` false) only accumulates its gradients locally (``no_sync``)."""
    target, loss_fn = y, step.loss_fn
    if step.mix is not None and x.shape[0] % 2 == 0:
        x, target = step.mix(x, y)
        loss_fn = step.mix_loss
    with contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
        with autocast(step.device, step.precision):
            logits = model(x)
            loss = loss_fn(logits.float(), target)
        finite = bool(torch.isfinite(loss))
        if step.reduce is not None:  # every rank stops at this step, or the others wait for its gradients forever
            bad = int(step.reduce(torch.tensor([0.0 if finite else 1.0], device=step.device)).item())
            if bad and finite:
                raise NonFiniteLoss(where[0], where[1], float("nan"), where=" on another process")
        if not finite:
            raise NonFiniteLoss(where[0], where[1], float(loss))
        scaled = loss / step.accumulate
        (step.scaler.scale(scaled) if step.scaler else scaled).backward()
    return logits, loss


def _sum_over_ranks(step: Step, loss_sum: float, correct: int, seen: int) -> tuple[float, int, int]:
    """Under DDP, the epoch's sums over all ranks' shards (else unchanged)."""
    if step.reduce is None:
        return loss_sum, correct, seen
    tot = step.reduce(torch.tensor([loss_sum, float(correct), float(seen)], dtype=torch.float64,
                                   device=step.device)).tolist()
    return tot[0], int(tot[1]), int(tot[2])


def optimizer_step(step: Step) -> None:
    """Unscale (fp16), clip the gradient norm over the trainable parameters, step, zero the gradients."""
    opt = step.optimizer
    if step.scaler:
        step.scaler.unscale_(opt)
    if step.clip_grad:
        params = [p for g in opt.param_groups for p in g["params"]]
        nn.utils.clip_grad_norm_(params, step.clip_grad)
    if step.scaler:
        step.scaler.step(opt)
        step.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int, value: float, where: str = ""):
        super().__init__(f"loss became {value}{where} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step, self.value = epoch, step, value


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, *, device: torch.device | str = "cpu",
             precision: str = "fp32", channels_last: bool = False, label_smoothing: float = 0.0,
             reporter: Reporter | None = None,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, fast: str = "auto") -> dict[str, Any]:
    """Loss, top-1 (argmax) and top-5 accuracy, per-class accuracy and the confusion matrix (rows = true class).

    Runs under ``model.eval()`` and ``torch.inference_mode()``; the model's previous mode is restored. Under DDP
    each rank evaluates its shard and ``reduce`` sums the counts, so the result covers the whole set once.
    ``samples`` (None under DDP, where a rank sees only its shard): per image, in loader order, the target, the
    prediction, its softmax probability and the true class's, for the report's pictures (finetune/reporting/report.py).
    ``fast``: ``auto`` runs a conv+BN-folded copy of the model (:mod:`finetune.models.fold`), ``off`` the model.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    run = FastInference(model, fast)
    loss_fn = nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, top5, n = 0.0, 0, 0
    per_sample: list[torch.Tensor] | None = [] if reduce is None else None  # rows of (target, pred, conf, p_true)
    n_batches = len(loader) if hasattr(loader, "__len__") else 0  # type: ignore[arg-type]
    if reporter:
        reporter.eval_start(n_batches)
    for i, (x, y) in enumerate(loader):
        x, y = to_device(x, y, device, channels_last)
        with autocast(device, precision):
            logits = run(x)
        logits = logits.float()
        loss_sum += loss_fn(logits, y).item()
        pred = logits.argmax(dim=1)
        confusion_update(confusion, y, pred)
        if num_classes >= 5:
            top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum().item()
        n += y.numel()
        if per_sample is not None:
            prob = logits.softmax(dim=1)
            per_sample.append(torch.stack([y.double(), pred.double(), prob.gather(1, pred[:, None])[:, 0].double(),
                                           prob.gather(1, y[:, None])[:, 0].double()], dim=1).cpu())
        if reporter:
            reporter.eval_batch(i, n_batches)
    model.train(was_training)
    if reduce is not None:
        confusion = reduce(confusion.to(device)).cpu()
        tot = reduce(torch.tensor([loss_sum, float(top5), float(n)], dtype=torch.float64, device=device)).tolist()
        loss_sum, top5, n = tot[0], int(tot[1]), int(tot[2])
    correct = int(confusion.diag().sum())
    counts = confusion.sum(dim=1)
    per_class = [float(c) / float(t) if t else None  # a class with no samples has no accuracy (not 0%)
                 for c, t in zip(confusion.diag().tolist(), counts.tolist())]
    return {**confusion_metrics(confusion), **{  # balanced_accuracy, macro_f1
        "loss": loss_sum / max(n, 1),
        "accuracy": correct / max(n, 1),
        "top5": (top5 / max(n, 1)) if num_classes >= 5 else None,
        "n": n,
        "correct": correct,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "samples": _samples(per_sample),
    }}


def _samples(rows: list[torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    if rows is None:
        return None
    t = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64)
    return {"target": t[:, 0].long(), "pred": t[:, 1].long(), "conf": t[:, 2].float(), "p_true": t[:, 3].float()}
