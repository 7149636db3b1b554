"""Retrieval pairs: each image with its K most similar images by a global descriptor made from
the feature store's own SuperPoint descriptors (no other network, no other weights).

The global descriptor is VLAD (Jégou et al. 2010) with the improvements of Arandjelović and
Zisserman's "All about VLAD" (2013): local descriptors are PCA-projected (``dims``), assigned to
the nearest of ``clusters`` k-means centroids, their residuals summed per centroid, each
centroid's sum L2-normalised (intra-normalisation, against bursts of similar descriptors) and
the whole vector L2-normalised. The model (mean, projection, centroids) is trained on a sample
of the collection's descriptors. Why VLAD rather than ASMK or a tf-idf bag of words: a VLAD is
a fixed-length vector whose similarity is a dot product, so search is exact matrix products in
bounded blocks, and an image's vector depends only on the model, so a growing collection only
describes its new images; ASMK and tf-idf need inverted files, and tf-idf weights change with
every image added. What VLAD lacks in precision, ``--rerank`` (``matching.rerank``) adds back.

The vectors are kept beside the store in ``STORE.retrieval/``: ``model.npz``, ``meta.json``
(the parameters, the store's settings and the model's checksum) and segments of vectors
(``segment-N.npy``, float16, with their names in ``segment-N.txt``), each written to a
temporary file and renamed. A run describes only the images no segment holds; a model made
with other parameters or for a store with other settings is detected and replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np
import torch

from ..errors import ConfigError, StoreError
from ..store.reader import open_store
from ..store.writer import StoreLock, describe_error, fsync_path, read_store_info
from .search import exact_search

MODEL_FORMAT = 1
SEGMENT_IMAGES = 4096  # images described per segment file
MAX_SEGMENTS = 16  # more are merged into one (amortised: a merge per 16 growing runs)
BLOCK_BYTES = 64 << 20  # float32 vectors per block (segment merges; the search on the CPU)
# re-ranks (Q, M) candidates by matching (``matching.rerank.rerank``, which the caller passes:
# matching sits above pairs): features, queries, database, candidates, device -> candidates
Reranker = Callable[[Path, Sequence[str], Sequence[str], np.ndarray, torch.device], np.ndarray]


@dataclass(frozen=True)
class RetrievalConfig:
    """Global-descriptor parameters; a model trained with other values is retrained."""

    clusters: int = 64
    dims: int = 64
    sample: int = 100_000
    iterations: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ConfigError(f"--clusters must be >= 1, got {self.clusters}")
        if self.dims < 1:
            raise ConfigError(f"--dims must be >= 1, got {self.dims}")
        if self.sample < self.clusters:
            raise ConfigError(
                f"the sample ({self.sample} descriptors) must be at least --clusters ({self.clusters})"
            )


@dataclass
class VladModel:
    """Mean (D,), projection (D, P) and centroids (K, P) of the VLAD descriptor, float32."""

    mean: np.ndarray
    projection: np.ndarray
    centroids: np.ndarray

    @property
    def dimension(self) -> int:
        return self.centroids.size

    def checksum(self) -> str:
        digest = hashlib.sha1()
        for array in (self.mean, self.projection, self.centroids):
            digest.update(np.ascontiguousarray(array, np.float32).tobytes())
        return digest.hexdigest()

    def describe(self, descriptors: np.ndarray) -> np.ndarray:
        """The VLAD vector (K * P,) float32 of one image's (N, D) descriptors; zero if N = 0."""
        local = (torch.from_numpy(np.asarray(descriptors, np.float32)) - torch.from_numpy(self.mean)) @ (
            torch.from_numpy(self.projection)
        )
        centroids = torch.from_numpy(self.centroids)
        assigned = nearest_centroid(local, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, local - centroids[assigned])
        sums = torch.nn.functional.normalize(sums, dim=1).flatten()
        return torch.nn.functional.normalize(sums, dim=0).numpy()


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each point's nearest centroid (L2), from the products: argmax x.c - |c|^2 / 2."""
    return (points @ centroids.T - centroids.square().sum(1) / 2).argmax(1)


