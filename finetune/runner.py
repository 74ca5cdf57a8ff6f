"""A training run: recipe -> model, data, freeze plan, optimizer -> epochs -> run directory.

The run directory holds the resolved ``config.yaml`` (a valid recipe that reruns the same thing), ``metrics.json``,
``last.pt`` and ``best.pt`` (plain-dict checkpoints readable with ``weights_only=True``) and TensorBoard events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import __version__, checkpoint as ck
from finetune import distributed as dist_
from finetune import report as _report
from finetune.config import Recipe, from_dict
from finetune.engine import (NonFiniteLoss, Reporter, Step, evaluate, maybe_compile, resolve_device,
                             resolve_precision, set_lr, train_one_epoch, wants_channels_last)
from finetune.errors import CheckpointError, ConfigError, FinetuneError

log = logging.getLogger("finetune")


class TrainingDiverged(FinetuneError):
    """Loss became NaN/inf; the last good checkpoint is kept."""


class Interrupted(FinetuneError):
    """Ctrl-C during training: say where the last checkpoint is and how to continue."""

    exit_code = 130


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    best_val_acc: float | None
    epochs: list[dict[str, Any]]
    class_names: list[str]


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


def probe_data_cfg(name: str, weights: str) -> dict[str, Any]:
    """The backbone's input config (size, mean/std, ...) without building it for real or downloading weights."""
    from finetune.models import data_config

    return data_config(name, weights)


def train(recipe: Recipe | None, *, out: str | Path | None = None, overwrite: bool = False,
          resume: str | Path | None = None, epochs: int | None = None,
          reporter: Reporter | None = None) -> RunResult:
    """Run ``recipe`` and write the run directory.

    ``resume`` continues the run in that directory from its ``last.pt`` with the recipe stored there (``recipe``
    is ignored); ``epochs`` may extend it. Ctrl-C before the first checkpoint of a new run (while data loads or
    features are computed) removes the new run directory: nothing in it could be resumed, and keeping it would make
    the same command fail with "already exists".
    """
    made: dict[str, Any] = {"lock": ck.RunLock()}  # the run directory's lock, held until the run ends
    try:
        return _train(recipe, out=out, overwrite=overwrite, resume=resume, epochs=epochs, reporter=reporter,
                      made=made)
    except KeyboardInterrupt:
        run_dir = made.get("run_dir")
        if resume is not None:
            raise Interrupted(f"interrupted; continue with finetune train --resume {resume}") from None
        if run_dir is None:
            raise Interrupted("interrupted before the run directory was created; nothing was written") from None
        if not (run_dir / "last.pt").exists():
            made["lock"].release()
            ck.clear_run_dir(run_dir)  # only what this run wrote (it made the directory, or emptied a run's)
            with contextlib.suppress(OSError):
                (run_dir / ck.LOCK).unlink()
                run_dir.rmdir()
            raise Interrupted(f"interrupted before the first checkpoint; removed the new run directory "
                              f"'{run_dir}' (nothing to resume); run the same command to start again") from None
        raise Interrupted(f"interrupted before the first checkpoint; nothing to resume in '{run_dir}'") from None
    finally:
        made["lock"].release()


