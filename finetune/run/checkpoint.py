"""Checkpoints: atomic save, safe load, and the run directory.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read: ``"model"`` is a state_dict and the
rest (class names, model name, eval transform, freeze plan, recipe, optimizer state, RNG) is tensors, numbers,
strings, lists and dicts only — so the model can be rebuilt and used without the recipe, and loading runs no code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune import files
from finetune.errors import CheckpointError, shown

RUN_FILES = ("config.yaml", "metrics.json", "last.pt", "best.pt")
MARKER = ".finetune-run"  # written first in every run directory: the proof that --overwrite may empty it
LOCK = ".lock"  # flock'd by the process that writes the run (rank 0) for the whole run
_OWN_DIRS = ("hparams", "shards")  # TensorBoard's add_hparams sub-run; FSDP's sharded last.pt (parallel/sharded.py)


def _run_owned(name: str) -> bool:
    """Names a finetune run writes into its directory (and nothing else): checkpoints, config, metrics, the marker,
    the lock, TensorBoard event files, the temp files of an interrupted atomic write, the report."""
    return (name in RUN_FILES
            or name in (MARKER, LOCK, ".write-test", "report.html", "report.json", "probe.json", "best_ema.pt",
                        "lr_find.png", "lr_find.json")
            or bool(re.fullmatch(r"epoch\d{3,}\.pt", name))
            or name in _OWN_DIRS
            or name.startswith("events.out.tfevents.") or (name.startswith(".") and name.endswith(".tmp")))


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` held for the whole run: a second process that would write the
    same run directory (a second ``train --out D --overwrite``, a ``--resume D`` while D trains) gets one error
    naming the holder's PID instead of mixing its files into the first one's. The kernel drops the lock when the
    process dies, even by ``kill -9``, so a stale lock never blocks a resume."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self, run_dir: Path) -> None:
        import fcntl

        path = Path(run_dir) / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot write to output directory '{run_dir}': {e.strerror or e}; choose "
                                  "another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise CheckpointError(f"run directory '{run_dir}' is in use by another finetune process (pid "
                                  f"{holder}); wait for it to finish or stop it, or choose another --out") from None
        pid = str(os.getpid()).encode()
        if os.pread(fd, 64, 0) != pid:  # the holder's PID, for the error above (unchanged: no write)
            os.ftruncate(fd, 0)
            os.pwrite(fd, pid, 0)
        self.release()
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing drops the flock
            self.fd = None


def clear_run_dir(out: Path) -> None:
    """Delete what a finetune run wrote into ``out`` (never ``out`` itself, never the lock file)."""
    for p in Path(out).iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    import torch

    try:
        files.atomic_write_bytes(Path(path), lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write (a full disk) as RuntimeError
        raise CheckpointError(f"cannot write checkpoint '{path}': {_write_failure(e, Path(path))}; the previous "
                              "checkpoint is unchanged") from None


def _write_failure(e: BaseException, path: Path) -> str:
    """Why a write failed, for one line: the OS's reason, or (torch's writer hides it) the free space left."""
    if isinstance(e, OSError):
        return str(e.strerror or e)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    where = f"{free / 2**20:.0f} MiB free on its disk" if free is not None else "free space unknown"
    return f"the write failed ({where}; is the disk full?)"


class UntrustedRunError(CheckpointError):
    """A run directory whose ``last.pt`` names files finetune does not write (a crafted or damaged run)."""


def load_checkpoint(path: str | Path, *, materialize: bool = True) -> dict[str, Any]:
    """Read a finetune checkpoint safely (``weights_only=True``; pickled objects only inside
    :func:`finetune.files.trusted`); errors name the file and what to do. An FSDP run's ``last.pt`` names
    its weights as DCP shards: ``materialize`` reads them into ``"model"`` (in this process; a resume loads them
    sharded instead)."""
    p = Path(path)
    if p.is_dir():
        p = p / "best.pt" if (p / "best.pt").is_file() else p / "last.pt"
    if p.name == "best.pt" and (p.parent / "last.pt").is_file():
        try:  # a kill between the end-of-epoch writes: best.pt follows from last.pt (see repair_run)
            repair_run(p.parent)
        except UntrustedRunError:
            raise
        except CheckpointError:
            pass  # a read-only run directory: evaluate what is there
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; pass a .pt file from a run directory "
                              "(runs/<run>/best.pt or last.pt)")
    ckpt = files.torch_load(p, CheckpointError, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise CheckpointError(f"'{p}' is not a finetune checkpoint (no 'model'/'model_name'); for plain weights "
                              "use --weights PATH with --model")
    problem = schema_problem(ckpt)
    if problem:
        raise CheckpointError(f"'{p}' is not a valid finetune checkpoint: {problem}; it is damaged or was not "
                              "written by finetune")
    ckpt["_path"] = str(p)
    if materialize and ckpt.get("sharded"):
        from finetune.parallel import sharded

        ckpt["model"] = sharded.materialize(p.parent, ckpt["sharded"])
    return ckpt


_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "nearest-exact")


def schema_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's metadata (None when nothing): the fields eval/predict/resume build from
    are checked before anything is allocated with them (a crafted file passes the safe loader but could ask for
    10^12 classes or a 6000-px transform)."""
    names, n = ckpt.get("class_names"), ckpt.get("num_classes")
    if not isinstance(names, (list, tuple)) or not all(isinstance(c, str) for c in names):
        return f"class_names must be a list of names, got {shown(repr(names))[:60]}"
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000 or n != len(names):
        return (f"num_classes must be an integer from 1 to 100000 equal to the number of class_names "
                f"({len(names)}), got {shown(repr(n))[:40]}")
    if not isinstance(ckpt.get("model_name"), str):
        return "model_name must be a string"
    problem = model_problem(ckpt) or run_files_problem(ckpt)
    if problem:
        return problem
    tf = ckpt.get("transform")
    if not isinstance(tf, dict):
        return f"transform must be a mapping, got {shown(repr(tf))[:40]}"
    size, resize = tf.get("input_size"), tf.get("resize")
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) for v in size)
            and size[0] == 3 and all(8 <= v <= 2048 for v in size[1:])
            and isinstance(resize, int) and 8 <= resize <= 4096):
        return (f"transform.input_size must be [3, H, W] with H and W from 8 to 2048 (resize up to 4096), got "
                f"{shown(repr(size))[:40]}")
    if tf.get("interpolation") not in _INTERPOLATIONS:
        return (f"transform.interpolation must be one of {', '.join(_INTERPOLATIONS)}, got "
                f"{shown(repr(tf.get('interpolation')))[:40]}")
    for key in ("mean", "std"):
        v = tf.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x)
                                                                     for x in v)):
            return f"transform.{key} must be 3 finite numbers, got {shown(repr(v))[:40]}"
    return None



