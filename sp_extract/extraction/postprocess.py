"""Stage 5, post-process: turn the network's dense maps into keypoints and descriptors.

Faithful to the reference SuperPoint (Magic Leap's demo, hloc, LightGlue, transformers):
max-pool non-maximum suppression with two suppression rounds, border removal, threshold,
top-k by score, bilinear descriptor sampling with the ``align_corners=True`` / s/2-offset
convention, L2 normalisation. Works on a batch of same-size maps on any device.

A huge image run tile by tile (``tiling``) is post-processed tile by tile instead, so its dense
maps never exist whole: ``tile_candidates`` finds a tile's keypoints with their descriptors from
the tile's network window alone, and ``select_candidates`` makes the image's features of them,
the same as ``postprocess`` of the whole maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .config import ExtractConfig
from .model import STRIDE
from .refine import DEFAULT_METHOD, keypoint_offsets, refine_keypoints

NMS_BAND_ROWS = 512  # rows of the score map suppressed at once on the CPU (bounded memory)


@dataclass
class Candidates:
    """Keypoints of one image found tile by tile, before the image-wide mask and top-k: integer
    pixels (N, 2; x, y, long), keypoints (N, 2; refined when sub-pixel), scores (N,) and
    descriptors (N, D), in tile order; ``width`` of the image's score map (for row-major order)."""

    pixels: torch.Tensor
    keypoints: torch.Tensor
    scores: torch.Tensor
    descriptors: torch.Tensor
    width: int

    def cpu(self) -> Candidates:
        """These candidates with their tensors on the CPU."""
        tensors = (self.pixels, self.keypoints, self.scores, self.descriptors)
        return Candidates(*(tensor.cpu() for tensor in tensors), self.width)


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
    keypoints: list[torch.Tensor],
    dense: torch.Tensor,
    stride: int = STRIDE,
    cells: tuple[int, int] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> list[torch.Tensor]:
    """Bilinearly sample (B, C, h, w) descriptor maps at each image's keypoints; L2-normalise.

    Keypoints are in pixels of the network input. Returns one (N, C) tensor per image. ``dense``
    may be a window of the image's map: ``cells`` (h, w) of the whole map, ``origin`` (row,
    column) the window's first cell; keypoints are sampled where the whole map's rule puts them.
    """
    batch, channels, height, width = dense.shape
    full_height, full_width = cells or (height, width)
    longest = max((len(k) for k in keypoints), default=0)
    grid = dense.new_zeros(batch, 1, max(longest, 1), 2)
    divisor = dense.new_tensor(
        [full_width * stride - stride / 2 - 0.5, full_height * stride - stride / 2 - 0.5]
    )
    for i, k in enumerate(keypoints):
        grid[i, 0, : len(k)] = (k - stride / 2 + 0.5) / divisor * 2 - 1
    if cells is not None:  # whole map's grid -> its cells -> the window's grid
        full = dense.new_tensor([full_width - 1, full_height - 1])
        local = dense.new_tensor([max(width - 1, 1), max(height - 1, 1)])
        offset = dense.new_tensor([origin[1], origin[0]])
        grid = ((grid + 1) / 2 * full - offset) / local * 2 - 1
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
    subpixel: bool | str = False,
    allowed: torch.Tensor | None = None,
) -> list[Features]:
    """Dense maps of one batch -> per-image ``Features`` in network-input pixels.

    ``subpixel`` (True, or the name of a ``refine`` method; True is ``DEFAULT_METHOD``) moves each
    kept keypoint to its sub-pixel peak (``refine.refine_keypoints``) before the descriptors are
    sampled; scores stay those of the detected pixels.
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
        keypoints = refine_keypoints(dense, keypoints, DEFAULT_METHOD if subpixel is True else subpixel)
    sampled = sample_descriptors(keypoints, descriptors)
    return [Features(xy, s, d) for xy, (_, s), d in zip(keypoints, selected, sampled)]


def tile_candidates(
    scores: torch.Tensor,
    descriptors: torch.Tensor,
    window: tuple[int, int],
    tile: tuple[int, int, int, int],
    size: tuple[int, int],
    config: ExtractConfig,
) -> list[Candidates]:
    """The keypoints of one tile of each image of a batch, from its network window's outputs.

    ``scores`` (B, h, w) and ``descriptors`` (B, C, h/8, w/8) are the window's; ``window`` its
    (top, left) in the image, ``tile`` the tile's (top, bottom, left, right) and ``size`` the
    (height, width) of the image's whole score map. The window's outputs must equal the whole
    image's within ``tile_halo`` pixels of the tile (``tiling`` makes sure): non-maximum
    suppression then reads the same scores, and the descriptor cells beside the tile are there.
    Border removal and the threshold apply in image coordinates, as ``postprocess`` does; the
    mask and the top-k wait for ``select_candidates``, which sees the whole image's candidates.
    """
    (y0, x0), (top, bottom, left, right) = window, tile
    halo = 6 * config.nms_radius  # what the suppression of a pixel depends on (nms_opencv_bands)
    a0, b0 = max(0, top - y0 - halo), max(0, left - x0 - halo)
    a1, b1 = min(scores.shape[1], bottom - y0 + halo), min(scores.shape[2], right - x0 + halo)
    around = scores[:, a0:a1, b0:b1]
    inside = (slice(None), slice(top - y0 - a0, bottom - y0 - a0), slice(left - x0 - b0, right - x0 - b0))
    kept = nms(around, config.nms_radius)[inside]
    rows, columns = torch.arange(top, bottom), torch.arange(left, right)
    border = config.border
    outside = ~(
        ((rows >= border) & (rows < size[0] - border))[:, None]
        & ((columns >= border) & (columns < size[1] - border))[None]
    )
    kept = kept.masked_fill(outside.to(kept.device), -1)
    found = []
    for image, (xy, values) in enumerate(select_keypoints(kept, config.threshold, -1)):
        pixels = xy.long() + xy.new_tensor([left, top]).long()
        keypoints = pixels.to(scores.dtype)
        if config.subpixel:
            local = xy + xy.new_tensor([left - x0 - b0, top - y0 - a0])
            keypoints = keypoints + keypoint_offsets(around[image : image + 1], [local])[0]
        (sampled,) = sample_descriptors(
            [keypoints],
            descriptors[image : image + 1],
            cells=(size[0] // STRIDE, size[1] // STRIDE),
            origin=(y0 // STRIDE, x0 // STRIDE),
        )
        found.append(Candidates(pixels, keypoints, values, sampled, size[1]))
    return found


def select_candidates(
    parts: list[Candidates], max_keypoints: int, allowed: torch.Tensor | None = None
) -> Features:
    """One image's ``Features`` from its tiles' candidates: those on allowed pixels (``allowed``
    (H, W) bool, None: all) in row-major order, then the top ``max_keypoints`` as ``postprocess``
    selects them."""
    pixels, keypoints, scores, descriptors = (
        torch.cat([getattr(part, name) for part in parts])
        for name in ("pixels", "keypoints", "scores", "descriptors")
    )
    order = torch.argsort(pixels[:, 1] * parts[0].width + pixels[:, 0])
    if allowed is not None:
        order = order[allowed.to(pixels.device)[pixels[order, 1], pixels[order, 0]]]
    if 0 <= max_keypoints < len(order):
        _, best = torch.topk(scores[order], max_keypoints, sorted=True)
        order = order[best]
    return Features(keypoints[order], scores[order], descriptors[order])


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
