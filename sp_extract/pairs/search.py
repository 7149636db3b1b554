"""Exact nearest-neighbour search by dot product, blockwise, on any device: a fast screening
pass in low precision whose error is bounded, then exact scores for the few candidates the bound
cannot rule out. The result is the exact ranking of the stored vectors, whatever the device.

**Exact scores.** The vectors are stored in float16, so every component is a multiple of
2^-24 and the product of two components a multiple of 2^-48, exact in float64 (22 significant
bits). Every partial sum of a dot product is then a multiple of 2^-48 of magnitude at most
sum |x_i y_i| <= |x| |y| (Cauchy-Schwarz); below 2^5 that fits float64's 53 bits, so float64
arithmetic adds them without any rounding, in whatever order: the float64 score is the exact
real dot product of the stored vectors (required: |x| |y| < 32; the vectors here are unit
vectors; vectors of a finer precision would get float64 scores, within about 1e-13). Equal
vectors get equal scores; ties are broken by the lower database index. That is the reference:
a plain float32 search rounds each score (about 1e-7 here) in an order that depends on the
BLAS and the block shapes, so its order of two candidates closer than that is arbitrary; this
search's is not.

**Screening.** Scores are first computed with both operands rounded to a low precision
(bfloat16 on CPUs with bfloat16 instructions, float16 on CUDA, float32 elsewhere) with float32
accumulation. Write x = x' + e_x, y = y' + e_y for the rounded vectors x', y' (e_x, e_y known
exactly: float32 subtraction of two floats within a factor 2 is exact). Then, for the screened
score s' (low-precision output of the float32 sum of the d products x'_i y'_i):

    x.y - x'.y' = x'.e_y + e_x.y' + e_x.e_y,  so  |x.y - x'.y'| <= |x'||e_y| + |e_x||y'| + |e_x||e_y|
    |acc - x'.y'| <= g_d |x'||y'|    float32 sum in any order, g_d = d u / (1 - d u),
                                      u = 2^-23 (twice float32's unit roundoff: also covers
                                      truncating accumulators such as tensor cores'; d
                                      roundings: the products of float32 operands included)
    |s' - acc| <= u' |s'|            output rounding, u' = v / (1 - v), v the low precision's
                                      unit roundoff (2^-8 bfloat16, 2^-11 float16, 0 float32)

With a_q = |x'||E| + |e_x||Y| + |e_x||E| + g_d |x'||Y| (|E|, |Y| the largest |e_y|, |y'| of the
database), the exact score lies in [lower(s'), upper(s')] = [s' - a_q - u'|s'|, s' + a_q +
u'|s'|], both increasing in s'. The k best screened candidates all have exact scores >=
lower(t_k) (t_k: the k-th best screened score), so the k-th best exact score is >= lower(t_k),
and a candidate can be among the k best only if upper(s') >= lower(t_k): about twice the bound
below t_k. Each query keeps its k + m best screened candidates; if the (k + m)-th still passes
that test (the bound not cleared: many near-equal scores, duplicates), the query is screened
again with m four times larger. The candidates that pass are scored exactly and the k best
taken. Memory: a block of queries, a block of database vectors and their block of screened
scores (a budget of 64 MiB, or a sixteenth of a CUDA device's free memory), never n x n; the
database, in the screening precision, stays on the device when it fits in four budgets.

**Approximate search** (``approximate_search``, for large collections: ``store/ann.py``): an
index proposes each query's k + m candidates, which are scored exactly and ranked as above (ties
to the lower index), so the result depends only on the index's proposals, not on its rounding.
The exact search is kept: faiss's exact ``IndexFlatIP`` (float32 products, their order of
near-equal scores the BLAS's) took 1.8 times as long at 10^5 vectors in the same quiet run, on a
CPU with bfloat16 (docs/performance.md "faiss: exact and approximate").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import StoreError

ACCUMULATION_UNIT = 2.0**-23  # float32 accumulation, rounding to nearest or truncating
OUTPUT_UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}
EXACT_NORM_PRODUCT = 32.0  # float64 scores of float16 vectors are exact below |x| |y| = 2^5
EXACT_ELEMENTS = 1 << 22  # float64 elements per chunk of exact re-scoring
FIRST_MARGIN = 48  # candidates kept beyond k in the first screening pass (at least k)

Reader = Callable[[np.ndarray], np.ndarray]  # positions (N,) -> vectors (N, D), float16 values
# query positions (Q,), width -> the database positions (Q, width) an approximate index proposes
Proposer = Callable[[np.ndarray, int], np.ndarray]


def screening_dtype(device: torch.device) -> torch.dtype:
    """The precision of the screening products: float16 on CUDA, bfloat16 on CPUs with
    bfloat16 instructions (AVX512-BF16, AMX), else float32 (no faster path)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            if getattr(cpu, check, lambda: False)():
                return torch.bfloat16
    return torch.float32


