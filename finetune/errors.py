"""User-facing errors. No torch import here: the CLI's fast paths (--help, recipes) import this module."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


class FinetuneError(Exception):
    """A mistake the user can fix. The CLI prints it as one ``Error: ...`` line and exits 1.

    The message names the thing that is wrong (file, key, layer, value) and, where possible, the fix.
    """

    exit_code = 1


class Interrupted(FinetuneError):
    """Ctrl-C or SIGTERM: the command stopped; the message says what was kept and how to continue. Not a mistake:
    the CLI prints it as a ``Stopped ...`` line (:func:`stopped_line`), exit code 130."""

    exit_code = 130


def stopped_line(message: str) -> str:
    """The CLI's line for an :class:`Interrupted` message: the user stopped the command, so it is no ``Error:``.
    ``"interrupted; nothing was written"`` -> ``"Stopped; nothing was written"``; ``"interrupted before the first
    checkpoint; ..."`` -> ``"Stopped before the first checkpoint; ..."``."""
    word = "interrupted"
    if message[:len(word)].lower() == word:
        return "Stopped" + message[len(word):]
    return f"Stopped: {message}"


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
    """Return ``" (did you mean 'a', 'b'?)"`` for the closest candidates, or ``""`` when none is close.

    Candidates that start with ``word`` come first, shortest (then alphabetically) first: a name typed without its
    last characters means the names that complete it (``tf_efficientnet_lite`` -> ``lite0``, ``lite1``,
    ``lite2``; difflib alone ranks ``lite4``, ``lite3``, ``lite2``). Then difflib's closest, then substrings."""
    cands = list(dict.fromkeys(candidates))
    low = word.lower()
    close = sorted((c for c in cands if word and c.lower().startswith(low) and c != word),
                   key=lambda c: (len(c), c))[:n]
    close += [c for c in difflib.get_close_matches(word, cands, n=n, cutoff=cutoff) if c not in close]
    close = close[:n]
    if not close:
        # substring matches help with parts of names such as "efficientnet" -> "tf_efficientnet_lite0"
        close = [c for c in cands if word and low in c.lower()][:n]
    if not close:
        return ""
    return " (did you mean " + ", ".join(f"'{c}'" for c in close) + "?)"


# How messages name a setting: the library's messages (warnings, notes) are read by CLI users and by Python users.
# They name a setting by its recipe key (``model.weights``: what a Python user sets on the Recipe, or in a YAML
# recipe); while the CLI runs (:func:`flag_names`), by the flag that sets it (``--weights``).
_FLAGS: list = []  # the innermost flag_names mapping (a dict, or a function that makes one on first use)


@contextmanager
def flag_names(flags: dict[str, str] | Callable[[], dict[str, str]]) -> Iterator[None]:
    """While the block runs, :func:`option` names recipe keys by their flags: ``flags`` maps a key to its flag
    (the CLI's ``flag_map``; a function is called on first use)."""
    _FLAGS.append(flags)
    try:
        yield
    finally:
        _FLAGS.pop()


def option(key: str, value: object = None) -> str:
    """The setting at recipe key ``key`` (with ``value``) as a message names it: ``--weights`` (``--weights none``)
    under the CLI, ``model.weights`` (``model.weights='none'``) in library use; a key without a flag stays a key."""
    flag = None
    if _FLAGS:
        if callable(_FLAGS[-1]):
            _FLAGS[-1] = _FLAGS[-1]()
        flag = _FLAGS[-1].get(key)
    if flag:
        return flag if value is None else f"{flag} {value}"
    return key if value is None else f"{key}={value!r}"


def how_to_set(key: str, value: object = None) -> str:
    """``"pass --weights"`` under the CLI, ``"set model.weights"`` in library use (see :func:`option`)."""
    name = option(key, value)
    return ("pass " if name.startswith("--") else "set ") + name
