"""``finetune auto``: which pretrained backbone, fine-tuned how, within a time budget, and how good it is.

Three stages, each visible (``progress``) and recorded (``auto.json`` in the run directory, the report's
"How this model was chosen"):

1. **Probe** every candidate (``--model a=WEIGHTS,b=...``, or the default :data:`SHELF`) on frozen features from the
   persistent store (:mod:`finetune.tools.probe`: the ``linear-probe`` recipe's grid of heads, plus k-NN). When the
   val split is small (under :data:`CV_BELOW` images) the estimate is k-fold cross-validation over the train+val
   features (:func:`cross_validate`: the heads are cheap on cached features, and n = train+val images narrows
   the interval), else the val split. Every estimate carries its 95% Wilson interval. A candidate whose weights
   can't be had (no file, offline) is skipped with the reason. The forward pass's images/s is measured on the fly
   (the feature pass; on a cached rerun, the speed recorded when the features were computed).
2. **Decide** (:func:`decide`): the winner is the best estimate; candidates within noise of it (each inside the
   other's interval) are ties, broken by cost (the faster forward pass). The strategy is LP-FT unless fine-tuning
   can't pay off: the probe already makes no mistake, or the budget left can't hold the LP-FT recipe's 4
   fine-tuning epochs (each estimated as 3 forward passes per training image plus a val pass). A cut-short LP-FT is
   not a measured recipe: on flowers12 (Lite0, 12-minute budget) 1 fine-tuning epoch ended at 94.6% on test where
   the linear probe reached 96.7% and the whole LP-FT 97.5%.
3. **Train** a normal run directory with ``train --budget`` (:mod:`finetune.run.budget` measures the training
   step and checks that the recipe's 5 epochs fit; if not, the linear probe instead), best.pt selected
   on val, the test split evaluated when the data has one; ``recipe.yaml`` reruns it with ``finetune train
   --recipe``. The linear probe is the probe's chosen head (its LR and weight decay) trained by ``train --recipe
   linear-probe`` on the train split.

What auto does not do (documented in docs/auto.md): a fine-tuning trial between the top two (the decision uses the
probe estimates), or an LP-FT of other than the recipe's 5 epochs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from finetune.config.preflight import budget_text
from finetune.errors import ConfigError, FinetuneError, ModelError, WeightsError
from finetune.training import stats

log = logging.getLogger("finetune")

# the default candidates when --model is not given: well-known ImageNet backbones across sizes, cheapest first; a
# candidate whose weights are neither in the local caches nor downloadable is skipped
SHELF = ("timm:tf_efficientnet_lite0", "resnet18", "timm:efficientnet_b0", "resnet50", "timm:convnext_tiny")
CV_BELOW = 1000  # val images under which the estimate is k-fold cross-validation over train+val
CV_MAX_ROWS = 50_000  # ... when train+val are at most this many images (else the val split, already narrow)
FOLDS = 5
MAX_EPOCHS = 5  # the LP-FT recipe's epochs, all of them or the linear probe (a cut-short LP-FT measured worse)
TRAIN_COST = 3.0  # a training image costs about 3 forward passes (forward + backward), before train measures it
PROBE_SHARE = 0.5  # the probe stage stops adding candidates once it has used this share of the budget


@dataclass
class Candidate:
    """One backbone with its weights, as the probe stage found it (see ``auto.json``)."""

    model: str
    weights: str
    status: str = "ok"  # or "skipped"
    reason: str | None = None
    acc: float | None = None  # the probe estimate
    ci: list[float] | None = None  # its Wilson 95% interval
    n: int = 0  # images behind the estimate
    loss: float | None = None
    knn: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    weight_decay: float | None = None
    images_per_sec: float | None = None  # forward pass, measured
    train_images_per_sec: float | None = None  # training step, measured by the run (the winner's)
    parameters: int | None = None
    seconds: float = 0.0
    features_seconds: float = 0.0  # of which the features (the forward pass, or reading the store)
    from_store: bool = False
    tied: bool = False
    winner: bool = False
    method: str | None = None  # how the estimate was made
    train_images: int = 0
    val_images: int = 0


@dataclass
class Decision:
    winner: int | None
    strategy: str  # "lp-ft" or "linear-probe"
    reasons: list[str]
    ft_epoch_seconds: float | None = None  # the estimate the strategy rests on


# ----------------------------------------------------------------------------------------------- estimates


def folds_of(labels, k: int, seed: int) -> list[list[int]]:
    """``k`` stratified folds of the row indices: each class's rows shuffled with ``seed`` and dealt round-robin,
    so every fold holds each class in proportion."""
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g).tolist()
    out: list[list[int]] = [[] for _ in range(k)]
    seen: dict[int, int] = {}
    for i in sorted(perm, key=lambda i: int(labels[i])):  # stable: within a class, the shuffled order
        c = int(labels[i])
        out[seen.get(c, 0) % k].append(i)
        seen[c] = seen.get(c, 0) + 1
    return [sorted(f) for f in out if f]


def cross_validate(feats, labels, num_classes: int, grid: list[tuple[float, float]], *, folds: int, epochs: int,
                   batch_size: int, seed: int, scheduler, label_smoothing: float = 0.0, knn: tuple[int, ...] = (),
                   init=None, device="cpu") -> tuple[list, dict[int, float]]:
    """Each (lr, wd) head of ``grid`` trained on k-1 folds and scored on the k-th, for each fold: per head the
    pooled accuracy and loss over all rows (a :class:`~finetune.tools.probe.HeadResult` each), and the pooled k-NN
    accuracy per k."""
    from finetune.tools.probe import HeadResult, knn_accuracy, sweep

    n = len(labels)
    H = len(grid)
    correct, loss, train_loss = [0.0] * H, [0.0] * H, [0.0] * H
    knn_correct = {k: 0.0 for k in knn}
    for f, held in enumerate(folds_of(labels, folds, seed)):
        keep = sorted(set(range(n)) - set(held))
        tr, va = (feats[keep], labels[keep]), (feats[held], labels[held])
        heads, _ = sweep(tr, va, num_classes, [g[0] for g in grid], [g[1] for g in grid], epochs=epochs,
                         batch_size=batch_size, seed=seed + f, scheduler=scheduler, label_smoothing=label_smoothing,
                         device=device, init=init)
        for h, r in enumerate(heads):
            correct[h] += r.val_acc * len(held)
            loss[h] += (r.val_loss if r.val_loss is not None and math.isfinite(r.val_loss) else math.inf) * len(held)
            train_loss[h] += r.train_loss / folds
        for k, a in knn_accuracy(tr, va, num_classes, list(knn)).items():
            knn_correct[k] += a * len(held)
    heads = [HeadResult(grid[h][0], grid[h][1], correct[h] / n, loss[h] / n, train_loss[h]) for h in range(H)]
    return heads, {k: c / n for k, c in knn_correct.items()}


def estimate(prep, grid: list[tuple[float, float]], cfg, *, folds: int = FOLDS, knn: tuple[int, ...] = (10, 20)
             ) -> tuple[Any, dict[int, float], int, str]:
    """The probe estimate of a prepared candidate: ``(chosen head, k-NN per k, n images, method)``. The head is
    :func:`~finetune.tools.probe.choose_best`'s (the lowest loss among those within noise of the top)."""
    import torch

    from finetune.tools.probe import choose_best, knn_accuracy, sweep

    C = len(prep.bundle.class_names)
    (ftr, ytr), (fva, yva) = prep.train, prep.val
    n_all = len(ytr) + len(yva)
    kw = dict(epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, scheduler=cfg.scheduler,
              label_smoothing=cfg.train.label_smoothing, device=prep.device,
              init=(prep.head.weight, prep.head.bias))
    if folds >= 2 and len(yva) < CV_BELOW and n_all <= CV_MAX_ROWS:
        feats = torch.cat([ftr.reshape(len(ytr), -1), fva.reshape(len(yva), -1)])
        labels = torch.cat([ytr, yva])
        heads, kn = cross_validate(feats, labels, C, grid, folds=folds, seed=cfg.train.seed, knn=knn, **kw)
        method = f"{folds}-fold cross-validation over the {n_all} train+val images"
        n = n_all
    else:
        heads, _ = sweep(prep.train, prep.val, C, [g[0] for g in grid], [g[1] for g in grid], seed=cfg.train.seed,
                         **kw)
        kn = knn_accuracy(prep.train, prep.val, C, list(knn))
        method = f"the val split ({len(yva)} images)"
        n = len(yva)
    return heads[choose_best(heads, n)], kn, n, method


