"""The mistakes a run's inputs can be checked for before torch is imported (2-5 s): a model name that no source
has, a data path or tar shard that does not exist, a weights file or checkpoint that is not there. Each check raises
the error the run would raise later, word for word; the later checks stay where they are (a library caller may skip
this), and this module only answers sooner. ``finetune.api`` calls it first thing in train, lr_find, probe,
evaluate_checkpoint, predict, load_model and export.

Also the torch-free part of the data path rules (``sample``, ``cifar10:ROOT``, tar shard patterns, folders) and of
the weights rules (which ``--weights`` values are files), which :mod:`finetune.data` and :mod:`finetune.models`
import from here.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from finetune.config import SAMPLE_DIR
from finetune.errors import CheckpointError, ConfigError, DataError, WeightsError

# ----------------------------------------------------------------------------------------------- data paths

CIFAR = re.compile(r"^(cifar10|cifar100):(.+)$")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # data/cifar.py LAYOUT's
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def resolve_data_path(path: str) -> str | Path:
    """``sample`` -> the bundled sample data (package data); ``cifar10:ROOT`` / ``cifar100:ROOT`` stay specs;
    else a Path."""
    path = str(path).strip()
    if path == "sample":
        return SAMPLE_DIR
    if CIFAR.match(path):
        return path
    if path in ("cifar10", "cifar100"):
        raise DataError(f"--data {path} needs a folder: --data {path}:ROOT (ROOT holds or will hold "
                        f"{CIFAR_FOLDERS[path]}/)")
    return Path(path).expanduser()


def check_root(root: Path, given: str) -> Path:
    if not root.exists():
        raise DataError(f"data path '{given}' does not exist; pass a folder of images, 'sample', or cifar10:ROOT")
    if not root.is_dir():
        raise DataError(f"data path '{given}' is a file, not a folder; pass the folder that holds the images")
    return root


def is_shard_spec(path: str) -> bool:
    return str(path).strip().endswith(".tar")


def expand(pattern: str) -> list[str]:
    """Brace expansion: ``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}``."""
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m is not None]
    if not found:
        return [pattern]
    m = min(found, key=lambda x: x.start())  # leftmost first, as the shell does
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        parts = m.group(1).split(",")
    return [x for part in parts for x in expand(pattern[:m.start()] + part + pattern[m.end():])]


def shard_paths(pattern: str) -> list[Path]:
    paths = [Path(p).expanduser() for p in expand(str(pattern).strip())]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"shard '{missing[0]}' does not exist ({len(missing)} of the {len(paths)} shards of "
                        f"'{pattern}' are missing); check the pattern (brace ranges like train-{{000..099}}.tar)")
    return paths


# ----------------------------------------------------------------------------------------------- weights

FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


def looks_like_path(spec: str) -> bool:
    """Whether a ``--weights`` value names a file (rather than none, default or a weights name)."""
    return spec.endswith(FILE_SUFFIXES) or os.sep in spec or "/" in spec or Path(spec).exists()


def weights_file(weights: str | None) -> Path | None:
    """The file a ``--weights`` value names (None: not a file); a ``WeightsError`` when it is not there."""
    w = "none" if weights is None else str(weights).strip()
    if w.lower() in ("none", "random", "") or not looks_like_path(w):
        return None
    path = Path(w).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file '{w}' not found; pass an existing .pth/.pt/.safetensors file, "
                           "a weights name, or --weights none")
    return path


# ----------------------------------------------------------------------------------------------- checkpoints

def checkpoint_file(path: str | Path) -> Path:
    """The file ``load_checkpoint`` reads for ``path`` (a run directory: its best.pt, else last.pt); a
    ``CheckpointError`` when there is none (a best.pt that a run's last.pt can restore counts as there)."""
    p = Path(path)
    if p.is_dir():
        p = p / "best.pt" if (p / "best.pt").is_file() else p / "last.pt"
    if not p.is_file() and not (p.name == "best.pt" and (p.parent / "last.pt").is_file()):
        raise CheckpointError(f"checkpoint '{path}' not found; pass a .pt file from a run directory "
                              "(runs/<run>/best.pt or last.pt)")
    if p.suffix.lower() == ".safetensors":  # what export writes, or a hub download: weights alone, never a run's
        raise CheckpointError(f"'{path}' is a .safetensors weights file, not a finetune checkpoint; pass a run's "
                              "best.pt or last.pt (runs/<run>/best.pt), or train from these weights: finetune train "
                              f"--model MODEL --weights {path}")
    return p


def image_paths(paths: list[Any]) -> None:
    """A ``DataError`` for the first of predict's ``paths`` (image files or folders) that is not there, in the
    words :func:`finetune.data.images.named_images` uses."""
    for p in paths:
        path = Path(os.fspath(p)).expanduser()
        if not path.is_dir() and not path.is_file():
            raise DataError(f"'{p}' does not exist; pass image files or folders of images")


# ----------------------------------------------------------------------------------------------- run directories

RUN_MARKER, RUN_LOCK = ".finetune-run", ".lock"  # finetune/run/checkpoint.py's MARKER and LOCK (a test holds it)


def out_dir(out: str | Path | None, overwrite: bool) -> None:
    """The plain refusals of ``train --out`` (:func:`finetune.run.checkpoint.prepare_run_dir`'s, word for word):
    a path that is a file, or a non-empty directory without ``overwrite``. What ``overwrite`` may empty is
    decided there, under the run's lock."""
    if out is None or overwrite:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path '{out}' exists and is not a directory; choose another --out")
    try:
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError:
        return  # unreadable: the run's own check says why
    if not [n for n in names if n != RUN_LOCK]:
        return
    if RUN_MARKER in names or "config.yaml" in names:
        if not (out / "last.pt").is_file():
            raise CheckpointError(f"output directory '{out}' holds a run that saved no checkpoint; pass --overwrite "
                                  "to replace it or choose another --out")
        raise CheckpointError(f"output directory '{out}' already exists and is not empty; pass --overwrite to "
                              "replace it, --resume to continue it, or choose another --out")
    raise CheckpointError(f"output directory '{out}' already exists and is not empty (and is not a finetune "
                          "run); choose another --out")


def run_dir(path: str | Path) -> Path:
    """A ``FinetuneError`` for a run directory (``finetune report RUN_DIR``) that is not there."""
    from finetune.errors import FinetuneError

    p = Path(path)
    if not p.is_dir():
        raise FinetuneError(f"run directory '{p}' not found; pass a folder written by finetune train "
                            "(see finetune runs)")
    return p


# ----------------------------------------------------------------------------------------------- probe flags

def parse_floats(text: str | None, what: str, default: tuple[float, ...]) -> list[float]:
    """``--lrs`` / ``--wds``: comma-separated non-negative numbers (LRs positive); ``default`` when not given."""
    if text is None or not str(text).strip():
        return list(default)
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} '{text}' is not a comma-separated list of numbers (e.g. 1e-3,3e-3)") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals) or (what == "lrs" and 0 in vals):
        raise ConfigError(f"--{what} '{text}': give positive numbers{'' if what == 'lrs' else ' (or 0)'}, "
                          "e.g. 1e-3,3e-3")
    return vals


