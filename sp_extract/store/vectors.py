"""The vector index: named vectors (each image's global descriptor) of a feature store, kept
beside it in ``STORE.retrieval/``, a second segmented, locked store.

The folder holds the model that makes the vectors (``model.npz``; ``meta.json``: the format,
the describer's parameters, the store's settings and the model's checksum) and segments of
vectors (``segment-N.npy``, float16, with their names in ``segment-N.txt``), each written
through ``atomic_write``; one updater at a time (``StoreLock`` on ``STORE.retrieval.lock``).
A run describes only the images no segment holds; a model made with other parameters or for a
store with other settings is detected and replaced; more than ``MAX_SEGMENTS`` segments are
merged into one. What a vector is, is the ``Describer``'s (``pairs/retrieval.py``: VLAD). From
``APPROXIMATE_FROM`` images, the approximate search index (``ann.py``: ``ann.npz``) is kept in
the folder too, grown by the new vectors under the same lock.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import h5py
import numpy as np

from ..errors import ConfigError, StoreError
from . import ann
from .atomic import atomic_write
from .catalog import read_store_info
from .failures import describe_error
from .lock import StoreLock
from .reader import StoreReader, open_store

MODEL_FORMAT = 1
SEGMENT_IMAGES = 4096  # images described per segment file
MAX_SEGMENTS = 16  # more are merged into one (amortised: a merge per 16 growing runs)
BLOCK_BYTES = 64 << 20  # float32 vectors per block (segment merges; the search on the CPU)


class VectorModel(Protocol):
    """A trained model that makes one image's vector from its local descriptors."""

    @property
    def dimension(self) -> int: ...

    def checksum(self) -> str: ...

    def arrays(self) -> dict[str, np.ndarray]:
        """What ``model.npz`` keeps of it."""
        ...

    def describe(self, descriptors: np.ndarray) -> np.ndarray:
        """The vector of one image's (N, D) descriptors."""
        ...


class Describer(Protocol):
    """How the vectors are made: its parameters (a model made with others is replaced), a model
    loaded from its arrays, and a model trained on a feature store's images."""

    def parameters(self) -> dict[str, Any]: ...

    def model(self, arrays: Mapping[str, np.ndarray]) -> VectorModel: ...

    def train(self, h5: StoreReader, names: list[str]) -> VectorModel: ...


def read_descriptors(h5: h5py.File, name: str) -> np.ndarray:
    """One image's descriptors as (N, D) float32, from the store's (D, N)."""
    try:
        stored = h5[name]["descriptors"]
        if stored.ndim != 2:
            raise ValueError(f"descriptors of shape {stored.shape}, expected D x N")
        return np.asarray(stored, np.float32).T
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise StoreError(f"{h5.filename}: cannot read the descriptors of '{name}' ({error})") from error