def _train(recipe: Recipe | None, *, out, overwrite: bool, resume, epochs, reporter, made: dict) -> RunResult:
    from finetune import data as D
    from finetune import freeze as F
    from finetune import optim as O
    from finetune.models import build_model

    reporter = reporter or Reporter()
    state = None
    if resume is not None:
        run_dir = Path(resume)
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
        state = ck.load_checkpoint(last)
        data = state["recipe"]
        if state.get("epoch_base") != 1 and data["freeze"]["schedule"]:  # written when schedules were 0-based
            data = {**data, "freeze": {**data["freeze"], "schedule": [{**s, "epoch": s["epoch"] + 1}
                                                                      for s in data["freeze"]["schedule"]]}}
        if epochs is not None:  # validated with the rest: --epochs 0 is an error, not an empty run
            data = {**data, "train": {**data["train"], "epochs": epochs}}
        recipe = from_dict(data)
        if int(state["epoch"]) >= recipe.train.epochs and not state.get("partial"):
            raise CheckpointError(f"nothing to resume: '{run_dir}' already finished {state['epoch']} of "
                                  f"{recipe.train.epochs} epochs; pass --epochs N with N > {state['epoch']} to "
                                  "train longer")
    if recipe is None:
        raise ConfigError("no recipe given; pass a Recipe (finetune.load_recipe('default')) or resume=RUN_DIR")
    cfg = recipe
    seed_everything(cfg.train.seed)
    dd = dist_.from_env()  # torchrun sets RANK/WORLD_SIZE; a plain run is rank 0 of 1
    device = dist_.init(dd, resolve_device(cfg.train.device))
    if not dd.is_main:
        reporter = Reporter()  # only rank 0 prints, writes TensorBoard and saves checkpoints
    precision = resolve_precision(cfg.train.precision, device)

    data_cfg = probe_data_cfg(cfg.model.name, cfg.model.weights)
    bundle = D.build_data(cfg.data, data_cfg, seed=cfg.train.seed)
    classes = list(bundle.class_names)
    if state is not None and classes != list(state["class_names"]):
        raise ConfigError(f"cannot resume: the data's classes {classes} differ from the run's "
                          f"{list(state['class_names'])}")
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(classes):
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the data has {len(classes)} classes "
                          f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); drop num_classes to "
                          "take it from the data")

    bb = build_model(cfg.model.name, num_classes=len(classes),
                     weights="none" if state is not None else cfg.model.weights)
    plan = F.apply_freeze(bb, cfg.freeze)
    if state is None and bb.weights == "none" and plan.frozen:
        log.warning(f"{len(plan.frozen)} parameter tensors are frozen at random init (weights: none): they will "
                    "stay random; pass --weights (pretrained or a file) or drop the freeze plan")
    for stp in cfg.freeze.schedule:
        if stp.epoch > cfg.train.epochs:
            log.warning(f"the unfreeze step at epoch {stp.epoch} ({', '.join(stp.layers)}) never runs: the run has "
                        f"{cfg.train.epochs} epochs (1..{cfg.train.epochs})")
    channels_last = wants_channels_last(bb.model, cfg.train.channels_last)
    model = bb.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = O.build_optimizer(bb, cfg.optimizer)
    start_epoch = 0
    partial = state.get("partial") if state is not None else None  # an epoch saved mid-way (save_every_steps)
    if state is not None:
        model.load_state_dict(state["model"])
        start_epoch = int(state["epoch"])
        for stp in sorted(cfg.freeze.schedule, key=lambda s: s.epoch):
            if stp.epoch - 1 < start_epoch or (partial and stp.epoch - 1 == start_epoch):  # 1-based steps
                O.unfreeze_step(bb, optimizer, stp, cfg.optimizer)
        optimizer.load_state_dict(state["optimizer"])
    else:
        run_dir = _prepare_shared_run_dir(dd, Path(out) if out else ck.default_run_dir(bb.name), overwrite,
                                          made["lock"])
        if dd.is_main:
            made["run_dir"] = run_dir  # a new run: train() removes it on Ctrl-C before the first checkpoint

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if scaler is not None and state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])

    resolved = _resolved_recipe(cfg, bb, resumed=state is not None)
    if dd.is_main:
        ck.atomic_write_text(run_dir / "config.yaml", _yaml(resolved, {
            "device": str(device), "precision": precision, "channels_last": channels_last,
            "processes": dd.world_size, "classes": classes}))
    reduce = (lambda t: dist_.all_reduce_sum(t, dd)) if dd.enabled else None
    if cfg.train.sync_bn and dd.enabled:
        model = dist_.sync_batchnorm(model, device)  # same Parameter objects: optimizer and state_dict unchanged
    train_model = dist_.wrap(model, dd, device)
    epochs_total = cfg.train.epochs
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    step = Step(optimizer=optimizer, loss_fn=loss_fn, device=device, precision=precision,
                channels_last=channels_last, accumulate=cfg.train.accumulate, clip_grad=cfg.train.clip_grad,
                scaler=scaler, after_train_mode=lambda m: F.apply_bn_policy(m, cfg.freeze.bn),
                schedule=lambda t, dt: set_lr(optimizer, cfg.scheduler, t, epochs_total, dt), reduce=reduce)

    shard = {"num_replicas": dd.world_size, "rank": dd.rank}  # batch_size is per process
    val_loader = (D.make_loader(bundle.val, cfg.train.batch_size, shuffle=False, seed=cfg.train.seed,
                                device=device.type, workers=cfg.data.workers, **shard)
                  if bundle.val is not None else None)
    train_loader = D.make_loader(bundle.train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                 device=device.type, workers=cfg.data.workers, **shard)
    # frozen-feature cache: while it serves, the epochs train the head alone on features computed once. Under
    # DDP every rank computes and trains on all of them (same data, same seed: the same weights on every rank).
    from finetune.features import plan_cache

    feats, feats_info = plan_cache(cfg, bb, bundle, step, device=device, precision=precision,
                                   channels_last=channels_last, start_epoch=start_epoch)
    if feats is not None and dd.enabled:
        feats.step = dataclasses.replace(feats.step, reduce=None)
    run_model = maybe_compile(train_model, cfg.train.compile)  # checkpoints keep saving `model`'s own state_dict
    writer = _writer(run_dir, cfg) if dd.is_main else None
    history: list[dict[str, Any]] = list(state["metrics"]) if state is not None else []
    best = dict(state["best"]) if state is not None else {"epoch": 0, "val_acc": None}
    since_best = history[-1]["epoch"] - best["epoch"] if history else 0  # early stop counts across a resume
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reporter.start({"run_dir": str(run_dir), "model": bb.name,
                    "weights": bb.weights if state is None else f"{cfg.model.weights}, resumed from last.pt",
                    "device": str(device),
                    "precision": precision, "channels_last": channels_last, "classes": classes,
                    "train_images": len(bundle.train), "val_images": len(bundle.val) if bundle.val else 0,
                    "skipped": len(bundle.skipped), "trainable": n_trainable,
                    "total": sum(p.numel() for p in model.parameters()), "start_epoch": start_epoch,
                    "epochs": epochs_total, "source": bundle.source, "world_size": dd.world_size,
                    "global_batch": cfg.train.batch_size * dd.world_size, "feature_cache": feats_info,
                    "compile": cfg.train.compile, "recipe": cfg.name, "description": cfg.description})
    if feats is not None:
        reporter.note(feats.note)
    elif cfg.train.cache_features != "off":
        reporter.note(f"frozen-feature cache {feats_info}")
    extra_ckpt = {"class_names": classes, "model_name": bb.name, "num_classes": len(classes),
                  "transform": bundle.transform, "precision": precision, "channels_last": channels_last,
                  "epoch_base": 1,  # freeze.schedule epochs count from 1 (older checkpoints: from 0)
                  "data": {"path": cfg.data.path, "labels": cfg.data.labels, "val_split": cfg.data.val_split,
                           "seed": cfg.train.seed}}
    first_batch_logged = start_epoch > 0

    def checkpoint(epochs_done: int, val: dict[str, Any] | None) -> dict[str, Any]:
        """Everything needed to rebuild and use the model without the recipe, and to resume the run exactly."""
        return {"model": model.state_dict(), **extra_ckpt, "epoch": epochs_done, "plan": plan.to_dict(),
                "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
                "recipe": resolved.to_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "metrics": history, "best": best,
                "val": val, "finetune_version": __version__, "world_size": dd.world_size}

    try:
        for epoch in range(start_epoch, epochs_total):
            resuming = partial if epoch == start_epoch else None
            for stp in cfg.freeze.schedule:
                if stp.epoch - 1 == epoch and not resuming:  # (1-based) steps before a resumed start: re-applied above
                    names = O.unfreeze_step(bb, optimizer, stp, cfg.optimizer)
                    train_model = dist_.wrap(model, dd, device)  # DDP must see the newly trainable parameters
                    run_model = maybe_compile(train_model, cfg.train.compile)
                    reporter.note(f"epoch {epoch + 1}: unfroze {', '.join(stp.layers)} ({len(names)} tensors, "
                                  f"lr x {stp.lr_mult})")
            if writer is not None and not first_batch_logged:
                D.set_epoch(train_loader, epoch)
                _log_first_batch(writer, train_loader, bundle.transform, model, cfg, device, channels_last)
                first_batch_logged = True
            if feats is not None and not feats.serves(epoch):
                feats = None  # an unfreeze changed what trains: from here on the full model runs
            m, tl, vl, st = ((feats.model, feats.train_loader, feats.val_loader, feats.step) if feats is not None
                             else (run_model, train_loader, val_loader, step))
            # order, augmentation and dropout are functions of (seed, epoch): a resumed run repeats them exactly
            torch.manual_seed(epoch_seed(cfg.train.seed, epoch))
            if resuming:  # mid-epoch: skip the batches already trained, continue the RNG where it was
                torch.set_rng_state(resuming["rng"])
            D.set_epoch(tl, epoch, int(resuming["batches"]) if resuming else 0)
            reporter.epoch_start(epoch, epochs_total, len(tl))
            saver = _mid_epoch_saver(cfg, run_dir, lambda: checkpoint(epoch, None))
            tr = train_one_epoch(m, tl, st, epoch, reporter, resume=resuming,
                                 on_step=saver if dd.is_main else None)
            # val runs in the run's precision even on cached features (the head trains in fp32 there): the
            # recorded accuracy is what `finetune eval best.pt` computes with the full model
            ev = (evaluate(m if feats is not None else model, vl, len(classes), device=device,
                           precision=precision, channels_last=st.channels_last, label_smoothing=0.0,
                           reporter=reporter, reduce=st.reduce)
                  if vl is not None else None)
            row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"],
                   "val_loss": ev["loss"] if ev else None, "val_acc": ev["accuracy"] if ev else None,
                   "lr": tr["lr"], "lrs": tr["lrs"], "seconds": tr["seconds"],
                   "images_per_sec": tr["images_per_sec"]}
            if ev and ev["top5"] is not None:
                row["val_top5"] = ev["top5"]
            history.append(row)
            # without a val set there is no "best": best.pt follows the latest epoch and val_acc stays null
            score = ev["accuracy"] if ev else None
            improved = score is None or best["val_acc"] is None or score > best["val_acc"]
            if improved:
                best = {"epoch": epoch + 1, "val_acc": score}
                since_best = 0
            else:
                since_best += 1
            row["best"] = improved
            if dd.is_main:
                ckpt = checkpoint(epoch + 1, ev)
                ck.save_checkpoint(ckpt, run_dir / "last.pt")
                if improved:  # weights + metadata: the optimizer state (2x the weights for Adam) is for resuming
                    ck.save_checkpoint(ck.slim(ckpt), run_dir / "best.pt")
                ck.atomic_write_text(run_dir / "metrics.json", ck.metrics_text(best, history))
            if writer is not None:
                _log_scalars(writer, row, epoch + 1)
                _report.log_tensorboard(writer, ev, bundle.val, classes, epoch + 1)  # confusion + wrong images
            reporter.epoch_end(row)
            if cfg.train.early_stop and since_best >= cfg.train.early_stop:
                reporter.note(f"early stop: no better val accuracy for {since_best} epochs")
                break
    except NonFiniteLoss as e:
        raise TrainingDiverged(f"training diverged: {e}; the last good checkpoint is in '{run_dir}'; lower --lr "
                               "or use --clip-grad") from None
    except KeyboardInterrupt:
        if (run_dir / "last.pt").is_file():
            raise Interrupted(f"interrupted; the last checkpoint is in '{run_dir}': continue with "
                              f"finetune train --resume {run_dir}") from None
        raise  # before the first checkpoint: train() removes a new run's directory
    finally:
        if writer is not None:
            writer.flush()
        dist_.barrier(dd)  # no rank leaves (or reads a checkpoint) before rank 0 has written it
    if writer is not None:
        _log_hparams(writer, resolved, best, history)
        writer.close()
    result = RunResult(run_dir, best["epoch"], best["val_acc"], history, classes)
    if dd.is_main and cfg.train.report:  # report.html: one call into finetune/report.py (a failure is a warning)
        _report.after_run(run_dir, bundle, reporter)
    reporter.end({"run_dir": str(run_dir), "best": best, "epochs": history})
    return result


