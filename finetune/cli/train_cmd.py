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

_RECIPE = typer.Option(None, "--recipe", "-r",
                       help="Recipe name (see 'finetune recipes') or YAML path.",
                       rich_help_panel=_R)
_MODEL = typer.Option(None, "--model", "-m", help="smallcnn, a torchvision name, or timm:<name>.", rich_help_panel=_M)
_WEIGHTS = typer.Option(None, "--weights", "-w",
                        help="default (the backbone's pretrained), none, a weights name, or a file.",
                        rich_help_panel=_M)
_DROP_RATE = typer.Option(None, "--drop-rate", help="timm models: dropout before the classifier (create_model's "
                         "drop_rate).", rich_help_panel=_M)
_DROP_PATH_RATE = typer.Option(None, "--drop-path-rate", help="timm models: stochastic depth (create_model's "
                               "drop_path_rate).", rich_help_panel=_M)
_DATA = typer.Option(None, "--data", "-d", help="Image folder, 'sample', cifar10:ROOT, or tar shards "
                     "('shards/train-{000..099}.tar', streamed).", rich_help_panel=_D)
_VAL_DATA = typer.Option(None, "--val-data",
                         help="Tar shards: the val shards (train-{000..099}.tar style; default: the last shard of "
                              "--data is held out).",
                         rich_help_panel=_D)
_LABELS = typer.Option(None, "--labels", help="prefix:A=x,=y | regex:PATTERN | csv:FILE.", rich_help_panel=_D)
_VAL_SPLIT = typer.Option(None, "--val-split", help="Fraction held out when there is no val/.", rich_help_panel=_D)
_IMAGE_SIZE = typer.Option(None, "--image-size", help="Input size (default: the backbone's).", rich_help_panel=_D)
_AUGMENT = typer.Option(None, "--augment", help="none | light | strong (default: the recipe's).", rich_help_panel=_D)
_SAMPLER = typer.Option(None, "--sampler", help="random | balanced (draw classes with equal odds, with replacement; "
                       "deterministic per seed and epoch).", rich_help_panel=_D)
_STRICT = typer.Option(None, "--strict/--no-strict",
                       help="Fail on an unreadable image instead of skipping it with a warning.",
                       rich_help_panel=_D)
_ALLOW_OUTSIDE = typer.Option(None, "--allow-outside",
                              help="CSV labels may name files outside the data folder (../x, /abs/x).",
                              rich_help_panel=_D)
_CACHE_DIR = typer.Option(None, "--cache-dir",
                          help="Keep the decoded-image disk cache in this folder and reuse it in later runs (default: "
                               "in the run directory, removed; used when the images exceed data.cache_gb).",
                          rich_help_panel=_D)
_REPORT = typer.Option(None, "--report/--no-report",
                       help="Write RUN_DIR/report.html at the end (curves, confusion matrix, wrong images, freeze "
                            "plan); on by default.",
                       rich_help_panel="Run")
_OPTIMIZER = typer.Option(None, "--optimizer", help="sgd | adam | adamw | rmsprop.", rich_help_panel=_O)
_LR = typer.Option(None, "--lr", help="Base learning rate, or 'auto': run the LR range test first (see 'finetune "
                   "lr-find') and train with its suggestion.", rich_help_panel=_O)
_MOMENTUM = typer.Option(None, "--momentum", help="SGD/RMSprop momentum (recipe default 0.9).", rich_help_panel=_O)
_NESTEROV = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum for SGD.", rich_help_panel=_O)
_WEIGHT_DECAY = typer.Option(None, "--weight-decay", help="Not applied to biases and norm weights.", rich_help_panel=_O)
_SCHEDULER = typer.Option(None, "--scheduler", help="constant | step | cosine | onecycle.", rich_help_panel=_O)
_WARMUP_EPOCHS = typer.Option(None, "--warmup-epochs",
                              help="Linear LR warmup, in epochs (fractions allowed).",
                              rich_help_panel=_O)
_CLASS_WEIGHTS = typer.Option(None, "--class-weights", help="none | auto (inverse class frequency in the loss) | "
                             "FILE (.json/.yaml: class -> weight).", rich_help_panel=_O)
_LABEL_SMOOTHING = typer.Option(None, "--label-smoothing",
                                help="CrossEntropyLoss label smoothing (0-1).",
                                rich_help_panel=_O)
_EPOCHS = typer.Option(None, "--epochs", "-e",
                       help="Epochs to train (with --resume: the new total).",
                       rich_help_panel=_T)
