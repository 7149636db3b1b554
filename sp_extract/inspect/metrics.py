"""The SuperPoint paper's evaluation metrics for one image pair related by a known homography.

Plain NumPy/OpenCV, after DeTone et al. 2018 (section 7) and Rémi Pautrat's evaluation code
(rpautrat/SuperPoint ``evaluations/``): keypoints outside the view both images share are
dropped; repeatability counts the keypoints with a keypoint of the other image within
``distance`` pixels after warping (both directions), the localization error is the mean of
those distances; descriptors are matched by mutual nearest neighbour; the matching score is
the share of keypoints (in the shared view) matched correctly, the mean matching accuracy the
share of matches that are correct at a threshold; a homography is estimated from the matches
(OpenCV RANSAC, 3 px) and is correct at epsilon when the image corners it maps are on average
within epsilon pixels of where the true homography maps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CORRECT_PX = 3.0  # the paper's distance threshold for repeatability and correct matches
HOMOGRAPHY_EPSILONS = (1, 3, 5)
MMA_THRESHOLDS = tuple(range(1, 11))


@dataclass
class PairMetrics:
    """The figures of one pair; ``None`` where the pair has no keypoint (or match) to judge."""

    repeatability: float | None
    localization_error_px: float | None
    matching_score: float | None
    mma: dict[int, float | None]  # by threshold in pixels
    corner_error_px: float | None  # mean corner distance of the estimated homography; None: none found
    keypoints: int  # in the shared view, mean of both images
    matches: int


def warp_points(points: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """(N, 2) points mapped by a 3x3 homography."""
    if len(points) == 0:
        return np.zeros((0, 2))
    mapped = np.concatenate([points, np.ones((len(points), 1))], 1) @ homography.T
    return mapped[:, :2] / mapped[:, 2:]


def inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Mask of (N, 2) x, y points inside an image of (width, height) pixels (centres at integers)."""
    return (
        (points[:, 0] >= 0)
        & (points[:, 0] <= size[0] - 1)
        & (points[:, 1] >= 0)
        & (points[:, 1] <= size[1] - 1)
    )


def mutual_nearest(descriptors0: np.ndarray, descriptors1: np.ndarray) -> np.ndarray:
    """(M, 2) index pairs of mutual nearest neighbours by L2 distance of (N, D) descriptors."""
    if len(descriptors0) == 0 or len(descriptors1) == 0:
        return np.zeros((0, 2), np.int64)
    d0, d1 = descriptors0.astype(np.float32), descriptors1.astype(np.float32)
    distances = (d0**2).sum(1)[:, None] + (d1**2).sum(1)[None] - 2 * d0 @ d1.T
    forward, backward = distances.argmin(1), distances.argmin(0)
    index0 = np.flatnonzero(backward[forward] == np.arange(len(d0)))
    return np.stack([index0, forward[index0]], 1)


def corner_error(homography: np.ndarray, estimate: np.ndarray | None, size: tuple[int, int]) -> float | None:
    """Mean distance of the image corners mapped by ``estimate`` and by the true ``homography``."""
    if estimate is None:
        return None
    w, h = size
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64)
    return float(
        np.linalg.norm(warp_points(corners, estimate) - warp_points(corners, homography), axis=1).mean()
    )


def evaluate_pair(
    keypoints0: np.ndarray,
    descriptors0: np.ndarray,
    keypoints1: np.ndarray,
    descriptors1: np.ndarray,
    homography: np.ndarray,
    size0: tuple[int, int],
    size1: tuple[int, int],
    distance: float = CORRECT_PX,
) -> PairMetrics:
    """All metrics of one pair: keypoints (N, 2) x, y and descriptors (N, D) of both images,
    ``homography`` mapping image 0's pixels onto image 1's, sizes as (width, height)."""
    homography = np.asarray(homography, np.float64)
    keep0 = inside(warp_points(keypoints0.astype(np.float64), homography), size1)
    keep1 = inside(warp_points(keypoints1.astype(np.float64), np.linalg.inv(homography)), size0)
    points0, points1 = keypoints0[keep0].astype(np.float64), keypoints1[keep1].astype(np.float64)
    warped0 = warp_points(points0, homography)
    count = (len(points0) + len(points1)) / 2

    repeatability = error = None
    if len(points0) and len(points1):
        distances = np.linalg.norm(warped0[:, None] - points1[None], axis=2)
        near0 = distances.min(1)[distances.min(1) <= distance]
        near1 = distances.min(0)[distances.min(0) <= distance]
        repeatability = (len(near0) + len(near1)) / (len(points0) + len(points1))
        if len(near0) + len(near1):
            error = float((near0.sum() + near1.sum()) / (len(near0) + len(near1)))

    matches = mutual_nearest(descriptors0[keep0], descriptors1[keep1])
    match_errors = np.linalg.norm(warped0[matches[:, 0]] - points1[matches[:, 1]], axis=1)
    mma = {t: (float((match_errors <= t).mean()) if len(matches) else None) for t in MMA_THRESHOLDS}
    score = float((match_errors <= distance).sum() / count) if count else None

    estimate = None
    if len(matches) >= 4:
        estimate, _ = cv2.findHomography(
            points0[matches[:, 0]], points1[matches[:, 1]], cv2.RANSAC, CORRECT_PX
        )
    return PairMetrics(
        repeatability=repeatability,
        localization_error_px=error,
        matching_score=score,
        mma=mma,
        corner_error_px=corner_error(homography, estimate, size0),
        keypoints=round(count),
        matches=len(matches),
    )
