"""The model names a recipe's ``model.name`` may take, answered without importing torch, timm or torchvision.

The built-in sources' names (``smallcnn``; torchvision's classification models with their weights names; timm's
architectures with their pretrained tags) are listed once per installed timm/torchvision version and kept as JSON in
the cache root (``$FINETUNE_CACHE``, else ``$XDG_CACHE_HOME/finetune``, else ``~/.cache/finetune``):
``<root>/models/names-timm<version>-tv<version>.json``. The versions come from the installed packages' metadata (no
import); a new version is a new file name, so an upgrade refreshes the list on its next use. The first use imports
both libraries once (about 4 s) and writes the file atomically; a damaged, unreadable or unwritable file (or
``FINETUNE_CACHE=off``) only means the libraries are imported, as without the cache. Where a library is already
imported in this process, it is asked directly (it answers in milliseconds, and knows models registered at run
time).

Also here: how a name resolves over a set of sources (:func:`resolve_in`, :func:`list_in`), so that
:mod:`finetune.models.sources` (the registry, which may hold third-party sources) and the torch-free check
(:func:`resolve`) word their errors the same way, and the built-in sources' ``parse``/``bare``/``list``.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

from finetune import files
from finetune.errors import ModelError, suggest

LIBS = ("timm", "torchvision")
_MEMO: dict[str, dict[str, dict[str, list[str]]]] = {}  # cache file name -> listing (read once per process)


# ----------------------------------------------------------------------------------------------- the name cache

@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """The installed timm and torchvision versions, from package metadata (None: not installed); read once per
    process (each read parses the package's METADATA file)."""
    from importlib import metadata  # ~30 ms: only when a name is looked up, not for --help

    out: dict[str, str | None] = {}
    for lib in LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def cache_root() -> Path | None:
    """The cache root (:func:`finetune.files.cache_root`), or None when ``FINETUNE_CACHE=off``."""
    return files.cache_root()


def cache_file() -> Path | None:
    """Where the name list of the installed versions lives (None: no disk cache)."""
    root = cache_root()
    if root is None:
        return None
    v = dict(versions())
    return root / "models" / f"names-timm{v['timm'] or 'none'}-tv{v['torchvision'] or 'none'}.json"


def compute(lib: str) -> dict[str, list[str]]:
    """``{arch: [weights names]}`` of ``lib`` asked of the library itself (importing it), in its own order."""
    if lib == "timm":
        import timm

        tags: dict[str, list[str]] = {}
        for full in timm.list_pretrained():
            base, _, tag = full.partition(".")
            tags.setdefault(base, []).append(tag)
        return {arch: tags.get(arch, []) for arch in timm.list_models()}
    import torchvision.models as tvm

    out = {}
    for arch in tvm.list_models(module=tvm):
        try:
            out[arch] = [f"{e.__class__.__name__}.{e.name}" for e in tvm.get_model_weights(arch)]
        except (ValueError, KeyError):
            out[arch] = []
    return out


def _valid(doc: Any) -> bool:
    return (isinstance(doc, dict) and all(isinstance(doc.get(lib), dict) for lib in LIBS)
            and all(isinstance(w, list) and all(isinstance(x, str) for x in w)
                    for lib in LIBS for w in doc[lib].values()))


def _read(path: Path) -> dict[str, dict[str, list[str]]] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable, damaged: list again
        return None
    return {lib: doc[lib] for lib in LIBS} if _valid(doc) else None


def _write(path: Path, doc: dict) -> None:
    from finetune.files import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**doc, "versions": versions()}))
    except Exception:  # noqa: BLE001 - a read-only or full disk: the list is still right, just not kept
        pass


def _cached() -> dict[str, dict[str, list[str]]]:
    """Both libraries' listings from the cache file, or computed (and written) when it is missing or damaged."""
    path = cache_file()
    key = str(path)
    if key in _MEMO:
        return _MEMO[key]
    doc = _read(path) if path is not None else None
    if doc is None:
        doc = {lib: compute(lib) for lib in LIBS}
        if path is not None:
            _write(path, doc)
    _MEMO[key] = doc
    return doc


def listing(lib: str) -> dict[str, list[str]]:
    """``{arch: [weights names]}`` of ``lib`` (``timm``: pretrained tags; ``torchvision``: ``Enum.MEMBER``
    names): the library's own answer where it is imported already, else the cached list."""
    if lib in sys.modules:
        return compute(lib)
    return _cached()[lib]


def _has(lib: str, arch: str) -> bool:
    if lib in sys.modules:  # one lookup, not a listing
        if lib == "timm":
            import timm

            return timm.is_model(arch)
        import torchvision.models as tvm

        return arch in tvm.list_models(module=tvm)
    return arch in _cached()[lib]


# ----------------------------------------------------------------------------------------------- built-in sources

def smallcnn_parse(arch: str) -> str:
    if arch != "smallcnn":
        raise ModelError(f"unknown model 'smallcnn:{arch}'; the smallcnn source has one model, 'smallcnn'")
    return arch