_BATCH_SIZE = typer.Option(None, "--batch-size", "-b",
                           help="Images per batch (per process under DDP).",
                           rich_help_panel=_T)
_ACCUMULATE = typer.Option(None, "--accumulate", help="Gradient accumulation steps.", rich_help_panel=_O)
_CLIP_GRAD = typer.Option(None, "--clip-grad", help="Clip the gradient norm to this value.", rich_help_panel=_O)
_SEED = typer.Option(None, "--seed", help="Seed for init, data order and augmentation.", rich_help_panel=_T)
_DEVICE = typer.Option(None, "--device", help="auto (cuda > mps > cpu) | cpu | cuda | mps.", rich_help_panel=_T)
_PRECISION = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16.", rich_help_panel=_T)
_CHANNELS_LAST = typer.Option(None, "--channels-last/--no-channels-last",
                              help="Memory layout (default: channels_last for conv nets).",
                              rich_help_panel=_T)
_SYNC_BN = typer.Option(None, "--sync-bn/--no-sync-bn",
                        help="With --nproc/torchrun: SyncBatchNorm, so BN that trains sees the global batch (CUDA).",
                        rich_help_panel=_T)
_COMPILE = typer.Option(None, "--compile/--no-compile",
                        help="torch.compile the model (opt-in; the first batches pay the compile time).",
                        rich_help_panel=_T)
_CACHE_FEATURES = typer.Option(None, "--cache-features",
                               help="auto | on | off: train the head on frozen features computed once (auto: when that "
                                    "is the same computation).",
                               rich_help_panel=_T)
_FAST_INFERENCE = typer.Option(None, "--fast-inference",
                               help="auto | off: frozen inference (features, val, eval, predict) on a conv+BN-folded "
                                    "copy of the model (auto: when it folds and matches the model).",
                               rich_help_panel=_T)
_AUTOTUNE = typer.Option(None, "--autotune",
                         help="auto | off: on the CPU with bf16, time each depthwise convolution's backward in bf16 "
                              "and fp32 on its real shape at the start and train it with the faster one (auto).",
                         rich_help_panel=_T)
_EARLY_STOP = typer.Option(None, "--early-stop",
                           help="Stop after N epochs without a better val accuracy.",
                           rich_help_panel=_T)
_TENSORBOARD = typer.Option(None, "--tensorboard/--no-tensorboard",
                            help="Write TensorBoard event files to the run directory.",
                            rich_help_panel=_T)
_SAVE_EVERY_STEPS = typer.Option(None, "--save-every-steps",
                                 help="Also save last.pt every N optimizer steps inside an epoch; --resume continues "
                                      "from there.",
                                 rich_help_panel=_T)
_MONITOR = typer.Option(None, "--monitor", help="val_acc | val_loss | val_f1 (macro-F1): picks best.pt, the top-k "
                       "files and early stopping (default val_acc).", rich_help_panel=_T)
_MONITOR_MODE = typer.Option(None, "--monitor-mode", help="auto (min for val_loss, else max) | max | min.",
                             rich_help_panel=_T)
_SAVE_TOP_K = typer.Option(None, "--save-top-k", help="Keep the K best epochs (K > 1: also epochNNN.pt files).",
                           rich_help_panel=_T)
_EMA = typer.Option(None, "--ema/--no-ema", help="Keep an EMA of the weights (timm ModelEmaV3): evaluated each epoch, "
                    "best_ema.pt when better.", rich_help_panel=_O)
_EMA_DECAY = typer.Option(None, "--ema-decay", help="EMA decay (recipe default 0.999; timm's warm-up applies).",
                          rich_help_panel=_O)
_MIXUP = typer.Option(None, "--mixup", help="Mixup alpha (timm Mixup; 0 = off).", rich_help_panel=_O)
_CUTMIX = typer.Option(None, "--cutmix", help="CutMix alpha (0 = off; with --mixup each batch picks one).",
                       rich_help_panel=_O)
_LOG_EVERY = typer.Option(None, "--log-every", help="TensorBoard scalars (loss, LR per group, images/s) every N "
                          "optimizer steps, beside the per-epoch ones.", rich_help_panel=_T)
_NNODES = typer.Option(1, "--nnodes", help="Machines in the job (torchrun --nnodes; with --node-rank and "
                       "--master-addr, the same command on each).", rich_help_panel=_T)
_NODE_RANK = typer.Option(0, "--node-rank", help="This machine's number, 0..nnodes-1.", rich_help_panel=_T)
_MASTER_ADDR = typer.Option(None, "--master-addr", help="HOST[:PORT] of node 0, where the nodes meet (c10d "
                            "rendezvous; port 29500 by default).", rich_help_panel=_T)
