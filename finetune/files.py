"""How finetune writes and reads files (no torch import at module level).

Writes: every file finetune writes into a run directory, the cache or next to a checkpoint goes through
:func:`atomic_write_bytes` (a temp file in the same folder, fsync, ``os.replace``, fsync of the folder), so a kill
at any moment leaves the old or the new whole file.

Where: :func:`cache_root`, the one folder every cache lives under (features, kept backbones, the model-name list,
the autotune decisions, image digests).

Reads: PyTorch files are read with ``torch.load(weights_only=True)`` (:func:`torch_load`); pickled objects only
inside :func:`trusted`, when the user trusts the file.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import os
import tempfile
from pathlib import Path
from typing import Any

from finetune.errors import CheckpointError, WeightsError


def cache_root(cache_dir: str | Path | None = None) -> Path | None:
    """The cache root: ``cache_dir`` (``--cache-dir``), else ``$FINETUNE_CACHE``, else ``$XDG_CACHE_HOME/finetune``,
    else ``~/.cache/finetune``; None when persistence is off (``off``)."""
    value = str(cache_dir) if cache_dir is not None else os.environ.get("FINETUNE_CACHE")
    if value is not None and value.strip().lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


def atomic_write_bytes(path: Path, write) -> None:
    """Write via ``write(fileobj)`` to a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any moment leaves either the old complete file or the new complete file, never a torn one. A kill
    (which no ``except`` sees) leaves the temp file ``.NAME.XXXXXXXX.tmp``; the next write of ``NAME`` removes it.
    Ctrl-C while ``write`` runs is a KeyboardInterrupt, also when torch.save's writer reported it as an error.
    """
    path = Path(path)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with _suppress():
            os.unlink(tmp)
        if not isinstance(e, KeyboardInterrupt) and _interrupted(e):
            raise KeyboardInterrupt from None  # a stop inside torch.save's writer: still a stop, not a failed write
        raise
    with _suppress():  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _interrupted(e: BaseException | None) -> bool:
    """True when ``e`` carries a KeyboardInterrupt (Ctrl-C, or SIGTERM under the CLI) as its context: torch's zip
    writer turns one raised in its write callback into a RuntimeError ("unexpected pos ...")."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__context__
    return False


def _remove_stale_temps(path: Path) -> None:
    """The temp files an earlier, killed write of ``path`` left (only that name's: ``.NAME.XXXXXXXX.tmp``)."""
    for stale in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        if len(os.path.basename(stale)) == len(path.name) + 14:  # "." + NAME + "." + 8 random chars + ".tmp"
            with _suppress():
                os.unlink(stale)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def atomic_write_text(path: Path, text: str) -> None:
    try:
        atomic_write_bytes(Path(path), lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise CheckpointError(f"cannot write '{path}': {e.strerror or e}") from None


_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("finetune_trust_pickles", default=False)

TRUST_HINT = ("re-save the weights with torch.save(model.state_dict(), PATH), or pass --trust-checkpoint if you "
              "trust where the file came from")


@contextlib.contextmanager
def trusted(flag: bool = True):
    """Within this block, files that hold pickled Python objects (a whole model saved with ``torch.save(model)``)
    load with ``weights_only=False``: that unpickling can run any code the file contains, so use it only for files
    from a source you trust (the CLI's ``--trust-checkpoint``). Outside it, such files are refused."""
    token = _TRUST.set(bool(flag))
    try:
        yield
    finally:
        _TRUST.reset(token)


def torch_load(path: Path, error: type[Exception] = WeightsError, what: str = "weights file") -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; pickled objects only inside :func:`trusted`.

    Errors are ``error`` (a FinetuneError) naming the file: not found/unreadable/truncated, or pickled code
    refused with how to fix it.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
            raise error(f"cannot read {what} '{path}': not a PyTorch file or truncated") from None
        if not _TRUST.get():
            raise error(f"'{path}' holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
                        f"which can run code when loaded; {TRUST_HINT}") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError):
        # the exception's type (KeyError from a file that is no zip archive, ...) says nothing a user can act on
        raise error(f"cannot read {what} '{path}': not a PyTorch file or truncated") from None
    try:  # trusted: the caller asked for it explicitly
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling can fail in any way (a missing class, ...)
        raise error(f"cannot unpickle {what} '{path}' even with --trust-checkpoint: {type(e).__name__}: "
                    f"{str(e)[:200]}") from None
