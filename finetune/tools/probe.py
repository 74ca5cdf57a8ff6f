"""Probe lab: many linear heads at once on cached features, plus k-NN — how good is a backbone for *this* data?

:func:`probe` takes the ``linear-probe`` recipe (AdamW, cosine, zero-initialised head, no augmentation) for each
model, gets the frozen features through the persistent store (:mod:`finetune.speedups.feature_store`: a second probe or
linear-probe ``train`` on the same data and backbone skips the backbone), and trains a grid of (lr, weight decay)
heads *simultaneously*: the heads are one ``[H, C, D]`` tensor, each step is one batched matmul for all of them
(DINOv2's linear evaluation), and AdamW is applied per head with that head's LR and decay. Every head sees the same
batches in the same order as ``finetune train --recipe linear-probe`` would (``EpochSampler`` with the run's seed),
with the same schedule per update and no decay on the bias, so head ``h`` of the sweep is the head that ``train``
with ``--lr lrs[h] --weight-decay wds[h]`` trains (equal up to float rounding; tested). The best head
(:func:`choose_best`: among the heads whose final val accuracy is within noise of the top one, the lowest val loss)
is written as a normal run directory (``best.pt``/``last.pt`` with the full model, class names, the
resolved recipe and the AdamW state, ``config.yaml``, ``metrics.json``, ``probe.json``).

k-NN (DINOv2's ``knn.py``): cosine similarity between L2-normalised val and train features, the k nearest vote with
weights ``exp(sim / 0.07)``.
"""

from __future__ import annotations

import dataclasses
import logging
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config.preflight import parse_floats, parse_ints  # noqa: F401 - torch-free, re-exported
from finetune.config.preflight import looks_like_path, model_pairs
from finetune.errors import ConfigError
from finetune.run.assemble import assemble
from finetune.run.runner import seed_everything, _resolved_recipe, _yaml
from finetune.speedups.feature_cache import _sample, bundle_features, check_split, split_frozen_prefix
from finetune.models.stand_in import NeedsBackbone, is_stand_in
from finetune.data.loader import EpochSampler
from finetune.training.engine import lr_factor, set_lr
from finetune import config, __version__, files
from finetune.run.checkpoint import default_run_dir, prepare_run_dir, finite_json
from finetune.run import checkpoint as ck
from finetune.config import from_dict
from finetune.training import optim as O
from finetune.training import stats

log = logging.getLogger("finetune")

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # 8 LRs, half a decade apart
DEFAULT_WDS = (1e-4, 1e-2)
DEFAULT_KNN = (10, 20)
KNN_T = 0.07  # DINOv2's temperature


@dataclass
class HeadResult:
    lr: float
    weight_decay: float
    val_acc: float | None
    val_loss: float | None
    train_loss: float
    val_accs: list[float] = field(default_factory=list)  # per epoch
    val_acc_ci: list[float] | None = None  # the Wilson 95% interval of val_acc on the val images, [low, high]
    within_noise: bool = False  # val_acc is within noise of the top head's (stats.tied): a candidate for best


@dataclass
class ProbeResult:
    model: str
    weights: str
    heads: list[HeadResult]
    knn: dict[int, float]
    best: int  # index into heads: the lowest val loss among the heads within noise of the top accuracy
    classes: list[str]
    feature_dim: int
    train_images: int
    val_images: int
    features_seconds: float
    sweep_seconds: float
    knn_seconds: float
    from_store: bool
    run_dir: Path | None = None
    top: int | None = None  # index of the head with the highest val accuracy (it may differ from best)
    val_acc_pm: float | None = None  # the noise: half the Wilson 95% interval of the top accuracy (a fraction)

    def to_dict(self) -> dict[str, Any]:
        """As JSON data (``probe --json``, ``probe.json``): a non-finite number (a diverging head's NaN loss) is
        None, written as null as in metrics.json: strict JSON, never a bare NaN."""

        d = dataclasses.asdict(self)
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        d["knn"] = {str(k): v for k, v in self.knn.items()}
        return finite_json(d)


# ----------------------------------------------------------------------------------------------- features