def exact_device(device: torch.device) -> torch.device:
    """Where exact float64 scores are computed: the device, or the CPU for MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


class _Rounded:
    """A block of vectors in the screening precision on the device and, with ``norms``, the
    norms (float64, CPU) of the vectors, of the rounded vectors and of their rounding errors."""

    def __init__(self, vectors: np.ndarray, dtype: torch.dtype, device: torch.device, norms: bool) -> None:
        stored = torch.from_numpy(np.ascontiguousarray(vectors))
        self.vectors = stored.to(dtype)
        if norms:  # float32 sums of squares: up to d + 2 roundings, made up for by ``slack``
            slack = 1 + (stored.shape[1] + 2) * 2.0**-23
            exact = stored.float()
            self.exact_norm = torch.linalg.vector_norm(exact, dim=1).double() * slack
            self.norm = torch.linalg.vector_norm(self.vectors, dim=1, dtype=torch.float32).double() * slack
            error = exact.sub_(self.vectors)  # exact: within a factor 2 of each other
            self.error_norm = torch.linalg.vector_norm(error, dim=1).double() * slack
        self.vectors = self.vectors.to(device)


class _Database:
    """The database vectors, block by block on the device (kept there if they fit), and the
    largest norms over it (known once a pass has visited every block)."""

    def __init__(self, read: Reader, count: int, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.read, self.count, self.rows, self.dtype, self.device = read, count, rows, dtype, device
        self.keep = False  # the blocks, once made, are kept on the device
        self.kept: dict[int, torch.Tensor] = {}
        self.norm = self.error_norm = self.exact_norm = 0.0
        self.measured = False  # the norms: after the first pass

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        for start in range(0, self.count, self.rows):
            end = min(self.count, start + self.rows)
            if start in self.kept:
                yield start, end, self.kept[start]
                continue
            block = _Rounded(self.read(np.arange(start, end)), self.dtype, self.device, not self.measured)
            if not self.measured:
                self.norm = max(self.norm, float(block.norm.max()))
                self.error_norm = max(self.error_norm, float(block.error_norm.max()))
                self.exact_norm = max(self.exact_norm, float(block.exact_norm.max()))
            if self.keep:
                self.kept[start] = block.vectors
            yield start, end, block.vectors
        self.measured = True


def merge_best(
    best_score: torch.Tensor, best_index: torch.Tensor, scores: torch.Tensor, columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running (Q, k) best scores and their indices updated with a block of ``scores``
    (Q, B) for the candidates ``columns`` (B,): the k largest of both, best first (the block's
    own k best are taken first, so no (Q, B) index tensor is made)."""
    width = best_score.shape[1]
    block_score, block_top = scores.topk(min(width, scores.shape[1]), dim=1)
    merged_score = torch.cat((best_score, block_score), 1)
    merged_index = torch.cat((best_index, columns[block_top]), 1)
    best_score, top = merged_score.topk(width, dim=1)
    return best_score, merged_index.gather(1, top)


