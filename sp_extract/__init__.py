"""sp-extract: batch SuperPoint feature extraction into hloc/COLMAP-compatible HDF5 stores.

Public API (imported lazily, so ``sp-extract --help`` does not load torch)::

    from sp_extract import SuperPoint, extract, ExtractConfig
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SuperPoint": "sp_extract.extract",
    "extract": "sp_extract.extract",
    "ExtractConfig": "sp_extract.config",
    "load_weights": "sp_extract.weights",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        # Importing the submodule sp_extract.extract binds it to this package's attribute
        # "extract", shadowing the function: bind the public names of that module explicitly.
        for public, source in _LAZY.items():
            if source == module.__name__:
                globals()[public] = getattr(module, public)
        return globals()[name]
    raise AttributeError(f"module 'sp_extract' has no attribute {name!r}")