_STRATEGY = typer.Option(None, "--strategy", help="With --nproc/torchrun: ddp (a replica per process, default) | fsdp "
                         "(FSDP2: parameters, gradients and optimizer state sharded per block).", rich_help_panel=_T)
_CHECKPOINT_FORMAT = typer.Option(None, "--checkpoint-format", help="With --strategy fsdp: auto (last.pt's weights "
                                  "and optimizer state as sharded torch.distributed.checkpoint files, each rank "
                                  "writing its shard; resumes at any world size) | full (one consolidated last.pt, "
                                  "gathered on rank 0).", rich_help_panel=_T)
_OUT = typer.Option(None, "--out", "-o", help="Run directory (default runs/<time>-<model>).", rich_help_panel=_T)
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing run directory.", rich_help_panel=_T)
_RESUME = typer.Option(None, "--resume",
                       help="Continue the run in this directory from its last.pt (--epochs may extend it).",
                       rich_help_panel=_T)
_QUIET = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.", rich_help_panel=_T)
_NPROC = typer.Option(1, "--nproc",
                      help="Launch N processes with torchrun (DDP: N GPUs, or N CPU processes with gloo). --batch-size "
                           "is per process.",
                      rich_help_panel=_T)


def train(
    recipe: Optional[str] = _RECIPE,
    model: Optional[str] = _MODEL,
    weights: Optional[str] = _WEIGHTS,
    drop_rate: Optional[float] = _DROP_RATE,
    drop_path_rate: Optional[float] = _DROP_PATH_RATE,
    data: Optional[str] = _DATA,
    val_data: Optional[str] = _VAL_DATA,
    labels: Optional[str] = _LABELS,
    val_split: Optional[float] = _VAL_SPLIT,
    image_size: Optional[int] = _IMAGE_SIZE,
    augment: Optional[str] = _AUGMENT,
    sampler: Optional[str] = _SAMPLER,
    allow_outside: Optional[bool] = _ALLOW_OUTSIDE,
    strict: Optional[bool] = _STRICT,
    cache_dir: Optional[str] = _CACHE_DIR,
    freeze_names: Optional[str] = O.panel(O.FREEZE_NAMES, _F),
    freeze_first: Optional[int] = O.panel(O.FREEZE_FIRST, _F),
    stages: Optional[int] = O.panel(O.FREEZE_STAGES, _F),
    freeze_layers: Optional[str] = O.panel(O.FREEZE_LAYERS, _F),
    freeze_backbone: Optional[bool] = O.panel(O.FREEZE_BACKBONE, _F),
    unfreeze: Optional[List[str]] = O.panel(O.UNFREEZE, _F),
    bn: Optional[str] = O.panel(O.BN, _F),
    optimizer: Optional[str] = _OPTIMIZER,
    lr: Optional[str] = _LR,
    momentum: Optional[float] = _MOMENTUM,
    nesterov: Optional[bool] = _NESTEROV,
    weight_decay: Optional[float] = _WEIGHT_DECAY,
    scheduler: Optional[str] = _SCHEDULER,
    warmup_epochs: Optional[float] = _WARMUP_EPOCHS,
    class_weights: Optional[str] = _CLASS_WEIGHTS,
    label_smoothing: Optional[float] = _LABEL_SMOOTHING,
    ema: Optional[bool] = _EMA, ema_decay: Optional[float] = _EMA_DECAY,
    mixup: Optional[float] = _MIXUP, cutmix: Optional[float] = _CUTMIX,
    epochs: Optional[int] = _EPOCHS,
    batch_size: Optional[int] = _BATCH_SIZE,
    accumulate: Optional[int] = _ACCUMULATE,
    clip_grad: Optional[float] = _CLIP_GRAD,
    seed: Optional[int] = _SEED,
    device: Optional[str] = _DEVICE,
    precision: Optional[str] = _PRECISION,
    channels_last: Optional[bool] = _CHANNELS_LAST,
    sync_bn: Optional[bool] = _SYNC_BN,
    compile_: Optional[bool] = _COMPILE,
    cache_features: Optional[str] = _CACHE_FEATURES,
    fast_inference: Optional[str] = _FAST_INFERENCE,
    autotune: Optional[str] = _AUTOTUNE,
    early_stop: Optional[int] = _EARLY_STOP,
    tensorboard: Optional[bool] = _TENSORBOARD,
    save_every_steps: Optional[int] = _SAVE_EVERY_STEPS,
    report: Optional[bool] = _REPORT,
    monitor: Optional[str] = _MONITOR, monitor_mode: Optional[str] = _MONITOR_MODE,
    save_top_k: Optional[int] = _SAVE_TOP_K,
    log_every: Optional[int] = _LOG_EVERY, strategy: Optional[str] = _STRATEGY,
    checkpoint_format: Optional[str] = _CHECKPOINT_FORMAT,
    out: Optional[Path] = _OUT,
    overwrite: bool = _OVERWRITE,
    resume: Optional[Path] = _RESUME,
    quiet: bool = _QUIET,
    nproc: int = _NPROC, nnodes: int = _NNODES, node_rank: int = _NODE_RANK, master_addr: Optional[str] = _MASTER_ADDR,
    trust_checkpoint: bool = O.panel(O.TRUST, _M),
) -> None:
    _launch_if_asked(nproc, resume, (nnodes, node_rank, master_addr))
    _train(dict(locals(), lr=_number_or_auto(lr)))