def model_problem(ckpt: dict[str, Any]) -> str | None:
    """``model`` must be a state_dict: names to floating-point or integer tensors (``{}`` in an FSDP last.pt, whose
    weights are shards)."""
    import torch

    sd = ckpt.get("model")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        return f"'model' must be a state_dict (parameter names to tensors), got {type(sd).__name__}"
    if not sd and not ckpt.get("sharded"):
        return "'model' holds no weights"
    return None


def load_weights(module: Any, state_dict: dict[str, Any], ckpt: dict[str, Any], what: str = "weights") -> None:
    """``module.load_state_dict(state_dict)``, with a state that does not fit (a crafted or damaged checkpoint,
    another model's weights) as one CheckpointError naming the checkpoint and the first mismatch."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if not ln.startswith("Error(s) in loading")), lines[0] if lines else
                      type(e).__name__)
        raise CheckpointError(f"'{ckpt.get('_path', 'the checkpoint')}' holds {what} that cannot be loaded into "
                              f"{shown(ckpt.get('model_name'))}: {shown(detail)[:200]}; it is damaged or was not "
                              "written by finetune for this model") from None


_TOP_K_FILE = re.compile(r"epoch\d{3,}\.pt")
_SHARD_ENTRY = re.compile(r"shards/e\d{4,}")


def _top_k_entry_ok(e: Any) -> bool:
    epoch = e.get("epoch") if isinstance(e, dict) else None
    return isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1 and isinstance(e.get("file"), str) \
        and _TOP_K_FILE.fullmatch(e["file"]) is not None and e["file"] == f"epoch{epoch:03d}.pt"


def run_files_problem(ckpt: dict[str, Any]) -> str | None:
    """The file names a ``last.pt`` gives that eval and resume write, delete or read in its run directory: each
    must be a name finetune writes, bare, inside the run directory (``top_k[].file``: ``epochNNN.pt`` of its own
    epoch; ``sharded.path``: ``shards/eNNNN``). A crafted run directory could otherwise name
    ``../../.ssh/authorized_keys``."""
    top = ckpt.get("top_k")
    if top is not None:
        bad = [e for e in top if not _top_k_entry_ok(e)] if isinstance(top, list) else [top]
        if bad:
            shown_bad = bad[0].get("file") if isinstance(bad[0], dict) else bad[0]
            return (f"top_k must list the run's epochNNN.pt files by their bare names, got "
                    f"{shown(repr(shown_bad))[:80]}")
    sh = ckpt.get("sharded")
    if sh is not None and not (isinstance(sh, dict) and isinstance(sh.get("path"), str)
                               and _SHARD_ENTRY.fullmatch(sh["path"])):
        path = sh.get("path") if isinstance(sh, dict) else sh
        return f"sharded.path must name a shards/eNNNN folder of the run, got {shown(repr(path))[:80]}"
    return None


@dataclass
class Checkpoint:
    """What ``last.pt`` / ``best.pt`` hold: everything to rebuild and use the model without the recipe, and (in
    ``last.pt``) to resume the run exactly. Stored as a plain dict of tensors and Python values, so
    ``torch.load(path, weights_only=True)`` reads it without finetune; :meth:`to_dict` / :meth:`from_dict` are the
    one mapping between the two. Keys this version does not know (from a newer finetune) are kept in ``extra``."""

    model: dict[str, Any]  # the full model's state_dict
    class_names: list[str]
    model_name: str
    num_classes: int
    transform: dict[str, Any]  # the eval transform (size, resize, crop, interpolation, mean, std)
    precision: str
    channels_last: bool
    epoch: int  # completed epochs
    plan: dict[str, Any]  # the freeze plan (FreezePlan.to_dict)
    trainable: list[str]  # parameter names that required grad when this was saved
    recipe: dict[str, Any]  # the resolved recipe
    metrics: list[dict[str, Any]]  # one row per completed epoch
    best: dict[str, Any]  # {"epoch", "val_acc"}
    data: dict[str, Any] = field(default_factory=dict)  # path, labels, val_split, seed
    val: dict[str, Any] | None = None  # the evaluation of this epoch
    finetune_version: str = ""
    world_size: int = 1
    epoch_base: int = 1  # freeze.schedule epochs count from 1 (older checkpoints: from 0)
    optimizer: dict[str, Any] | None = None  # resume only
    scaler: dict[str, Any] | None = None  # resume only (fp16)
    partial: dict[str, Any] | None = None  # resume only: an epoch saved mid-way (batches done, sums, RNG)
    ema: dict[str, Any] | None = None  # resume only: the EMA weights (train.ema)
    best_ema: dict[str, Any] | None = None  # the EMA's best epoch (train.ema)
    top_k: list[dict[str, Any]] | None = None  # the K best epochs, best first (train.save_top_k > 1)
    sharded: dict[str, Any] | None = None  # resume only: FSDP's weights + optimizer state as DCP shards (model {})
    autotune: dict[str, Any] | None = None  # the layers train.autotune switched (a resume repeats them, untimed)
    extra: dict[str, Any] = field(default_factory=dict)

    _ORDER = ("model", "class_names", "model_name", "num_classes", "transform", "precision", "channels_last",
              "epoch_base", "data", "epoch", "plan", "trainable", "recipe", "optimizer", "scaler", "metrics", "best",
              "val", "finetune_version", "world_size", "partial", "ema", "best_ema", "top_k", "sharded", "autotune")
    _OPTIONAL = ("partial", "ema", "best_ema", "top_k", "sharded", "autotune")  # written only when the run uses them

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self._ORDER if k not in self._OPTIONAL or getattr(self, k) is not None}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Checkpoint":
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("epoch_base", 0)  # checkpoints written before the key existed counted from 0
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known and k != "_path"})

    def slim(self) -> dict[str, Any]:
        """``best.pt``'s content: without what only a resume needs."""
        return slim(self.to_dict())


