"""``sp-extract compact``: fold a store's segments (and a killed run's parts) into its main file.

After it, the main file alone holds every entry, which is what hloc's readers need (its
``list_h5_names`` sees one file). Crash-safe as every fold (``StoreWriter``): a new copy of the
main file is written, fsynced and renamed over the old one before the segments are deleted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import h5py

from ..errors import StoreError
from .catalog import live_segments, part_files, read_store_file
from .failures import H5_ERRORS
from .format import KIND_ATTR, MARKERS
from .writer import StoreWriter


def compact_store(path: Path) -> tuple[int, int]:
    """Fold everything into ``path``; returns (segments, parts) folded, (0, 0) if nothing was to do."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such store")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{path}: not an HDF5 file, nothing to compact")
    kind = None
    with contextlib.suppress(*H5_ERRORS), h5py.File(path, "r") as h5:
        kind = h5.attrs.get(KIND_ATTR)
        if kind not in MARKERS:
            raise StoreError(f"{path}: not an sp-extract store (no {KIND_ATTR} attribute)")
    info = read_store_file(path, str(kind or "features"), scan=False)  # a damaged file: names repair
    segments = len(live_segments(path, kind, info.store_id))
    parts = len(part_files(path))
    if segments or parts:
        StoreWriter(path, kind, info.settings).close(compact=True)
    return segments, parts
