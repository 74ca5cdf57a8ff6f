"""User-facing errors. No torch import here: the CLI's fast paths (--help, recipes) import this module."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FinetuneError(Exception):
    """A mistake the user can fix. The CLI prints it as one ``Error: ...`` line and exits 1.

    The message names the thing that is wrong (file, key, layer, value) and, where possible, the fix.
    """

    exit_code = 1


class Interrupted(FinetuneError):
    """Ctrl-C or SIGTERM: the command stopped; the message says what was kept and how to continue."""

    exit_code = 130


class ConfigError(FinetuneError):
    """A recipe or command-line value is invalid."""


class ModelError(FinetuneError):
    """An unknown model name or an impossible model configuration."""


class WeightsError(FinetuneError):
    """Weights that cannot be found, downloaded or loaded into the model."""


class FreezeError(FinetuneError):
    """A freeze plan that names nothing real, or leaves nothing to train."""


class DataError(FinetuneError):
    """A data folder, label spec or image that cannot be used."""


class CheckpointError(FinetuneError):
    """A checkpoint or run directory that cannot be read or written."""


def shown(value: object) -> str:
    """``value`` as text for a one-line message: control characters (a newline in a key) are escaped."""
    s = str(value)
    return s if s.isprintable() else s.encode("unicode_escape").decode("ascii")


def suggest(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """Return ``" (did you mean 'a', 'b'?)"`` for the closest candidates, or ``""`` when none is close."""
    cands = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(word, cands, n=n, cutoff=cutoff)
    if not close:
        # substring matches help with prefixes such as "resnet" -> "resnet18"
        close = [c for c in cands if word and word.lower() in c.lower()][:n]
    if not close:
        return ""
    return " (did you mean " + ", ".join(f"'{c}'" for c in close) + "?)"