def _launch_if_asked(nproc: int, resume: Optional[Path], nodes: tuple = (1, 0, None)) -> None:
    """``--nproc N`` (N > 1) or ``--nnodes M`` (M > 1) outside torchrun: relaunch this command under torchrun with
    N processes here (one of M machines)."""
    import os
    import sys

    from finetune.api import ConfigError

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if LR_FIND["on"] and (resume is not None or nproc > 1):
        raise ConfigError("lr-find takes the flags of a new run; drop --resume and --nproc")
    nnodes, node_rank, master = nodes
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError(f"--nnodes must be at least 1 and --node-rank in 0..nnodes-1, got --nnodes {nnodes} "
                          f"--node-rank {node_rank}")
    if nnodes > 1 and not master:
        raise ConfigError(f"--nnodes {nnodes} needs --master-addr HOST[:PORT], node 0's address (the same on every "
                          "node)")
    if (nproc > 1 or nnodes > 1) and "LOCAL_RANK" not in os.environ:
        from finetune.api import launch, strip_nproc

        argv = sys.argv[sys.argv.index("train"):] if "train" in sys.argv else ["train"]
        raise typer.Exit(launch(nproc, strip_nproc(argv), nodes))


def _train(v: dict) -> None:
    """The command's body over its parameter values ``v``: flags -> recipe keys -> a run (or a resume)."""
    from finetune import api
    from finetune.api import ConfigError
    from finetune.cli.progress import RichReporter

    overrides = {key: v[name] for key, name in KEYS.items()}
    overrides.update(O.freeze_overrides(v["freeze_names"], v["freeze_first"], v["freeze_layers"],
                                        v["freeze_backbone"], v["unfreeze"], v["bn"], v["stages"]))
    given = {k: x for k, x in overrides.items() if x is not None}
    typed = dict(given)  # what the user typed (the error below names only those flags)
    recipe, model = v["recipe"], v["model"]
    if model is not None and v["weights"] is None and recipe is None:
        given["model.weights"] = "default"  # a new model from the command line: its own pretrained weights
    reporter = RichReporter(quiet=v["quiet"])
    if v["resume"] is not None:
        extra = sorted(set(typed) - {"train.epochs"})
        if recipe or extra or v["out"]:
            flags = ", ".join(dict.fromkeys(["--recipe"] * bool(recipe) + ["--out"] * bool(v["out"])
                                            + [flag_map()[k] for k in extra]))
            raise ConfigError(f"--resume continues a run exactly as it was configured; drop {flags} (only --epochs "
                              "may change)")
        with api.trusted(v["trust_checkpoint"]):  # a last.pt holding pickled objects loads only when trusted
            _run(lambda: api.train(None, resume=v["resume"], epochs=v["epochs"], reporter=reporter))
        return
    with O.name_flags(given, flag_map()):
        base = _base_recipe(recipe, model, given)
        r = api.apply_overrides(base, given)
    if recipe is not None and model is not None and model != base.model.name:  # record what ran, not the recipe's
        r.name = f"{base.name or recipe} (model overridden)"
        r.description = f"{base.description} -- model overridden: {model} instead of {base.model.name}"
    if LR_FIND["on"]:  # `finetune lr-find [train flags]`: the range test on what these flags would train
        with api.trusted(v["trust_checkpoint"]):
            _lr_find(api, r, v["out"], v["overwrite"], v["quiet"])
        return
    try:
        with api.trusted(v["trust_checkpoint"]):
            _run(lambda: api.train(r, out=v["out"], overwrite=v["overwrite"], reporter=reporter))
    except api.FreezeError as e:
        raise api.from_recipe(e, recipe, typed) from None


