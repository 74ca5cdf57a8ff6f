"""The LR range test (Smith 2017; fastai's ``lr_find``, Lightning's ``Tuner.lr_find``): train the recipe's trainable
parameters for ~100 steps while the LR grows exponentially from ``start_lr`` to ``end_lr``, record the loss, and
suggest an LR from the curve.

The suggestion rule is fastai's default, **valley**: the longest stretch over which the smoothed loss keeps falling,
and the LR a bit past its middle (``start + len/3 + len/6`` of the stretch). Two details differ from fastai's code,
both because they put fastai's pick at the *top* of the descent on a fine-tune's curve (issue 30: 5.2e-4 where a
sweep's best was 3e-3), not in the middle of it as the rule says:

- **Only the visible descent counts.** fastai's stretch is a longest strictly decreasing subsequence over the whole
  curve, so a plateau that falls by 1e-5 per step counts as descent. A new head starts at zero (loss ln C), so from
  the first step every tiny LR lowers the loss a little: the "valley" then starts at the first step, 1e-6, and its
  middle is ~1e-3 whatever the data. Here the stretch starts at the last point still within ``VISIBLE`` (5%) of the
  curve's total fall from its top, and ends where the loss first comes within ``BOTTOM`` (2%) of that fall above
  its minimum: a head that memorises a small training set sits at ~0 loss over two decades of LR, and where on
  that floor the noise puts the minimum says nothing (fastai's stretch runs to the minimum).
- **The curve is smoothed without lag.** fastai smooths with an exponential moving average (beta 0.98): its mean
  age is ~35 steps, about 3 decades of LR at 100 steps over 1e-7..10, so the smoothed minimum sits ~1-2 decades
  right of where the loss bottomed out. The rules (and the plot) use a centred moving average of the per-step loss
  (``SMOOTH`` steps each side); the moving average still decides when the test stops (divergence), as fastai's.

The alternatives fastai offers are computed on the same curve and written beside it: **steep** (the LR where
d loss / d log(lr) is most negative: often a single noisy step on small batches, fastai's default before valley)
and **minimum/10** (a tenth of the LR at the lowest loss). The plot marks all three.

Everything is built with the library's own functions (the same data, model, freeze plan, optimizer and parameter
groups, loss, precision and BN policy as ``train``), and when only the head trains the frozen part runs once: the
test runs on cached features (``features.plan_cache``) in seconds. Groups keep their LR ratios (``lr_mult``,
layer decay): the suggestion is the base LR. Nothing here changes the recipe's model for ``train``: ``--lr auto``
runs this on its own copy first, then trains from the start with the suggested LR.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import Recipe, from_dict, preflight
from finetune.errors import ConfigError

log = logging.getLogger("finetune")

RULE = "valley"
RULES = ("valley", "steep", "minimum")  # fastai's SuggestionMethod names; minimum suggests a tenth of the minimum's LR
LABELS = {"valley": "valley", "steep": "steep", "minimum": "minimum/10"}
VISIBLE = 0.05  # the valley starts where the loss has fallen by 5% of its total fall: before that it is a plateau
BOTTOM = 0.02  # ... and ends where it is within 2% of that fall above its minimum: after that it is the bottom
SMOOTH = 4  # the centred moving average's half-width, in steps per 100 steps of the test (9 steps, ~0.7 decades)
FLAT = 0.02  # a curve whose minimum is within 2% of its start never found a useful LR
FILES = ("lr_find.png", "lr_find.json")  # what the test writes into a run directory


@dataclass
class LRFind:
    """The curve (``lrs``; ``losses``: the per-step loss smoothed by a centred moving average, what the rules and the
    plot use; ``raw_losses``: the per-step loss), the suggested base LR (``rule``) and every rule's suggestion
    (``suggestions``: rule -> ``{"lr": ..., "index": ...}``, ``index`` the step whose LR is nearest)."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    index: int  # the step whose LR is suggested
    rule: str = RULE
    stopped: str = ""  # why the test ended before ``steps`` (divergence), or ""
    flat: bool = False  # the loss never fell by FLAT of its start: no LR helped, the suggestion means nothing
    info: dict[str, Any] = field(default_factory=dict)
    suggestions: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw_losses: list[float] = field(default_factory=list)

    def alternatives(self) -> str:
        """The other rules' suggestions as text: ``steep 1.2e-02, minimum/10 3.4e-02``."""
        return ", ".join(f"{LABELS[k]} {v['lr']:.2g}" for k, v in self.suggestions.items() if k != self.rule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``lr_find.json`` (the curve and suggestion) and ``lr_find.png`` (the plot) into ``out_dir``."""
        from finetune.files import atomic_write_bytes, atomic_write_text

        out = Path(out_dir)
        atomic_write_text(out / FILES[1], json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_bytes(out / FILES[0], lambda f: f.write(self.png()))
        return [out / FILES[0], out / FILES[1]]

    def legend(self) -> list[str]:
        """The plot's legend entries for the rules' markers, in ``suggestions`` order."""
        return [f"{LABELS.get(k, k)}: {v['lr']:.2e}" + (" (suggested)" if k == self.rule else "")
                for k, v in self.suggestions.items()]

    def png(self) -> bytes:
        """:meth:`figure` as PNG bytes (``lr_find.png``)."""
        import io

        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        return buf.getvalue()

    def figure(self):
        """The curve on a log LR axis (per-step loss in grey, the smoothed loss in blue) with each rule's suggestion
        marked on it (valley, steep, minimum/10) and named in the legend; the suggested one also as a dashed line."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        if self.raw_losses:
            ax.plot(self.lrs, self.raw_losses, color="0.8", linewidth=0.8, label="loss per step")
        ax.plot(self.lrs, self.losses, color="tab:blue", label="smoothed")
        lo, start = min(self.losses), self.losses[0]  # fastai's view: a divergence spike doesn't flatten the rest
        ax.set_ylim(lo - 0.05 * (start - lo + 1e-3), start + 0.5 * (start - lo + 1e-3))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        styles = {"valley": ("tab:red", "o"), "steep": ("tab:orange", "^"), "minimum": ("tab:green", "s")}
        for (name, sug), label in zip(self.suggestions.items(), self.legend()):
            color, marker = styles.get(name, ("tab:gray", "D"))
            if name == self.rule:
                ax.axvline(sug["lr"], color=color, linestyle="--", linewidth=1)
            ax.plot([sug["lr"]], [self.losses[sug["index"]]], marker, color=color,
                    markersize=8 if name == self.rule else 6, label=label)
        ax.legend(fontsize=8)
        ax.set_title(self.info.get("title", "LR range test"), fontsize=9)
        fig.tight_layout()
        return fig


def lr_schedule(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """Exponential growth: ``start_lr`` at step 0, ``end_lr`` at step ``steps - 1``."""
    return start_lr * (end_lr / start_lr) ** (step / max(steps - 1, 1))


def smooth(raw: list[float], steps: int = 100) -> list[float]:
    """A centred moving average of the per-step loss (``SMOOTH`` steps each side per 100 steps of the test, fewer at
    the ends): no lag, so a feature of the curve stays at the LR that made it."""
    h = max(1, round(SMOOTH * steps / 100))
    out = []
    for i in range(len(raw)):
        w = raw[max(0, i - h):i + h + 1]
        out.append(sum(w) / len(w))
    return out


def _longest_descent(losses: list[float]) -> tuple[int, int]:
    """fastai's dynamic programme: the longest strictly decreasing subsequence of ``losses`` (O(n^2), n ~ 100);
    returns fastai's ``(max_start, max_end)``: the end index and ``end - length`` (one before its first point)."""
    lds = [1] * len(losses)
    start = end = 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[end] < lds[i]:
            end, start = i, i - lds[i]
    return start, end


def valley(lrs: list[float], losses: list[float]) -> int:
    """The valley rule: the index of the suggested LR, ``start + len/3 + len/6`` (floored, fastai's) along the
    longest decreasing stretch of ``losses`` over the visible descent: from the plateau's end (the last point still
    within ``VISIBLE`` of the curve's fall from its top to its minimum) to where it reaches the bottom (the first
    point within ``BOTTOM`` of that fall above the minimum)."""
    n = len(losses)
    if n < 2:
        return 0
    m = min(range(n), key=losses.__getitem__)
    top = max(losses[:m + 1])
    fall = top - losses[m]
    if fall <= 0:
        return 0  # never fell: any index means nothing (the caller flags a flat curve)
    s0 = max(i for i in range(m + 1) if losses[i] >= top - VISIBLE * fall)
    e0 = min(i for i in range(s0, m + 1) if losses[i] <= losses[m] + BOTTOM * fall)
    start, end = _longest_descent(losses[s0:e0 + 1])
    sections = (end - start) / 3
    return max(0, min(n - 1, s0 + start + int(sections) + int(sections / 2)))


def steep(lrs: list[float], losses: list[float]) -> int:
    """fastai's ``steep``: the index where d loss / d log(lr) (to the next step) is most negative."""
    if len(losses) < 2:
        return 0
    grads = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(losses) - 1)]
    return min(range(len(grads)), key=grads.__getitem__)


