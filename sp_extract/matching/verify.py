"""Geometric verification of matches: inliers of a fundamental matrix or a homography
(OpenCV's USAC MAGSAC)."""

from __future__ import annotations

import cv2
import numpy as np

from .config import VERIFY_MIN_MATCHES

VERIFY_CONFIDENCE = 0.999
VERIFY_MAX_ITERS = 10_000


def verify_matches(
    keypoints0: np.ndarray, keypoints1: np.ndarray, matches0: np.ndarray, model: str, threshold: float
) -> tuple[np.ndarray, int]:
    """Keep the matches that are inliers of a fundamental matrix or a homography (USAC MAGSAC).

    ``threshold`` is OpenCV's maximum error in pixels. A pair with too few matches, or whose
    model cannot be estimated, keeps none. Returns the filtered ``matches0`` and the inlier count.
    """
    index = np.flatnonzero(matches0 >= 0)
    kept = np.full_like(matches0, -1)
    if len(index) < VERIFY_MIN_MATCHES[model]:
        return kept, 0
    points0 = keypoints0[index].astype(np.float64)
    points1 = keypoints1[matches0[index]].astype(np.float64)
    try:
        if model == "fundamental":
            found, mask = cv2.findFundamentalMat(
                points0, points1, cv2.USAC_MAGSAC, threshold, VERIFY_CONFIDENCE, VERIFY_MAX_ITERS
            )
        else:
            found, mask = cv2.findHomography(
                points0, points1, cv2.USAC_MAGSAC, threshold, maxIters=VERIFY_MAX_ITERS,
                confidence=VERIFY_CONFIDENCE,
            )  # fmt: skip
    except cv2.error:  # degenerate configurations (all points on a line, say)
        return kept, 0
    if found is None or mask is None:
        return kept, 0
    inliers = index[mask.ravel().astype(bool)]
    kept[inliers] = matches0[inliers]
    return kept, len(inliers)
