"""The one way sp-extract reads a store: its main file and its segments, as one.

A store is ``FEATS.h5`` plus the immutable segment files in ``FEATS.h5.segments/`` that belong
to it (same ``sp_extract_store_id``; see ``writer.py``). ``StoreReader`` opens them all
read-only and answers like an ``h5py.File``: ``store[name]`` (or ``store["name/keypoints"]``)
is the group (dataset) of the first file holding it, main file first, then segments oldest
first (an entry in two files is the same entry, copied by a run killed before it deleted the
older file), ``name in store``, ``store.names()``, ``store.attrs`` (the main file's). Part
files of a killed run are not read: they are durable results not yet in the store, folded in
by the next run that writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from ..errors import StoreError
from .catalog import file_names, segment_files
from .failures import H5_ERRORS, open_error, segment_errors
from .format import KIND_ATTR, MARKERS, STORE_ID_ATTR, entry_names

OPEN_ATTEMPTS = 10


class StoreReader:
    """A store's main file and its segments, open read-only. Use as a context manager."""

    def __init__(self, path: Path, locking: bool | None = None) -> None:
        self.path = Path(path)
        self.files: list[h5py.File] = []
        self.segments: list[Path] = []
        self.kind: str | None = None
        for _ in range(OPEN_ATTEMPTS):
            try:
                if self._open(locking):
                    return
            except BaseException:
                self.close()
                raise
            self.close()
        raise StoreError(f"{self.path}: its segments kept changing while it was opened; try again")

    def _open(self, locking: bool | None) -> bool:
        """Open the listed segments, then the main file, and keep the segments of its store.
        In this order the files are one state of the store even while a writer merges or folds
        segments (it deletes them only after renaming their replacement into place); False if a
        listed segment vanished meanwhile (merged or folded: list again)."""
        segments = []
        for segment in segment_files(self.path):
            try:
                with segment_errors(self.path, segment):
                    self.files.append(h5py.File(segment, "r", locking=locking))
            except StoreError:
                if not segment.exists():
                    return False
                raise
            segments.append(segment)
        try:
            main = h5py.File(self.path, "r", locking=locking)
        except H5_ERRORS as error:
            raise open_error(self.path, error) from error
        kind = main.attrs.get(KIND_ATTR)
        self.kind = str(kind) if kind in MARKERS else None
        ours = [(path, h5) for path, h5 in zip(segments, self.files) if _same_store(h5, main)]
        for h5 in self.files:
            if all(h5 is not kept for _, kept in ours):
                h5.close()
        self.files = [main, *(h5 for _, h5 in ours)]
        self.segments = [path for path, _ in ours]
        return True

    @property
    def filename(self) -> str:
        return str(self.path)

    @property
    def attrs(self) -> h5py.AttributeManager:
        return self.files[0].attrs

    def names(self) -> list[str]:
        """Every entry name (image names or pair keys) of the store, sorted."""
        marker = MARKERS[self.kind or "features"]
        found: set[str] = set()
        for path, h5 in zip([self.path, *self.segments], self.files):
            found.update(file_names(path, h5, lambda h5=h5: entry_names(h5, marker)))
        return sorted(found)

    def __contains__(self, key: object) -> bool:
        return any(key in h5 for h5 in self.files)

    def __getitem__(self, key: str) -> Any:
        for h5 in self.files:
            if key in h5:
                return h5[key]
        raise KeyError(f"'{key}' is not in {self.path}")

    def close(self) -> None:
        for h5 in self.files:
            h5.close()
        self.files.clear()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_store(segment: h5py.File, main: h5py.File) -> bool:
    """Whether a segment belongs to the store of this main file (not to one it replaced)."""
    return all(segment.attrs.get(key) == main.attrs.get(key) for key in (KIND_ATTR, STORE_ID_ATTR))


def open_store(path: Path, locking: bool | None = None) -> StoreReader:
    """Open a feature or match store for reading (main file and segments)."""
    return StoreReader(path, locking)