def suggest(lrs: list[float], losses: list[float]) -> dict[str, dict[str, Any]]:
    """Every rule's suggestion on the curve, trimmed as fastai trims it (the first tenth of the steps and the last
    five): ``{"valley": {"lr", "index"}, "steep": ..., "minimum": ...}`` with indices into the whole curve;
    minimum's ``lr`` is a tenth of the lowest loss's LR and its ``index`` the step nearest that LR."""
    lo, hi = len(lrs) // 10, max(len(lrs) - 5, len(lrs) // 10 + 2)
    a, b = lrs[lo:hi], losses[lo:hi]
    v, st = lo + valley(a, b), lo + steep(a, b)
    lr_min = a[min(range(len(b)), key=b.__getitem__)] / 10
    near = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / lr_min)))
    return {"valley": {"lr": lrs[v], "index": v}, "steep": {"lr": lrs[st], "index": st},
            "minimum": {"lr": lr_min, "index": near}}


def range_test(model, loader, optimizer, loss_fn, *, steps: int = 100, start_lr: float = 1e-7,
               end_lr: float = 10.0, device=None, precision: str = "fp32", channels_last: bool = False,
               after_train_mode=lambda m: None, beta: float = 0.98, diverge: float = 4.0,
               set_epoch=None) -> LRFind:
    """Train ``model`` for ``steps`` optimizer steps (cycling through ``loader``'s epochs), step k at
    ``lr_schedule(k)`` times each group's ratio to the first group's LR; record each step's loss; stop early once
    its bias-corrected exponential moving average (``beta``, as fastai) exceeds ``diverge`` x its minimum (or the
    loss is not finite). The rules read the loss smoothed by :func:`smooth` (see :func:`suggest`)."""
    import torch

    from finetune.training.engine import autocast, to_device

    device = device or torch.device("cpu")
    base = optimizer.param_groups[0]["lr"]
    ratios = [g["lr"] / base if base else 1.0 for g in optimizer.param_groups]
    model.train()
    after_train_mode(model)
    lrs: list[float] = []
    raw: list[float] = []
    avg, best, stopped, epoch = 0.0, math.inf, "", 0
    batches = iter(())
    for k in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            if set_epoch is not None:
                set_epoch(loader, epoch)
            epoch += 1
            batches = iter(loader)
            x, y = next(batches)
        lr = lr_schedule(k, steps, start_lr, end_lr)
        for g, r in zip(optimizer.param_groups, ratios):
            g["lr"] = lr * r
        x, y = to_device(x, y, device, channels_last)
        with autocast(device, precision):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            stopped = f"loss became {value} at lr {lr:.2e}"
            break
        loss.backward()
        optimizer.step()
        avg = beta * avg + (1 - beta) * value
        ema = avg / (1 - beta ** (k + 1))
        lrs.append(lr)
        raw.append(value)
        best = min(best, ema)
        if k > steps // 10 and ema > diverge * best:
            stopped = f"loss diverged (> {diverge:g}x its minimum) at lr {lr:.2e}"
            break
    if len(lrs) < 3:
        raise ConfigError(f"the LR range test stopped after {len(lrs)} steps ({stopped or 'no data'}); "
                          "lower its start LR")
    losses = smooth(raw, steps)
    found = suggest(lrs, losses)
    flat = min(losses) > (1 - FLAT) * losses[0]
    return LRFind(lrs, losses, found[RULE]["lr"], found[RULE]["index"], stopped=stopped, flat=flat,
                  suggestions=found, raw_losses=raw)