def timm_parse(arch: str) -> str:
    """``arch`` or ``arch.tag`` when timm has the architecture (the tag is checked with the weights)."""
    base = arch.split(".", 1)[0]
    if not _has("timm", base):
        raise ModelError(f"unknown timm model '{arch}'{suggest(base, list(listing('timm')), n=3)}; "
                         "see 'finetune models timm:PATTERN'")
    return arch


def tv_names() -> list[str]:
    """torchvision's image-classification models (not detection/segmentation/video)."""
    return list(listing("torchvision"))


def tv_bare(arch: str) -> bool:
    return _has("torchvision", arch)


def tv_parse(arch: str) -> str:
    """Only reached for an arch that :func:`tv_names` holds (the registry words the error for the others)."""
    if not tv_bare(arch):
        raise ModelError(f"unknown model 'torchvision:{arch}'; 'finetune models' lists the available names")
    return arch


def builtin_sources() -> dict[str, SimpleNamespace]:
    """The built-in sources as :func:`resolve_in` sees them (``parse``, ``bare``, ``list``, ``title``), in the
    registry's order; what ``finetune.models`` registers, without its torch."""
    return {
        "smallcnn": SimpleNamespace(parse=smallcnn_parse, bare=lambda arch: arch == "smallcnn",
                                    list=lambda: {"smallcnn": []}, title="smallcnn"),
        "torchvision": SimpleNamespace(parse=tv_parse, bare=tv_bare, list=lambda: listing("torchvision"),
                                       title="torchvision"),
        "timm": SimpleNamespace(parse=timm_parse, bare=None, list=lambda: listing("timm"), title="timm"),
    }


def registry() -> Mapping[str, Any]:
    """The sources a name resolves over: the registry of ``finetune.models`` where it is loaded (it may hold
    third-party sources, and its loading imported torch anyway), else the built-in ones, torch-free."""
    mod = sys.modules.get("finetune.models.sources")
    if mod is not None and hasattr(mod, "registered_sources") and mod.registered_sources():
        return mod.registered_sources()
    return builtin_sources()


def resolve(name: str) -> tuple[str, str]:
    """``(prefix, arch)`` for a model name, or the ``ModelError`` that building it would raise."""
    return resolve_in(name, registry())


def list_models(pattern: str | None = None, pretrained_only: bool = False) -> list[dict[str, Any]]:
    """:func:`list_in` over :func:`registry` (``finetune models``)."""
    return list_in(registry(), pattern, pretrained_only)


# ----------------------------------------------------------------------------------------------- over any sources

def bare_owner(arch: str, sources: Mapping[str, Any]) -> str | None:
    """The first source that answers to ``arch`` without a prefix."""
    for prefix, src in sources.items():
        if src.bare is not None and src.bare(arch):
            return prefix
    return None


def resolve_in(name: str, sources: Mapping[str, Any]) -> tuple[str, str]:
    """``(prefix, arch)`` for a model name, checked by its source: ``PREFIX:ARCH``, or a bare arch that a source
    with ``bare`` claims. An unknown name is a ``ModelError`` that points to a source that has it under its
    prefix, or to the closest names; a source without ``bare`` words its own (``parse``)."""
    name = name.strip()
    prefix, sep, arch = name.partition(":")
    if sep and prefix in sources and sources[prefix].bare is None:
        return prefix, sources[prefix].parse(arch)
    bare = arch if sep and prefix in sources else name
    owner = bare_owner(bare, sources)
    if owner is not None and (owner == prefix or bare == name):
        return owner, sources[owner].parse(bare)
    for other, src in sources.items():
        if src.bare is None and _parses(src, bare):
            return _unknown(name, f" ('{bare}' is a {src.title or other} model: use '{other}:{bare}')")
    every = [a if src.bare is not None and src.bare(a) else f"{p}:{a}" for p, src in sources.items()
             for a in src.list()]
    return _unknown(name, suggest(bare, every, n=3))


def _parses(src: Any, arch: str) -> bool:
    try:
        src.parse(arch)
    except ModelError:
        return False
    return True


def _unknown(name: str, hint: str) -> tuple[str, str]:
    raise ModelError(f"unknown model '{name}'{hint}; 'finetune models' lists the available names")


def list_in(sources: Mapping[str, Any], pattern: str | None = None,
            pretrained_only: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"source", "name", "weights": [...]}`` for every model whose name matches ``pattern``.

    ``pattern`` is a glob (``resnet*``, ``timm:vit_*``) or, without glob characters, a substring; a pattern
    without a source prefix matches models of every source.
    """
    prefixes = tuple(f"{p}:" for p in sources)

    def match(name: str) -> bool:
        if not pattern:
            return True
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatch(name, pattern)
        return pattern in name

    rows: list[dict[str, Any]] = []
    for prefix, src in sources.items():
        for arch, weights in src.list().items():
            bare = src.bare is not None and src.bare(arch)
            if match(f"{prefix}:{arch}") or ((bare or not (pattern or "").startswith(prefixes)) and match(arch)):
                rows.append({"source": prefix, "name": arch if bare else f"{prefix}:{arch}", "weights": weights})
    if pretrained_only:
        rows = [r for r in rows if r["weights"]]
    return rows