@dataclass
class Prepared:
    cfg: Any
    bb: Any
    bundle: Any
    precision: str
    device: torch.device
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    seconds: float
    from_store: bool
    head: nn.Linear
    plan: Any
    channels_last: bool


def prepare(cfg, *, cache_dir: str | Path | None = None, need_val: bool = False) -> Prepared:
    """Build ``cfg``'s model and data as ``train`` does and get the head's input features (store or backbone)."""

    def check_data(bundle) -> None:
        if need_val and bundle.val is None:
            raise ConfigError(f"probe needs validation images to compare heads, but '{cfg.data.path}' has none; "
                              "add a val folder or pass --val-split 0.2")

    seed_everything(cfg.train.seed)
    try:  # all features in the store: a stand-in for the backbone (nothing runs it; best.pt needs its tensors)
        return _prepare(cfg, check_data, cache_dir, stand_in=True)
    except NeedsBackbone:
        seed_everything(cfg.train.seed)
        return _prepare(cfg, check_data, cache_dir, stand_in=False)


def _prepare(cfg, check_data, cache_dir, stand_in: bool) -> Prepared:
    parts = assemble(cfg, check_data=check_data, optimizer=False, stand_in=stand_in,  # the heads: their own sweep
                     cache_dir=cache_dir)
    cfg, bundle, bb, device, precision = parts.cfg, parts.bundle, parts.bb, parts.device, parts.precision
    plan, channels_last = parts.plan, parts.channels_last
    split = split_frozen_prefix(bb)
    head = dict(bb.model.named_modules()).get(bb.head[0]) if len(bb.head) == 1 else None
    if split is None or not isinstance(head, nn.Linear) or split.trainable is not head:
        raise ConfigError(f"probe needs a model whose classifier is one Linear layer on the backbone's features; "
                          f"{bb.name}'s head is {', '.join(bb.head)} ({type(head).__name__ if head else 'several'})")
    if not is_stand_in(bb.model) and not check_split(split, bb.model, _sample(bundle.train, device)):
        raise ConfigError(f"probe cannot cut {bb.name} at the input of '{split.where}' (the model does more than "
                          "head(features) after it); use finetune train --recipe linear-probe --cache-features off")
    t0 = time.perf_counter()
    train, val, hit = bundle_features(split, bb, bundle, cfg, device=device, precision=precision,
                                      channels_last=channels_last, cache_dir=cache_dir)
    if is_stand_in(bb.model):
        for note in bb.notes:  # what building the backbone said ("loaded ... without the head")
            log.warning(note)
    return Prepared(cfg, bb, bundle, precision, device, train, val, time.perf_counter() - t0, hit, head,
                    plan, channels_last)


# ----------------------------------------------------------------------------------------------- the sweep


@dataclass
class SweepState:
    weight: torch.Tensor  # [H, C, D]
    bias: torch.Tensor  # [H, C]
    opt: dict[str, dict[str, torch.Tensor]]  # AdamW state per tensor: exp_avg, exp_avg_sq
    steps: int


def sweep(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None, num_classes: int,
          lrs: list[float], wds: list[float], *, epochs: int, batch_size: int, seed: int, scheduler,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, label_smoothing: float = 0.0,
          reporter=None, device: torch.device | str = "cpu",
          init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[HeadResult], SweepState]:
    """Train ``len(lrs)`` linear heads at once, all from ``init`` (the model's own new head: zeros on pretrained
    weights, the source's init from scratch; default zeros), head ``h`` with AdamW ``(lrs[h], wds[h])`` (decay
    on the weight only, as the toolkit's optimizer groups do), the LR of each update from ``scheduler`` at
    ``epoch + k/K``; batches in ``EpochSampler(seed)`` order. Returns per-head results and the final state (on the
    CPU). The features stay where they are (a memory map); each batch moves to ``device``."""

    # small heads: one thread. The per-step tensors are tiny (16 heads x 12 classes x 1280: 1 MB), and on a shared
    # 2-core CPU intra-op threading cost more than it gave: 16 Lite0 heads, 5 epochs, 0.31 s with 1 thread vs
    # 1.14 s with 2 (measured in one process while the machine was loaded)
    threads = torch.get_num_threads()
    dev = torch.device(device)
    small = dev.type == "cpu" and len(lrs) * num_classes * train[0][0].numel() < (1 << 22)
    if small:
        torch.set_num_threads(1)
    try:
        return _sweep(train, val, num_classes, lrs, wds, epochs=epochs, batch_size=batch_size, seed=seed,
                      scheduler=scheduler, betas=betas, eps=eps, label_smoothing=label_smoothing, reporter=reporter,
                      dev=dev, init=init)
    finally:
        torch.set_num_threads(threads)


