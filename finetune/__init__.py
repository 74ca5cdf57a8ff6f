"""finetune: transfer learning for PyTorch image classifiers.

The package imports no torch at the top level (the CLI's --help must be fast); the library API is loaded on
first use: ``finetune.build_model``, ``finetune.load_recipe``.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "build_model": "finetune.models",
    "list_models": "finetune.models",
    "Backbone": "finetune.models",
    "load_recipe": "finetune.config",
    "Recipe": "finetune.config",
    "FinetuneError": "finetune.errors",
    "parameter_rows": "finetune.models.params",
    "train": "finetune.api",
    "auto": "finetune.api",
    "evaluate_checkpoint": "finetune.api",
    "predict": "finetune.api",
    "load_model": "finetune.api",
    "write_report": "finetune.api",
    "sample_data": "finetune.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute '{name}'")


__all__ = list(_LAZY)


def __dir__() -> list[str]:
    """``dir(finetune)`` lists the lazy API too (it is loaded on first use, so not yet in the module's dict)."""
    return sorted(set(globals()) | set(_LAZY))
