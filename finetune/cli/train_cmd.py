from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from finetune.cli import options as O

HELP = ("Train a model from a recipe (default: smallcnn on the bundled sample data); flags override the recipe. "
        "Writes a run directory with config.yaml, metrics.json, last.pt, best.pt and TensorBoard logs.")

_R = "Recipe"
_M = "Model"
_D = "Data"
_F = "Freezing"
_O = "Optimization"
_T = "Run"


def train(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe name (see 'finetune recipes') or "
                                         "YAML path.", rich_help_panel=_R),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="smallcnn, a torchvision name, or timm:<name>.",
                                        rich_help_panel=_M),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="default (the backbone's pretrained), none, "
                                          "a weights name, or a file.", rich_help_panel=_M),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Image folder, 'sample', or cifar10:ROOT.",
                                       rich_help_panel=_D),
    labels: Optional[str] = typer.Option(None, "--labels", help="prefix:A=x,=y | regex:PATTERN | csv:FILE.",
                                         rich_help_panel=_D),
    val_split: Optional[float] = typer.Option(None, "--val-split", help="Fraction held out when there is no val/.",
                                              rich_help_panel=_D),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size (default: the backbone's).",
                                             rich_help_panel=_D),
    augment: Optional[str] = typer.Option(None, "--augment", help="none | light | strong (default: the recipe's).",
                                          rich_help_panel=_D),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Fail on an unreadable image instead "
                                          "of skipping it with a warning.", rich_help_panel=_D),
    freeze_names: Optional[str] = O.panel(O.FREEZE_NAMES, _F),
    freeze_first: Optional[int] = O.panel(O.FREEZE_FIRST, _F),
    stages: Optional[int] = O.panel(O.FREEZE_STAGES, _F),
    freeze_layers: Optional[str] = O.panel(O.FREEZE_LAYERS, _F),
    freeze_backbone: Optional[bool] = O.panel(O.FREEZE_BACKBONE, _F),
    unfreeze: Optional[List[str]] = O.panel(O.UNFREEZE, _F),
    bn: Optional[str] = O.panel(O.BN, _F),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd | adam | adamw | rmsprop.",
                                            rich_help_panel=_O),
    lr: Optional[float] = typer.Option(None, "--lr", help="Base learning rate.", rich_help_panel=_O),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD/RMSprop momentum (recipe default 0.9).", rich_help_panel=_O),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum for SGD.", rich_help_panel=_O),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Not applied to biases and norm "
                                                 "weights.", rich_help_panel=_O),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="constant | step | cosine | onecycle.",
                                            rich_help_panel=_O),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear LR warmup, in epochs (fractions allowed).", rich_help_panel=_O),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="CrossEntropyLoss label smoothing (0-1).", rich_help_panel=_O),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", help="Epochs to train (with --resume: the new total).", rich_help_panel=_T),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per batch (per process under DDP).", rich_help_panel=_T),
    accumulate: Optional[int] = typer.Option(None, "--accumulate", help="Gradient accumulation steps.",
                                             rich_help_panel=_O),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", help="Clip the gradient norm to this value.",
                                              rich_help_panel=_O),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init, data order and augmentation.", rich_help_panel=_T),
    device: Optional[str] = typer.Option(None, "--device", help="auto (cuda > mps > cpu) | cpu | cuda | mps.",
                                         rich_help_panel=_T),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16.",
                                            rich_help_panel=_T),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Memory layout (default: channels_last for conv nets).",
                                                 rich_help_panel=_T),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn/--no-sync-bn", help="With --nproc/torchrun: "
                                           "SyncBatchNorm, so BN that trains sees the global batch (CUDA).",
                                           rich_help_panel=_T),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model "
                                            "(opt-in; the first batches pay the compile time).", rich_help_panel=_T),
    cache_features: Optional[str] = typer.Option(None, "--cache-features", help="auto | on | off: train the head "
                                                 "on frozen features computed once (auto: when that is the same "
                                                 "computation).", rich_help_panel=_T),
    early_stop: Optional[int] = typer.Option(None, "--early-stop", help="Stop after N epochs without a better val "
                                             "accuracy.", rich_help_panel=_T),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", help="Write TensorBoard event files to the run directory.", rich_help_panel=_T),
    report: Optional[bool] = typer.Option(None, "--report/--no-report", help="Write RUN_DIR/report.html at the end (curves, confusion matrix, wrong images, freeze plan); on by default.", rich_help_panel=_T),
    save_every_steps: Optional[int] = typer.Option(None, "--save-every-steps", help="Also save last.pt every N "
                                                   "optimizer steps inside an epoch; --resume continues from there.",
                                                   rich_help_panel=_T),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<time>-<model>).",
                                       rich_help_panel=_T),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory.",
                                   rich_help_panel=_T),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its "
                                          "last.pt (--epochs may extend it).", rich_help_panel=_T),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.", rich_help_panel=_T),
    nproc: int = typer.Option(1, "--nproc", help="Launch N processes with torchrun (DDP: N GPUs, or N CPU "
                              "processes with gloo). --batch-size is per process.", rich_help_panel=_T),
    trust_checkpoint: bool = O.panel(O.TRUST, _M),
) -> None:
    import os
    import sys

    from finetune import api
    from finetune.api import ConfigError

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        from finetune.api import launch, strip_nproc

        argv = sys.argv[sys.argv.index("train"):] if "train" in sys.argv else ["train"]
        raise typer.Exit(launch(nproc, strip_nproc(argv)))

    overrides = {
        "model.name": model, "model.weights": weights,
        "data.path": data, "data.labels": labels, "data.val_split": val_split, "data.image_size": image_size,
        "data.augment": augment, "data.strict": strict,
        **O.freeze_overrides(freeze_names, freeze_first, freeze_layers, freeze_backbone, unfreeze, bn, stages),
        "optimizer.name": optimizer, "optimizer.lr": lr, "optimizer.momentum": momentum,
        "optimizer.nesterov": nesterov, "optimizer.weight_decay": weight_decay,
        "scheduler.name": scheduler, "scheduler.warmup_epochs": warmup_epochs,
        "train.label_smoothing": label_smoothing, "train.epochs": epochs, "train.batch_size": batch_size,
        "train.accumulate": accumulate, "train.clip_grad": clip_grad, "train.seed": seed, "train.device": device,
        "train.precision": precision, "train.channels_last": channels_last, "train.compile": compile_,
        "train.cache_features": cache_features, "train.early_stop": early_stop, "train.tensorboard": tensorboard,
        "train.report": report,
        "train.save_every_steps": save_every_steps, "train.sync_bn": sync_bn,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    typed = dict(given)  # what the user typed (the error below names only those flags)
    if model is not None and weights is None and recipe is None:
        given["model.weights"] = "default"  # a new model from the command line: its own pretrained weights
    from finetune.cli.progress import RichReporter
    from finetune.api import train as run_train

    reporter = RichReporter(quiet=quiet)
    if resume is not None:
        extra = sorted(set(typed) - {"train.epochs"})
        if recipe or extra or out:
            flags = ", ".join(dict.fromkeys(["--recipe"] * bool(recipe) + ["--out"] * bool(out)
                                            + [O.flag_of(k) for k in extra]))
            raise ConfigError(f"--resume continues a run exactly as it was configured; drop {flags} (only --epochs "
                              "may change)")
        _run(lambda: run_train(None, resume=resume, epochs=epochs, reporter=reporter))
        return
    from finetune.api import trusted

    with O.name_flags(given):
        base = _base_recipe(recipe, model, given)
        r = api.apply_overrides(base, given)
    if recipe is not None and model is not None and model != base.model.name:  # record what ran, not the recipe's
        r.name = f"{base.name or recipe} (model overridden)"
        r.description = f"{base.description} -- model overridden: {model} instead of {base.model.name}"
    from finetune.api import FreezeError, from_recipe

    try:
        with trusted(trust_checkpoint):
            _run(lambda: run_train(r, out=out, overwrite=overwrite, reporter=reporter))
    except FreezeError as e:
        raise from_recipe(e, recipe, typed) from None


def _base_recipe(recipe: Optional[str], model: Optional[str], given: dict):
    """What the flags override: the named recipe; for ``--model`` without ``--recipe``, the ``lp-ft`` recipe when
    the model starts from pretrained weights and no freeze flag is given (head first on cached features, then
    everything at a lower LR: what practitioners do, fastai's ``fine_tune``), else (random init, smallcnn, or a
    freeze plan of the user's own) the generic defaults (light augmentation, the backbone's input size, SGD 0.01)
    rather than the smallcnn-tuned ``default`` recipe; with neither, the ``default`` recipe (the main job). The
    start-up lines name the recipe that runs."""
    from finetune import api

    if recipe is None and model is not None:
        weights = given.get("model.weights")
        pretrained = weights not in (None, "none") and not (model.strip() == "smallcnn" and weights == "default")
        if pretrained and not any(k.startswith("freeze.") and k != "freeze.bn" for k in given):
            return api.load_recipe("lp-ft")
        r = api.Recipe()
        r.name, r.description = f"{model}-cli", f"{model} from random init, configured from the command line"
        return r
    return api.load_recipe(recipe or "default")


def _run(fn) -> None:
    """Run training; under torchrun, leave the process group cleanly whatever happens."""
    from finetune.api import shutdown_distributed

    try:
        fn()
    finally:
        shutdown_distributed()
