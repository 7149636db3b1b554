"""What the learned matchers (SuperGlue, LightGlue) share: pairs padded into batches and the
mutual-best selection of matches from a log assignment matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PaddedFeatures:
    """One image of each pair of a batch, padded to the longest: keypoints (B, N, 2) in pixels,
    detection scores (B, N), descriptors (B, N, D), image size (B, 2) as (width, height), and
    ``mask`` (B, N), True for real keypoints."""

    keypoints: torch.Tensor
    scores: torch.Tensor
    descriptors: torch.Tensor
    image_size: torch.Tensor
    mask: torch.Tensor
    padded: bool = True

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """``mask``, or None when nothing is padded (attention may then use its fastest kernels)."""
        return self.mask if self.padded else None

    @classmethod
    def pad(
        cls,
        keypoints: Sequence[torch.Tensor],
        scores: Sequence[torch.Tensor],
        descriptors: Sequence[torch.Tensor],
        image_sizes: Sequence[torch.Tensor],
    ) -> PaddedFeatures:
        """Stack per-image tensors (N_i, 2), (N_i,), (N_i, D) and (2,) into a padded batch (float32)."""
        length = max(len(k) for k in keypoints)
        device = descriptors[0].device
        mask = torch.zeros((len(keypoints), length), dtype=torch.bool, device=device)
        for row, k in zip(mask, keypoints):
            row[: len(k)] = True

        def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
            out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]), dtype=torch.float32)
            for row, t in zip(out, tensors):
                row[: len(t)] = t
            return out

        sizes = torch.stack([s.to(device=device, dtype=torch.float32) for s in image_sizes])
        padded = any(len(k) < length for k in keypoints)
        return cls(stack(keypoints), stack(scores), stack(descriptors), sizes, mask, padded)


def mutual_matches(
    log_assignment: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints of image 0 and 1 that are each other's best in ``log_assignment`` (B, M, N)
    with a probability above ``threshold``: ``matches0`` (B, M), -1 for none, and the
    probabilities, 0 for none. Padded rows and columns never match."""
    best0, best1 = log_assignment.max(2), log_assignment.max(1)
    indices0 = best0.indices
    rows = torch.arange(indices0.shape[1], device=indices0.device)[None]
    mutual = rows == best1.indices.gather(1, indices0)
    scores = best0.values.exp()
    valid = mutual & (scores > threshold) & mask0 & mask1.gather(1, indices0)
    return torch.where(valid, indices0, -1), torch.where(valid, scores, torch.zeros_like(scores))


def match_batch(
    model: torch.nn.Module,
    images0: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    images1: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match B pairs with a learned ``model``; each image is (keypoints (N, 2), scores (N,),
    descriptors (N, D), image size (2,)). Returns ``matches0`` (B, M), -1 for none, and their
    scores, 0 for none, M the largest N0 (at least 1); a pair with an image without keypoints
    has no matches."""
    length = max(1, *(len(image[0]) for image in images0))
    device = images0[0][2].device
    matches = torch.full((len(images0), length), -1, dtype=torch.long, device=device)
    scores = torch.zeros((len(images0), length), device=device)
    rows = [row for row, (a, b) in enumerate(zip(images0, images1)) if len(a[0]) and len(b[0])]
    if rows:
        padded = [PaddedFeatures.pad(*zip(*(images[row] for row in rows))) for images in (images0, images1)]
        with torch.inference_mode():
            found, probability = model(*padded)
        index = torch.tensor(rows, device=device)
        matches[index, : found.shape[1]] = found
        scores[index, : found.shape[1]] = probability
    return matches, scores