def _sweep(train, val, num_classes, lrs, wds, *, epochs, batch_size, seed, scheduler, betas, eps, label_smoothing,
           reporter, dev, init=None):
    feats, labels = train
    n = len(labels)
    x_all = feats.reshape(n, -1)
    d = x_all.shape[1]
    H = len(lrs)
    W = torch.zeros(H, num_classes, d, device=dev)
    b = torch.zeros(H, num_classes, device=dev)
    if init is not None:
        W.copy_(init[0].detach().reshape(1, num_classes, d).to(dev))
        b.copy_(init[1].detach().reshape(1, num_classes).to(dev))
    W.requires_grad_(True)
    b.requires_grad_(True)
    state = {k: {"exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)} for k, t in (("weight", W),
                                                                                             ("bias", b))}
    base = torch.tensor(lrs, dtype=torch.float64, device=dev)
    wd = torch.tensor(wds, dtype=torch.float64, device=dev)
    sampler = EpochSampler(n, shuffle=True, seed=seed)
    K = max(1, -(-n // batch_size))
    step = 0
    val_accs: list[list[float]] = [[] for _ in range(H)]
    train_loss = torch.zeros(H, dtype=torch.float64, device=dev)
    ev = None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)))
        train_loss.zero_()
        for k in range(K):
            idx = order[k * batch_size:(k + 1) * batch_size]
            x, y = x_all[idx].float().to(dev), labels[idx].to(dev)
            # one GEMM for all heads: [B, D] x [D, H*C] -> [B, H, C]
            logits = torch.addmm(b.reshape(-1), x, W.reshape(H * num_classes, d).T).view(-1, H, num_classes)
            per = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat_interleave(H), reduction="none",
                                  label_smoothing=label_smoothing).view(-1, H).mean(0)
            W.grad = b.grad = None
            per.sum().backward()  # head h's gradient is that of its own mean loss
            train_loss += per.detach().double() * len(y)
            step += 1
            f = torch.tensor([lr_factor(scheduler, epoch + k / K, epochs, base_lr=float(lr), dt=1.0 / K)
                              for lr in lrs], dtype=torch.float64, device=dev)
            lr_now = base * f
            with torch.no_grad():
                _adamw(W, state["weight"], lr_now, wd, step, betas, eps)
                _adamw(b, state["bias"], lr_now, torch.zeros_like(wd), step, betas, eps)
        train_loss /= n
        if val is not None:
            ev = evaluate_heads(W.detach(), b.detach(), val, num_classes)
            for h in range(H):
                val_accs[h].append(float(ev["acc"][h]))
        if reporter is not None:
            reporter(epoch, epochs)
    heads = [HeadResult(float(lrs[h]), float(wds[h]), float(ev["acc"][h]) if ev else None,
                        float(ev["loss"][h]) if ev else None, float(train_loss[h]), val_accs[h]) for h in range(H)]
    state = {k: {n: t.cpu() for n, t in v.items()} for k, v in state.items()}
    return heads, SweepState(W.detach().cpu(), b.detach().cpu(), state, step)


