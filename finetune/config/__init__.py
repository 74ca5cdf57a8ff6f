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


@dataclass
class ModelCfg:
    name: str = "smallcnn"
    weights: str = "default"  # default = the backbone's own pretrained weights (none for smallcnn)
    num_classes: int | None = None  # None = from the data
    drop_rate: Annotated[float, FRACTION] | None = None  # timm create_model(drop_rate=): dropout before the head
    drop_path_rate: Annotated[float, FRACTION] | None = None  # timm create_model(drop_path_rate=): stochastic depth


@dataclass
class DataCfg:
    path: str = "sample"  # "sample" = the bundled data (config.SAMPLE_DIR)
    val_path: str | None = None  # tar shards: the val shards' pattern (None: the last shard is held out)
    labels: str | None = None  # prefix:..., regex:..., csv:FILE; None = class subfolders
    val_split: Annotated[float, FRACTION] = 0.2  # used when the folder has no val/ split
    image_size: Annotated[int, SIZE] | None = None  # None = the backbone's own input size
    augment: Literal["none", "light", "strong"] = "light"
    sampler: Literal["random", "balanced"] = "random"  # balanced: each class equally likely per draw (imbalance.py)
    mean: list[float] | None = None
    std: list[float] | None = None
    cache: Literal["auto", "on", "off", "ram", "disk"] = "auto"  # decoded-image cache (auto/on: RAM or disk by size)
    cache_gb: Annotated[float, POS] = 2.0  # RAM budget of the cache; larger data goes to the disk cache
    cache_dir: str | None = None  # disk cache folder, kept and reused (None: in the run directory, removed)
    workers: Annotated[int, NONNEG] | None = None  # None = sized for the machine
    strict: bool = False  # fail on unreadable images instead of skipping them
    allow_outside: bool = False  # csv labels: allow paths outside the data folder (../x, /abs/x)


@dataclass
class UnfreezeStep:
    epoch: Annotated[int, EPOCH]  # 1-based (as logs count): at the start of this epoch the layers become trainable
    layers: list[str]  # dotted module paths, stage:K addresses, or ["all"]
    lr_mult: Annotated[float, Range(gt=0, msg="must be greater than 0")] = 1.0  # new group's LR = base LR x this


@dataclass
class FreezeCfg:
    names: list[str] = field(default_factory=list)  # parameter-name substrings or globs (tutorial method 1)
    first: Annotated[int, NONNEG] | None = None  # the first N parameter tensors (tutorial method 2)
    stages: int | None = None  # fastai freeze_to: -2 = all but the last 2 stages frozen (the head trains)
    layers: list[str] = field(default_factory=list)  # dotted module paths (tutorial method 3)
    backbone: bool = False  # everything except the head (linear probing)
    unfreeze: list[str] = field(default_factory=list)  # applied last: names/layers made trainable again
    bn: Literal["frozen", "eval", "train"] = "frozen"  # BatchNorm: frozen layers' stats fixed | all fixed | all train
    schedule: list[UnfreezeStep] = field(default_factory=list)
    kinds: dict[str, Any] = field(default_factory=dict)  # kinds added by register_freeze_kind: name -> value it checks


@dataclass
class OptimizerCfg:
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    lr: Annotated[float, POS, F32] | Literal["auto"] = 0.01  # auto: the LR range test picks it (lr_find.py)
    momentum: Annotated[float, NONNEG] = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, NONNEG] = 0.0  # never applied to biases and norm weights
    lr_mult: dict[str, Annotated[float, Range(ge=0, msg="must not be negative")]] = field(default_factory=dict)
    # layer path -> LR multiplier
    layer_decay: Annotated[float, DECAY] | None = None  # layer-wise LR decay for what is trainable from the start


@dataclass
class SchedulerCfg:
    name: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    warmup_epochs: Annotated[float, NONNEG] = 0.0
    step_size: Annotated[int, NONNEG] = 1  # step: epochs between decays
    gamma: Annotated[float, NONNEG] = 0.1
    min_lr: Annotated[float, NONNEG] = 0.0


