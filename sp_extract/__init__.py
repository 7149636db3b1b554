"""sp-extract: batch SuperPoint feature extraction into hloc/COLMAP-compatible HDF5 stores.

Public API (imported lazily, so ``sp-extract --help`` does not load torch)::

    from sp_extract import SuperPoint, extract, ExtractConfig, ExtractRun
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SuperPoint": "sp_extract.extraction.pipeline",
    "extract": "sp_extract.extraction.pipeline",
    "ExtractConfig": "sp_extract.extraction.config",
    "ExtractRun": "sp_extract.extraction.config",
    "load_weights": "sp_extract.extraction.weights",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sp_extract' has no attribute {name!r}")
