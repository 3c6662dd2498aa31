"""napari-wbc: white blood cell segmentation, typing and differential counts.

The public API is Qt-free and light to import: torch, napari and Qt are only
imported when one of the functions below is called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["__version__", "segment", "classify", "finetune", "adapt_classifier"]

if TYPE_CHECKING:  # pragma: no cover
    from .core.adapt import adapt_classifier
    from .core.classify import classify
    from .core.finetune import finetune
    from .core.segment import segment

_LAZY = {
    "segment": "napari_wbc.core.segment",
    "classify": "napari_wbc.core.classify",
    "finetune": "napari_wbc.core.finetune",
    "adapt_classifier": "napari_wbc.core.adapt",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_wbc' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
