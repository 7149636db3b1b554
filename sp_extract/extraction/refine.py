"""Sub-pixel keypoint refinement (``--subpixel``), a post-processing step.

SuperPoint's keypoints are pixels of the dense score map: the reference post-processing keeps
the integer position of each local maximum. ``refine_keypoints`` moves every kept keypoint to
the vertex of a quadratic fitted to the logarithm of the scores in its 3x3 neighbourhood (one
Newton step, as SIFT localises its extrema). The logarithm makes the fit exact for a Gaussian
peak. Offsets are clamped to half a pixel per axis, so a keypoint never leaves its pixel; a
neighbourhood that is not a proper maximum (flat, saddle) keeps the integer position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_OFFSET = 0.5  # pixels, per axis
_LOG_FLOOR = 1e-12  # scores are softmax probabilities, > 0 but they can underflow


def quadratic_offsets(patches: torch.Tensor) -> torch.Tensor:
    """Vertex offsets (N, 2; x, y) of quadratics fitted to (N, 3, 3) patches of log-scores.

    Central differences give the gradient g and Hessian H at the centre; the offset is the
    Newton step -H^-1 g, clamped to ``MAX_OFFSET`` per axis, and zero where H is not negative
    definite (the centre is no proper maximum).
    """
    centre = patches[:, 1, 1]
    gx = (patches[:, 1, 2] - patches[:, 1, 0]) / 2
    gy = (patches[:, 2, 1] - patches[:, 0, 1]) / 2
    dxx = patches[:, 1, 2] + patches[:, 1, 0] - 2 * centre
    dyy = patches[:, 2, 1] + patches[:, 0, 1] - 2 * centre
    dxy = (patches[:, 2, 2] - patches[:, 0, 2] - patches[:, 2, 0] + patches[:, 0, 0]) / 4
    determinant = dxx * dyy - dxy * dxy
    is_maximum = (dxx < 0) & (determinant > 0)
    safe = torch.where(is_maximum, determinant, torch.ones_like(determinant))
    # H^-1 = [[dyy, -dxy], [-dxy, dxx]] / det
    offset = torch.stack([dyy * gx - dxy * gy, dxx * gy - dxy * gx], dim=-1) / -safe[:, None]
    offset = offset.clamp(-MAX_OFFSET, MAX_OFFSET)
    return torch.where(is_maximum[:, None], offset, torch.zeros_like(offset))


def soft_argmax_offsets(patches: torch.Tensor) -> torch.Tensor:
    """Score-weighted mean offsets (N, 2; x, y) of (N, K, K) patches of scores, K odd, after
    subtracting each patch's minimum (so the flat background does not pull to the centre)."""
    size = patches.shape[-1]
    steps = torch.arange(size, device=patches.device, dtype=patches.dtype) - size // 2
    weights = patches - patches.amin(dim=(1, 2), keepdim=True)
    total = weights.sum(dim=(1, 2)).clamp_min(_LOG_FLOOR)
    x = (weights * steps[None, None, :]).sum(dim=(1, 2)) / total
    y = (weights * steps[None, :, None]).sum(dim=(1, 2)) / total
    return torch.stack([x, y], dim=-1).clamp(-MAX_OFFSET, MAX_OFFSET)


def _patches(maps: torch.Tensor, keypoints: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """(N, size, size) patches of (B, H, W) maps centred on each image's integer keypoints; the
    map's edges are repeated outwards."""
    half = size // 2
    padded = F.pad(maps[:, None], (half, half, half, half), mode="replicate")[:, 0]
    steps = torch.arange(size, device=maps.device)
    found = []
    for image, xy in enumerate(keypoints):
        x, y = xy[:, 0].long(), xy[:, 1].long()  # top-left corner of the patch in ``padded``
        found.append(
            padded[image, y[:, None, None] + steps[None, :, None], x[:, None, None] + steps[None, None, :]]
        )
    return found


def _log_quadratic(scores: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
    logs = torch.log(scores.clamp_min(_LOG_FLOOR))
    return [quadratic_offsets(p) for p in _patches(logs, keypoints, 3)]


def _raw_quadratic(scores: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
    return [quadratic_offsets(p) for p in _patches(scores, keypoints, 3)]


def _smoothed_log_quadratic(scores: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
    kernel = torch.tensor([1.0, 2.0, 1.0], device=scores.device) / 4
    smooth = F.conv2d(
        F.pad(scores[:, None], (1, 1, 1, 1), mode="replicate"), (kernel[:, None] * kernel[None])[None, None]
    )[:, 0]
    return _log_quadratic(smooth, keypoints)


def _soft_argmax(size: int):  # noqa: ANN202
    def offsets(scores: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
        return [soft_argmax_offsets(p) for p in _patches(scores, keypoints, size)]

    return offsets


METHODS = {  # name -> offsets of every image's keypoints on float32 score maps
    "log-quadratic": _log_quadratic,
    "quadratic": _raw_quadratic,
    "smoothed-log-quadratic": _smoothed_log_quadratic,
    "soft-argmax-3": _soft_argmax(3),
    "soft-argmax-5": _soft_argmax(5),
}
DEFAULT_METHOD = "log-quadratic"


def refine_keypoints(
    scores: torch.Tensor, keypoints: list[torch.Tensor], method: str = DEFAULT_METHOD
) -> list[torch.Tensor]:
    """Sub-pixel positions of integer keypoints on (B, H, W) dense score maps.

    ``keypoints[i]`` is an (N, 2) tensor of integer x, y on image i's map (the dense scores
    before non-maximum suppression). Returns refined (N, 2) float tensors, same order. At the
    map's edges the missing neighbours repeat the edge value. Computed in float32 whatever the
    maps' type (the floor of the logarithm would vanish in float16). ``method`` is one of
    ``METHODS`` (docs/accuracy.md compares them).
    """
    return [xy.float() + offset for xy, offset in zip(keypoints, keypoint_offsets(scores, keypoints, method))]


def keypoint_offsets(
    scores: torch.Tensor, keypoints: list[torch.Tensor], method: str = DEFAULT_METHOD
) -> list[torch.Tensor]:
    """The (N, 2) sub-pixel offsets ``refine_keypoints`` adds to each image's keypoints."""
    return METHODS[method](scores.float(), keypoints)