# in last.pt for a resume, not in best.pt
RESUME_ONLY = ("optimizer", "scaler", "partial", "ema", "sharded", "autotune", "_path")


def slim(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``best.pt``'s content: the weights and metadata of a checkpoint, without what only a resume needs."""
    return {k: v for k, v in ckpt.items() if k not in RESUME_ONLY}


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None: ``json.dumps`` would write bare ``NaN``/``Infinity``, which
    is not JSON (jq, browsers and ``JSON.parse`` reject the whole file)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def metrics_text(best: dict, history: list[dict], *, best_ema: dict | None = None,
                 top_k: list[dict] | None = None, test: dict | None = None, val_images: int | None = None) -> str:
    """``metrics.json``: the best epoch, every epoch's row, and (when used) the EMA's best and the top-k list;
    ``val_images``: how many images the val accuracies are measured on (``runs``/``compare`` show their noise).
    Non-finite numbers are written as null (JSON has no NaN)."""
    rows = [{k: v for k, v in r.items() if k != "best"} for r in history]
    doc: dict[str, Any] = {"best": best}
    if val_images:
        doc["val_images"] = int(val_images)
    if best_ema is not None:
        doc["best_ema"] = best_ema
    if top_k:
        doc["top_k"] = top_k
    if test is not None:
        doc["test"] = test  # best.pt on the data's test/ folder (holdout.py), apart from the epochs
    return json.dumps(finite_json({**doc, "epochs": rows}), indent=2, allow_nan=False)


def _peek(path: Path) -> dict[str, Any] | None:
    """A checkpoint's small entries, read memory-mapped (the tensors stay on disk); None if unreadable."""
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - missing, truncated or not ours: the caller decides
        return None
    return ck if isinstance(ck, dict) else None


def repair_run(run_dir: str | Path) -> list[str]:
    """Make ``best.pt`` and ``metrics.json`` agree with ``last.pt``, the run's commit point; returns what was
    rewritten.

    An epoch ends with three atomic writes: ``last.pt`` (the commit: weights, optimizer, metrics, best epoch), then
    ``best.pt`` when the epoch improved, then ``metrics.json``. A kill between them leaves ``last.pt`` ahead: its
    ``best`` names its own epoch while ``best.pt`` is older or missing, and ``metrics.json`` lacks the epoch. Both
    follow from ``last.pt`` (when its epoch is the best one, its weights ARE the best weights), so resume and eval
    rewrite them from it. A ``last.pt`` saved mid-epoch (``partial``) holds mid-epoch weights: ``best.pt`` was
    already committed before any such save, so only ``metrics.json`` is checked then.
    """
    run_dir = Path(run_dir)
    last = _peek(run_dir / "last.pt")
    if last is None or "epoch" not in last:
        return []
    problem = run_files_problem(last)
    if problem:  # before anything is written or deleted on its word
        raise UntrustedRunError(f"'{run_dir / 'last.pt'}' is not a valid finetune checkpoint: {problem}; it is "
                                "damaged or was not written by finetune")
    best = last.get("best") or {}
    epoch = int(last["epoch"])
    _check_best_is_this_runs(run_dir, last, rebuildable=best.get("epoch") == epoch and not last.get("partial"))
    fixed = [] if last.get("partial") or epoch <= 0 else _repair_epoch_files(run_dir, last, epoch)
    mp = run_dir / "metrics.json"
    try:
        old = mp.read_text(encoding="utf-8")
    except OSError:
        old = None
    text = metrics_text(best, list(last.get("metrics") or []), best_ema=last.get("best_ema"),
                        top_k=last.get("top_k"), test=_kept_test(old, best), val_images=_kept_val_images(old))
    same = old == text
    if not same and last.get("metrics"):
        files.atomic_write_text(mp, text)
        fixed.append("metrics.json")
    return fixed


def _kept_val_images(text: str | None) -> int | None:
    """metrics.json's ``val_images`` (the val set does not change within a run), or None."""
    try:
        n = json.loads(text).get("val_images") if text else None
    except (ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _kept_test(text: str | None, best: dict) -> dict | None:
    """metrics.json's ``test`` entry while it still describes the best epoch's best.pt (else it is stale)."""
    try:
        test = json.loads(text).get("test") if text else None
    except (ValueError, AttributeError):
        return None
    return test if isinstance(test, dict) and test.get("epoch") == best.get("epoch") else None


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("model_name") == b.get("model_name") and list(a.get("class_names") or []) == \
        list(b.get("class_names") or [])


def _check_best_is_this_runs(run_dir: Path, last: dict[str, Any], rebuildable: bool) -> None:
    """A ``best.pt`` of another model or other classes than ``last.pt`` (a last.pt copied in from another run) is
    replaced from last.pt when last.pt's epoch is the best one; otherwise it cannot be rebuilt: an error, and
    nothing changes (before, it stayed, and ``eval best.pt`` evaluated the other model)."""
    current = _peek(run_dir / "best.pt")
    if rebuildable or current is None or _same_model(current, last):
        return
    raise CheckpointError(f"'{run_dir / 'best.pt'}' holds another model ({current.get('model_name')}, classes "
                          f"{list(current.get('class_names') or [])}) than last.pt ({last.get('model_name')}, "
                          f"classes {list(last.get('class_names') or [])}), and its best epoch cannot be rebuilt "
                          "from last.pt; move best.pt away, then resume")


def _repair_epoch_files(run_dir: Path, last: dict[str, Any], epoch: int) -> list[str]:
    """best.pt, best_ema.pt and the top-k file of ``last.pt``'s own epoch when it was the best (its weights ARE
    those files' weights); top-k files that dropped out are removed."""
    fixed = []
    wanted = {"best.pt": (last.get("best") or {}).get("epoch") == epoch,
              "best_ema.pt": (last.get("best_ema") or {}).get("epoch") == epoch and last.get("ema") is not None}
    for e in last.get("top_k") or []:
        wanted[e["file"]] = e["epoch"] == epoch
    for name, own in wanted.items():
        current = _peek(run_dir / name) if own else None
        if own and (current is None or int(current.get("epoch", -1)) != epoch or not _same_model(current, last)):
            if last.get("sharded") and not last.get("model"):  # FSDP's last.pt: its weights are DCP shards
                from finetune.parallel import sharded

                last = {**last, "model": sharded.materialize(run_dir, last["sharded"])}
            content = slim(dict(last))
            if name == "best_ema.pt":
                content = {**content, "model": last["ema"], "ema_weights": True}
            save_checkpoint(content, run_dir / name)
            fixed.append(name)
    listed = {e["file"] for e in last.get("top_k") or []}
    for p in run_dir.glob("epoch[0-9][0-9][0-9]*.pt"):
        if p.name not in listed:
            p.unlink(missing_ok=True)
            fixed.append(f"{p.name} (removed)")
    return fixed


EXPORT_SUFFIX = {"safetensors": ".safetensors", "state-dict": ".pth"}


def export_weights(checkpoint: str | Path, fmt: str = "safetensors", out: str | Path | None = None, *,
                   overwrite: bool = False) -> Path:
    """Write the checkpoint's ``"model"`` state_dict alone as ``.safetensors`` or a ``torch.save``'d dict.

    ``out`` defaults to the checkpoint's name with the format's suffix, next to it. The write is atomic and never
    replaces an existing file unless ``overwrite``. The result loads with ``--weights PATH`` (and plain
    ``load_state_dict``); safetensors metadata records the model name and class count.
    """
    import torch

    if fmt not in EXPORT_SUFFIX:
        raise CheckpointError(f"unknown export format '{fmt}'; use safetensors or state-dict")
    ckpt = load_checkpoint(checkpoint)
    src = Path(ckpt["_path"])
    dest = Path(out) if out is not None else src.with_suffix(EXPORT_SUFFIX[fmt])
    if dest.resolve() == src.resolve():
        raise CheckpointError(f"refusing to export '{src}' onto itself; choose another --out")
    if dest.exists() and (not overwrite or dest.is_dir()):
        raise CheckpointError(f"'{dest}' already exists; pass --overwrite to replace it or choose another --out"
                              if not dest.is_dir() else f"'{dest}' is a directory; --out takes a file path")
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()}
    try:  # --out exports/x.safetensors: create exports/, as users of a tool's --out expect
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # e.g. a file in the way: the write below fails with its own one-line error
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save(sd, metadata={"format": "pt", "model_name": str(ckpt["model_name"]),
                                  "num_classes": str(ckpt["num_classes"])})

        def write(f) -> None:
            f.write(data)
    else:
        def write(f) -> None:
            torch.save(sd, f)
    try:
        files.atomic_write_bytes(dest, write)
    except OSError as e:
        raise CheckpointError(f"cannot write '{dest}': {e.strerror or e}") from None
    return dest


def remove_temp_files(run_dir: Path) -> list[str]:
    """Delete the temp files a killed atomic write left in ``run_dir`` (``.NAME.XXXX.tmp``); returns their names.

    Only names of the run's own files are touched, so nothing of the user's is ever removed.
    """
    removed = []
    for name in RUN_FILES:
        for p in Path(run_dir).glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p.name)
    return removed