# ----------------------------------------------------------------------------------------------- the decision


def decide(cands: list[Candidate], *, budget_left: float | None, n_train: int, n_val: int) -> Decision:
    """The winner and the strategy (see the module docstring); pure: tested on synthetic candidates."""
    ok = [i for i, c in enumerate(cands) if c.status == "ok" and c.acc is not None]
    if not ok:
        return Decision(None, "none", ["no candidate could be probed"])
    top = max(ok, key=lambda i: (cands[i].acc, -(cands[i].loss or 0.0)))
    best = cands[top]
    tied = [i for i in ok if i == top or (cands[i].n == best.n and stats.tied(cands[i].acc, best.acc, best.n))]

    def speed(i: int) -> float:
        return cands[i].images_per_sec or 0.0

    winner = max(tied, key=lambda i: (speed(i), cands[i].acc, -i))
    for i in ok:
        cands[i].tied = i in tied and len(tied) > 1
        cands[i].winner = i == winner
    w = cands[winner]
    reasons = [_why_winner(cands, winner, top, tied)]
    if w.acc >= 1.0:
        reasons.append(f"linear probe: the probe makes no mistake on {w.n} images; fine-tuning cannot improve it")
        return Decision(winner, "linear-probe", reasons)
    if budget_left is None:
        reasons.append(f"LP-FT ({MAX_EPOCHS} epochs): no budget given; fine-tuning usually adds accuracy on top of "
                       "the linear probe, and best.pt is selected on val")
        return Decision(winner, "lp-ft", reasons)
    ft = (n_train * TRAIN_COST + n_val) / w.images_per_sec if w.images_per_sec else math.inf
    need = (MAX_EPOCHS - 1) * ft + 15.0  # + the linear-probe epoch on stored features, start-up, the report
    if budget_left < need:
        reasons.append(f"linear probe: the {budget_text(max(budget_left, 0))} left can't hold LP-FT's "
                       f"{MAX_EPOCHS - 1} fine-tuning epochs (~{budget_text(ft) if math.isfinite(ft) else '?'} each at "
                       f"{_ips(w.images_per_sec)} forward), and a shorter LP-FT is not a measured recipe (on "
                       "flowers12 one fine-tuning epoch ended 2.1 points below the linear probe)")
        return Decision(winner, "linear-probe", reasons, ft)
    reasons.append(f"LP-FT: the {budget_text(budget_left)} left hold the linear-probe epoch and its "
                   f"{MAX_EPOCHS - 1} fine-tuning epochs (~{budget_text(ft)} each, estimated from "
                   f"{_ips(w.images_per_sec)} forward); the run measures its training step and checks")
    return Decision(winner, "lp-ft", reasons, ft)


