"""The approximate nearest-neighbour index of the vector index, kept in ``STORE.retrieval/ann.npz``
for collections of ``APPROXIMATE_FROM`` images or more (below, the search is exact).

The vectors are projected onto ``PROJECTED`` seeded random orthonormal directions (dot
products kept, within about 1 / sqrt(``PROJECTED``) of the vectors' norms; principal directions
kept far fewer true neighbours on VLAD-like vectors: docs/performance.md) and kept, quantized to
8 bits a dimension, in a faiss HNSW graph (``IndexHNSWSQ``, inner product; an inverted-file
index also proposed far fewer). A search walks the graph keeping ``BREADTH`` candidates; its
candidates are then scored exactly by the caller (``pairs/search.py``). The file holds the
projection, the names in the index's order, the serialized index and how many vectors it was
trained on; it is written through ``atomic_write`` under the vector index's lock
(``GlobalIndex.update``). A run adds the vectors of the images the index does not hold yet; it
is trained again when the collection has grown to ``RETRAIN_GROWTH`` times the vectors it was
trained on (the quantization's ranges), and with the vectors when the vector model changes
(the folder is replaced). faiss inserts into the graph on all cores, in an order that timing
decides: an index built again may propose differently; one index file always gives the same
proposals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

FILE = "ann.npz"
APPROXIMATE_FROM = 100_000  # images; docs/performance.md "Retrieval search" (why)
PROJECTED = 512  # dimensions of the projected vectors (all of them if the vectors have fewer)
LINKS = 32  # HNSW: neighbours of a vector in the graph (twice that on its lowest layer)
BREADTH = 256  # HNSW: candidates kept while a search walks the graph (at least the ones asked)
RETRAIN_GROWTH = 8  # trained again when the collection reaches this many times its training size
TRAIN_SAMPLE = 16_384  # vectors the 8-bit quantization's ranges are learned from
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

    def neighbours(self, vectors: np.ndarray, width: int, among: np.ndarray | None) -> np.ndarray:
        """Each vector's ``width`` approximate nearest (positions in ``names``, best first; -1:
        none), only ``among`` those positions if given."""
        selector = None if among is None else faiss.IDSelectorBatch(np.ascontiguousarray(among, np.int64))
        parameters = faiss.SearchParametersHNSW(efSearch=max(BREADTH, width), sel=selector)
        return self.index.search(self.project(vectors), width, params=parameters)[1]

    def save(self, handle: BinaryIO) -> None:
        np.savez(
            handle,
            projection=self.projection,
            names=np.array(self.names, dtype=str),
            index=faiss.serialize_index(self.index),
            trained=np.array(self.trained),
        )


def load(path: Path) -> ApproximateIndex | None:
    """The index kept at ``path``, or None if there is none or it cannot be read."""
    try:
        with np.load(path) as data:
            index = faiss.deserialize_index(data["index"])
            return ApproximateIndex(data["projection"], data["names"].tolist(), index, int(data["trained"]))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def train(names: Sequence[str], read: Reader) -> ApproximateIndex:
    """A new, empty index: the projection and the quantization's ranges (from an even
    subsample of the vectors of ``names``)."""
    sample = read(list(names[:: max(1, len(names) // TRAIN_SAMPLE)]))
    gaussian = np.random.default_rng(0).normal(size=(sample.shape[1], PROJECTED))
    projection = np.ascontiguousarray(np.linalg.qr(gaussian)[0], np.float32)  # orthonormal columns
    index = faiss.IndexHNSWSQ(
        projection.shape[1], faiss.ScalarQuantizer.QT_8bit, LINKS, faiss.METRIC_INNER_PRODUCT
    )
    index.train(np.ascontiguousarray(sample @ projection))
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
