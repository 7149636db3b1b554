"""Re-ranking of retrieval candidates by matching: each query's top candidates ordered by the
inliers of mutual nearest-neighbour matches under a fundamental matrix (USAC MAGSAC, 4 px):
the spatial verification of Philbin et al. (2007) with the matcher and defaults of
``match-pairs``, so the pairs kept are those COLMAP's own verification will keep too (a ratio
test first, tried too, made the ranking worse for SfM on the shared photos)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..matching.config import MatchConfig
from ..matching.nn import CPU_WORK_ELEMENTS, MAX_BATCH_ELEMENTS, nearest_neighbours
from ..matching.run import FeatureCache
from ..matching.verify import verify_matches
from ..store.reader import open_store

RERANK_MATCHING = MatchConfig(mutual=True, verify="fundamental", verify_threshold=4.0)


def rerank(
    features: Path,
    queries: Sequence[str],
    database: Sequence[str],
    candidates: np.ndarray,
    device: torch.device,
    cache_mb: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``candidates`` (Q, M) indices into ``database`` (-1: none) reordered per row by inlier
    count, most first; ties and unreadable images keep the retrieval order. A pair met twice
    (``a b`` and ``b a``) is matched once."""
    config = RERANK_MATCHING
    work = CPU_WORK_ELEMENTS if device.type == "cpu" else MAX_BATCH_ELEMENTS
    known: dict[frozenset[str], int] = {}
    reordered = candidates.copy()
    with open_store(features) as h5, ThreadPoolExecutor() as pool:
        cache = FeatureCache(h5, device, cache_mb << 20, keypoints=True)
        for row, query in enumerate(queries):
            names = [database[i] for i in candidates[row] if i >= 0]
            todo = [n for n in names if frozenset((query, n)) not in known]
            first = cache.get(query)
            loaded = [(n, cache.get(n)) for n in todo]
            loaded = [(n, f) for n, f in loaded if f is not None and first is not None]
            if loaded:
                matches, _ = nearest_neighbours(
                    [first.descriptors] * len(loaded), [f.descriptors for _, f in loaded], config, work
                )
                rows = matches.to(torch.int32).cpu().numpy()[:, : len(first.descriptors)]
                jobs = [(first.keypoints, f.keypoints, kept) for (_, f), kept in zip(loaded, rows)]
                for (name, _), count in zip(loaded, pool.map(_inliers, jobs)):
                    known[frozenset((query, name))] = count
            counts = [known.get(frozenset((query, n)), 0) for n in names]
            order = sorted(range(len(names)), key=lambda i: -counts[i])  # stable: ties keep rank
            reordered[row, : len(names)] = candidates[row, : len(names)][order]
            if progress is not None:
                progress(1)
    return reordered


def _inliers(job: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
    keypoints0, keypoints1, matches0 = job
    config = RERANK_MATCHING
    return verify_matches(keypoints0, keypoints1, matches0, config.verify, config.verify_threshold)[1]
