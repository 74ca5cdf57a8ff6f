"""Recipes: documented training setups as YAML, validated into dataclasses; CLI flags override them.

No torch import here: ``finetune recipes`` and ``--help`` must answer fast. Validation errors name the key path
and, when the value came from a file, the line: ``recipe 'x.yaml', line 12: train.epochs must be an integer``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from finetune.errors import ConfigError, shown, suggest

# Shipped with the package (package data), so a plain `pip install` has them; the repository's top-level recipes/
# and data/sample are links to these.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
RECIPES_DIR = PACKAGE_DIR / "config" / "recipes"
SAMPLE_DIR = PACKAGE_DIR / "data" / "sample"


@dataclass(frozen=True)
class Range:
    """A bound on a number, carried by its field's type (``Annotated[float, Range(gt=0)]``); ``msg`` is what
    follows the key path in the error (``{v}`` = the value)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    msg: str = ""

    def ok(self, v: float) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def message(self, v: Any) -> str:
        if self.msg:
            return self.msg.format(v=v)
        return f"must be greater than {self.gt:g}, got {v}" if self.gt is not None else \
            f"must not be negative, got {v}"


POS = Range(gt=0)
NONNEG = Range(ge=0)
IMAGE_SIZE = (8, 2048)  # data.image_size: smaller cannot pass a CNN's downsampling; larger is an allocator crash
SIZE = Range(ge=IMAGE_SIZE[0], le=IMAGE_SIZE[1], msg=f"must be between {IMAGE_SIZE[0]} and {IMAGE_SIZE[1]} pixels, "
             "got {v}; omit it to use the backbone's own input size")
FRACTION = Range(ge=0, lt=1, msg="must be in [0, 1), got {v}")
FLOAT32_MAX = 3.4028234663852886e38  # optimizer.lr: torch multiplies float32 weights by it
F32 = Range(le=FLOAT32_MAX, msg=f"must be at most {FLOAT32_MAX:.2g} (it is applied to float32 weights), got {{v:g}}")
DECAY = Range(gt=0, le=1, msg="must be in (0, 1] (each layer's LR is lr x decay^distance from the head), got {v}")
UNIT = Range(gt=0, lt=1, msg="must be in (0, 1), got {v}")
SEED = Range(ge=0, le=2**32 - 1, msg="must be an integer from 0 to 4294967295 (2**32 - 1: NumPy's seed range, as in "
             "Lightning's seed_everything), got {v}")
EPOCH = Range(ge=1, msg="must be at least 1 (epochs count from 1, as the logs do), got {v}")


@dataclass(frozen=True)
class Flag:
    """The command-line flag that sets a recipe key, declared on the key's field (``flag(...)``) so that the key,
    its type, its checks and its flag are written once; the CLI builds the options of ``train`` and ``lr-find``
    (and ``inspect``'s freeze options) from :func:`recipe_flags`. ``name``: click's declaration
    (``--strict/--no-strict`` for an on/off pair); ``short``: an alias (``-e``); ``panel``: the help section
    (default: the section's, PANELS); ``repeat``: the flag may be given several times."""

    name: str
    help: str
    short: str = ""
    panel: str = ""
    repeat: bool = False


