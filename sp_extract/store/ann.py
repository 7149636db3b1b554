"""The approximate nearest-neighbour index of the vector index, kept in ``STORE.retrieval/ann.npz``
for collections of ``APPROXIMATE_FROM`` images or more (below, the search is exact).

The vectors are projected onto the ``PROJECTED`` principal directions of their uncentred second
moment (a projection without centring keeps dot products, the similarity) and kept in a faiss
inverted-file index: sqrt(n) k-means cells (n / 39 below 1,521 vectors; inner product), 8-bit
scalar-quantized vectors in each. A search visits the ``PROBES`` cells nearest to the query; its
candidates are then scored exactly by the caller (``pairs/search.py``). The file holds the
projection, the names in the index's order, the serialized index and how many vectors it was
trained on; it is written through ``atomic_write`` under the vector index's lock
(``GlobalIndex.update``). A run adds the vectors of the images the index does not hold yet; it
is trained again when the collection has grown to ``RETRAIN_GROWTH`` times the vectors it was
trained on (cells that would hold too many), and with the vectors when the vector model
changes (the folder is replaced).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

FILE = "ann.npz"
APPROXIMATE_FROM = 50_000  # images; docs/performance.md "Retrieval search" (why)
PROJECTED = 256  # dimensions of the projected vectors
PROBES = 32  # cells visited per query
RETRAIN_GROWTH = 8  # retrained when the collection reaches this many times its training size
MIN_PER_CELL = 39  # faiss's k-means wants at least this many vectors per cell
TRAIN_PER_CELL = 64  # training vectors per k-means cell (an even subsample of the collection)
PROJECTION_SAMPLE = 8192  # vectors the projection is learned from (at most about twice that)
ADD_ROWS = 16_384  # vectors projected and added at a time

Reader = Callable[[Sequence[str]], np.ndarray]  # names -> (N, D) float32 vectors


@dataclass
class ApproximateIndex:
    """The projection (D, P) float32, the names in the index's order and the faiss index."""

    projection: np.ndarray
    names: list[str]
    index: faiss.Index
    trained: int

    def project(self, vectors: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(vectors, np.float32) @ self.projection)

    def add(self, names: Sequence[str], read: Reader) -> None:
        for start in range(0, len(names), ADD_ROWS):
            chunk = list(names[start : start + ADD_ROWS])
            self.index.add(self.project(read(chunk)))
            self.names += chunk

    def neighbours(
        self, vectors: np.ndarray, width: int, among: np.ndarray | None, device: str
    ) -> np.ndarray:
        """Each vector's ``width`` approximate nearest (positions in ``names``, -1: none), only
        ``among`` those positions if given; on a CUDA ``device`` with faiss's GPU build, there."""
        projected = self.project(vectors)
        if among is None:
            index = _on_device(self.index, device)
            return index.search(projected, width, params=faiss.SearchParametersIVF(nprobe=PROBES))[1]
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(among, np.int64))
        parameters = faiss.SearchParametersIVF(sel=selector, nprobe=PROBES)
        return self.index.search(projected, width, params=parameters)[1]  # selectors: CPU only

    def save(self, handle: BinaryIO) -> None:
        np.savez(
            handle,
            projection=self.projection,
            names=np.array(self.names, dtype=str),
            index=faiss.serialize_index(self.index),
            trained=np.array(self.trained),
        )


def _on_device(index: faiss.Index, device: str) -> faiss.Index:
    """``index`` on the CUDA ``device`` if faiss has its GPU build and sees a GPU, else itself."""
    if not str(device).startswith("cuda") or not hasattr(faiss, "StandardGpuResources"):
        return index
    if faiss.get_num_gpus() < 1:
        return index
    number = int(str(device).partition(":")[2] or 0)
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), number, index)


def load(path: Path) -> ApproximateIndex | None:
    """The index kept at ``path``, or None if there is none or it cannot be read."""
    try:
        with np.load(path) as data:
            index = faiss.deserialize_index(data["index"])
            return ApproximateIndex(data["projection"], data["names"].tolist(), index, int(data["trained"]))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def principal_directions(moment: np.ndarray, count: int, iterations: int = 6) -> np.ndarray:
    """The ``count`` leading eigenvectors (D, count) float32 of the symmetric ``moment`` (D, D),
    by subspace iteration from a seeded start (``iterations`` products with 64 extra
    directions, then Rayleigh-Ritz): seconds where a full eigendecomposition of 4096 x 4096
    takes half a minute."""
    count = min(count, len(moment))
    basis = np.random.default_rng(0).normal(size=(len(moment), min(len(moment), count + 64)))
    for _ in range(iterations):
        basis = np.linalg.qr(moment @ basis)[0]
    values, vectors = np.linalg.eigh(basis.T @ moment @ basis)
    return np.ascontiguousarray((basis @ vectors[:, ::-1])[:, :count], np.float32)


def train(names: Sequence[str], read: Reader) -> ApproximateIndex:
    """A new, empty index trained on an even subsample of the vectors of ``names``."""
    cells = max(1, min(math.isqrt(len(names)), len(names) // MIN_PER_CELL))
    sample = read(list(names[:: max(1, len(names) // (TRAIN_PER_CELL * cells))]))
    some = sample[:: max(1, len(sample) // PROJECTION_SAMPLE)].astype(np.float64)
    projection = principal_directions(some.T @ some, PROJECTED)
    dimension = projection.shape[1]
    quantizer = faiss.IndexFlatIP(dimension)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dimension, cells, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.seed = 0
    projected = np.ascontiguousarray(sample @ projection)
    index.train(projected)
    index.nprobe = PROBES
    return ApproximateIndex(projection, [], index, len(names))


def updated(
    path: Path, names: Sequence[str], read: Reader, write: Callable[[Path, Callable], None]
) -> ApproximateIndex:
    """The index at ``path`` brought up to date with ``names`` (grown, or trained anew when there
    is none or the collection outgrew it), written with ``write`` if it changed."""
    kept = load(path)
    if kept is None or len(names) >= RETRAIN_GROWTH * kept.trained:
        kept = train(names, read)
    held = set(kept.names)
    new = [name for name in names if name not in held]
    if new:
        kept.add(new, read)
        write(path, kept.save)
    return kept