def memory_budget(device: torch.device, block_bytes: int) -> int:
    """Bytes of a block of the search: ``block_bytes``, or on CUDA a sixteenth of the free
    memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 16
    return block_bytes


def block_rows(dimension: int, budget: int) -> int:
    """Rows of a block: ``budget`` bytes of float32 vectors, and the (rows, rows) float32 block
    of scores within it too."""
    return max(1, min(budget // (4 * dimension), math.isqrt(budget // 4)))


@dataclass(frozen=True)
class VectorSet:
    """The queries or the database of a search: ``read`` returns the vectors at the given
    positions (float16 values, any float dtype) of the ``count``; ``groups``: a label (N,) for
    each, or None."""

    read: Reader
    count: int
    groups: np.ndarray | None = None


def _empty_result(queries: VectorSet, database: VectorSet, k: int) -> tuple[int, np.ndarray, np.ndarray]:
    """k' = min(k, database.count) and the (Q, k') result arrays, filled with -1 and -inf."""
    width = min(k, database.count)
    return (
        width,
        np.full((queries.count, width), -1, np.int64),
        np.full((queries.count, width), -np.inf, np.float32),
    )


def exact_search(
    queries: VectorSet,
    database: VectorSet,
    k: int,
    device: torch.device | str = "cpu",
    block_bytes: int = 64 << 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` largest dot products with the database, exactly (module doc).

    With groups on both sides, a database vector of the query's own group (a label >= 0) is
    never a candidate. Returns database indices (Q, k') and scores (Q, k') float32 (the exact
    score rounded), best first, ties to the lower index, k' = min(k, database.count); -1 and
    -inf fill a row that has fewer candidates.
    """
    device = torch.device(device)
    width, found_index, found_score = _empty_result(queries, database, k)
    if width == 0 or queries.count == 0:
        return found_index, found_score
    dtype = screening_dtype(device)
    dimension = database.read(np.arange(1)).shape[1]
    budget = memory_budget(device, block_bytes)
    rows = block_rows(dimension, budget)
    screened = _Database(database.read, database.count, rows, dtype, device)
    screened.keep = database.count * dimension * dtype.itemsize <= 4 * budget  # kept on the device
    groups = None
    if queries.groups is not None and database.groups is not None:
        groups = torch.as_tensor(database.groups, device=device)
    reduced = _reduced_precision_reduction(device, False)
    try:
        pending, margin = np.arange(queries.count), max(FIRST_MARGIN, width)
        while len(pending):
            kept = min(database.count, width + margin)
            retry = []
            for start in range(0, len(pending), rows):
                positions = pending[start : start + rows]
                query = _Rounded(queries.read(positions), dtype, device, True)
                own = None if groups is None else _own_groups(queries.groups[positions], groups)
                score, index = _screen(query.vectors, screened, kept, own, groups)
                done = _select(query, screened, score.double().cpu(), index.cpu(), width, dimension)
                if done is None:
                    raise StoreError(_NOT_EXACT.format(screened.exact_norm * query.exact_norm.max()))
                cleared, candidates = done
                retry.append(positions[~cleared])
                if cleared.any():
                    found = positions[cleared]
                    best, best_score = _exact_best(
                        queries.read, database.read, found, candidates[cleared], width, dimension, device
                    )
                    found_index[found], found_score[found] = best, best_score
            pending, margin = np.concatenate(retry), 4 * margin
    finally:
        _reduced_precision_reduction(device, reduced)
    return found_index, found_score