def flag(default: Any, name: str, help: str, **kw: Any) -> Any:
    """A dataclass field set by flag ``name`` (see Flag); a list default is a new list per recipe."""
    meta = {"flag": Flag(name, help, **kw)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


OPT = "Optimization"  # the help panel of the train keys that tune the optimization (loss, EMA, mixup, gradients)


@dataclass
class ModelCfg:
    name: str = flag("smallcnn", "--model", "smallcnn, a torchvision name, or timm:<name>.", short="-m")
    weights: str = flag("default", "--weights", "default (the backbone's pretrained), none, a weights name, or a "
                        "file.", short="-w")  # none for smallcnn
    num_classes: int | None = None  # None = from the data
    drop_rate: Annotated[float, FRACTION] | None = flag(None, "--drop-rate", "timm models: dropout before the "
                                                        "classifier (create_model's drop_rate).")
    drop_path_rate: Annotated[float, FRACTION] | None = flag(None, "--drop-path-rate", "timm models: stochastic depth "
                                                             "(create_model's drop_path_rate).")


@dataclass
class DataCfg:
    path: str = flag("sample", "--data", "Image folder, 'sample', cifar10:ROOT, or tar shards "
                     "('shards/train-{000..099}.tar', streamed).", short="-d")  # sample: config.SAMPLE_DIR
    val_path: str | None = flag(None, "--val-data", "Tar shards: the val shards (train-{000..099}.tar style; "
                                "default: the last shard of --data is held out).")
    labels: str | None = flag(None, "--labels", "prefix:A=x,=y | regex:PATTERN | csv:FILE.")  # None: subfolders
    val_split: Annotated[float, FRACTION] = flag(0.2, "--val-split", "Fraction held out when there is no val/.")
    image_size: Annotated[int, SIZE] | None = flag(None, "--image-size", "Input size (default: the backbone's).")
    augment: Literal["none", "light", "strong"] = flag("light", "--augment", "none | light | strong (default: the "
                                                       "recipe's).")
    sampler: Literal["random", "balanced"] = flag("random", "--sampler", "random | balanced (draw classes with equal "
                                                  "odds, with replacement; deterministic per seed and epoch).")
    mean: list[float] | None = None
    std: list[float] | None = None
    cache: Literal["auto", "on", "off", "ram", "disk"] = "auto"  # decoded-image cache (auto/on: RAM or disk by size)
    cache_gb: Annotated[float, POS] = 2.0  # RAM budget of the cache; larger data goes to the disk cache
    cache_dir: str | None = flag(None, "--cache-dir", "Keep the decoded-image disk cache in this folder and reuse "
                                 "it in later runs (default: in the run directory, removed; used when the images "
                                 "exceed data.cache_gb).")
    workers: Annotated[int, NONNEG] | None = None  # None = sized for the machine
    strict: bool = flag(False, "--strict/--no-strict", "Fail on an unreadable image instead of skipping it with a "
                        "warning.")
    allow_outside: bool = flag(False, "--allow-outside", "CSV labels may name files outside the data folder (../x, "
                               "/abs/x).")


@dataclass
class UnfreezeStep:
    epoch: Annotated[int, EPOCH]  # 1-based (as logs count): at the start of this epoch the layers become trainable
    layers: list[str]  # dotted module paths, stage:K addresses, or ["all"]
    lr_mult: Annotated[float, Range(gt=0, msg="must be greater than 0")] = 1.0  # new group's LR = base LR x this


@dataclass
class FreezeCfg:
    names: list[str] = flag([], "--freeze-names", "Freeze parameters whose name contains A or B (globs match whole "
                            "names): A,B.")  # tutorial method 1
    first: Annotated[int, NONNEG] | None = flag(None, "--freeze-first", "Freeze the first N parameter tensors "
                                                "(YOLOv5's --freeze N).")  # tutorial method 2
    stages: int | None = flag(None, "--stages", "fastai's freeze_to: -N trains the last N stages and the head, N "
                              "freezes the first N stages (stages per architecture: see 'finetune inspect MODEL').")
    layers: list[str] = flag([], "--freeze-layers", "Freeze modules by dotted path (conv1,bn1,layer1) or stage "
                             "address (stage:0, stage:-1).")  # tutorial method 3
    backbone: bool = flag(False, "--freeze-backbone/--no-freeze-backbone", "Freeze everything except the head "
                          "(linear probing).")
    unfreeze: list[str] = flag([], "--unfreeze", "Repeatable. L1,L2 makes them trainable again now; "
                               "L1,L2@EPOCH[:LR_MULT] unfreezes at the start of epoch EPOCH (1 = the first, as "
                               "logged) with LR x LR_MULT (e.g. stage:-1@2:0.1, all@4:0.01).", repeat=True)
    # applied last; --unfreeze L@EPOCH also sets `schedule`
    bn: Literal["frozen", "eval", "train"] = flag("frozen", "--bn", "BatchNorm: frozen (the running stats of frozen "
                                                  "layers stay fixed; default), eval (every BN layer keeps its "
                                                  "running stats, also after an unfreeze; its scale/shift still "
                                                  "train) or train.")
    schedule: list[UnfreezeStep] = field(default_factory=list)
    kinds: dict[str, Any] = field(default_factory=dict)  # kinds added by register_freeze_kind: name -> value it checks


@dataclass
class OptimizerCfg:
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = flag("sgd", "--optimizer", "sgd | adam | adamw | rmsprop.")
    lr: Annotated[float, POS, F32] | Literal["auto"] = flag(0.01, "--lr", "Base learning rate, or 'auto': run the LR "
                                                            "range test first (see 'finetune lr-find') and train "
                                                            "with its suggestion.")
    momentum: Annotated[float, NONNEG] = flag(0.9, "--momentum", "SGD/RMSprop momentum (recipe default 0.9).")
    nesterov: bool = flag(False, "--nesterov/--no-nesterov", "Nesterov momentum for SGD.")
    weight_decay: Annotated[float, NONNEG] = flag(0.0, "--weight-decay", "Not applied to biases and norm weights.")
    lr_mult: dict[str, Annotated[float, Range(ge=0, msg="must not be negative")]] = field(default_factory=dict)
    # layer path -> LR multiplier
    layer_decay: Annotated[float, DECAY] | None = None  # layer-wise LR decay for what is trainable from the start


@dataclass
class SchedulerCfg:
    name: Literal["constant", "step", "cosine", "onecycle"] = flag("constant", "--scheduler", "constant | step | "
                                                                   "cosine | onecycle.")
    warmup_epochs: Annotated[float, NONNEG] = flag(0.0, "--warmup-epochs", "Linear LR warmup, in epochs (fractions "
                                                   "allowed).")
    step_size: Annotated[int, NONNEG] = 1  # step: epochs between decays
    gamma: Annotated[float, NONNEG] = 0.1
    min_lr: Annotated[float, NONNEG] = 0.0


@dataclass
class TrainCfg:
    epochs: Annotated[int, POS] = flag(5, "--epochs", "Epochs to train (with --resume: the new total).", short="-e")
    batch_size: Annotated[int, POS] = flag(32, "--batch-size", "Images per batch (per process under DDP).",
                                           short="-b")
    accumulate: Annotated[int, POS] = flag(1, "--accumulate", "Gradient accumulation steps.", panel=OPT)
    clip_grad: Annotated[float, NONNEG] | None = flag(None, "--clip-grad", "Clip the gradient norm to this value.",
                                                      panel=OPT)
    label_smoothing: Annotated[float, NONNEG, Range(lt=1, msg="must be below 1")] = flag(
        0.0, "--label-smoothing", "CrossEntropyLoss label smoothing (0-1).", panel=OPT)
    class_weights: str = flag("none", "--class-weights", "none | auto (inverse class frequency in the loss) | FILE "
                              "(.json/.yaml: class -> weight).", panel=OPT)
    seed: Annotated[int, SEED] = flag(0, "--seed", "Seed for init, data order and augmentation.")
    device: Literal["auto", "cpu", "cuda", "mps"] = flag("auto", "--device", "auto (cuda > mps > cpu) | cpu | cuda | "
                                                         "mps.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = flag("auto", "--precision", "auto | fp32 | bf16 | fp16.")
    channels_last: bool | None = flag(None, "--channels-last/--no-channels-last", "Memory layout (default: "
                                      "channels_last for conv nets).")  # None = auto (conv nets)
    compile: bool = flag(False, "--compile/--no-compile", "torch.compile the model (opt-in; the first batches pay "
                         "the compile time).")
    early_stop: Annotated[int, NONNEG] | None = flag(None, "--early-stop", "Stop after N epochs without a better val "
                                                     "accuracy.")
    cache_features: Literal["auto", "on", "off"] = flag("auto", "--cache-features", "auto | on | off: train the head "
                                                        "on frozen features computed once (auto: when that is the "
                                                        "same computation).")
    fast_inference: Literal["auto", "off"] = flag("auto", "--fast-inference", "auto | off: frozen inference "
                                                  "(features, val, eval, predict) on a conv+BN-folded copy of the "
                                                  "model (auto: when it folds and matches the model).")
    autotune: Literal["auto", "off"] = flag("auto", "--autotune", "auto | off: on the CPU with bf16, time each "
                                            "depthwise convolution's backward in bf16 and fp32 on its real shape at "
                                            "the start and train it with the faster one (auto).")  # dwgrad
    tensorboard: bool = flag(True, "--tensorboard/--no-tensorboard", "Write TensorBoard event files to the run "
                             "directory.")
    report: bool = flag(True, "--report/--no-report", "Write RUN_DIR/report.html at the end (curves, confusion "
                        "matrix, wrong images, freeze plan); on by default.")
    graph: bool = flag(False, "--graph/--no-graph", "Add the model graph to TensorBoard (a torch.jit trace: "
                       "seconds per run, so off by default).")
    save_every_steps: Annotated[int, POS] | None = flag(None, "--save-every-steps", "Also save last.pt every N "
                                                        "optimizer steps inside an epoch; --resume continues from "
                                                        "there.")
    sync_bn: bool = flag(False, "--sync-bn/--no-sync-bn", "With --nproc/torchrun: SyncBatchNorm, so BN that trains "
                         "sees the global batch (CUDA).")
    monitor: Literal["val_acc", "val_loss", "val_f1"] = flag("val_acc", "--monitor", "val_acc | val_loss | val_f1 "
                                                             "(macro-F1): picks best.pt, the top-k files and early "
                                                             "stopping (default val_acc).")
    monitor_mode: Literal["auto", "max", "min"] = flag("auto", "--monitor-mode", "auto (min for val_loss, else max) | "
                                                       "max | min.")
    save_top_k: Annotated[int, POS] = flag(1, "--save-top-k", "Keep the K best epochs (K > 1: also epochNNN.pt "
                                           "files).")
    ema: bool = flag(False, "--ema/--no-ema", "Keep an EMA of the weights (timm ModelEmaV3): evaluated each epoch, "
                     "best_ema.pt when better.", panel=OPT)
    ema_decay: Annotated[float, UNIT] = flag(0.999, "--ema-decay", "EMA decay (recipe default 0.999; timm's warm-up "
                                             "applies).", panel=OPT)  # min(decay, 1 - (1 + step) ** -2/3)
    mixup: Annotated[float, NONNEG] = flag(0.0, "--mixup", "Mixup alpha (timm Mixup; 0 = off).", panel=OPT)
    cutmix: Annotated[float, NONNEG] = flag(0.0, "--cutmix", "CutMix alpha (0 = off; with --mixup each batch picks "
                                            "one).", panel=OPT)
    log_every: Annotated[int, POS] | None = flag(None, "--log-every", "TensorBoard scalars (loss, LR per group, "
                                                 "images/s) every N optimizer steps, beside the per-epoch ones.")
    dist_timeout: Annotated[float, POS] = 10.0  # DDP: minutes a collective may wait for the other processes
    strategy: Literal["ddp", "fsdp"] = flag("ddp", "--strategy", "With --nproc/torchrun: ddp (a replica per process, "
                                            "default) | fsdp (FSDP2: parameters, gradients and optimizer state "
                                            "sharded per block).")
    checkpoint_format: Literal["auto", "full"] = flag("auto", "--checkpoint-format", "With --strategy fsdp: auto "
                                                      "(last.pt's weights and optimizer state as sharded "
                                                      "torch.distributed.checkpoint files, each rank writing its "
                                                      "shard; resumes at any world size) | full (one consolidated "
                                                      "last.pt, gathered on rank 0).")

@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    freeze: FreezeCfg = field(default_factory=FreezeCfg)
    optimizer: OptimizerCfg = field(default_factory=OptimizerCfg)
    scheduler: SchedulerCfg = field(default_factory=SchedulerCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PANELS = {"model": "Model", "data": "Data", "freeze": "Freezing", "optimizer": OPT, "scheduler": OPT, "train": "Run"}


def recipe_flags() -> list[tuple[str, Any, Flag]]:
    """``(recipe key, field type, Flag)`` for every key that a command-line flag sets, in schema order (the panel
    filled in from PANELS)."""
    out = []
    for section in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue  # name, description
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if "flag" in f.metadata:
                fl = f.metadata["flag"]
                out.append((f"{section.name}.{f.name}", hints[f.name],
                            dataclasses.replace(fl, panel=fl.panel or PANELS[section.name])))
    return out


# a recipe is a few KB of YAML; these bounds stop "billion laughs" alias bombs, self-referencing aliases and deep
# nesting before anything expands them (every shipped recipe is < 2 KB, < 100 values, 4 levels deep)
MAX_RECIPE_BYTES = 256 * 1024
MAX_RECIPE_VALUES = 10_000  # values after expanding aliases
MAX_RECIPE_DEPTH = 32

# ----------------------------------------------------------------------------------------------- loading

class _Where:
    """Maps key paths to 'recipe FILE, line N' for error messages."""

    def __init__(self, source: str | None, lines: dict[str, int] | None = None):
        self.source, self.lines = source, lines or {}

    def __call__(self, path: str) -> str:
        if self.source is None:
            return ""
        line = self.lines.get(path)
        return f"recipe '{self.source}'" + (f", line {line}" if line else "") + ": "

    def line(self, path: str) -> str:
        """``"line N: "`` for one error of several (the file is named once, before them)."""
        line = self.lines.get(path) if self.source is not None else None
        return f"line {line}: " if line else ""


MAX_ERRORS_SHOWN = 10  # a file of nonsense: the first ten, then how many more


def _fail(where: _Where, path: str, text: str, key: bool = True) -> ConfigError:
    """A ConfigError at key ``path``: ``where(path) + text``; ``.key`` names the key (for the CLI's flag names),
    ``.brief`` is the text as one error of several (:func:`_raise_all`), ``.at`` the path (for the file order)."""
    e = ConfigError(f"{where(path)}{text}")
    e.brief, e.at = f"{where.line(path)}{text}", path
    if key:
        e.key = path
    return e


def _errors_of(e: ConfigError) -> list[ConfigError]:
    return list(getattr(e, "errors", None) or [e])


def _raise_all(errors: list[ConfigError], where: _Where) -> None:
    """Raise the errors found in one recipe as one ConfigError (as a type checker reports every error, not the
    first): one error as itself; several as ``recipe 'F' has 3 errors: (1) line 4: ...; (2) ...`` with
    ``.errors`` holding each (the CLI names the flag that set each key)."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    raise many_errors(errors, f"recipe '{where.source}'" if where.source is not None else "the recipe")


def many_errors(errors: list[ConfigError], subject: str, brief=None) -> ConfigError:
    """One ConfigError for several: ``<subject> has N errors: (1) ...; (2) ...`` (at most MAX_ERRORS_SHOWN, then
    ``and N more``); ``brief(error)`` is each one's text (default: its ``.brief``, else its message)."""
    brief = brief or (lambda e: getattr(e, "brief", None) or str(e))
    shown_ = [f"({i}) {brief(e)}" for i, e in enumerate(errors[:MAX_ERRORS_SHOWN], start=1)]
    more = len(errors) - MAX_ERRORS_SHOWN
    e = ConfigError(f"{subject} has {len(errors)} errors: " + "; ".join(shown_) + (f"; and {more} more" if more > 0
                                                                                   else ""))
    e.errors, e.subject = errors, subject
    return e


def _key_lines(text: str) -> dict[str, int]:
    import yaml

    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[f"{prefix}[{i}]"] = v.start_mark.line + 1
                walk(v, f"{prefix}[{i}]")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _compose_checked(text: str, source: str):
    """The YAML node graph of a recipe, refused before anything expands it when it is a bomb: aliases that expand
    to more than MAX_RECIPE_VALUES values, an anchor that contains its own alias (a recursive structure), nesting
    deeper than MAX_RECIPE_DEPTH, or a key given twice in one mapping (YAML would keep the last, silently)."""
    import yaml

    try:
        root = yaml.compose(text)
    except RecursionError:
        raise ConfigError(f"recipe '{source}': YAML nested too deeply (a recipe is a few levels of sections and "
                          "values)") from None
    count = 0

    def walk(node, path: list[int], prefix: str, at: int = 1) -> None:
        nonlocal count
        count += 1
        line = node.start_mark.line + 1
        if count > MAX_RECIPE_VALUES:
            raise ConfigError(f"recipe '{source}': its YAML aliases expand to more than {MAX_RECIPE_VALUES:,} "
                              "values; a recipe may use anchors and aliases only for a few repeated values")
        if id(node) in path:
            raise ConfigError(f"recipe '{source}', line {at}: a YAML alias refers to the node that contains it "
                              "(a recursive structure); write the values out")
        if len(path) >= MAX_RECIPE_DEPTH:
            raise ConfigError(f"recipe '{source}', line {line}: YAML nested deeper than {MAX_RECIPE_DEPTH} levels")
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                kpath = f"{prefix}.{key}" if prefix else key
                if key in first and isinstance(k, yaml.ScalarNode):
                    raise ConfigError(f"recipe '{source}', line {k.start_mark.line + 1}: duplicate key "
                                      f"'{shown(kpath)}' (first on line {first[key]}); keep one")
                first[key] = k.start_mark.line + 1
                walk(k, path + [id(node)], kpath, k.start_mark.line + 1)
                walk(v, path + [id(node)], kpath, k.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + [id(node)], f"{prefix}[{i}]", line)

    if root is not None:
        walk(root, [], "")
    return root


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        words = typing.get_args(tp)
        return f"'{words[0]}'" if len(words) == 1 else "one of " + ", ".join(map(str, words))
    if origin is list:
        item = _type_name(typing.get_args(tp)[0])
        return f"a list of {item.split(' ', 1)[1] if item.startswith(('a ', 'an ')) else item}s"  # of strings
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _error(where: _Where, path: str, text: str) -> ConfigError:
    """``ConfigError`` for key ``path``: the message starts with it (after the file and line), ``.key`` holds it so
    the CLI can name the flag that set it."""
    return _fail(where, path, f"{path} {text}")


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _convert(value: Any, tp, path: str, where: _Where) -> Any:
    """``value`` as type ``tp``, checked against what the type carries: ``Literal`` choices, ``Annotated`` ranges."""
    if tp is Any:  # a registered freeze kind's value (freeze.kinds): the kind checks it
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        words = [w for a in inner if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if words and isinstance(value, str) and value in words:  # a number or a word: lr: auto
            return value
        rest = [a for a in inner if typing.get_origin(a) is not Literal]
        if words and isinstance(value, str) and not _NUMBER.match(value.strip()):
            raise _error(where, path, f"must be {_type_name(tp)}, got {value!r}")
        return _convert(value, rest[0], path, where)
    if origin is Annotated:
        inner, *rules = typing.get_args(tp)
        value = _convert(value, inner, path, where)
        for rule in rules:
            if isinstance(rule, Range) and not rule.ok(value):
                raise _error(where, path, rule.message(value))
        return value
    if origin is Literal:
        return _choice(value, typing.get_args(tp), path, where)
    bad = _error(where, path, f"must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, path, where)
    if origin is list:
        if isinstance(value, str) and typing.get_args(tp)[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return list(_each({i: (v, item, f"{path}[{i}]") for i, v in enumerate(value)}, where).values())
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, vt = typing.get_args(tp)
        return _each({str(k): (v, vt, f"{path}.{k}") for k, v in value.items()}, where)
    return _scalar(value, tp, path, where, bad)


def _each(items: dict, where: _Where) -> dict:
    """Convert every ``{name: (value, type, path)}``, then raise all their errors together."""
    out, errors = {}, []
    for name, (value, tp, path) in items.items():
        try:
            out[name] = _convert(value, tp, path, where)
        except ConfigError as e:
            errors += _errors_of(e)
    _raise_all(errors, where)
    return out


def _choice(value: Any, choices: tuple, path: str, where: _Where) -> str:
    if isinstance(value, bool) and {"on", "off"} <= set(choices):
        value = "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as true/false
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value) in choices:
        return str(value)
    raise _error(where, path, f"must be one of {', '.join(choices)}, got '{shown(value)}'"
                              f"{suggest(str(value), choices)}")


def _scalar(value: Any, tp, path: str, where: _Where, bad: ConfigError) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if abs(value) > sys.float_info.max or not math.isfinite(value):  # YAML .nan/.inf, 10**400
                text = repr(value) if len(repr(value)) <= 32 else f"{repr(value)[:12]}... ({len(repr(value))} digits)"
                raise _error(where, path, f"must be a finite number, got {text}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _build(cls, data: dict, prefix: str, where: _Where):
    """``cls`` from a mapping; every unknown key, bad value and missing key found, raised together."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f.name for f in dataclasses.fields(cls)]
    known, errors = {}, []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key in fields:
            known[key] = (value, hints[key], path)
        else:
            errors.append(_fail(where, path, f"unknown key '{shown(path)}'{suggest(str(key), fields)}; valid "
                                f"keys{' in ' + prefix if prefix else ''}: {', '.join(fields)}", key=False))
    try:
        kwargs = _each(known, where)
    except ConfigError as e:
        errors += _errors_of(e)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data:
            path = f"{prefix}.{f.name}" if prefix else f.name
            errors.append(_fail(where, prefix, f"missing key '{path}'", key=False))
    errors.sort(key=lambda e: _line_of(e, where))  # in the file's order (unknown and bad keys interleave)
    _raise_all(errors, where)
    return cls(**kwargs)


def _line_of(e: ConfigError, where: _Where) -> int:
    return where.lines.get(getattr(e, "at", None) or "", 0) if where.source is not None else 0


def choices(path: str) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` recipe key (``choices("freeze.bn")`` -> ``("frozen", "eval", "train")``): the
    field's type is the one place they are written."""
    tp: Any = Recipe
    for part in path.split("."):
        tp = typing.get_type_hints(tp, include_extras=True)[part]
    return typing.get_args(tp)


def validate(recipe: Recipe, where: _Where | None = None) -> Recipe:
    """Check every value of a recipe built in Python against the field types (the same rules as a YAML file):
    types, ``Literal`` choices, ``Annotated`` ranges; raise ConfigError naming the key path (``.key``)."""
    return _cross_checks(_build(Recipe, recipe.to_dict(), "", where or _Where(None)), where or _Where(None))


def _cross_checks(recipe: Recipe, where: _Where) -> Recipe:
    """Rules between keys (a single field's rules live in its type); all broken ones raised together."""
    errors = []
    if recipe.optimizer.lr != "auto" and recipe.scheduler.min_lr > recipe.optimizer.lr:
        errors.append(_fail(where, "scheduler.min_lr", f"scheduler.min_lr ({recipe.scheduler.min_lr:g}) must not be "
                            f"above optimizer.lr ({recipe.optimizer.lr:g}): the schedule would raise the LR"))
    if recipe.scheduler.warmup_epochs > recipe.train.epochs:
        warmup = recipe.scheduler.warmup_epochs
        errors.append(_fail(where, "scheduler.warmup_epochs", f"scheduler.warmup_epochs ({warmup:g}) must not be "
                            f"more than train.epochs ({recipe.train.epochs}): the LR would never reach "
                            "optimizer.lr"))
    _raise_all(errors, where)
    return recipe


def from_dict(data: dict, source: str | None = None, text: str | None = None) -> Recipe:
    where = _Where(source, _key_lines(text) if text else None)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where('')}a recipe must be a mapping of sections (model, data, freeze, optimizer, "
                          "scheduler, train)")
    return _cross_checks(_build(Recipe, data, "", where), where)


def sample_data() -> Path:
    """The bundled sample data (shipped in the package; what ``data.path: sample`` means)."""
    return SAMPLE_DIR


def recipes_dir() -> Path:
    """Where named recipes live: $FINETUNE_RECIPES, else the package's recipes/ (the repository's recipes/)."""
    env = os.environ.get("FINETUNE_RECIPES")
    return Path(env) if env else RECIPES_DIR


def recipe_names() -> list[str]:
    d = recipes_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path or "/" in name_or_path:
        if not p.is_file():
            raise ConfigError(f"recipe file '{name_or_path}' not found")
        return p
    cand = recipes_dir() / f"{name_or_path}.yaml"
    if not cand.is_file():
        names = recipe_names()
        raise ConfigError(f"unknown recipe '{name_or_path}'{suggest(name_or_path, names)}; "
                          f"available: {', '.join(names) or 'none'}")
    return cand


def load_recipe(name_or_path: str | None = "default") -> Recipe:
    """Load a recipe by name (``recipes/NAME.yaml``) or path, validated."""
    import yaml

    path = recipe_path(name_or_path or "default")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe '{path}' is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES // 1024} KiB "
                          "(is this the right file?)")
    text = path.read_text(encoding="utf-8")
    try:
        _compose_checked(text, str(path))  # before anything expands an alias
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe '{path}'{line}: invalid YAML: {problem}") from None
    recipe = from_dict(data, source=str(path), text=text)
    if not recipe.name:
        recipe.name = path.stem
    return recipe


def describe(path: Path) -> str:
    """The recipe's one-line description, without validating it (for the fast listing)."""
    import yaml

    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            return "(too large)"
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, RecursionError):
        return "(invalid YAML)"
    return str(data.get("description", "")).strip().splitlines()[0] if isinstance(data, dict) and \
        data.get("description") else ""


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Set dotted keys (``{"train.epochs": 3}``) from CLI flags; ``None`` values mean "not given"."""
    data = recipe.to_dict()
    for path, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return from_dict(data, source=None)