def _prepare_shared_run_dir(dd: dist_.Dist, out_dir: Path, overwrite: bool, lock: ck.RunLock) -> Path:
    """Rank 0 picks, prepares and locks the run directory; every rank gets the same path, or the same error."""
    if not dd.enabled:
        return ck.prepare_run_dir(out_dir, overwrite=overwrite, lock=lock)
    result: tuple[str, str | None] = (str(out_dir), None)
    if dd.is_main:
        try:
            ck.prepare_run_dir(out_dir, overwrite=overwrite, lock=lock)
        except FinetuneError as e:
            result = (str(out_dir), str(e))
    path, error = dist_.broadcast_object(result, dd)
    if error:
        raise CheckpointError(error)
    return Path(path)


def _mid_epoch_saver(cfg: Recipe, run_dir: Path, make_ckpt):
    """``on_step`` for :func:`train_one_epoch`: every ``train.save_every_steps`` optimizer steps, write last.pt
    with ``"epoch"`` = completed epochs and ``"partial"`` = where this epoch is (batches done, running sums, the
    torch RNG state), so a resume continues exactly there. None when mid-epoch saving is off."""
    every = cfg.train.save_every_steps
    if not every:
        return None
    acc = cfg.train.accumulate

    def on_step(progress: dict[str, Any]) -> None:
        if (progress["batches"] // acc) % every == 0:
            ck.save_checkpoint({**make_ckpt(), "partial": {**progress, "rng": torch.get_rng_state()}},
                               run_dir / "last.pt")

    return on_step


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


# ----------------------------------------------------------------------------------------------- TensorBoard


def _writer(run_dir: Path, cfg: Recipe):
    if not cfg.train.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir))