def lr_find(recipe: Recipe, *, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0,
            reporter=None) -> LRFind:
    """The range test for ``recipe``: its data, model, freeze plan, optimizer (with ``lr`` replaced by the test's),
    loss and precision, on cached features when only a head (or a cut-off trailing block) trains."""
    preflight.check_recipe(recipe)  # a missing path or unknown model: the error before torch is imported
    from finetune import data as D

    if not (0 < start_lr < end_lr):
        raise ConfigError(f"the LR range test needs 0 < start_lr < end_lr, got {start_lr:g} and {end_lr:g}")
    if steps < 10:
        raise ConfigError(f"the LR range test needs at least 10 steps, got {steps}")
    cfg = from_dict({**recipe.to_dict(), "optimizer": {**recipe.to_dict()["optimizer"], "lr": 1.0}})
    parts, step, loader, feats = _assembled(cfg)
    cfg, bb, model, optimizer, device = parts.cfg, parts.bb, parts.model, parts.optimizer, parts.device
    m, tl, st = (feats.model, feats.train_loader, feats.step) if feats is not None else (model, loader, step)
    res = range_test(m, tl, optimizer, step.loss_fn, steps=steps, start_lr=start_lr, end_lr=end_lr, device=device,
                     precision=st.precision, channels_last=st.channels_last, after_train_mode=st.after_train_mode,
                     set_epoch=D.set_epoch)
    res.info = {"model": bb.name, "weights": bb.weights, "optimizer": cfg.optimizer.name,
                "batch_size": cfg.train.batch_size, "steps": steps, "start_lr": start_lr, "end_lr": end_lr,
                "on_cached_features": feats is not None, "trainable": sum(p.numel() for p in model.parameters()
                                                                          if p.requires_grad),
                "title": f"{bb.name}, {cfg.optimizer.name}, batch {cfg.train.batch_size}"
                         f"{', cached features' if feats is not None else ''}"}
    return res