@dataclass
class TrainCfg:
    epochs: Annotated[int, POS] = 5
    batch_size: Annotated[int, POS] = 32
    accumulate: Annotated[int, POS] = 1
    clip_grad: Annotated[float, NONNEG] | None = None
    label_smoothing: Annotated[float, NONNEG, Range(lt=1, msg="must be below 1")] = 0.0
    class_weights: str = "none"  # none | auto (inverse frequency) | FILE (.json/.yaml: class -> weight)
    seed: Annotated[int, SEED] = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None  # None = auto (conv nets)
    compile: bool = False
    early_stop: Annotated[int, NONNEG] | None = None  # stop after N epochs without a better val accuracy
    cache_features: Literal["auto", "on", "off"] = "auto"
    fast_inference: Literal["auto", "off"] = "auto"  # frozen inference on a conv+BN-folded copy (models/fold.py)
    autotune: Literal["auto", "off"] = "auto"  # CPU bf16: depthwise convs get an fp32 backward where faster (dwgrad)
    tensorboard: bool = True
    report: bool = True  # write report.html (curves, confusion, wrong images, freeze plan) at the end of the run
    graph: bool = True  # add the model graph to TensorBoard
    save_every_steps: Annotated[int, POS] | None = None  # also save last.pt every N steps in an epoch (resumable)
    sync_bn: bool = False  # DDP: SyncBatchNorm for BN layers that train (statistics over the global batch)
    monitor: Literal["val_acc", "val_loss", "val_f1"] = "val_acc"  # what picks best.pt, top-k and early stop
    monitor_mode: Literal["auto", "max", "min"] = "auto"  # auto: min for val_loss, else max
    save_top_k: Annotated[int, POS] = 1  # keep the K best epochs (K > 1: also epochNNN.pt files)
    ema: bool = False  # keep an exponential moving average of the weights (timm ModelEmaV3), saved as best_ema.pt
    ema_decay: Annotated[float, UNIT] = 0.999  # with timm's warm-up: min(decay, 1 - (1 + step) ** -2/3)
    mixup: Annotated[float, NONNEG] = 0.0  # mixup alpha (timm Mixup); 0 = off
    cutmix: Annotated[float, NONNEG] = 0.0  # cutmix alpha; 0 = off (with both: one of them per batch)
    log_every: Annotated[int, POS] | None = None  # TensorBoard scalars every N optimizer steps (besides per epoch)
    dist_timeout: Annotated[float, POS] = 10.0  # DDP: minutes a collective may wait for the other processes
    strategy: Literal["ddp", "fsdp"] = "ddp"  # N processes: DDP replicas, or FSDP2 (fully_shard per block)
    checkpoint_format: Literal["auto", "full"] = "auto"  # last.pt under FSDP: auto = sharded (DCP), full = one file


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
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _error(where: _Where, path: str, text: str) -> ConfigError:
    """``ConfigError`` for key ``path``: the message starts with it (after the file and line), ``.key`` holds it so
    the CLI can name the flag that set it."""
    e = ConfigError(f"{where(path)}{path} {text}")
    e.key = path
    return e


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
        return [_convert(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{path}.{k}", where) for k, v in value.items()}
    return _scalar(value, tp, path, where, bad)


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
    hints = typing.get_type_hints(cls, include_extras=True)
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
    """Rules between keys (a single field's rules live in its type)."""
    if recipe.optimizer.lr != "auto" and recipe.scheduler.min_lr > recipe.optimizer.lr:
        e = ConfigError(f"{where('scheduler.min_lr')}scheduler.min_lr ({recipe.scheduler.min_lr:g}) must not be "
                        f"above optimizer.lr ({recipe.optimizer.lr:g}): the schedule would raise the LR")
        e.key = "scheduler.min_lr"
        raise e
    if recipe.scheduler.warmup_epochs > recipe.train.epochs:
        warmup = recipe.scheduler.warmup_epochs
        e = ConfigError(f"{where('scheduler.warmup_epochs')}scheduler.warmup_epochs ({warmup:g}) must not be more "
                        f"than train.epochs ({recipe.train.epochs}): the LR would never reach optimizer.lr")
        e.key = "scheduler.warmup_epochs"
        raise e
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