def _adamw(p: torch.Tensor, st: dict[str, torch.Tensor], lr: torch.Tensor, wd: torch.Tensor, step: int,
           betas: tuple[float, float], eps: float) -> None:
    """torch.optim.AdamW's single-tensor update, with per-head ``lr``/``wd`` (one value per leading index)."""
    shape = (-1,) + (1,) * (p.dim() - 1)
    decay = (1 - lr * wd).view(shape).to(p.dtype)
    g = p.grad
    p.mul_(decay)
    st["exp_avg"].lerp_(g, 1 - betas[0])
    st["exp_avg_sq"].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    bc1 = 1 - betas[0] ** step
    bc2_sqrt = math.sqrt(1 - betas[1] ** step)
    step_size = (lr / bc1).view(shape).to(p.dtype)
    denom = (st["exp_avg_sq"].sqrt() / bc2_sqrt).add_(eps)
    p.add_((-step_size * st["exp_avg"]) / denom)


@torch.no_grad()
def evaluate_heads(W: torch.Tensor, b: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                   chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per-head val accuracy and mean loss (argmax, as :func:`finetune.training.engine.evaluate`), in row chunks."""
    feats, labels = val
    n = len(labels)
    H, dev = W.shape[0], W.device
    correct = torch.zeros(H, dtype=torch.long, device=dev)
    loss = torch.zeros(H, dtype=torch.float64, device=dev)
    for i in range(0, n, chunk):
        x = feats[i:i + chunk].reshape(min(chunk, n - i), -1).float().to(dev)
        y = labels[i:i + chunk].to(dev)
        logits = torch.addmm(b.reshape(-1), x, W.reshape(H * num_classes, -1).T).view(-1, H, num_classes)
        correct += (logits.argmax(2) == y.unsqueeze(1)).sum(0)
        loss += F.cross_entropy(logits.reshape(-1, num_classes), y.repeat_interleave(H), reduction="none") \
            .view(-1, H).sum(0).double()
    return {"acc": (correct.double() / max(n, 1)).cpu(), "loss": (loss / max(n, 1)).cpu()}


@torch.no_grad()
def knn_accuracy(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 ks: list[int], chunk: int = 1024, temperature: float = KNN_T, train_chunk: int = 16384
                 ) -> dict[int, float]:
    """Weighted k-NN on cosine similarity (DINOv2): the k nearest train features vote ``exp(sim / T)``."""
    if not ks:
        return {}
    ftr, ytr = train
    fva, yva = val
    kmax = min(max(ks), len(ytr))
    correct = {k: 0 for k in ks}
    for i in range(0, len(yva), chunk):
        q = F.normalize(fva[i:i + chunk].reshape(min(chunk, len(yva) - i), -1).float(), dim=1)
        # train features in blocks with a running top-k: memory-mapped features larger than RAM are read, not held
        sim = torch.empty(len(q), 0)
        idx = torch.empty(len(q), 0, dtype=torch.long)
        for j in range(0, len(ytr), train_chunk):
            t = F.normalize(ftr[j:j + train_chunk].reshape(min(train_chunk, len(ytr) - j), -1).float(), dim=1)
            s_all = torch.cat([sim, q @ t.T], dim=1)
            i_all = torch.cat([idx, torch.arange(j, j + len(t)).expand(len(q), -1)], dim=1)
            sim, pos = s_all.topk(min(kmax, s_all.shape[1]), dim=1)
            idx = i_all.gather(1, pos)
        w = (sim / temperature).exp()
        onehot = F.one_hot(ytr[idx], num_classes).float() * w.unsqueeze(2)  # [q, kmax, C]
        for k in ks:
            pred = onehot[:, :min(k, kmax)].sum(1).argmax(1)
            correct[k] += int((pred == yva[i:i + chunk]).sum())
    return {k: correct[k] / max(len(yva), 1) for k in ks}


# ----------------------------------------------------------------------------------------------- the best head


def choose_best(heads: list[HeadResult], n: int) -> int:
    """The head to keep, by val on ``n`` images: of the heads whose accuracy is within noise of the top accuracy
    (:func:`finetune.training.stats.tied`: each inside the other's 95% Wilson interval), the one with the lowest
    val loss (the best calibrated; a diverging head's NaN loss counts as infinite), then the higher accuracy, then
    the first. A head one image ahead but with a val loss of 7 no longer wins. Also fills each head's
    ``val_acc_ci`` and ``within_noise``."""
    accs = [h.val_acc for h in heads if h.val_acc is not None and math.isfinite(h.val_acc)]
    top = max(accs) if accs else None
    for h in heads:
        ci = stats.wilson(h.val_acc, n)
        h.val_acc_ci = None if ci is None else [ci[0], ci[1]]
        h.within_noise = top is not None and h.val_acc is not None and (h.val_acc == top or
                                                                           stats.tied(h.val_acc, top, n))

    def loss(h: HeadResult) -> float:
        return h.val_loss if h.val_loss is not None and math.isfinite(h.val_loss) else math.inf

    pool = [i for i, h in enumerate(heads) if h.within_noise] or list(range(len(heads)))
    return min(pool, key=lambda i: (loss(heads[i]), -(heads[i].val_acc or 0.0), i))


def top_head(heads: list[HeadResult]) -> int:
    """The head with the highest val accuracy (ties: lower val loss, then the first)."""
    def key(i: int):
        h = heads[i]
        loss = h.val_loss if h.val_loss is not None and math.isfinite(h.val_loss) else math.inf
        return (-(h.val_acc if h.val_acc is not None else -1.0), loss, i)

    return min(range(len(heads)), key=key)


# ----------------------------------------------------------------------------------------------- the command


def probe_recipe(model: str, *, weights: str = "default", data: str = "sample", labels: str | None = None,
                 val_split: float | None = None, image_size: int | None = None, epochs: int | None = None,
                 batch_size: int | None = None, seed: int | None = None, device: str | None = None,
                 precision: str | None = None):
    """The ``linear-probe`` recipe with the command's values: what ``finetune train --recipe linear-probe`` runs."""

    over: dict[str, Any] = {"model.name": model, "model.weights": weights, "data.path": data}
    for key, v in (("data.labels", labels), ("data.val_split", val_split), ("data.image_size", image_size),
                   ("train.epochs", epochs), ("train.batch_size", batch_size), ("train.seed", seed),
                   ("train.device", device), ("train.precision", precision)):
        if v is not None:
            over[key] = v
    return config.apply_overrides(config.load_recipe("linear-probe"), over)


def probe(models, *, weights: str = "default", data: str = "sample", lrs: list[float] | None = None,
          wds: list[float] | None = None, knn: list[int] | None = None, out: str | Path | None = None,
          overwrite: bool = False, cache_dir: str | Path | None = None, write: bool = True, progress=None,
          **recipe_kw) -> list[ProbeResult]:
    """Probe each of ``models`` (see the module docstring); one result per model, the best head's run written under
    ``out`` (one model: ``out`` itself; several: ``out/<model>``). ``models``: names (each with ``weights``), or each
    with its own weights: ``["a=PATH", "b"]``, ``[("a", PATH), ("b", "default")]``, ``{"a": PATH}``, or the
    ``--model`` text ``"a=PATH,b"`` (:func:`finetune.config.preflight.model_pairs`)."""

    pairs = model_pairs(models, weights)
    lrs = list(lrs or DEFAULT_LRS)
    wds = list(DEFAULT_WDS if wds is None else wds)
    grid = [(lr, wd) for wd in wds for lr in lrs]
    targets = run_dirs(pairs, Path(out) if out else default_run_dir("probe"))
    for d in targets:  # an --out that cannot be used fails before the backbone runs, not after
        if write and d.is_dir() and any(d.iterdir()):
            prepare_run_dir(d, overwrite=overwrite)
    results: list[ProbeResult] = []
    try:
        for (name, w), target in zip(pairs, targets):
            results.append(_probe_one(name, w, data, lrs, wds, grid, knn, target, overwrite, cache_dir,
                                      write, progress, recipe_kw))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under the CLI: the feature store removed its temp entry
        from finetune.run.runner import Interrupted

        done = [str(r.run_dir) for r in results if r.run_dir]
        raise Interrupted("interrupted; " + (f"the finished models' runs are in {', '.join(done)}" if done else
                                             "nothing was written")) from None
    return results


def run_dirs(pairs: list[tuple[str, str]], root: Path) -> list[Path]:
    """Where each model's best head goes: one model, ``root``; several, ``root/<model>`` (``timm:x`` ->
    ``timm-x``); a model probed with several weights, ``root/<model>-<weights file stem or tag>`` (then ``-2``,
    ``-3``... should those still clash)."""
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")

    if len(pairs) == 1:
        return [root]
    names = [n for n, _ in pairs]
    subs = [slug(n) if names.count(n) == 1 else slug(f"{n}-{Path(w).stem if looks_like_path(w) else w}")
            for n, w in pairs]
    used: list[str] = []
    for s in subs:
        c, k = s, 1
        while c in used:
            k += 1
            c = f"{s}-{k}"
        used.append(c)
    return [root / c for c in used]


def _probe_one(name, weights, data, lrs, wds, grid, knn, target, overwrite, cache_dir, write, progress, recipe_kw):
    """One model of :func:`probe`: features, the sweep, k-NN, and (``write``) its run directory."""
    cfg = probe_recipe(name, weights=weights, data=data, **recipe_kw)
    if progress:
        progress(f"{name}: features")
    prep = prepare(cfg, cache_dir=cache_dir, need_val=True)
    C = len(prep.bundle.class_names)
    t0 = time.perf_counter()
    heads, st = sweep(prep.train, prep.val, C, [g[0] for g in grid], [g[1] for g in grid],
                      epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                      scheduler=cfg.scheduler, label_smoothing=cfg.train.label_smoothing,
                      reporter=((lambda e, n, name=name: progress(f"{name}: epoch {e + 1}/{n}"))
                                if progress else None),
                      device=prep.device, init=(prep.head.weight, prep.head.bias))
    t_sweep = time.perf_counter() - t0
    t0 = time.perf_counter()
    kn = knn_accuracy(prep.train, prep.val, C, list(DEFAULT_KNN if knn is None else knn))
    t_knn = time.perf_counter() - t0
    n_val = len(prep.val[1])
    best, top = choose_best(heads, n_val), top_head(heads)
    res = ProbeResult(prep.bb.name, prep.bb.weights, heads, kn, best, list(prep.bundle.class_names),
                      int(prep.train[0][0].numel()), len(prep.train[1]), n_val, prep.seconds,
                      t_sweep, t_knn, prep.from_store, top=top,
                      val_acc_pm=stats.half_width(heads[top].val_acc, n_val))
    if write:
        res.run_dir = write_run(prep, st, best, res, target, overwrite=overwrite)
    return res


def _val_record(prep: Prepared, cfg, head_res: HeadResult) -> dict[str, Any]:
    """The best head's evaluation on the val features as a run records it at each epoch (accuracy, loss, top-5,
    balanced accuracy, macro-F1, per-class accuracy, the confusion matrix and the per-image ``samples``): what
    ``finetune report``, ``eval`` and ``predict --min-confidence auto`` read from best.pt. The head holds the best
    head's weights (``_write_run`` copied them in); the sweep's own numbers are kept for accuracy and loss."""
    from finetune.speedups.feature_cache import FeatureDataset
    from finetune.data import make_loader
    from finetune.training.engine import evaluate

    feats, labels = prep.val
    loader = make_loader(FeatureDataset(feats, labels), 256, shuffle=False, seed=0, workers=0)
    ev = evaluate(prep.head, loader, len(prep.bundle.class_names), device=prep.device,
                  label_smoothing=cfg.train.label_smoothing, fast="off")
    return {**ev, "accuracy": head_res.val_acc, "loss": head_res.val_loss}


def write_run(prep: Prepared, st: SweepState, h: int, res: ProbeResult, run_dir: Path, *, overwrite: bool) -> Path:
    """Write head ``h`` as a normal run directory: the checkpoint ``train --recipe linear-probe --lr LR
    --weight-decay WD`` would have written after its last epoch (so eval/predict/export, ``--weights`` and
    ``train --resume --epochs N`` work on it), plus ``probe.json`` with the whole table. Interrupted or failed
    half-way, the run directory is removed (a new one) or emptied (one it replaced)."""

    cfg = from_dict(prep.cfg.to_dict())
    head_res = res.heads[h]
    cfg.optimizer.lr, cfg.optimizer.weight_decay = head_res.lr, head_res.weight_decay
    new = not Path(run_dir).exists()
    run_dir = ck.prepare_run_dir(Path(run_dir), overwrite=overwrite)
    try:
        return _write_run(prep, st, h, res, run_dir, cfg, head_res)
    except BaseException:  # Ctrl-C/SIGTERM or a failed write: no half-written run directory stays
        import shutil

        if new and not run_dir.is_symlink():
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            ck.clear_run_dir(run_dir)
        raise


def _write_run(prep: Prepared, st: SweepState, h: int, res: ProbeResult, run_dir: Path, cfg, head_res) -> Path:
    bb = prep.bb
    with torch.no_grad():
        prep.head.weight.copy_(st.weight[h])
        prep.head.bias.copy_(st.bias[h])
    model = bb.model
    # The optimizer state train --recipe linear-probe would leave, written as torch's AdamW state_dict() without
    # building an AdamW (that imports torch._dynamo: 1.6 s; the heads trained with the sweep's own AdamW).
    opt = SimpleNamespace(param_groups=O.param_groups(bb, cfg.optimizer))
    set_lr(opt, cfg.scheduler, cfg.train.epochs - 1 / max(1, -(-res.train_images // cfg.train.batch_size)),
           cfg.train.epochs)  # the group LRs of the last update, as train leaves them
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {i: {"step": torch.tensor(float(st.steps)), "exp_avg": st.opt[key]["exp_avg"][h].clone(),
                 "exp_avg_sq": st.opt[key]["exp_avg_sq"][h].clone()}
             for i, p in enumerate(params) for key in ["weight" if p is prep.head.weight else "bias"]}
    resolved = _resolved_recipe(cfg, bb)
    files.atomic_write_text(run_dir / "config.yaml", _yaml(resolved, {
        "device": str(prep.device), "precision": prep.precision, "channels_last": prep.channels_last,
        "processes": 1, "classes": res.classes, "made_by": "finetune probe"}))
    history = [{"epoch": e + 1, "train_loss": head_res.train_loss if e + 1 == len(head_res.val_accs) else None,
                "train_acc": None, "val_loss": head_res.val_loss if e + 1 == len(head_res.val_accs) else None,
                "val_acc": a, "lr": None, "lrs": {}, "seconds": None, "images_per_sec": None}
               for e, a in enumerate(head_res.val_accs)]
    best = {"epoch": len(history), "val_acc": head_res.val_acc}
    ckpt = {"model": model.state_dict(), "class_names": res.classes, "model_name": bb.name,
            "num_classes": len(res.classes), "transform": prep.bundle.transform, "precision": prep.precision,
            "channels_last": prep.channels_last,
            "data": {"path": prep.cfg.data.path, "labels": prep.cfg.data.labels,
                     "val_split": prep.cfg.data.val_split, "seed": prep.cfg.train.seed},
            "epoch": cfg.train.epochs, "plan": prep.plan.to_dict(), "trainable": [n for n, p in model.named_parameters()
                                                                   if p.requires_grad],
            "recipe": resolved.to_dict(), "optimizer": O.adamw_state_dict(opt.param_groups, state), "scaler": None,
            "metrics": history,
            "best": best, "val": _val_record(prep, cfg, head_res),
            "finetune_version": __version__, "world_size": 1, "probe": {"lr": head_res.lr,
                                                                        "weight_decay": head_res.weight_decay}}
    ck.save_checkpoint(ckpt, run_dir / "last.pt")
    ck.save_checkpoint(ck.slim(ckpt), run_dir / "best.pt")
    files.atomic_write_text(run_dir / "metrics.json", ck.metrics_text(best, history, val_images=res.val_images))
    files.atomic_write_text(run_dir / "probe.json", json.dumps({**res.to_dict(), "run_dir": str(run_dir)}, indent=1,
                                                               allow_nan=False))
    return run_dir
