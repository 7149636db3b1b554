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


def refine_keypoints(scores: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sub-pixel positions of integer keypoints on (B, H, W) dense score maps.

    ``keypoints[i]`` is an (N, 2) tensor of integer x, y on image i's map (the dense scores
    before non-maximum suppression). Returns refined (N, 2) float tensors, same order. At the
    map's edges the missing neighbours repeat the edge value. Computed in float32 whatever the
    maps' type (the floor of the logarithm would vanish in float16).
    """
    logs = torch.log(scores.float().clamp_min(_LOG_FLOOR))
    padded = F.pad(logs[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    steps = torch.arange(3, device=scores.device)
    refined = []
    for image, xy in enumerate(keypoints):
        x, y = xy[:, 0].long(), xy[:, 1].long()  # top-left corner of the 3x3 patch in ``padded``
        patches = padded[
            image, y[:, None, None] + steps[None, :, None], x[:, None, None] + steps[None, None, :]
        ]
        refined.append(xy.float() + quadratic_offsets(patches))
    return refined