def default_run_dir(model_name: str, root: str | Path = "runs") -> Path:
    """``runs/<date>-<time>-<model>``: the name a run without ``--out`` asks for (see :func:`claim_run_dir`)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-")
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


def claim_run_dir(path: Path, limit: int = 1000) -> Path:
    """Make and return a new, empty directory: ``path``, or ``path-2``, ``path-3``, ... when that name is taken.

    A default run name has one-second resolution, and two runs started in the same second (two terminals, a sweep
    script) must not share a directory. ``mkdir`` without ``exist_ok`` is the claim: of two processes racing for a
    name, exactly one creates it, the other moves on to the next suffix."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, limit + 1):
            candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as e:
        raise CheckpointError(f"cannot create a run directory in '{path.parent}': {e.strerror or e}; choose "
                              "another --out") from None
    raise CheckpointError(f"'{path}' and {limit - 1} suffixed names ('{path.name}-2', ...) are all taken; pass --out")


def prepare_run_dir(out: Path, *, overwrite: bool, lock: RunLock | None = None) -> Path:
    """Create ``out`` (and write its marker file); an existing non-empty directory is an error unless
    ``overwrite``, which only ever empties a directory proven to be a finetune run: it holds the marker
    ``.finetune-run`` (or, for runs made before the marker, ``config.yaml``) and nothing but what a run writes. A
    symlinked ``out`` is never emptied. ``lock`` is acquired before anything is deleted or written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path '{out}' exists and is not a directory; choose another --out")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        is_run = MARKER in names or "config.yaml" in names
        foreign = [n for n in names if not _run_owned(n)]
        if not overwrite and is_run and not (out / "last.pt").is_file():
            raise CheckpointError(f"output directory '{out}' holds a run that saved no checkpoint; pass --overwrite "
                                  "to replace it or choose another --out")
        if not overwrite and is_run:
            raise CheckpointError(f"output directory '{out}' already exists and is not empty; pass --overwrite to "
                                  "replace it, --resume to continue it, or choose another --out")
        if not overwrite:
            raise CheckpointError(f"output directory '{out}' already exists and is not empty (and is not a finetune "
                                  "run); choose another --out")
        if not is_run or foreign:
            what = (f"holds files a finetune run does not write ({', '.join(repr(n) for n in foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''})" if is_run else
                    "is not empty and is not a finetune run (no .finetune-run marker)")
            raise CheckpointError(f"output directory '{out}' {what}; refusing to delete it with --overwrite; "
                                  "choose another --out")
        if out.is_symlink():
            raise CheckpointError(f"output directory '{out}' is a symbolic link; refusing to empty it with "
                                  "--overwrite; pass the real path or choose another --out")
        if lock is not None:
            lock.acquire(out)  # a run still writing here makes this an error before anything is deleted
        clear_run_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if lock is not None and lock.fd is None:
            lock.acquire(out)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        (out / MARKER).write_text(f"finetune run directory; --overwrite may empty it\ncreated: "
                                  f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\npid: {os.getpid()}\n", encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"cannot write to output directory '{out}': {e.strerror or e}; choose another "
                              "--out") from None
    return out