def acc_text(acc: float | None, n: int | None) -> str:
    """``"95.1% ± 1.6"``: an estimate with the half width of its 95% Wilson interval (points)."""
    if acc is None:
        return "-"
    pm = stats.pm_text(acc, n)
    return f"{100 * acc:.1f}%" + (f" {pm}" if pm else "")


def _ips(v: float | None) -> str:
    return f"{v:.3g} img/s" if v else "unmeasured img/s"


def _why_winner(cands: list[Candidate], winner: int, top: int, tied: list[int]) -> str:
    w = cands[winner]
    est = f"{acc_text(w.acc, w.n)} on {w.n} images"
    others = [i for i in range(len(cands)) if i != winner and cands[i].status == "ok" and cands[i].acc is not None]
    if not others:
        return f"{w.model}: the only candidate probed ({est})"
    if winner == top and len(tied) == 1:
        nxt = max(others, key=lambda i: cands[i].acc)
        return (f"{w.model} has the best probe estimate, {est}, ahead of {cands[nxt].model} "
                f"({acc_text(cands[nxt].acc, cands[nxt].n)}) by more than the noise")
    names = ", ".join(cands[i].model for i in tied if i != winner)
    lead = "" if winner == top else f"; {cands[top].model} is {acc_text(cands[top].acc, cands[top].n)}"
    return (f"{w.model} ({est}) is within noise of {names}{lead}: a tie, broken by cost ({_ips(w.images_per_sec)} "
            "forward, the fastest of them)")


