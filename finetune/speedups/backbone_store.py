"""Backbones kept beside their features: a head-only run on stored features builds a stand-in, not the backbone.

A linear probe or ``probe`` rerun whose features are all in the store (:mod:`.feature_store`) needs the backbone
only for what it writes: ``best.pt`` holds the whole model's ``state_dict``. Building the model costs importing its
library (timm ~2 s, torchvision ~1.7 s on a 2-core CPU: both import ``torch._dynamo``) and reading its weights;
the stand-in (:mod:`finetune.models.stand_in`) holds the same tensors under the same names, read from one
safetensors file.

An entry, ``<cache root>/backbones/<key>/``: ``record.json`` (the module record, the backbone's fields, the data
config the run used) and ``state.safetensors`` (the model's ``state_dict()`` as built: pretrained weights and the new
head, before any training). The key: the model name as given, the weights as given and their identity (a
file's SHA-256), the class count, drop rates, and the versions of torch, timm and torchvision. Entries are written
atomically (a temporary sibling directory, renamed) by a run that built the real model for a head-only run, and
read only when everything checks out (the record's format, its tensor names equal to the file's, the shapes of the
head); anything else is a miss (the real model is built). Safetensors hold tensors only: nothing in an entry runs.
``finetune cache clear`` removes them with the features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from finetune import files

log = logging.getLogger("finetune")

FORMAT = 1
DIR = "backbones"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "timm", "torchvision", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def key_parts(cfg, num_classes: int | None = None) -> dict[str, Any] | None:
    """What identifies the backbone ``cfg`` builds, or None when it cannot be kept (random init: the weights
    depend on the seed; no persistent cache)."""
    from finetune.speedups.feature_store import weights_identity

    w = cfg.model.weights
    if w in (None, "", "none", "random"):
        return None
    return {"format": FORMAT, "model": cfg.model.name.strip(), "weights": weights_identity(w), "given": w,
            "drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate,
            "num_classes": num_classes, "versions": _versions()}


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _root(cache_dir=None) -> Path | None:
    from finetune.speedups.feature_store import cache_root

    root = cache_root(cache_dir)
    return root / DIR if root is not None else None


def find_data_config(cfg, cache_dir=None) -> dict[str, Any] | None:
    """The data config stored with any entry for ``cfg``'s backbone (whatever the class count), or None. Read
    from a small index (``<key without classes>.json``) so that the data can be listed before the classes are
    known."""
    root, parts = _root(cache_dir), key_parts(cfg)
    if root is None or parts is None:
        return None
    try:
        data = json.loads((root / f"{_key(parts)}.json").read_text("utf-8"))
        dc = data["data_config"]
        return _tuples(dc) if isinstance(dc, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tuples(dc: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the registries return (input_size, mean, std)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dc.items()}


def load(cfg, num_classes: int, cache_dir=None):
    """The stored backbone of ``cfg`` with ``num_classes`` as a :class:`finetune.models.Backbone` whose model is a
    stand-in, or None (no entry, or one that does not check out)."""
    root, parts = _root(cache_dir), key_parts(cfg, num_classes)
    if root is None or parts is None:
        return None
    d = root / _key(parts)
    try:
        record = json.loads((d / "record.json").read_text("utf-8"))
        if record.get("format") != FORMAT or record.get("parts") != json.loads(json.dumps(parts, default=str)):
            return None
        from safetensors.torch import load_file

        from finetune.models.backbone import Backbone
        from finetune.models.stand_in import build

        state = load_file(str(d / "state.safetensors"))
        model = build(record["module_record"], state)
        b = record["backbone"]
        head = [str(h) for h in b["head"]]
        lin = model.get_submodule(head[0])
        if len(head) != 1 or lin.out_features != num_classes:
            return None
        bb = Backbone(model=model, name=str(b["name"]), source=str(b["source"]), arch=str(b["arch"]),
                      num_classes=int(b["num_classes"]), head=head, weights=str(b["weights"]),
                      data_cfg=_tuples(b["data_cfg"]), notes=[str(n) for n in b["notes"]])
        with contextlib.suppress(OSError):  # last used, for 'cache clear --older-than' (a read-only cache: not kept)
            os.utime(d / "record.json")
        return bb, _tuples(record["data_config"])
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged entry is a miss; the real model is built
        log.debug(f"stored backbone {d.name[:12]} not used ({type(e).__name__}: {e})")
        return None


def save(cfg, bb, data_cfg: dict[str, Any], cache_dir=None) -> bool:
    """Keep ``bb`` (just built, untrained) for later head-only runs of ``cfg``; False when it cannot be kept (see
    :func:`finetune.models.stand_in.describe`) or the cache is not writable. Never raises."""
    root, parts = _root(cache_dir), key_parts(cfg, bb.num_classes)
    if root is None or parts is None:
        return False
    d = root / _key(parts)
    if (d / "record.json").is_file():
        return True
    tmp = None
    try:
        from safetensors.torch import save_file

        from finetune.models.stand_in import describe

        rec = describe(bb.model, bb.head)
        if rec is None:
            return False
        from finetune.speedups.feature_cache import UpToHead, train_mode_effects

        frozen = UpToHead(bb.model, bb.model.get_submodule(bb.head[0]))  # named as the cache's split names them
        rec["train_effects"] = {"train": train_mode_effects(frozen, "train"),
                                "other": train_mode_effects(frozen, "frozen")}
        state = {k: v.detach().cpu().contiguous() for k, v in bb.model.state_dict().items()}
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{d.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        save_file(state, str(tmp / "state.safetensors"))
        record = {"format": FORMAT, "parts": parts, "module_record": rec, "data_config": data_cfg,
                  "backbone": {"name": bb.name, "source": bb.source, "arch": bb.arch, "num_classes": bb.num_classes,
                               "head": list(bb.head), "weights": bb.weights, "data_cfg": bb.data_cfg,
                               "notes": list(bb.notes)}}
        (tmp / "record.json").write_text(json.dumps(record, default=str), "utf-8")
        try:
            os.rename(tmp, d)
        except OSError:  # another process kept the same backbone first
            shutil.rmtree(tmp, ignore_errors=True)
        files.atomic_write_text(root / f"{_key(key_parts(cfg))}.json",
                                json.dumps({"data_config": data_cfg}, default=str))
        return True
    except Exception as e:  # noqa: BLE001 - a convenience: a full or read-only cache only costs the next run time
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        log.debug(f"backbone not kept ({type(e).__name__}: {e})")
        return False


def clear(cache_dir=None, older_than: float | None = None, *, kind: str = DIR) -> tuple[int, int]:
    """Remove stored backbones (those unused for more than ``older_than`` seconds, or all) and leftovers of
    interrupted writes: ``(entries removed, bytes freed)``. Never follows a symbolic link. ``kind="inference"``: the
    same for the inference graphs kept beside them (finetune/speedups/inference_store.py, whose module imports
    torch; ``cache clear`` does not) and their ``.seen`` marks."""
    from finetune.speedups.feature_store import _remove

    root = _root(cache_dir)
    root = root.parent / kind if root is not None else None
    if root is None or not root.is_dir() or root.is_symlink():
        return 0, 0
    removed = freed = 0
    now = time.time()
    for p in sorted(root.iterdir()):
        try:
            if p.is_symlink() or not (p.is_dir() or p.suffix in (".json", ".seen")):
                continue
            if p.is_dir():
                stamp = p / ("record.json" if kind == DIR else "graph.json")
                last = stamp.stat().st_mtime if stamp.is_file() else p.stat().st_mtime
                if older_than is not None and now - last <= older_than and not p.name.startswith("."):
                    continue
                gone, size, _ = _remove(p)
                removed += gone and not p.name.startswith(".")
                freed += size
            elif older_than is None or now - p.stat().st_mtime > older_than:  # a data-config index, a mark
                size = p.stat().st_size
                p.unlink()
                freed += size
        except OSError:
            continue
    return removed, freed
