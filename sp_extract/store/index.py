"""Name indexes: which entries a store file holds, as a sorted array of 64-bit name hashes.

Each file of a store (the main file and every segment) has a sidecar ``FILE.index``: a
``.npy`` array of uint64 whose first four values are a magic number and the identity of the
file it describes (inode, size, modification time in ns), followed by the sorted hashes of
its entry names. A resuming run loads these arrays instead of walking the files, and tests
membership with ``numpy.searchsorted``, so neither its start nor its memory depends on a
Python set of every stored name. The sidecar lives beside the file, not inside it: a dataset
in the store would add a name to hloc's ``list_h5_names``. It is written (temporary, fsync,
rename) before its file is renamed into place; a sidecar whose identity does not match its
file (a kill between the two renames, a copied or edited store) is ignored, and the file is
then walked and checked as a store without index is.

Hashes are the first 8 bytes of BLAKE2b of the UTF-8 name. Two different names share one with
probability 2^-64 per pair: a run asking about q names of a store of n entries takes a new
name for a stored one with probability about q * n / 2^64 (3e-6 for 10^7 pairs asked against
10^7 stored), in which case that one entry is not computed; it is not confirmed by opening.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_write

MAGIC = 0x5350_4958_0001  # "SPIX", format 1
HEADER = 4  # magic, inode, size, mtime_ns


def name_hashes(names: Iterable[str]) -> np.ndarray:
    """The 64-bit hashes of ``names`` (uint64, in the order given)."""
    digest = b"".join(
        hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest() for name in names
    )
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def index_path(file: Path) -> Path:
    """The sidecar index of a store file."""
    return file.with_name(file.name + ".index")


def identity(file: Path) -> np.ndarray:
    """What ties a sidecar to its file: inode, size and modification time (kept by rename)."""
    info = os.stat(file)
    return np.array([info.st_ino, info.st_size, info.st_mtime_ns], dtype=np.uint64)


def write_index(file: Path, hashes: np.ndarray, described: Path | None = None) -> None:
    """Write ``file``'s sidecar durably for the hashes of its entries. ``described`` is the file
    whose identity is recorded when it is not yet in place (the temporary renamed to ``file``)."""
    target = index_path(file)
    header = np.concatenate([np.array([MAGIC], dtype=np.uint64), identity(described or file)])
    with (
        atomic_write(target, target.with_name(target.name + ".tmp")) as temporary,
        open(temporary, "wb") as out,
    ):
        np.save(out, np.concatenate([header, np.unique(hashes.astype(np.uint64))]))


def load_index(file: Path) -> np.ndarray | None:
    """The sorted name hashes of ``file`` (memory-mapped: read as they are searched), or None if
    its sidecar is missing, unreadable or describes another file (then the file must be walked)."""
    with contextlib.suppress(OSError, ValueError):
        stored = np.load(index_path(file), mmap_mode="r", allow_pickle=False)
        valid = stored.dtype == np.uint64 and stored.ndim == 1 and len(stored) >= HEADER
        if valid and stored[0] == MAGIC and np.array_equal(stored[1:HEADER], identity(file)):
            return stored[HEADER:]
    return None


def indexed_names(h5: h5py.File, hashes: np.ndarray) -> list[str] | None:
    """The entry names of ``h5`` whose valid sidecar index is ``hashes``, sorted, found by
    walking groups only down to the entries the index knows (no entry is opened, its
    datasets are not visited); None when the walk does not find every indexed name (a folder
    named like an image, say), and the caller walks the whole file."""
    found: list[str] = []
    pending = [b""]
    while pending:
        prefix = pending.pop()
        children: list[bytes] = []
        group = h5py.h5g.open(h5.id, prefix) if prefix else h5.id  # kept: its links need it open
        group.links.iterate(children.append)
        paths = [prefix + b"/" + child if prefix else child for child in children]
        names = [path.decode("utf-8", "surrogateescape") for path in paths]
        known = np.zeros(len(names), dtype=bool)
        if len(hashes) and names:
            wanted = name_hashes(names)
            known = hashes[np.minimum(np.searchsorted(hashes, wanted), len(hashes) - 1)] == wanted
        found += [name for name, entry in zip(names, known) if entry]
        for path, entry in zip(paths, known):  # a folder of entries, or another group
            if not entry and h5py.h5o.get_info(h5.id, path).type == h5py.h5o.TYPE_GROUP:
                pending.append(path)
    return sorted(found) if len(found) == len(hashes) else None


def remove_index(file: Path) -> None:
    index_path(file).unlink(missing_ok=True)


class NameIndex:
    """Set-like membership of entry names: sorted hash arrays (of the stored files, and of the
    names this run added, ``RECENT`` at a time) plus the latest names. ``name in index``;
    ``index.contains(names)`` answers a chunk at once. Memory: 8 bytes a name."""

    RECENT = 65536  # names kept as strings before they become a sorted hash array
    RUNS = 8  # hash arrays of this run's names merged into one beyond this many

    def __init__(self) -> None:
        self._arrays: list[np.ndarray] = []  # of stored files
        self._runs: list[np.ndarray] = []  # of this run's names
        self._names: set[str] = set()

    def add_hashes(self, hashes: np.ndarray) -> None:
        """Add the names of a stored file: its hashes, sorted (as ``load_index`` gives them)."""
        if len(hashes):
            self._arrays.append(hashes)

    def update(self, names: Iterable[str]) -> None:
        self._names.update(names)
        if len(self._names) >= self.RECENT:
            self._runs.append(np.sort(name_hashes(self._names)))
            self._names.clear()
            if len(self._runs) > self.RUNS:
                self._runs = [np.sort(np.concatenate(self._runs))]

    def contains(self, names: Sequence[str]) -> np.ndarray:
        """A boolean array: which of ``names`` are in the index."""
        found = np.zeros(len(names), dtype=bool)
        if self._names:  # this run's latest names, not yet hashed
            found[:] = [name in self._names for name in names]
        if (self._arrays or self._runs) and len(names):
            hashes = name_hashes(names)
            for array in [*self._arrays, *self._runs]:
                positions = np.minimum(np.searchsorted(array, hashes), len(array) - 1)
                found |= array[positions] == hashes
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.contains([name])[0])
