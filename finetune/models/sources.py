"""The backbone-source registry: where a model name's prefix leads (torchvision's ``register_model``/``get_model``,
timm's ``register_model``, one level up: whole libraries of models rather than single architectures).

A source answers five questions about the models it holds, each a plain function: ``parse`` (is ``arch`` one of
mine? the arch as I spell it, or a ``ModelError``), ``build`` (the model with a head for N classes, as a
:class:`~finetune.models.backbone.Backbone`), ``data_config`` (its input config without building it, or None),
``list`` (every arch with its weights names) and ``weights`` (a ``--weights`` value as a
:class:`~finetune.models.weights.WeightsSpec`). ``finetune.models`` does the rest the same way for every source:
``none``/files for weights, the new head zeroed under a weights file, listing by pattern, canonical names.

Each source registers itself in its own module (``smallcnn.py``, ``tv.py``, ``timm_models.py``); a new one is one
file plus one :func:`register_source` call, from inside the package or outside it. Names are ``PREFIX:ARCH``;
a source with ``bare`` also answers to the arch alone (``resnet18``, ``smallcnn``), tried in registration order.
A leaf: imports nothing of finetune but the errors, the torch-free name logic (:mod:`finetune.config.catalog`) and
the Backbone type, so every source module can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from finetune.config.catalog import bare_owner, resolve_in
from finetune.errors import ModelError, suggest

if TYPE_CHECKING:
    from finetune.models.backbone import Backbone

WeightsSpec = Any  # finetune.models.weights.WeightsSpec (which imports this module: not imported here)


@dataclass(frozen=True)
class BackboneSource:
    """One library of models, addressed as ``PREFIX:ARCH``.

    ``parse(arch) -> arch``: the arch as the source spells it; a ``ModelError`` (saying what exists) when unknown.
    ``build(arch, num_classes, spec, **rates) -> Backbone``: ``num_classes`` None keeps the source's own head;
    ``spec`` is never a file (``build_model`` loads files itself). ``data_config(arch, spec) -> dict | None``:
    input_size, resize, crop_pct, interpolation, mean, std without building, or None to have the model built on
    the meta device. ``list() -> {arch: [weights names]}`` in the source's order. ``weights(value, arch) ->
    WeightsSpec`` for a ``--weights`` value other than none/random or a file path (``default`` included).
    ``bare(arch)``: whether the arch alone, without the prefix, names this source's model (None: never).
    ``packages``: the Python packages whose versions define the architecture (feature-store keys).
    ``group_matcher``: the models carry timm's ``group_matcher`` (stages and layer decay use it).
    ``rates``: ``build`` takes ``drop_rate``/``drop_path_rate``. ``title``: the source's name in messages."""

    parse: Callable[[str], str]
    build: Callable[..., Backbone]
    data_config: Callable[[str, WeightsSpec], dict[str, Any] | None]
    list: Callable[[], dict[str, list[str]]]
    weights: Callable[[str, str], WeightsSpec]
    bare: Callable[[str], bool] | None = None
    packages: tuple[str, ...] = ()
    group_matcher: bool = False
    rates: bool = False
    title: str = ""


_SOURCES: dict[str, BackboneSource] = {}


def register_source(prefix: str, source: BackboneSource) -> BackboneSource:
    """Make ``PREFIX:ARCH`` names build through ``source``; ``prefix`` is also ``Backbone.source`` of its models.
    Registering a prefix again is an error (call :func:`unregister_source` first), so two plugins cannot silently
    take each other's names."""
    if not prefix or not prefix.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a source prefix is a word (letters, digits, - or _), got {prefix!r}")
    if prefix in _SOURCES:
        raise ValueError(f"backbone source '{prefix}' is already registered")
    _SOURCES[prefix] = source
    return source


def unregister_source(prefix: str) -> BackboneSource:
    """Remove a source (a test's clean-up; a plugin being unloaded); returns it."""
    return _SOURCES.pop(prefix)


def get_source(prefix: str) -> BackboneSource:
    """The source registered under ``prefix``; ``ModelError`` naming the registered ones otherwise."""
    try:
        return _SOURCES[prefix]
    except KeyError:
        raise ModelError(f"unknown model source '{prefix}'{suggest(prefix, _SOURCES)}; registered: "
                         f"{', '.join(_SOURCES)}") from None


def registered_sources() -> dict[str, BackboneSource]:
    """The registered sources by prefix, in registration order (a copy)."""
    return dict(_SOURCES)


def uses_group_matcher(bb: Backbone) -> bool:
    """Whether ``bb``'s source groups parameters with timm's ``group_matcher`` (False for an unknown source)."""
    src = _SOURCES.get(getattr(bb, "source", ""))
    return bool(src and src.group_matcher)


def canonical(prefix: str, arch: str) -> str:
    """The name a model is recorded under: the arch alone where its source answers to it bare and is the first
    source to do so (``resnet18``, ``smallcnn``), else ``PREFIX:ARCH`` (``timm:resnet18``)."""
    return arch if bare_owner(arch, _SOURCES) == prefix else f"{prefix}:{arch}"


def resolve(name: str) -> tuple[str, str]:
    """``(prefix, arch)`` for a model name, checked by its source: ``PREFIX:ARCH``, or a bare arch that a source
    with ``bare`` claims. An unknown name is a ``ModelError`` that points to a source that has it under its
    prefix, or to the closest names; a source without ``bare`` words its own (``parse``). The algorithm is
    :func:`finetune.config.catalog.resolve_in`, which the torch-free check runs over the built-in sources."""
    return resolve_in(name, _SOURCES)
