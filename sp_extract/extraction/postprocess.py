"""Stage 5, post-process: turn the network's dense maps into keypoints and descriptors.

Faithful to the reference SuperPoint (Magic Leap's demo, hloc, LightGlue, transformers):
max-pool non-maximum suppression with two suppression rounds, border removal, threshold,
top-k by score, bilinear descriptor sampling with the ``align_corners=True`` / s/2-offset
convention, L2 normalisation. Works on a batch of same-size maps on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .model import STRIDE
from .refine import DEFAULT_METHOD, refine_keypoints

NMS_BAND_ROWS = 512  # rows of the score map suppressed at once on the CPU (bounded memory)


@dataclass
class Features:
    """Keypoints (N, 2; x, y), scores (N,) and descriptors (N, D) of one image."""

    keypoints: torch.Tensor
    scores: torch.Tensor
    descriptors: torch.Tensor


def nms(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """Zero every score (>= 0) of (B, H, W) maps that is not a local maximum in a (2r+1)^2
    window, with the reference's two suppression rounds. On the CPU it runs on OpenCV
    (``nms_opencv``, some 5x faster than PyTorch on one thread), elsewhere in PyTorch."""
    if radius == 0:
        return scores
    if scores.device.type != "cpu":
        return nms_torch(scores, radius)
    maps = np.ascontiguousarray(scores.float().numpy())
    kept = np.empty_like(maps)
    for image, out in zip(maps, kept):
        nms_opencv_bands(image, radius, out)
    return torch.from_numpy(kept)


def nms_torch(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """``nms`` by max-pools (the reference's ``simple_nms``), on any device."""

    def max_filter(maps: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(maps, kernel_size=2 * radius + 1, stride=1, padding=radius)

    # scores are >= 0, so multiplying by a mask zeroes like torch.where, at a fraction of its cost
    is_max = scores == max_filter(scores)
    for _ in range(2):
        kept = max_filter(is_max.float()) == 0
        remaining = scores * kept
        is_max = is_max | ((remaining == max_filter(remaining)) & kept)
    return scores * is_max


def nms_opencv(scores: np.ndarray, radius: int) -> np.ndarray:
    """``nms`` of one (H, W) float32 map: OpenCV dilations (a max filter whose border never wins,
    as a max-pool's padding) of the map and of 0/255 masks."""
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    is_max = cv2.compare(scores, cv2.dilate(scores, kernel), cv2.CMP_EQ)
    for _ in range(2):
        suppressed = cv2.dilate(is_max, kernel)
        remaining = scores * (suppressed == 0)
        found = cv2.compare(remaining, cv2.dilate(remaining, kernel), cv2.CMP_EQ)
        is_max |= found & ~suppressed
    return scores * (is_max > 0)


def nms_opencv_bands(scores: np.ndarray, radius: int, out: np.ndarray, band: int = NMS_BAND_ROWS) -> None:
    """``nms_opencv`` of a (H, W) map into ``out``, in bands of ``band`` rows, so that its
    temporaries stay small on huge maps. The suppression of a pixel depends on the map within
    5 radii of it (three dilations a round, two rounds), so each band is computed with 6 radii
    of the map around it and the result is the same as in one piece."""
    height = scores.shape[0]
    pad = 6 * radius
    for top in range(0, height, band):
        bottom = min(height, top + band)
        start, stop = max(0, top - pad), min(height, bottom + pad)
        out[top:bottom] = nms_opencv(scores[start:stop], radius)[top - start : bottom - start]


def remove_borders(scores: torch.Tensor, border: int) -> torch.Tensor:
    """Set the scores within ``border`` pixels of the map's edges to -1."""
    if border == 0:
        return scores
    scores = scores.clone()
    scores[..., :border, :] = -1
    scores[..., -border:, :] = -1
    scores[..., :, :border] = -1
    scores[..., :, -border:] = -1
    return scores


def select_keypoints(
    scores: torch.Tensor, threshold: float, max_keypoints: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image of a (B, H, W) map: pixels above ``threshold``, then the top ``max_keypoints``.

    Returns (keypoints (N, 2) float as x, y; scores (N,)) per image. Keypoints are in row-major
    order unless top-k applied, in which case they are sorted by decreasing score.
    """
    batch = scores.shape[0]
    index = torch.nonzero(scores > threshold)
    values = scores[index[:, 0], index[:, 1], index[:, 2]]
    counts = torch.bincount(index[:, 0], minlength=batch).tolist()
    result = []
    for positions, kept in zip(index.split(counts), values.split(counts)):
        xy = positions[:, 1:].flip(1).to(scores.dtype)
        if 0 <= max_keypoints < len(kept):
            kept, order = torch.topk(kept, max_keypoints, sorted=True)
            xy = xy[order]
        result.append((xy, kept))
    return result


def sample_descriptors(
    keypoints: list[torch.Tensor], dense: torch.Tensor, stride: int = STRIDE
) -> list[torch.Tensor]:
    """Bilinearly sample (B, C, h, w) descriptor maps at each image's keypoints; L2-normalise.

    Keypoints are in pixels of the network input. Returns one (N, C) tensor per image.
    """
    batch, channels, height, width = dense.shape
    longest = max((len(k) for k in keypoints), default=0)
    grid = dense.new_zeros(batch, 1, max(longest, 1), 2)
    divisor = dense.new_tensor([width * stride - stride / 2 - 0.5, height * stride - stride / 2 - 0.5])
    for i, k in enumerate(keypoints):
        grid[i, 0, : len(k)] = (k - stride / 2 + 0.5) / divisor * 2 - 1
    sampled = F.grid_sample(dense, grid, mode="bilinear", align_corners=True)
    sampled = F.normalize(sampled[:, :, 0], p=2, dim=1)  # (B, C, N)
    return [sampled[i, :, : len(k)].t() for i, k in enumerate(keypoints)]


def postprocess(
    scores: torch.Tensor,
    descriptors: torch.Tensor,
    threshold: float,
    nms_radius: int,
    border: int,
    max_keypoints: int,
    subpixel: bool = False,
    allowed: torch.Tensor | None = None,
    refine_method: str = DEFAULT_METHOD,
) -> list[Features]:
    """Dense maps of one batch -> per-image ``Features`` in network-input pixels.

    ``subpixel`` moves each kept keypoint to its sub-pixel peak (``refine.refine_keypoints`` with
    ``refine_method``) before the descriptors are sampled; scores stay those of the detected pixels.
    ``allowed`` (B, H, W) bool, at least the score maps' size: keypoints detected where it is False
    (masked pixels) are removed before the top-k, so ``max_keypoints`` keeps the best allowed ones.
    """
    dense = scores
    scores = remove_borders(nms(scores, nms_radius), border)
    if allowed is not None:
        height, width = scores.shape[-2:]
        scores = scores.masked_fill(~allowed[:, :height, :width].to(scores.device), -1)
    selected = select_keypoints(scores, threshold, max_keypoints)
    keypoints = [xy for xy, _ in selected]
    if subpixel:
        keypoints = refine_keypoints(dense, keypoints, refine_method)
    sampled = sample_descriptors(keypoints, descriptors)
    return [Features(xy, s, d) for xy, (_, s), d in zip(keypoints, selected, sampled)]


def to_original_frame(
    keypoints: np.ndarray, working_size: tuple[int, int], original_size: tuple[int, int]
) -> np.ndarray:
    """Map (N, 2) keypoints from the resized image to the original with hloc's rule.

    ``(k + 0.5) * scale - 0.5`` per axis, then clipped into [0, size - 1] so every keypoint
    lies inside the original image.
    """
    scale = np.asarray(original_size, np.float32) / np.asarray(working_size, np.float32)
    mapped = (keypoints.astype(np.float32) + 0.5) * scale[None] - 0.5
    upper = np.asarray(original_size, np.float32) - 1
    return np.clip(mapped, 0, upper[None]).astype(np.float32)
