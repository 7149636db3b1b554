"""Nearest-neighbour matching of descriptor sets, batched and blockwise (hloc's ``NN-mutual``,
``NN-ratio`` and ``NN-superpoint``): mutual check, Lowe's ratio, distance threshold."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import MatchConfig

MAX_BATCH_ELEMENTS = 1 << 27  # distance-matrix entries per batch (512 MiB in float32)
CPU_WORK_ELEMENTS = 1 << 20  # on the CPU, per batch and per block of rows: 4 MiB, the L2 caches


def _augmented(descriptors: Sequence[torch.Tensor], length: int, second: bool) -> tuple[torch.Tensor, ...]:
    """The (N_i, D) descriptors padded to (B, length, D + 2) float32 rows whose products are
    squared L2 distances, |x|^2 + |y|^2 - 2 x.y = [x, |x|^2, 1] . [-2 y, 1, |y|^2] (image 0's
    rows on the left, ``second`` image 1's on the right), and the (B, length) padding mask.
    Padding rows have an infinite norm, so every distance to them is infinite."""
    first = descriptors[0]
    dim = first.shape[1]
    out = first.new_zeros((len(descriptors), length, dim + 2), dtype=torch.float32)
    for row, d in zip(out, descriptors):
        row[: len(d), :dim] = d
    sizes = torch.tensor([len(d) for d in descriptors], device=first.device)
    padding = torch.arange(length, device=first.device)[None] >= sizes[:, None]
    norms = out[..., :dim].square().sum(-1).masked_fill_(padding, float("inf"))
    out[..., dim + second] = norms
    out[..., dim + (not second)] = 1.0
    if second:
        out[..., :dim] *= -2.0
    return out, padding


def _smallest(values: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The ``k`` smallest entries along ``dim`` (fewer if ``dim`` is shorter), kept as a dim of
    that size; ``amin`` for ``k`` = 1, much faster than ``topk`` or ``min``, which find indices."""
    if k == 1:
        return values.amin(dim, keepdim=True)
    return values.topk(min(k, values.shape[dim]), dim=dim, largest=False).values


def nearest_neighbours(
    descriptors0: Sequence[torch.Tensor],
    descriptors1: Sequence[torch.Tensor],
    config: MatchConfig,
    work_elements: int = MAX_BATCH_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match B pairs at once: ``descriptors0[i]`` (N0_i, D) against ``descriptors1[i]`` (N1_i, D).

    Distances are exact L2 distances computed in float32, in one matrix product with the norms
    (``_augmented``); descriptors are padded to the batch maximum and the padding masked. A
    keypoint of image 0 matches its nearest neighbour in image 1 if that passes Lowe's ratio
    (skipped, as in hloc, for a pair where an image has fewer than two keypoints), the distance
    threshold and, with ``mutual``, is matched back the same way (the mutual check compares
    distances, so exact ties in a column keep every tied keypoint). The distance matrix is made
    in blocks of rows of at most ``work_elements`` entries, each reduced (row minima, running
    column minima) while it is in the cache, so it is never held whole.
    Returns ``matches0`` (B, M) int64, -1 for none, and ``scores0`` (B, M) float32, 0 for none,
    where score = 1 - d^2 / 4 (hloc's (1 + cosine) / 2 for unit descriptors); row i is valid up
    to N0_i.
    """
    length0 = max(2, *(len(d) for d in descriptors0))
    length1 = max(2, *(len(d) for d in descriptors1))
    left, padding0 = _augmented(descriptors0, length0, second=False)
    right, padding1 = _augmented(descriptors1, length1, second=True)
    right = right.transpose(1, 2)
    ratio = config.ratio
    k = 1 if ratio is None else 2  # the ratio test needs the two nearest
    rows = max(1, work_elements // (len(left) * length1))
    row_values, row_indices, column = [], [], None
    for start in range(0, length0, rows):
        distances = torch.bmm(left[:, start : start + rows], right)  # squared, may round below 0
        values, indices = distances.min(2, keepdim=True) if k == 1 else distances.topk(k, 2, largest=False)
        row_values.append(values)
        row_indices.append(indices[..., 0])
        if config.mutual:  # the k smallest of each column so far
            smallest = _smallest(distances, k, 1)
            column = smallest if column is None else _smallest(torch.cat((column, smallest), 1), k, 1)
    # clamping to 0 commutes with taking minima, so it is done on the minima only
    values, matches = torch.cat(row_values, 1).clamp_(min=0.0), torch.cat(row_indices, 1)
    best = values[..., 0]
    counts0 = (~padding0).sum(1)
    counts1 = (~padding1).sum(1)
    ratio_on = ((counts0 >= 2) & (counts1 >= 2))[:, None]
    ok = torch.isfinite(best)
    if ratio is not None:
        ok &= ~ratio_on | (best <= ratio**2 * values[..., 1])
    if config.max_distance is not None:
        ok &= best <= config.max_distance**2
    if column is not None:  # the match is also the smallest of its column (and passes the ratio there)
        column = column.clamp_(min=0.0).gather(2, matches[:, None, :].expand(-1, column.shape[1], -1))
        ok &= best <= column[:, 0]
        if ratio is not None:
            ok &= ~ratio_on | (column[:, 0] <= ratio**2 * column[:, 1])
    scores = torch.where(ok, (1.0 - best / 4.0).clamp(0.0, 1.0), torch.zeros_like(best))
    return torch.where(ok, matches, torch.full_like(matches, -1)), scores
