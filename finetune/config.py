"""Recipes: documented training setups as YAML, validated into dataclasses; CLI flags override them.

No torch import here: ``finetune recipes`` and ``--help`` must answer fast. Validation errors name the key path
and, when the value came from a file, the line: ``recipe 'x.yaml', line 12: train.epochs must be an integer``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from finetune.errors import ConfigError, shown, suggest

# Shipped with the package (package data), so a plain `pip install` has them; the repository's top-level recipes/
# and data/sample are links to these.
PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
SAMPLE_DIR = PACKAGE_DIR / "data" / "sample"


@dataclass
class ModelCfg:
    name: str = "smallcnn"
    weights: str = "default"  # default = the backbone's own pretrained weights (none for smallcnn)
    num_classes: int | None = None  # None = from the data


@dataclass
class DataCfg:
    path: str = "sample"  # "sample" = the bundled data (config.SAMPLE_DIR)
    labels: str | None = None  # prefix:..., regex:..., csv:FILE; None = class subfolders
    val_split: float = 0.2  # used when the folder has no val/ split
    image_size: int | None = None  # None = the backbone's own input size
    augment: str = "light"  # none | light | strong
    mean: list[float] | None = None
    std: list[float] | None = None
    cache: str = "auto"  # decoded-image cache: auto | on | off
    cache_gb: float = 2.0
    workers: int | None = None  # None = sized for the machine
    strict: bool = False  # fail on unreadable images instead of skipping them


@dataclass
class UnfreezeStep:
    epoch: int  # 1-based (as logs and metrics count): at the start of this epoch the layers become trainable
    layers: list[str]  # dotted module paths, stage:K addresses, or ["all"]
    lr_mult: float = 1.0  # LR of the new parameter group = base LR x lr_mult


@dataclass
class FreezeCfg:
    names: list[str] = field(default_factory=list)  # parameter-name substrings or globs (tutorial method 1)
    first: int | None = None  # the first N parameter tensors (tutorial method 2)
    stages: int | None = None  # fastai freeze_to: -2 = all but the last 2 stages frozen (the head trains)
    layers: list[str] = field(default_factory=list)  # dotted module paths (tutorial method 3)
    backbone: bool = False  # everything except the head (linear probing)
    unfreeze: list[str] = field(default_factory=list)  # applied last: names/layers made trainable again
    bn: str = "frozen"  # frozen | train
    schedule: list[UnfreezeStep] = field(default_factory=list)


@dataclass
class OptimizerCfg:
    name: str = "sgd"  # sgd | adam | adamw | rmsprop
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0  # never applied to biases and norm weights
    lr_mult: dict[str, float] = field(default_factory=dict)  # layer path -> LR multiplier
    layer_decay: float | None = None  # layer-wise LR decay for what is trainable from the start


@dataclass
class SchedulerCfg:
    name: str = "constant"  # constant | step | cosine | onecycle
    warmup_epochs: float = 0.0
    step_size: int = 1  # step: epochs between decays
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainCfg:
    epochs: int = 5
    batch_size: int = 32
    accumulate: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool | None = None  # None = auto (conv nets)
    compile: bool = False
    early_stop: int | None = None  # stop after this many epochs without a better val accuracy
    cache_features: str = "auto"  # auto | on | off
    tensorboard: bool = True
    report: bool = True  # write report.html (curves, confusion, wrong images, freeze plan) at the end of the run
    graph: bool = True  # add the model graph to TensorBoard
    save_every_steps: int | None = None  # also save last.pt every N optimizer steps inside an epoch (resumable)
    sync_bn: bool = False  # DDP: SyncBatchNorm for BN layers that train (statistics over the global batch)


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


CHOICES = {
    "data.augment": ("none", "light", "strong"),
    "data.cache": ("auto", "on", "off"),
    "freeze.bn": ("frozen", "train"),
    "optimizer.name": ("sgd", "adam", "adamw", "rmsprop"),
    "scheduler.name": ("constant", "step", "cosine", "onecycle"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.cache_features": ("auto", "on", "off"),
}
POSITIVE = {"optimizer.lr", "train.epochs", "train.batch_size", "train.accumulate", "data.cache_gb",
            "train.save_every_steps"}
NON_NEGATIVE = {"optimizer.momentum", "optimizer.weight_decay", "scheduler.warmup_epochs", "scheduler.min_lr",
                "train.label_smoothing", "train.clip_grad", "train.early_stop", "freeze.first",
                "data.workers", "scheduler.step_size", "scheduler.gamma"}

IMAGE_SIZE = (8, 2048)  # data.image_size: smaller cannot pass a CNN's downsampling; larger is an allocator crash

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


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp, path: str, where: _Where) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path, where)
    bad = ConfigError(f"{where(path)}{path} must be {_type_name(tp)}, got {value!r}")
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
        return [_convert(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{path}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if abs(value) > sys.float_info.max or not math.isfinite(value):  # YAML .nan/.inf, 10**400
                text = repr(value) if len(repr(value)) <= 32 else f"{repr(value)[:12]}... ({len(repr(value))} digits)"
                raise ConfigError(f"{where(path)}{path} must be a finite number, got {text}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _build(cls, data: dict, prefix: str, where: _Where):
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{where(path)}unknown key '{shown(path)}'{suggest(str(key), fields)}; "
                              f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], path, where)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kwargs]
    if missing:
        path = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"{where(prefix)}missing key '{path}'")
    return cls(**kwargs)


def validate(recipe: Recipe, where: _Where | None = None) -> Recipe:
    """Check values (choices, signs) after types; raise ConfigError naming the key path."""
    where = where or _Where(None)
    for path, choices in CHOICES.items():
        value = _get(recipe, path)
        if value not in choices:
            raise ConfigError(f"{where(path)}{path} must be one of {', '.join(choices)}, got '{shown(value)}'"
                              f"{suggest(str(value), choices)}")
    for path in POSITIVE:
        value = _get(recipe, path)
        if value is not None and value <= 0:
            raise ConfigError(f"{where(path)}{path} must be greater than 0, got {value}")
    for path in NON_NEGATIVE:
        value = _get(recipe, path)
        if value is not None and value < 0:
            raise ConfigError(f"{where(path)}{path} must not be negative, got {value}")
    if not 0.0 <= recipe.data.val_split < 1.0:
        raise ConfigError(f"{where('data.val_split')}data.val_split must be in [0, 1), got {recipe.data.val_split}")
    size = recipe.data.image_size
    if size is not None and not IMAGE_SIZE[0] <= size <= IMAGE_SIZE[1]:
        raise ConfigError(f"{where('data.image_size')}data.image_size must be between {IMAGE_SIZE[0]} and "
                          f"{IMAGE_SIZE[1]} pixels, got {size}; omit it to use the backbone's own input size")
    if recipe.train.label_smoothing >= 1.0:
        raise ConfigError(f"{where('train.label_smoothing')}train.label_smoothing must be below 1")
    for i, step in enumerate(recipe.freeze.schedule):
        if step.epoch < 1:
            raise ConfigError(f"{where(f'freeze.schedule[{i}]')}freeze.schedule[{i}].epoch must be at least 1 "
                              f"(epochs count from 1, as the logs do), got {step.epoch}")
        if step.lr_mult <= 0:
            raise ConfigError(f"{where(f'freeze.schedule[{i}]')}freeze.schedule[{i}].lr_mult must be greater than 0")
    for k, v in recipe.optimizer.lr_mult.items():
        if v < 0:
            raise ConfigError(f"{where('optimizer.lr_mult.' + k)}optimizer.lr_mult.{k} must not be negative")
    return recipe


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def from_dict(data: dict, source: str | None = None, text: str | None = None) -> Recipe:
    where = _Where(source, _key_lines(text) if text else None)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where('')}a recipe must be a mapping of sections (model, data, freeze, optimizer, "
                          "scheduler, train)")
    return validate(_build(Recipe, data, "", where), where)


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
    text = path.read_text(encoding="utf-8")
    try:
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
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
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
