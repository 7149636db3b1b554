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

The vectors are kept beside the store in ``STORE.retrieval/`` by the vector index
(``store/vectors.py``: ``GlobalIndex``), which describes only the images it does not hold yet;
``Vlad`` is what it makes them with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..errors import ConfigError
from ..store.ann import APPROXIMATE_FROM
from ..store.reader import StoreReader
from ..store.vectors import BLOCK_BYTES, GlobalIndex, read_descriptors
from .search import VectorSet, approximate_search, exact_search

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


@dataclass(frozen=True)
class RetrievalOptions:
    """Which pairs ``retrieval_pairs`` makes: each query with its ``num_matched`` most similar
    database images (``rerank_top``: re-ranked among that many first), queries and database from
    name lists (default: every image), an image never its own neighbour (``exclude_self``), and,
    with ``connect``, the pairs that join the components of the pair graph."""

    num_matched: int
    rerank_top: int | None = None
    query_list: Path | None = None
    db_list: Path | None = None
    exclude_self: bool = True
    connect: bool = True


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

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "projection": self.projection, "centroids": self.centroids}

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


@dataclass(frozen=True)
class Vlad:
    """VLAD with ``config`` as the vector index's describer (``store.vectors.Describer``)."""

    config: RetrievalConfig

    def parameters(self) -> dict[str, Any]:
        return asdict(self.config)

    def model(self, arrays: Mapping[str, np.ndarray]) -> VladModel:
        return VladModel(arrays["mean"], arrays["projection"], arrays["centroids"])

    def train(self, h5: StoreReader, names: list[str]) -> VladModel:
        return train_model(sample_descriptors(h5, names, self.config.sample, self.config.seed), self.config)


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
    bound, exact re-scoring; memory: blocks, never n x n); from ``APPROXIMATE_FROM`` database
    images, among the candidates of the approximate index (``store/ann.py``), scored exactly.

    With groups, a database image of the query's own group (a label >= 0) is never a
    candidate: groups by position exclude the image itself (hloc's rule), groups by connected
    component find edges between components. Returns indices into ``database`` (Q, k') and
    similarities (Q, k'), best first, ties to the lower index, k' = min(k, len(database)); -1
    and -inf fill a row that has fewer candidates.
    """
    query_set = VectorSet(lambda rows: index.vectors([queries[i] for i in rows]), len(queries), query_groups)
    database_set = VectorSet(
        lambda rows: index.vectors([database[i] for i in rows]), len(database), database_groups
    )
    approximate = index.approximate
    if approximate is None or len(database) < APPROXIMATE_FROM:
        return exact_search(query_set, database_set, k, device, BLOCK_BYTES)
    position = {name: i for i, name in enumerate(database)}
    to_database = np.array([position.get(name, -1) for name in approximate.names] + [-1])
    among = None if (to_database[:-1] >= 0).all() else np.flatnonzero(to_database[:-1] >= 0)

    def propose(rows: np.ndarray, width: int) -> np.ndarray:
        return to_database[approximate.neighbours(query_set.read(rows), width, among)]

    return approximate_search(query_set, database_set, k, propose, device, BLOCK_BYTES)


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
    options: RetrievalOptions,
    config: RetrievalConfig | None = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    rerank: Reranker | None = None,
) -> list[tuple[str, str]]:
    """Pairs of each query image with its ``options.num_matched`` most similar database images,
    by the global descriptors of ``config``.

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

    num_matched, rerank_top = options.num_matched, options.rerank_top
    if num_matched < 1:
        raise ConfigError(f"--num-matched must be >= 1, got {num_matched}")
    if rerank_top is not None and rerank_top < num_matched:
        raise ConfigError(f"--rerank ({rerank_top}) must be at least --num-matched ({num_matched})")
    if rerank_top is not None and rerank is None:
        raise ValueError(
            "rerank_top needs rerank, the re-ranking by matching (sp_extract.matching.rerank.rerank)"
        )
    index = GlobalIndex(features, Vlad(config or RetrievalConfig()))
    index.update(progress)
    names = index.names  # a name kept from an entry the store no longer has is not used
    known = set(names)
    queries = read_name_list(options.query_list, known) if options.query_list else names
    database = read_name_list(options.db_list, known) if options.db_list else names
    groups = None
    if options.exclude_self:
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
    if options.connect and queries == database:
        position = {name: i for i, name in enumerate(database)}
        edges = [(position[a], position[b]) for a, b in pairs]
        joining = connecting_pairs(index, database, edges, device_used)
        pairs += [(database[i], database[j]) for i, j in joining]
    return pairs