def _assembled(cfg: Recipe):
    """``(parts, step, image loader, FeatureRun or None)`` for the test, as train assembles them: on a stand-in for
    the backbone when the run trains only the head and every feature is stored (finetune/models/stand_in.py), else
    (or when a feature is missing) on the real model."""
    import torch

    from finetune import data as D
    from finetune.models.stand_in import NeedsBackbone, is_stand_in
    from finetune.run.assemble import assemble, head_only_on_stored_features
    from finetune.speedups.feature_cache import plan_cache
    from finetune.training import freeze as F
    from finetune.training import imbalance
    from finetune.training.engine import Step

    for stand_in in [True, False] if head_only_on_stored_features(cfg) else [False]:
        torch.manual_seed(cfg.train.seed)  # the new head's init and dropout: as train seeds them
        try:
            parts = assemble(cfg, stand_in=stand_in)  # as train assembles it, without a run directory
            b = parts.bundle
            loss_fn = imbalance.loss_fn(parts.cfg, b.train.targets, list(b.class_names), parts.device)
            step = Step(optimizer=parts.optimizer, loss_fn=loss_fn, device=parts.device, precision=parts.precision,
                        channels_last=parts.channels_last,
                        after_train_mode=lambda m: F.apply_bn_policy(m, cfg.freeze.bn))
            loader = D.make_loader(b.train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                   device=parts.device.type, workers=cfg.data.workers,
                                   weights=imbalance.sample_weights(cfg.data.sampler, b.train.targets,
                                                                    len(b.class_names)))
            feats, _ = plan_cache(parts.cfg, parts.bb, b, step, device=parts.device, precision=parts.precision,
                                  channels_last=parts.channels_last)
        except NeedsBackbone:
            continue
        if is_stand_in(parts.model):
            for note in parts.bb.notes:  # what building the backbone said
                log.warning(note)
        return parts, step, loader, feats
    raise AssertionError("unreachable: the real model never raises NeedsBackbone")


def resolve_auto_lr(recipe: Recipe, reporter=None) -> tuple[Recipe, LRFind | None]:
    """``optimizer.lr: auto``: run the range test and return the recipe with its suggestion (what ``train`` then
    runs and records in config.yaml) and the test (to save beside the run); any other LR: unchanged, None."""
    if recipe.optimizer.lr != "auto":
        return recipe, None
    found = lr_find(recipe, reporter=reporter)
    if found.flat:
        raise ConfigError(f"--lr auto: the LR range test's loss never fell by {FLAT:.0%} (from {found.losses[0]:.4f}, "
                          f"lowest {min(found.losses):.4f}) over lr {found.lrs[0]:.0e}..{found.lrs[-1]:.0e}, so it "
                          "suggests nothing (typical from random init: ~100 steps teach it too little); pass --lr")
    data = recipe.to_dict()
    data["optimizer"]["lr"] = float(f"{found.suggestion:.3g}")
    out = from_dict(data)
    log.info(f"lr auto: the LR range test suggests {out.optimizer.lr:g} ({found.rule} rule, {len(found.lrs)} steps"
             f"{' on cached features' if found.info.get('on_cached_features') else ''}); training with it")
    return out, found
