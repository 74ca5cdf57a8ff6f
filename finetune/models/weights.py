"""Resolve and load weights: none | default | torchvision enum name | timm pretrained/tag | local file.

Local files load with ``torch.load(weights_only=True)`` (or safetensors), accept DDP's ``module.`` prefix and
finetune checkpoints (``{"model": state_dict, ...}``), and load without the head when the head doesn't fit the
requested class count. Downloads fail within seconds when offline, naming the file to place and where.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from finetune.config.preflight import FILE_SUFFIXES, looks_like_path, weights_file  # noqa: F401 - torch-free
from finetune.errors import WeightsError
from finetune.models.backbone import is_under
from finetune.models.sources import get_source
from finetune.files import TRUST_HINT, torch_load, trusted  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import torch

    from finetune.models.backbone import Backbone

@dataclass
class WeightsSpec:
    kind: str  # "none" | "file" | a source's own ("torchvision", "timm")
    label: str  # what to record as the loaded weights
    enum: Any = None  # torchvision WeightsEnum member
    tag_name: str = ""  # the arch the weights name (timm "arch.tag"): what data_config builds when it must
    path: Path | None = None


def parse_spec(weights: str | None, source: str, arch: str) -> WeightsSpec:
    """Turn the user's ``--weights`` value into a spec for ``source``/``arch`` (no loading, no download): none and
    files the same way for every source, the rest by the source's own ``weights`` (its weights names)."""
    w = "none" if weights is None else str(weights).strip()
    low = w.lower()
    if low in ("none", "random", ""):
        return WeightsSpec("none", "none")
    path = weights_file(w)  # a file path (checked: it exists), or None
    if path is not None:
        return WeightsSpec("file", str(path), path=path)
    return get_source(source).weights(w, arch)


# ----------------------------------------------------------------------------------------------- downloads

def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def fetch_torchvision(enum) -> None:
    """Make sure the torchvision weights file is in TORCH_HOME/hub/checkpoints, or fail fast saying where to put it."""
    import torch.hub
    from urllib.parse import urlparse

    fname = os.path.basename(urlparse(enum.url).path)
    dest = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if dest.is_file():
        return
    host = urlparse(enum.url).hostname or ""
    msg = (f"cannot download {enum.__class__.__name__}.{enum.name} ({enum.url}): offline or unreachable; "
           f"place {fname} in {dest.parent} (set TORCH_HOME to move it) or pass --weights PATH")
    if not _reachable(host):
        raise WeightsError(msg)
    try:
        torch.hub.load_state_dict_from_url(enum.url, progress=True, check_hash=False)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise WeightsError(f"{msg} ({type(e).__name__})") from None


@contextlib.contextmanager
def _hf_offline(flag: bool):
    try:
        from huggingface_hub import constants
    except ImportError:  # older timm without the hub
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = flag
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def fetch_timm(create: Callable[[], Any], name: str):
    """Create a pretrained timm model from the local cache, downloading only if the hub answers at once.

    huggingface_hub retries an unreachable host for most of a minute; we look in the cache first and probe the
    host with a 3-second timeout before letting it try.
    """
    try:
        with _hf_offline(True):
            return create()
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and friends)
        pass
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    msg = (f"cannot download timm weights '{name}': offline or huggingface.co unreachable; put the files in the "
           f"Hugging Face cache ({hf_home}/hub, e.g. with 'hf download timm/{name}' on a connected machine) "
           "or pass --weights PATH")
    if not _reachable("huggingface.co"):
        raise WeightsError(msg)
    try:
        return create()
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{msg} ({type(e).__name__}: {str(e)[:200]})") from None


# ----------------------------------------------------------------------------------------------- local files

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a .safetensors file, a .pth/.pt state_dict, or a finetune/Lightning/timm checkpoint
    (a whole pickled model only inside :func:`trusted`)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"cannot read safetensors file '{path}': {str(e)[:200]}") from None
    obj = torch_load(path)
    if isinstance(obj, torch.nn.Module):  # a whole pickled model, loaded because the user trusts it
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"'{path}' does not contain a state_dict (a dict of tensors)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_file_into(bb: Backbone, path: Path) -> None:
    """Load a local weights file into ``bb.model``; the head is skipped (with a note) when it doesn't fit."""
    sd = clean_state_dict(read_state_dict(path))
    own = bb.model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    head_bad = [k for k in (missing + unexpected + mismatched) if is_under(k, bb.head)]
    other = [k for k in missing + unexpected + mismatched if k not in head_bad]
    if other:
        bits = []
        for k in other[:4]:
            if k in mismatched:
                bits.append(f"{k}: {list(sd[k].shape)} in file vs {list(own[k].shape)} in model")
            elif k in missing:
                bits.append(f"{k}: missing from file")
            else:
                bits.append(f"{k}: not in model")
        more = f" (and {len(other) - 4} more)" if len(other) > 4 else ""
        raise WeightsError(f"weights file '{path}' does not fit {bb.name}: " + "; ".join(bits) + more
                           + "; check --model, or save the weights from the same architecture")
    if head_bad:
        shapes = ", ".join(f"{k} {list(sd[k].shape)}" for k in head_bad if k in sd)
        for k in head_bad:
            sd.pop(k, None)
        bb.notes.append(f"loaded '{path}' without the head ({shapes or ', '.join(head_bad)} does not fit "
                        f"{bb.num_classes} classes); the new head starts at zero")
    check_dtypes(sd, own, path)
    bb.model.load_state_dict(sd, strict=False)
    bb.weights = str(path)


def check_dtypes(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: Path) -> None:
    """A floating-point tensor of the model stored as an integer, bool or complex tensor in the file would be cast
    by ``load_state_dict`` without a word (int64 weights truncated to whole numbers, complex ones lose their
    imaginary part): an error naming the key and both dtypes. Integer buffers (BatchNorm's num_batches_tracked)
    and float-to-float (fp16/bf16/fp64 files) load as before."""
    for k, v in sd.items():
        mine = own.get(k)
        if mine is None or not mine.is_floating_point() or (v.is_floating_point() and not v.is_complex()):
            continue
        from finetune.errors import shown

        raise WeightsError(f"weights file '{path}': '{shown(k)}' is stored as {str(v.dtype).replace('torch.', '')} "
                           f"but {str(mine.dtype).replace('torch.', '')} in the model (loading would cast it silently"
                           f"{', dropping the imaginary part' if v.is_complex() else ''}); save the "
                           "weights as floating point (e.g. {k: v.float() for k, v in state_dict.items()})")


WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")  # torch.compile around DDP, DDP, torch.compile


def clean_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    """Keys without the DDP/DataParallel ``module.`` and torch.compile ``_orig_mod.`` wrapper prefixes, stripped in
    either order: timm's ``clean_state_dict`` rule (tests/test_weights_clean.py checks the two agree), here so that a
    weights file for a torchvision model or smallcnn does not import timm (~2.5 s on a 2-core CPU)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(WRAPPER_PREFIXES):
            for prefix in WRAPPER_PREFIXES:
                k = k.removeprefix(prefix)
        out[k] = v
    return out