def approximate_search(
    queries: VectorSet,
    database: VectorSet,
    k: int,
    propose: Proposer,
    device: torch.device | str = "cpu",
    block_bytes: int = 64 << 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best among the first k + ``FIRST_MARGIN`` candidates ``propose``
    gives (best first; -1: none) outside its own group, by exact scores, best first, ties to
    the lower index; as ``exact_search`` otherwise (groups, returns). A query whose own group
    takes so many of its candidates that fewer than k remain is proposed 4 times as many, until
    the proposer has no more (the proposals of a block of queries: within ``block_bytes``)."""
    device = torch.device(device)
    width, found_index, found_score = _empty_result(queries, database, k)
    if width == 0 or queries.count == 0:
        return found_index, found_score
    dimension = database.read(np.arange(1)).shape[1]
    rows = block_rows(dimension, block_bytes)
    grouped = queries.groups is not None and database.groups is not None
    pending, wanted = np.arange(queries.count), width + FIRST_MARGIN
    while len(pending):
        asked, retry = min(wanted, database.count), []
        rows_here = max(1, min(rows, block_bytes // (12 * asked)))  # proposals: int64 + float32
        for start in range(0, len(pending), rows_here):
            positions = pending[start : start + rows_here]
            proposed = propose(positions, asked)
            more = (proposed[:, -1] >= 0) & (asked < database.count)  # the proposer may have more
            if grouped:
                own = queries.groups[positions][:, None]
                proposed[(own >= 0) & (own == database.groups[np.maximum(proposed, 0)])] = -1
            short = ((proposed >= 0).sum(1) < width) & more
            retry.append(positions[short])
            first = np.argsort(proposed < 0, axis=1, kind="stable")[:, : width + FIRST_MARGIN]
            candidates = np.take_along_axis(proposed, first, 1)[~short]  # the first proposed
            found = positions[~short]
            best, best_score = _exact_best(
                queries.read, database.read, found, candidates, width, dimension, device
            )
            found_index[found], found_score[found] = best, best_score
        pending, wanted = np.concatenate(retry), 4 * wanted
    return found_index, found_score


_NOT_EXACT = "retrieval vectors with norms whose product reaches {:.3g}: expected unit vectors"


def _reduced_precision_reduction(device: torch.device, allowed: bool) -> bool:
    """Set whether CUDA float16 products may be summed in float16 (the bound needs float32);
    returns the previous setting."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_fp16_reduced_precision_reduction
    if device.type == "cuda":
        matmul.allow_fp16_reduced_precision_reduction = allowed
    return previous


def _own_groups(labels: np.ndarray, groups: torch.Tensor) -> torch.Tensor:
    """The queries' group labels on the device, a label < 0 (no group) replaced by one no
    database vector has."""
    none = int(groups.min()) - 1 if len(groups) else -1
    return torch.as_tensor(np.where(labels >= 0, labels, none), device=groups.device)


def _screen(
    query: torch.Tensor, database: _Database, kept: int, own: torch.Tensor | None, groups: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kept`` best screened scores of a block of queries and their database indices."""
    best_score = torch.full((len(query), kept), -torch.inf, dtype=query.dtype, device=query.device)
    best_index = torch.full((len(query), kept), -1, dtype=torch.int64, device=query.device)
    for start, end, block in database.blocks():
        scores = query @ block.T
        if own is not None and groups is not None:
            scores.masked_fill_(own[:, None] == groups[None, start:end], -torch.inf)
        columns = torch.arange(start, end, device=query.device)
        best_score, best_index = merge_best(best_score, best_index, scores, columns)
    return best_score, best_index


def _select(
    query: _Rounded, database: _Database, score: torch.Tensor, index: torch.Tensor, width: int, dimension: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Which queries the bound clears, and each query's candidates (database indices, -1 for
    none) that may be among its ``width`` best; None if the scores cannot be exact."""
    if database.exact_norm * float(query.exact_norm.max()) >= EXACT_NORM_PRODUCT:
        return None
    unit = OUTPUT_UNIT[database.dtype]
    output = unit / (1 - unit)
    accumulation = dimension * ACCUMULATION_UNIT / (1 - dimension * ACCUMULATION_UNIT)
    bound = (
        query.norm * database.error_norm
        + query.error_norm * database.norm
        + query.error_norm * database.error_norm
        + accumulation * query.norm * database.norm
    ) * (1 + 2.0**-20)  # the bound's own float64 rounding
    finite = torch.isfinite(score)
    margin = bound[:, None] + output * torch.where(finite, score, 0).abs()
    lowest = (score - margin)[:, width - 1 : width]  # -inf: fewer than ``width`` candidates
    passes = finite & (score + margin >= lowest)
    last = score[:, -1]
    cleared = ~passes[:, -1] | torch.isinf(last) | (score.shape[1] == database.count)
    candidates = torch.where(passes, index, -1)
    return cleared.numpy(), candidates.numpy()


def _float64(vectors: np.ndarray, device: torch.device) -> torch.Tensor:
    """``vectors`` in float64 on ``device``."""
    return torch.from_numpy(np.asarray(vectors, np.float64)).to(device)


def _row_blocks(counts: np.ndarray, capacity: int) -> Iterator[tuple[int, int, int]]:
    """Consecutive rows (start, end) and their largest count, rows x count <= ``capacity``
    (at least one row a block)."""
    start = 0
    while start < len(counts):
        end, width = start + 1, max(1, int(counts[start]))
        while end < len(counts) and (end - start + 1) * max(width, counts[end]) <= capacity:
            width = max(width, int(counts[end]))
            end += 1
        yield start, end, width
        start = end


def _exact_best(
    read_queries: Reader,
    read_database: Reader,
    queries: np.ndarray,
    candidates: np.ndarray,
    width: int,
    dimension: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``width`` best of each query's candidates (-1: none) by exact float64 scores, ties to
    the lower index; returns indices and float32 scores."""
    device = exact_device(device)
    exact = torch.full(candidates.shape, -torch.inf, dtype=torch.float64)
    counts = (candidates >= 0).sum(1)  # each row's candidates come first (``_select``)
    for start, end, width_here in _row_blocks(counts, EXACT_ELEMENTS // dimension):
        block = candidates[start:end, :width_here]
        query = _float64(read_queries(queries[start:end]), device)
        found = _float64(read_database(np.maximum(block, 0).ravel()), device)  # -1: row 0, unused
        scores = torch.bmm(found.view(*block.shape, dimension), query[:, :, None])[:, :, 0]
        exact[start:end, :width_here] = torch.where(torch.from_numpy(block >= 0), scores.cpu(), -torch.inf)
    index = torch.from_numpy(np.where(candidates >= 0, candidates, np.iinfo(np.int64).max))
    by_index = index.argsort(dim=1, stable=True)  # ties: the lower index first
    exact, index = exact.gather(1, by_index), index.gather(1, by_index)
    order = exact.argsort(dim=1, descending=True, stable=True)[:, :width]
    best_score, best = exact.gather(1, order), index.gather(1, order)
    best[torch.isinf(best_score)] = -1
    return best.numpy(), best_score.float().numpy()