# ----------------------------------------------------------------------------------------------- candidates


def shelf_pairs() -> list[tuple[str, str]]:
    """The default shelf with each model's pretrained weights."""
    return [(m, "default") for m in SHELF]


def speed_file(cache_dir=None) -> Path | None:
    from finetune.files import cache_root

    root = cache_root(cache_dir)
    return None if root is None else root / "auto" / "speeds.json"


def _speed_key(cfg, device, precision: str) -> str:
    return json.dumps([cfg.model.name, cfg.data.image_size, str(device), precision, os.cpu_count()])


def recorded_speed(cfg, device, precision: str, cache_dir=None) -> float | None:
    """The forward img/s recorded when this model's features were last computed here (a cached rerun)."""
    p = speed_file(cache_dir)
    try:
        v = json.loads(p.read_text()).get(_speed_key(cfg, device, precision)) if p else None
    except (OSError, ValueError, AttributeError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def record_speed(cfg, device, precision: str, ips: float, cache_dir=None) -> None:
    from finetune import files

    p = speed_file(cache_dir)
    if p is None:
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(p.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[_speed_key(cfg, device, precision)] = ips
        files.atomic_write_text(p, json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only cache: the next rerun measures again


def probe_candidate(name: str, weights: str, data: str, grid, *, cache_dir, folds: int, recipe_kw: dict
                    ) -> Candidate:
    """Stage 1 for one candidate: its features (store or backbone), the estimate, the speed."""
    from finetune.config.preflight import weights_file
    from finetune.tools.probe import prepare, probe_recipe

    t0 = time.perf_counter()
    c = Candidate(name, weights)
    try:
        weights_file(weights)  # a missing file: this candidate is skipped, the others still run
        cfg = probe_recipe(name, weights=weights, data=data, **recipe_kw)
        prep = prepare(cfg, cache_dir=cache_dir, need_val=True)
    except (WeightsError, ModelError) as e:
        return dataclasses.replace(c, status="skipped", reason=str(e), seconds=time.perf_counter() - t0)
    except ConfigError as e:
        if not str(e).startswith("probe ") or "validation images" in str(e):  # the data's: every candidate's
            raise
        # a head that is not one Linear layer on the features (the probe can't cut the model)
        return dataclasses.replace(c, status="skipped", reason=str(e), seconds=time.perf_counter() - t0)
    c.weights = prep.bb.weights if weights != "default" else weights
    c.parameters = sum(p.numel() for p in prep.bb.model.parameters())
    c.from_store, c.features_seconds = prep.from_store, prep.seconds
    n_img = len(prep.train[1]) + len(prep.val[1])
    if not prep.from_store and prep.seconds > 0:
        c.images_per_sec = n_img / prep.seconds
        record_speed(cfg, prep.device, prep.precision, c.images_per_sec, cache_dir)
    else:
        c.images_per_sec = recorded_speed(cfg, prep.device, prep.precision, cache_dir)
    head, kn, c.n, method = estimate(prep, grid, cfg, folds=folds)
    c.acc, c.loss, c.lr, c.weight_decay = head.val_acc, head.val_loss, head.lr, head.weight_decay
    ci = stats.wilson(c.acc, c.n)
    c.ci = None if ci is None else [ci[0], ci[1]]
    c.knn = {str(k): v for k, v in kn.items()}
    c.seconds = time.perf_counter() - t0
    c.method, c.train_images, c.val_images = method, len(prep.train[1]), len(prep.val[1])
    return c


def to_json(cands: list[Candidate], decision: Decision, **extra: Any) -> dict[str, Any]:
    """auto.json's content."""
    from finetune.run.checkpoint import finite_json

    return finite_json({"version": 1, **extra, "candidates": [dataclasses.asdict(c) for c in cands],
                        "winner": decision.winner,
                        "strategy": decision.strategy, "reasons": decision.reasons})


def progress_line(stage: str, started: float, budget: float | None) -> str:
    """``[probe] ... (12m30s of 15m left)``: the stage and what is left of the budget."""
    if budget is None:
        return f"auto [{stage}]"
    left = budget - (time.monotonic() - started)
    return f"auto [{stage}, {budget_text(max(left, 0))} of {budget_text(budget)} left]"


def probe_all(pairs, data: str, grid, *, started: float, budget: float | None, cache_dir, folds: int,
              recipe_kw: dict, progress: Callable[[str], None]) -> list[Candidate]:
    """Stage 1 over every candidate; a candidate that would take the stage past :data:`PROBE_SHARE` of the budget
    (assumed to cost what the previous one did) is skipped: the budget must still hold the training."""
    cands: list[Candidate] = []
    last = 0.0  # what the previous candidate cost: the next one is assumed to cost as much
    for i, (name, w) in enumerate(pairs):
        used = time.monotonic() - started
        if budget is not None and i > 0 and used + last > PROBE_SHARE * budget:
            cands.append(Candidate(name, w, status="skipped", reason=f"the probe stage had used {budget_text(used)} "
                                   f"of the {budget_text(budget)} budget; another candidate (~{budget_text(last)} "
                                   f"like the last) would take it past {PROBE_SHARE:.0%}"))
            progress(f"{progress_line('probe', started, budget)} {name}: skipped ({cands[-1].reason})")
            continue
        progress(f"{progress_line('probe', started, budget)} {name} ({i + 1}/{len(pairs)}): features and "
                 f"{len(grid)} heads")
        c = probe_candidate(name, w, data, grid, cache_dir=cache_dir, folds=folds, recipe_kw=recipe_kw)
        last = c.seconds
        if c.status == "skipped":
            progress(f"{progress_line('probe', started, budget)} {name}: skipped: {c.reason}")
        else:
            progress(f"{progress_line('probe', started, budget)} {name}: {acc_text(c.acc, c.n)} "
                     f"({c.n} images), k-NN {', '.join(f'k={k} {100 * v:.1f}%' for k, v in c.knn.items())}; "
                     f"{_ips(c.images_per_sec)} forward; {c.seconds:.1f} s")
        cands.append(c)
    return cands


class NoCandidate(FinetuneError):
    """No candidate could be probed."""


def no_candidate(cands: list[Candidate]) -> NoCandidate:
    """One line: the first candidate's reason (up to its advice), and how many more were skipped (each was named
    on its own line as it was skipped)."""
    first = next((c for c in cands if c.reason), None)
    why = "" if first is None else f"{first.model}: {first.reason.split('; ')[0]}"
    more = len(cands) - 1
    why += f"; {more} more skipped, each for its own reason" if more > 0 else ""
    return NoCandidate(f"no candidate backbone could be probed ({why}); pass --model NAME=WEIGHTS_FILE,... with "
                       "weights files you have")


# ----------------------------------------------------------------------------------------------- the command


@dataclass
class AutoResult:
    run_dir: Path
    candidates: list[Candidate]
    decision: Decision
    result: Any  # finetune.run.runner.RunResult
    seconds: float
    budget: float | None
    stages: dict[str, float]
    epochs: int


def recipe_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """The recipe keys the command's options set (those given)."""
    keys = {"labels": "data.labels", "val_split": "data.val_split", "image_size": "data.image_size",
            "batch_size": "train.batch_size", "seed": "train.seed", "device": "train.device",
            "precision": "train.precision"}
    return {keys[k]: v for k, v in kw.items() if v is not None and k in keys}


def final_recipe(strategy: str, c: Candidate, data: str, recipe_kw: dict[str, Any]):
    """The recipe stage 3 trains: LP-FT from the winner's weights, or the linear probe with its chosen head's LR and
    weight decay."""
    from finetune import config

    over = {"model.name": c.model, "model.weights": c.weights, "data.path": data, **recipe_overrides(recipe_kw)}
    if strategy == "linear-probe":
        r = config.apply_overrides(config.load_recipe("linear-probe"),
                                   {**over, "optimizer.lr": c.lr, "optimizer.weight_decay": c.weight_decay})
        r.description = (f"finetune auto: {c.model}, the linear probe (lr {c.lr:g}, weight decay "
                         f"{c.weight_decay:g}: the probe's choice)")
    else:
        r = config.apply_overrides(config.load_recipe("lp-ft"), over)
        r.description = f"finetune auto: {c.model}, LP-FT (the lp-ft recipe)"
    r.name = f"auto-{strategy}"
    return r


def run_auto(pairs: list[tuple[str, str]], *, data: str, budget: float | None, out: Path, overwrite: bool,
             cache_dir, folds: int, recipe_kw: dict[str, Any], lrs, wds, progress: Callable[[str], None],
             train_fn: Callable[..., Any], report_fn: Callable[[Path], Any], reporter=None,
             started: float | None = None) -> AutoResult:
    """The three stages (module docstring); ``train_fn`` is :func:`finetune.api.train`, ``report_fn`` writes
    report.html (both given by the api, which adds the report to every run)."""
    from finetune.run.budget import BudgetTooShort
    from finetune.tools.probe import DEFAULT_LRS, DEFAULT_WDS

    started = time.monotonic() if started is None else started
    grid = [(lr, wd) for wd in (wds or DEFAULT_WDS) for lr in (lrs or DEFAULT_LRS)]
    cands = probe_all(pairs, data, grid, started=started, budget=budget, cache_dir=cache_dir, folds=folds,
                      recipe_kw=recipe_kw, progress=progress)
    t_probe = time.monotonic() - started
    ok = [c for c in cands if c.status == "ok"]
    if not ok:
        raise no_candidate(cands)
    left = None if budget is None else budget - (time.monotonic() - started)
    decision = decide(cands, budget_left=left, n_train=ok[0].train_images, n_val=ok[0].val_images)
    w = cands[decision.winner]
    progress(f"{progress_line('decide', started, budget)} " + "; ".join(decision.reasons))
    t_decide = time.monotonic() - started - t_probe
    progress(f"{progress_line('train', started, budget)} {w.model}: {decision.strategy}")
    try:
        whole = MAX_EPOCHS if decision.strategy == "lp-ft" else 1  # LP-FT: all its epochs, or none
        result = train_fn(final_recipe(decision.strategy, w, data, recipe_kw), out=out, overwrite=overwrite,
                          budget=budget, reporter=reporter, min_epochs=whole, started=started)
    except BudgetTooShort as e:
        decision.strategy = "linear-probe"
        decision.reasons.append(f"linear probe after all: the run measured its training step and {e.fits}")
        progress(f"{progress_line('train', started, budget)} {w.model}: {decision.reasons[-1]}")
        result = train_fn(final_recipe("linear-probe", w, data, recipe_kw), out=out, overwrite=overwrite,
                          budget=None, reporter=reporter, started=started)
    tp = (result.budget or {}).get("throughput") or {}
    w.train_images_per_sec = tp.get("train")  # the run's measured training step (LP-FT)
    seconds = time.monotonic() - started
    stages = {"probe": t_probe, "decide": t_decide, "train": seconds - t_probe - t_decide}
    return AutoResult(Path(result.run_dir), cands, decision, result, seconds, budget, stages, len(result.epochs))


def write_outputs(res: AutoResult, report_fn: Callable[[Path], Any]) -> None:
    """recipe.yaml (config.yaml with a header: ``finetune train --recipe RUN/recipe.yaml`` reruns the chosen run),
    auto.json, and report.html again with the decision."""
    from finetune import files

    run = res.run_dir
    head = (f"# made by finetune auto: {res.candidates[res.decision.winner].model}, {res.decision.strategy}\n"
            f"# rerun the chosen run with: finetune train --recipe {run}/recipe.yaml --out NEW_DIR\n")
    files.atomic_write_text(run / "recipe.yaml", head + (run / "config.yaml").read_text())
    ok = [c for c in res.candidates if c.status == "ok"]
    test = res.result.test or {}
    doc = to_json(res.candidates, res.decision, budget_seconds=res.budget, seconds=res.seconds, stages=res.stages,
                  data={"train": ok[0].train_images, "val": ok[0].val_images,
                        "test": test.get("n"), "classes": len(res.result.class_names)},
                  estimate=ok[0].method, epochs=res.epochs, recipe="recipe.yaml")
    files.atomic_write_text(run / "auto.json", json.dumps(doc, indent=1, allow_nan=False))
    report_fn(run)
