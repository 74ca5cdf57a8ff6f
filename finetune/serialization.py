"""Reading PyTorch files safely: ``torch.load(weights_only=True)``, pickled objects only when the user trusts the
file, and state_dict key cleaning. A leaf shared by ``weights`` (weights files) and ``checkpoint`` (run
checkpoints); it imports nothing of finetune but the errors.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any

from finetune.errors import WeightsError

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
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as e:
        raise error(f"cannot read {what} '{path}': not a PyTorch file or truncated ({type(e).__name__})") from None
    try:  # trusted: the caller asked for it explicitly
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling can fail in any way (a missing class, ...)
        raise error(f"cannot unpickle {what} '{path}' even with --trust-checkpoint: {type(e).__name__}: "
                    f"{str(e)[:200]}") from None


def clean_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    """Keys without the DDP/DataParallel ``module.`` and torch.compile ``_orig_mod.`` wrapper prefixes (timm's
    ``clean_state_dict``, which strips them in either order)."""
    from timm.models import clean_state_dict as timm_clean

    return timm_clean(sd)