KEYS = {  # recipe key -> the parameter of `train` that sets it (the freeze flags: options.FREEZE_KEYS)
    "model.name": "model", "model.weights": "weights", "model.drop_rate": "drop_rate",
    "model.drop_path_rate": "drop_path_rate", "data.sampler": "sampler", "train.class_weights": "class_weights",
    "data.path": "data", "data.val_path": "val_data", "data.labels": "labels",
    "data.val_split": "val_split", "data.image_size": "image_size", "data.augment": "augment", "data.strict": "strict",
    "data.allow_outside": "allow_outside", "data.cache_dir": "cache_dir",
    "optimizer.name": "optimizer", "optimizer.lr": "lr", "optimizer.momentum": "momentum",
    "optimizer.nesterov": "nesterov", "optimizer.weight_decay": "weight_decay", "scheduler.name": "scheduler",
    "scheduler.warmup_epochs": "warmup_epochs", "train.label_smoothing": "label_smoothing", "train.epochs": "epochs",
    "train.batch_size": "batch_size", "train.accumulate": "accumulate", "train.clip_grad": "clip_grad",
    "train.seed": "seed", "train.device": "device", "train.precision": "precision",
    "train.channels_last": "channels_last", "train.compile": "compile_", "train.cache_features": "cache_features",
    "train.early_stop": "early_stop", "train.tensorboard": "tensorboard", "train.save_every_steps": "save_every_steps",
    "train.sync_bn": "sync_bn", "train.report": "report", "train.monitor": "monitor",
    "train.monitor_mode": "monitor_mode", "train.save_top_k": "save_top_k", "train.ema": "ema",
    "train.ema_decay": "ema_decay", "train.mixup": "mixup", "train.cutmix": "cutmix", "train.log_every": "log_every",
    "train.strategy": "strategy",
    "train.checkpoint_format": "checkpoint_format",
    "train.fast_inference": "fast_inference",
    "train.autotune": "autotune",
}


def flag_map() -> dict[str, str]:
    """Recipe key -> train's flag, generated from KEYS and the options' declarations (one mapping for every
    message that names a flag)."""
    return O.flags_of(train, {**KEYS, **O.FREEZE_KEYS})


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
    """Run training (SIGTERM stops it as Ctrl-C does); under torchrun, leave the process group cleanly whatever
    happens."""
    from finetune.api import shutdown_distributed, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            fn()
    finally:
        shutdown_distributed()


LR_FIND = {"on": False}  # set by `finetune lr-find`, which is this command with the same flags


def _number_or_auto(value: Optional[str]):
    """--lr: a number, or 'auto' (left as typed otherwise: the recipe check names the flag and the value)."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        return value


def _lr_find(api, r, out: Optional[Path], overwrite: bool, quiet: bool) -> None:
    """Run the LR range test for recipe ``r``; write lr_find.png/json into ``out`` (default runs/<time>-lr-find);
    print the suggestion on stdout."""
    import time

    from finetune.api import CheckpointError

    if r.optimizer.lr == "auto":
        r.optimizer.lr = 0.01  # the range test replaces it anyway
    dest = Path(out) if out is not None else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-lr-find"
    taken = [n for n in api.LR_FIND_FILES if (dest / n).exists()]
    if taken and not overwrite:
        raise CheckpointError(f"'{dest / taken[0]}' already exists; pass --overwrite to replace it or choose "
                              "another --out")
    found = api.lr_find(r)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        paths = found.save(dest)
    except OSError as e:
        raise CheckpointError(f"cannot write to '{dest}': {e.strerror or e}; choose another --out") from None
    if not quiet:
        where = "on cached features" if found.info.get("on_cached_features") else "on the full model"
        stop = f"; stopped early: {found.stopped}" if found.stopped else ""
        typer.echo(f"suggested lr: {found.suggestion:.3g} ({found.rule} rule; {len(found.lrs)} steps {where}, "
                   f"lr {found.lrs[0]:.1e} -> {found.lrs[-1]:.1e}{stop})")
        typer.echo(f"curve: {paths[0]}")
    if found.flat:
        from logging import getLogger

        getLogger("finetune").warning(f"the loss never fell by 2% during the test (from {found.losses[0]:.4f}, "
                                      f"lowest {min(found.losses):.4f}): the suggestion is noise; from random "
                                      "init ~100 steps teach too little, pick the LR by a short sweep")