class GlobalIndex:
    """The global descriptors of a feature store, kept in ``STORE.retrieval/`` (module doc).

    ``update`` brings them up to date with the store (training the ``describer``'s model if
    there is none or it is stale) under a lock; then ``vectors`` reads any names' vectors from
    the segments.
    """

    def __init__(self, features: Path, describer: Describer) -> None:
        self.features = Path(features)
        self.describer = describer
        self.folder = self.features.with_name(self.features.name + ".retrieval")
        self.model: VectorModel | None = None
        self.names: list[str] = []  # the store's images, sorted (``update``)
        self.rows: dict[str, tuple[int, int]] = {}  # name -> segment number, row
        self.segments: dict[int, np.ndarray] = {}  # memory-mapped (rows, dimension) float16
        self.approximate: ann.ApproximateIndex | None = None  # from ``APPROXIMATE_FROM`` images

    # -- files ---------------------------------------------------------------------------
    def _write(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        """Write ``path`` through a temporary file, fsynced and renamed (``atomic_write``)."""
        with (
            atomic_write(path, path.with_name(path.name + ".tmp")) as temporary,
            open(temporary, "wb") as handle,
        ):
            write(handle)

    def _meta(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"format": MODEL_FORMAT, "config": self.describer.parameters(), "features_settings": settings}

    def _load_model(self, settings: dict[str, Any]) -> VectorModel | None:
        """The kept model if it was made with these parameters for a store of these settings."""
        with contextlib.suppress(OSError, ValueError, KeyError):
            meta = json.loads((self.folder / "meta.json").read_text())
            if {k: v for k, v in meta.items() if k != "model_sha1"} != self._meta(settings):
                return None
            with np.load(self.folder / "model.npz") as data:
                model = self.describer.model(data)
            if model.checksum() == meta["model_sha1"]:
                return model
        return None

    def _segment_numbers(self) -> list[int]:
        found = (re.fullmatch(r"segment-(\d+)\.npy", p.name) for p in self.folder.glob("segment-*.npy"))
        return sorted(int(match[1]) for match in found if match)

    def _open_segments(self) -> None:
        """Map every complete segment; drop what a killed run left (a vectors file without its
        names, temporaries)."""
        for stale in self.folder.glob("*.tmp"):
            stale.unlink()
        self.rows, self.segments = {}, {}
        for number in self._segment_numbers():
            names_path = self.folder / f"segment-{number}.txt"
            try:
                vectors = np.load(self.folder / f"segment-{number}.npy", mmap_mode="r")
                names = names_path.read_text(encoding="utf-8").splitlines() if names_path.exists() else []
            except (OSError, ValueError):
                vectors, names = np.zeros((0, 0)), [""]
            if len(names) != len(vectors) or vectors.shape[1:] != (self.model.dimension,):
                del vectors
                (self.folder / f"segment-{number}.npy").unlink()
                names_path.unlink(missing_ok=True)
                continue
            self.segments[number] = vectors
            self.rows.update((name, (number, row)) for row, name in enumerate(names))

    def _add_segment(self, names: list[str], vectors: np.ndarray) -> None:
        number = max(self._segment_numbers(), default=0) + 1
        self._write(
            self.folder / f"segment-{number}.txt",
            lambda f: f.write("".join(n + "\n" for n in names).encode()),
        )
        self._write(self.folder / f"segment-{number}.npy", lambda f: np.save(f, vectors))

    # -- updating ------------------------------------------------------------------------
    def update(self, progress: Callable[[int], None] | None = None) -> int:
        """Describe the store's images that no segment holds; returns how many were described."""
        settings, names = read_store_info(self.features, "features")
        if not names:
            raise ConfigError(f"{self.features}: the feature store holds no images")
        self.names = names
        lock = StoreLock(self.folder)
        lock.acquire()
        try:
            return self._update(settings, names, progress)
        except OSError as error:
            raise StoreError(
                f"{self.folder}: cannot write global descriptors ({describe_error(error)})"
            ) from error
        finally:
            lock.release()

    def _update(
        self, settings: dict[str, Any], names: list[str], progress: Callable[[int], None] | None
    ) -> int:
        with open_store(self.features) as h5:
            self.model = self._load_model(settings) if self.folder.is_dir() else None
            if self.model is None:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder.mkdir()
                self.model = model = self.describer.train(h5, names)
                self._write(self.folder / "model.npz", lambda f: np.savez(f, **model.arrays()))
                meta = {**self._meta(settings), "model_sha1": model.checksum()}
                self._write(self.folder / "meta.json", lambda f: f.write(json.dumps(meta).encode()))
            self._open_segments()
            new = [name for name in names if name not in self.rows]
            for start in range(0, len(new), SEGMENT_IMAGES):
                chunk = new[start : start + SEGMENT_IMAGES]
                vectors = np.stack([self.model.describe(read_descriptors(h5, n)) for n in chunk]).astype(
                    np.float16
                )
                self._add_segment(chunk, vectors)
                if progress is not None:
                    progress(len(chunk))
        if len(self._segment_numbers()) > MAX_SEGMENTS:
            self._merge()
        self._open_segments()
        if len(names) >= ann.APPROXIMATE_FROM:
            self.approximate = ann.updated(self.folder / ann.FILE, names, self.vectors, self._write)
        return len(new)

    def _merge(self) -> None:
        """Fold every segment into one, written block by block (bounded memory) before the old
        ones are deleted; a name held twice (a merge killed before its deletions) is kept once."""
        self._open_segments()
        numbers = sorted(self.segments)
        names = sorted(self.rows)
        number = numbers[-1] + 1
        self._write(
            self.folder / f"segment-{number}.txt",
            lambda f: f.write("".join(n + "\n" for n in names).encode()),
        )
        final = self.folder / f"segment-{number}.npy"
        with atomic_write(final, final.with_name(final.name + ".tmp")) as temporary:
            shape = (len(names), self.model.dimension)
            merged = np.lib.format.open_memmap(temporary, "w+", np.float16, shape)
            for start, end in _blocks(len(names), self.model.dimension):
                merged[start:end] = self.vectors(names[start:end])
            merged.flush()
            del merged
        self.segments = {}
        for old in numbers:
            (self.folder / f"segment-{old}.txt").unlink()
            (self.folder / f"segment-{old}.npy").unlink()

    # -- reading -------------------------------------------------------------------------
    def vectors(self, names: Sequence[str]) -> np.ndarray:
        """The (len(names), dimension) float32 vectors of ``names`` (all described)."""
        out = np.empty((len(names), self.model.dimension), np.float32)
        where = np.array([self.rows[name] for name in names], np.int64).reshape(-1, 2)
        for number in np.unique(where[:, 0]):
            picked = np.flatnonzero(where[:, 0] == number)
            out[picked] = self.segments[int(number)][where[picked, 1]]
        return out


def _blocks(count: int, dimension: int) -> Iterator[tuple[int, int]]:
    rows = max(1, BLOCK_BYTES // (4 * dimension))
    for start in range(0, count, rows):
        yield start, min(count, start + rows)