def parse_ints(text: str | None, default: tuple[int, ...]) -> list[int]:
    """``--knn``: comma-separated k values, 0 dropped (it turns k-NN off); ``default`` when not given."""
    if text is None or not str(text).strip():
        return list(default)
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--knn '{text}' is not a comma-separated list of integers (e.g. 10,20); 0 turns k-NN "
                          "off") from None
    if any(v < 0 for v in vals):
        raise ConfigError(f"--knn '{text}': k must be positive (0 turns k-NN off)")
    return [v for v in vals if v > 0]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")


def parse_budget(text: str | float | int | None) -> float | None:
    """``--budget``: a wall-clock duration as ``90s``, ``20m``, ``1h30m``, ``1.5h`` or plain seconds; None when not
    given. At least 1 second."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        t = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(t)
        except ValueError:
            parts = _DURATION.findall(t)
            if not parts or "".join(n + u for n, u in parts) != t or len({u for _, u in parts}) != len(parts):
                raise ConfigError(f"--budget '{text}' is not a duration; use e.g. 90s, 20m, 1h30m or seconds"
                                  ) from None
            seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 1:
        raise ConfigError(f"--budget '{text}' is too short; give at least 1s (e.g. 20m)")
    return seconds


def budget_text(seconds: float) -> str:
    """``1h05m``, ``20m``, ``12m30s``, ``45s``: a budget or an estimate as a person writes it."""
    s = int(round(seconds))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    if h:
        return f"{h}h{m:02d}m" if not sec else f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m" if not sec else f"{m}m{sec:02d}s"
    return f"{sec}s"


# ----------------------------------------------------------------------------------------------- --model lists

MODEL_EXAMPLE = "--model timm:tf_efficientnet_lite0=/w/lite0.safetensors,resnet18"


def parse_models(text: str, weights: str | None = "default") -> list[tuple[str, str]]:
    """``--model a,b=PATH,c=TAG``: ``(name, weights)`` pairs, in order. Split on commas, then on the first ``=``
    (a model name never holds one); a model without ``=`` takes ``weights`` (``--weights``). A path that holds a
    comma cannot be written here (the comma splits it): such a piece is refused, naming the fix."""
    pairs = []
    for piece in (p.strip() for p in str(text).split(",")):
        if not piece:
            continue
        name, sep, w = (s.strip() for s in piece.partition("="))
        if sep:
            pairs.append((name, w))
        elif name.endswith(FILE_SUFFIXES) or "/" in name or os.sep in name:  # not looks_like_path: no file test
            raise ConfigError(f"--model '{name}' looks like a weights file, not a model name; give each model its "
                              "file as NAME=PATH (paths with a comma are not supported in --model: rename the "
                              f"file), e.g. {MODEL_EXAMPLE}")
        else:
            pairs.append((name, "none" if weights is None else str(weights).strip()))
    return checked_pairs(pairs, text)


def model_pairs(models: Any, weights: str | None = "default") -> list[tuple[str, str]]:
    """``probe``'s models in any of the forms it takes, as ``(name, weights)`` pairs: the ``--model`` text
    (:func:`parse_models`), a list of names (each may be ``name=weights``; the others take ``weights``), a list of
    ``(name, weights)`` pairs, or a dict ``{name: weights}``."""
    if isinstance(models, str):
        return parse_models(models, weights)
    items = list(models.items()) if isinstance(models, dict) else list(models)
    pairs: list[tuple[str, str]] = []
    for m in items:
        if isinstance(m, str):
            pairs += parse_models(m, weights) if m.strip() else [("", "")]
        else:
            name, w = m
            pairs.append((str(name).strip(), "none" if w is None else str(w).strip()))
    return checked_pairs(pairs, ",".join(n if w == weights else f"{n}={w}" for n, w in pairs))


def checked_pairs(pairs: list[tuple[str, str]], text: str) -> list[tuple[str, str]]:
    """The refusals of a ``--model`` list: none, a model without a name or without weights after ``=``, the same
    model with the same weights twice (one model with two weights files is two candidates)."""
    if not pairs:
        raise ConfigError("--model is empty; name one or more backbones: --model resnet18,timm:convnext_tiny")
    for name, w in pairs:
        if not name:
            raise ConfigError(f"--model '{text}' has a model without a name (before '='); write NAME=WEIGHTS, e.g. "
                              f"{MODEL_EXAMPLE}")
        if not w:
            raise ConfigError(f"--model '{text}': '{name}=' has no weights after '='; write {name}=PATH (a file, a "
                              "tag, or default), or drop the '=' to use --weights")
    keys = [(n, os.path.abspath(os.path.expanduser(w)) if looks_like_path(w) else w) for n, w in pairs]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--model names a backbone twice: {text}")
    return pairs


# ----------------------------------------------------------------------------------------------- the checks

def check_model(name: str) -> None:
    """A ``ModelError`` (with the closest names) for a name no source has; torch-free while only the built-in
    sources exist (:mod:`finetune.config.catalog`)."""
    from finetune.config import catalog

    catalog.resolve(name)


def check_data(path: str, val_path: str | None = None) -> None:
    """A ``DataError`` for data that is not there: a folder, tar shards (and ``val_path``'s), ``cifar10`` without
    a root. ``sample`` and ``cifar10:ROOT`` pass (CIFAR may still be downloaded)."""
    if is_shard_spec(path):
        shard_paths(path)
        if val_path:
            shard_paths(val_path)
        return
    spec = resolve_data_path(path)
    if isinstance(spec, Path):
        check_root(spec, path)


def check_recipe(recipe: Any) -> None:
    """The model name, the data and the weights file of a recipe, in the order a run meets them (values of the
    wrong type are left to the recipe's own validation)."""
    model, data = recipe.model, recipe.data
    if isinstance(model.name, str):
        check_model(model.name)
    if isinstance(data.path, str):
        val_path = getattr(data, "val_path", None)
        check_data(data.path, val_path if isinstance(val_path, str) else None)
    if isinstance(model.weights, str):
        weights_file(model.weights)


def check_run(models: Any, weights: str | None, data: str) -> list[tuple[str, str]]:
    """Several models on one data set (``probe``), each with its weights (the forms of :func:`model_pairs`): the
    list first, then every name, the data, each weights file. Returns the ``(name, weights)`` pairs."""
    pairs = model_pairs(models, weights)
    for m, _ in pairs:
        check_model(m)
    check_data(data)
    for _, w in pairs:
        weights_file(w)
    return pairs
