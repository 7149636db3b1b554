"""Re-ranking of retrieval candidates by matching, with a significance test: each query's top
candidates are matched (mutual nearest neighbours, as ``match-pairs``), a fundamental matrix is
searched among the matches (USAC, 4 px), and the candidates whose matches are significantly
more consistent with it than chance allows come first, most significant first; the others keep
the retrieval order.

The test is the a contrario one of ORSA (Moisan and Stival, IJCV 2004; Moisan, Moulon and
Monasse, IPOL 2016): a match whose point lies within e pixels of its epipolar line has, for a
point placed at random in the other image, the chance alpha = 2 D e / A (D the diagonal, A the
area of the image region where keypoints lie); the number of false alarms of the k matches
closest to the lines is NFA(k) = 3 (n - 7) C(n, k) C(k, 7) alpha_k^(k - 7), alpha_k the k-th
smallest chance, n the number of matches; the geometry is significant when min_k NFA(k) < 1,
i.e. fewer than one set that good is expected between unrelated images. The count assumes a
model made from 7 matches, so the model is USAC's best minimal-sample model, neither
re-estimated on its inliers nor polished (a re-estimated model fits its own inliers and makes
chance look significant). Why a test rather than the inlier count: between unrelated frames of
indoor scenes the fundamental matrix found among 100-200 mutual matches has about as many
inliers as between related ones (about 15), so ranking by inliers pushed related images down;
where the evidence is not significant, the retrieval order is the better guess.

Retrieval (``pairs.retrieval.retrieval_pairs``) sits below matching, so its caller passes
``rerank`` to it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from ..store.reader import open_store
from .config import MatchConfig
from .nn import CPU_WORK_ELEMENTS, MAX_BATCH_ELEMENTS, nearest_neighbours
from .run import FeatureCache

RERANK_MATCHING = MatchConfig(mutual=True)
VERIFY_THRESHOLD = 4.0  # pixels, as match-pairs' --verify-threshold
SAMPLE_SIZE = 7  # matches of a minimal sample of the fundamental matrix
MODELS_PER_SAMPLE = 3  # real solutions of the 7-point algorithm, at most


def rerank(
    features: Path,
    queries: Sequence[str],
    database: Sequence[str],
    candidates: np.ndarray,
    device: torch.device,
    cache_mb: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``candidates`` (Q, M) indices into ``database`` (-1: none) reordered per row: those with
    significant geometry first, by their log10 NFA, the others in retrieval order (so are
    unreadable images). A pair met twice (``a b`` and ``b a``) is matched once."""
    work = CPU_WORK_ELEMENTS if device.type == "cpu" else MAX_BATCH_ELEMENTS
    known: dict[frozenset[str], float] = {}
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
                    [first.descriptors] * len(loaded),
                    [f.descriptors for _, f in loaded],
                    RERANK_MATCHING,
                    work,
                )
                rows = matches.cpu().numpy()[:, : len(first.descriptors)]
                jobs = [(first.keypoints, f.keypoints, kept) for (_, f), kept in zip(loaded, rows)]
                for (name, _), value in zip(loaded, pool.map(_log_nfa_of_matches, jobs)):
                    known[frozenset((query, name))] = value
            # not significant (log NFA >= 0) or not verified: 0, and the stable sort keeps rank
            keys = [min(0.0, known.get(frozenset((query, n)), 0.0)) for n in names]
            order = sorted(range(len(names)), key=lambda i: keys[i])
            reordered[row, : len(names)] = candidates[row, : len(names)][order]
            if progress is not None:
                progress(1)
    return reordered