def _log_scalars(writer, row: dict, step: int) -> None:
    for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("train_acc", "accuracy/train"),
                     ("val_acc", "accuracy/val"), ("lr", "lr"), ("images_per_sec", "images_per_sec")):
        if row.get(key) is not None:
            writer.add_scalar(tag, row[key], step)
    for name, lr in (row.get("lrs") or {}).items():  # each group's LR at the epoch's first update
        writer.add_scalar("lr_group/" + name.replace(" ", "_"), lr, step)


def _log_first_batch(writer, loader, tf: dict, model, cfg: Recipe, device, channels_last: bool) -> None:
    """The tutorial's add_images: the first training batch, un-normalized; and the model graph."""
    try:
        x, _ = next(iter(loader))
    except StopIteration:
        return
    mean = torch.tensor(tf.get("mean", (0.0, 0.0, 0.0))).view(1, -1, 1, 1)
    std = torch.tensor(tf.get("std", (1.0, 1.0, 1.0))).view(1, -1, 1, 1)
    writer.add_images("train/first_batch", (x[:32].float() * std + mean).clamp(0, 1), 0)
    if cfg.train.graph:
        was = model.training
        try:
            model.eval()
            sample = x[:1].to(device)
            if channels_last:
                sample = sample.contiguous(memory_format=torch.channels_last)
            import warnings

            with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
                warnings.simplefilter("ignore")
                writer.add_graph(model, sample)
        except Exception as e:  # noqa: BLE001 - some models don't trace; the graph is optional
            log.warning(f"TensorBoard graph skipped: the model does not trace ({type(e).__name__}); "
                        "set train.graph: false to silence this")
        finally:
            model.train(was)


def _log_hparams(writer, cfg: Recipe, best: dict, history: list[dict]) -> None:
    hp = {"model": cfg.model.name, "weights": cfg.model.weights, "optimizer": cfg.optimizer.name,
          "lr": cfg.optimizer.lr, "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
          "scheduler": cfg.scheduler.name, "precision": cfg.train.precision, "bn": cfg.freeze.bn}
    last = history[-1] if history else {}
    metrics = {"hparam/best_val_acc": best["val_acc"] if best["val_acc"] is not None else 0.0,
               "hparam/final_train_loss": last.get("train_loss") or 0.0}
    writer.add_hparams(hp, metrics, run_name="hparams")