def sample_descriptors(h5: h5py.File, names: Sequence[str], total: int, seed: int) -> np.ndarray:
    """About ``total`` descriptors (M, D) float32 drawn evenly from up to ``total // 50`` images
    spread over ``names`` (a fixed random subset of each), so a huge store is not read whole."""
    rng = np.random.default_rng(seed)
    chosen = names[:: max(1, -(-len(names) // max(1, total // 50)))]
    per_image = -(-total // len(chosen))
    parts = []
    for name in chosen:
        descriptors = read_descriptors(h5, name)
        if len(descriptors) > per_image:
            descriptors = descriptors[np.sort(rng.choice(len(descriptors), per_image, replace=False))]
        parts.append(descriptors)
    return np.concatenate(parts)


def read_descriptors(h5: h5py.File, name: str) -> np.ndarray:
    """One image's descriptors as (N, D) float32, from the store's (D, N)."""
    try:
        stored = h5[name]["descriptors"]
        if stored.ndim != 2:
            raise ValueError(f"descriptors of shape {stored.shape}, expected D x N")
        return np.asarray(stored, np.float32).T
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise StoreError(f"{h5.filename}: cannot read the descriptors of '{name}' ({error})") from error


def train_model(samples: np.ndarray, config: RetrievalConfig) -> VladModel:
    """PCA to ``config.dims`` and k-means (Lloyd, seeded random initialisation) on the samples."""
    if len(samples) < config.clusters:
        raise ConfigError(
            f"only {len(samples)} descriptors in the store, fewer than --clusters {config.clusters}"
        )
    points = torch.from_numpy(samples)
    mean = points.mean(0)
    centred = points - mean
    dims = min(config.dims, points.shape[1])
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    projection = vectors[:, -dims:].flip(1).contiguous()  # the principal directions first
    local = centred @ projection
    generator = torch.Generator().manual_seed(config.seed)
    centroids = local[torch.randperm(len(local), generator=generator)[: config.clusters]].clone()
    for _ in range(config.iterations):
        assigned = nearest_centroid(local, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, local)
        counts = torch.bincount(assigned, minlength=config.clusters)
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    return VladModel(mean.numpy(), projection.numpy(), centroids.numpy())


class GlobalIndex:
    """The global descriptors of a feature store, kept in ``STORE.retrieval/`` (module doc).

    ``update`` brings them up to date with the store (training the model if there is none or
    it is stale) under a lock; then ``vectors`` reads any names' vectors from the segments.
    """

    def __init__(self, features: Path, config: RetrievalConfig) -> None:
        self.features = Path(features)
        self.config = config
        self.folder = self.features.with_name(self.features.name + ".retrieval")
        self.model: VladModel | None = None
        self.names: list[str] = []  # the store's images, sorted (``update``)
        self.rows: dict[str, tuple[int, int]] = {}  # name -> segment number, row
        self.segments: dict[int, np.ndarray] = {}  # memory-mapped (rows, dimension) float16

    # -- files ---------------------------------------------------------------------------
    def _write(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        """Write ``path`` through a temporary file, fsynced and renamed."""
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_path(self.folder, directory=True)

    def _meta(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"format": MODEL_FORMAT, "config": asdict(self.config), "features_settings": settings}

    def _load_model(self, settings: dict[str, Any]) -> VladModel | None:
        """The kept model if it was made with these parameters for a store of these settings."""
        with contextlib.suppress(OSError, ValueError, KeyError):
            meta = json.loads((self.folder / "meta.json").read_text())
            if {k: v for k, v in meta.items() if k != "model_sha1"} != self._meta(settings):
                return None
            with np.load(self.folder / "model.npz") as data:
                model = VladModel(data["mean"], data["projection"], data["centroids"])
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
                self.model = train_model(
                    sample_descriptors(h5, names, self.config.sample, self.config.seed), self.config
                )
                model = self.model
                self._write(
                    self.folder / "model.npz",
                    lambda f: np.savez(
                        f, mean=model.mean, projection=model.projection, centroids=model.centroids
                    ),
                )
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
        temporary = self.folder / f"segment-{number}.npy.tmp"
        merged = np.lib.format.open_memmap(temporary, "w+", np.float16, (len(names), self.model.dimension))
        for start, end in _blocks(len(names), self.model.dimension):
            merged[start:end] = self.vectors(names[start:end])
        merged.flush()
        del merged
        fsync_path(temporary)
        os.replace(temporary, self.folder / f"segment-{number}.npy")
        fsync_path(self.folder, directory=True)
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


def nearest_images(
    index: GlobalIndex,
    queries: Sequence[str],
    database: Sequence[str],
    k: int,
    query_groups: np.ndarray | None = None,
    database_groups: np.ndarray | None = None,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` most similar database images, exactly, by blocks of queries and of
    database vectors on ``device`` (``search.py``: low-precision screening with a proven error
    bound, exact re-scoring; memory: blocks, never n x n).

    With groups, a database image of the query's own group (a label >= 0) is never a
    candidate: groups by position exclude the image itself (hloc's rule), groups by connected
    component find edges between components. Returns indices into ``database`` (Q, k') and
    similarities (Q, k'), best first, ties to the lower index, k' = min(k, len(database)); -1
    and -inf fill a row that has fewer candidates.
    """
    return exact_search(
        lambda rows: index.vectors([queries[i] for i in rows]),
        len(queries),
        lambda rows: index.vectors([database[i] for i in rows]),
        len(database),
        k,
        query_groups,
        database_groups,
        device,
        BLOCK_BYTES,
    )


def _root(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


def connecting_pairs(
    index: GlobalIndex,
    names: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    device: torch.device | str = "cpu",
) -> list[tuple[int, int]]:
    """Edges that join the components of the graph ``pairs`` on ``names``: Borůvka's maximum
    spanning forest over the similarities, each round one blockwise search for every image's
    best neighbour outside its component (at most log2(components) rounds). An SfM model
    cannot span images of two components, so these few pairs (fewer than the components)
    are what k nearest neighbours miss."""
    parent = np.arange(len(names))
    for a, b in pairs:
        parent[_root(parent, a)] = _root(parent, b)
    added: list[tuple[int, int]] = []
    while True:
        labels = np.array([_root(parent, i) for i in range(len(names))])
        if len(np.unique(labels)) == 1:
            return added
        found, score = nearest_images(index, names, names, 1, labels, labels, device)
        best: dict[int, tuple[float, int, int]] = {}
        for i, (j, value) in enumerate(zip(found[:, 0], score[:, 0])):
            if j >= 0 and value > best.get(labels[i], (-np.inf,))[0]:
                best[labels[i]] = (float(value), i, int(j))
        if not best:  # no similarity left between components
            return added
        for _, i, j in sorted(best.values(), reverse=True):
            if _root(parent, i) != _root(parent, j):
                parent[_root(parent, i)] = _root(parent, j)
                added.append((i, j))


def retrieval_pairs(
    features: Path,
    num_matched: int,
    config: RetrievalConfig | None = None,
    query_list: Path | None = None,
    db_list: Path | None = None,
    exclude_self: bool = True,
    rerank_top: int | None = None,
    connect: bool = True,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    rerank: Reranker | None = None,
) -> list[tuple[str, str]]:
    """Pairs of each query image with its ``num_matched`` most similar database images.

    Queries and database default to every image of the store (``--query-list``/``--db-list``
    restrict them: localization of new images against a mapped set). With ``rerank_top`` M,
    the M most similar are re-ranked by ``rerank`` (matching and verification:
    ``matching.rerank.rerank``) before the first ``num_matched`` are kept. With ``connect``
    (queries and database the same images), the few most similar pairs that join the components
    of the resulting pair graph are added (``connecting_pairs``). A pair found from both sides
    is written once. The search and the re-ranking run on ``device`` (``auto``: CUDA, then MPS,
    then the CPU).
    """
    from ..devices import resolve_device
    from .core import merge_pairs, read_name_list

    if num_matched < 1:
        raise ConfigError(f"--num-matched must be >= 1, got {num_matched}")
    if rerank_top is not None and rerank_top < num_matched:
        raise ConfigError(f"--rerank ({rerank_top}) must be at least --num-matched ({num_matched})")
    if rerank_top is not None and rerank is None:
        raise ValueError(
            "rerank_top needs rerank, the re-ranking by matching (sp_extract.matching.rerank.rerank)"
        )
    index = GlobalIndex(features, config or RetrievalConfig())
    index.update(progress)
    names = index.names  # a name kept from an entry the store no longer has is not used
    known = set(names)
    queries = read_name_list(query_list, known) if query_list else names
    database = read_name_list(db_list, known) if db_list else names
    groups = None
    if exclude_self:
        position = {name: i for i, name in enumerate(database)}
        groups = (np.array([position.get(name, -1) for name in queries]), np.arange(len(database)))
    device_used = resolve_device(device)
    width = rerank_top or num_matched
    found, _ = nearest_images(index, queries, database, width, *(groups or (None, None)), device_used)
    if rerank is not None and rerank_top is not None:
        found = rerank(features, queries, database, found, device_used)
    pairs = merge_pairs(
        [(query, database[i]) for query, row in zip(queries, found[:, :num_matched]) for i in row[row >= 0]]
    )
    pairs = [(a, b) for a, b in pairs if a != b]  # --include-self: the image took one of its K
    if connect and queries == database:
        position = {name: i for i, name in enumerate(database)}
        edges = [(position[a], position[b]) for a, b in pairs]
        joining = connecting_pairs(index, database, edges, device_used)
        pairs += [(database[i], database[j]) for i, j in joining]
    return pairs