def _log_nfa_of_matches(job: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    keypoints0, keypoints1, matches0 = job
    index = np.flatnonzero(matches0 >= 0)
    return fundamental_log_nfa(keypoints0, keypoints1, keypoints0[index], keypoints1[matches0[index]])[0]


def _minimal_model_params() -> cv2.UsacParams:
    """USAC with MAGSAC scoring whose answer is its best minimal-sample model (see module doc)."""
    params = cv2.UsacParams()
    params.threshold = VERIFY_THRESHOLD
    params.confidence = 0.999
    params.maxIterations = 10_000
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.sampler = cv2.SAMPLING_UNIFORM
    params.loMethod = cv2.LOCAL_OPTIM_NULL
    params.final_polisher = cv2.NONE_POLISHER
    return params


def fundamental_log_nfa(
    keypoints0: np.ndarray, keypoints1: np.ndarray, points0: np.ndarray, points1: np.ndarray
) -> tuple[float, int]:
    """log10 NFA of the most meaningful set of matches ``points0`` <-> ``points1`` (M, 2) under
    the fundamental matrix USAC finds, and the size of that set; (inf, 0) with fewer than
    8 matches or no model. ``keypoints0``/``keypoints1`` (all of each image's keypoints) give
    the region a point falls in by chance: their bounding box."""
    if len(points0) <= SAMPLE_SIZE:
        return math.inf, 0
    try:
        found, _ = cv2.findFundamentalMat(
            points0.astype(np.float64), points1.astype(np.float64), mask=None, params=_minimal_model_params()
        )
    except cv2.error:  # degenerate configurations (all points on a line, say)
        return math.inf, 0
    if found is None or found.shape[0] < 3:
        return math.inf, 0
    distance0, distance1 = epipolar_distances(found[:3], points0, points1)
    chance = np.maximum(_line_chance(keypoints0) * distance0, _line_chance(keypoints1) * distance1)
    return meaningful_set(np.clip(chance, np.finfo(np.float64).eps, 1.0))


def epipolar_distances(
    fundamental: np.ndarray, points0: np.ndarray, points1: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (pixels) of each point to the epipolar line of its match, in image 0 and 1
    (``x1^T F x0 = 0``)."""
    homogeneous0 = np.c_[points0, np.ones(len(points0))]
    homogeneous1 = np.c_[points1, np.ones(len(points1))]
    lines1 = homogeneous0 @ fundamental.T  # in image 1
    lines0 = homogeneous1 @ fundamental  # in image 0
    residual = np.abs(np.sum(lines1 * homogeneous1, axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        distance0 = residual / np.hypot(lines0[:, 0], lines0[:, 1])
        distance1 = residual / np.hypot(lines1[:, 0], lines1[:, 1])
    return np.nan_to_num(distance0, nan=np.inf), np.nan_to_num(distance1, nan=np.inf)


def _line_chance(keypoints: np.ndarray) -> float:
    """2 D / A of the keypoints' bounding box: the chance that a random point of it lies within
    one pixel of a line (a band 2 px wide, at most D long)."""
    width, height = np.ptp(keypoints, axis=0) + 1.0
    return 2.0 * math.hypot(width, height) / (width * height)


def meaningful_set(chance: np.ndarray) -> tuple[float, int]:
    """min over k of log10 NFA(k) = log10(3 (n - 7) C(n, k) C(k, 7)) + (k - 7) log10 chance_(k)
    for k = 8 .. n, chance_(k) the k-th smallest of the n matches' chances; and its k."""
    count = len(chance)
    if count <= SAMPLE_SIZE:
        return math.inf, 0
    sizes = np.arange(SAMPLE_SIZE + 1, count + 1)
    log_factorial = np.concatenate(([0.0], np.cumsum(np.log10(np.arange(1, count + 1)))))
    log_tests = math.log10(MODELS_PER_SAMPLE * (count - SAMPLE_SIZE))
    log_choose_n = log_factorial[count] - log_factorial[sizes] - log_factorial[count - sizes]
    log_choose_7 = log_factorial[sizes] - log_factorial[SAMPLE_SIZE] - log_factorial[sizes - SAMPLE_SIZE]
    smallest = np.sort(chance)[SAMPLE_SIZE:]
    with np.errstate(divide="ignore"):
        log_nfa = log_tests + log_choose_n + log_choose_7 + (sizes - SAMPLE_SIZE) * np.log10(smallest)
    best = int(np.argmin(log_nfa))
    return float(log_nfa[best]), int(sizes[best])
