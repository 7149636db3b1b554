"""Sub-pixel refinement methods compared with ``sp-extract evaluate homography``'s yardstick.

Usage: python benchmarks/subpixel.py [--images DIR] [--weights FILE] [--pairs-per-image 1]
       [--methods none log-quadratic ...] [--adjust-radius 4] [--adjust-max-shift 1] [--adjust-prior 0.3]

The synthetic pairs of ``evaluate homography`` (same seed) are made once; the network runs
once per image and every method of ``sp_extract.extraction.refine.METHODS`` (and none: integer
keypoints) post-processes the same dense maps, so the table compares the methods alone. The
figures are accuracy, not speed: the load of the machine does not change them.

A second table measures the match-time adjustment of ``colmap --refine-keypoints``
(``sp_extract.sfm.adjust``) on each pair's mutual-nearest matches that a RANSAC homography keeps:
the error |H x0 - x1| of the matches within 3 px, before and after adjusting the pair.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.pipeline import SuperPoint
from sp_extract.extraction.postprocess import postprocess
from sp_extract.extraction.refine import METHODS
from sp_extract.inspect.evaluate import homography_pairs, summarize
from sp_extract.inspect.metrics import evaluate_pair, mutual_nearest, warp_points
from sp_extract.sfm.adjust import AdjustOptions, adjust_keypoints

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/sacre_coeur")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared/weights/superpoint_v1.pth"))
    parser.add_argument("--pairs-per-image", type=int, default=1)
    parser.add_argument("--max-keypoints", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=["none", *METHODS], help="refinements to compare")
    parser.add_argument("--adjust-radius", type=int, default=AdjustOptions.radius)
    parser.add_argument("--adjust-max-shift", type=float, default=AdjustOptions.max_shift)
    parser.add_argument("--adjust-prior", type=float, default=AdjustOptions.prior)
    args = parser.parse_args()
    config = ExtractConfig(max_keypoints=args.max_keypoints)
    model = SuperPoint(args.weights, config).eval()
    dense: dict[int, tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor]]] = {}

    def maps(image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if id(image) not in dense:  # the image is kept with its maps, so its id stays unique
            with torch.inference_mode():
                dense[id(image)] = (image, model.net(torch.from_numpy(image)[None, None]))
        return dense[id(image)][1]

    options = AdjustOptions(
        radius=args.adjust_radius, max_shift=args.adjust_max_shift, prior=args.adjust_prior
    )
    pairs = list(homography_pairs(args.images, config, args.pairs_per_image, seed=0, failed=[]))
    methods = args.methods
    results: dict[str, dict[str, list]] = {m: {"illumination": [], "viewpoint": []} for m in methods}
    match_errors: dict[str, dict[str, list]] = {m: {"illumination": [], "viewpoint": []} for m in methods}
    for pair in pairs:
        size = (pair.image0.shape[1], pair.image0.shape[0])
        for method in methods:
            found = []
            for image in (pair.image0, pair.image1):
                c = config
                features = postprocess(
                    *maps(image), c.threshold, c.nms_radius, c.border, c.max_keypoints,
                    subpixel=method != "none" and method,
                )[0]  # fmt: skip
                found += [features.keypoints.numpy(), features.descriptors.numpy()]
            results[method][pair.subset].append(evaluate_pair(*found, pair.homography, size, size))
            match_errors[method][pair.subset].append(
                _match_errors((pair.image0, pair.image1), found[0::2], found[1::2], pair.homography, options)
            )
    print(f"{len(pairs)} pairs from {args.images}, max {args.max_keypoints} keypoints, resize-max 1024")
    print(
        f"{'method':<24}{'loc.err illum':>14}{'viewpoint':>10}{'all':>7}{'repeat.':>9}"
        f"{'MMA@1':>7}{'MMA@3':>7}{'H@1':>6}"
    )
    for method in methods:
        illumination, viewpoint = (summarize(results[method][s]) for s in ("illumination", "viewpoint"))
        every = summarize(results[method]["illumination"] + results[method]["viewpoint"])
        print(
            f"{method:<24}{illumination['localization_error_px']:>14.3f}{viewpoint['localization_error_px']:>10.3f}"
            f"{every['localization_error_px']:>7.3f}{every['repeatability']:>9.3f}"
            f"{every['mma_by_threshold']['1']:>7.3f}{every['mma']:>7.3f}{every['homography_accuracy']['1']:>6.2f}"
        )
    print(
        "\nmatch-time keypoint adjustment (colmap --refine-keypoints) on the same pairs: mean error"
        " |H x0 - x1| of the RANSAC-verified mutual-nearest matches within 3 px before adjusting"
    )
    print(f"{'method':<24}{'before illum':>14}{'after':>8}{'before viewp':>14}{'after':>8}{'matches':>9}")
    for method in methods:
        row = f"{method:<24}"
        for subset in ("illumination", "viewpoint"):
            errors = np.concatenate(match_errors[method][subset], axis=1)
            row += f"{errors[0].mean():>14.3f}{errors[1].mean():>8.3f}"
        every = sum(e.shape[1] for s in match_errors[method].values() for e in s)
        print(row + f"{every:>9}")


def _match_errors(
    images: tuple[np.ndarray, np.ndarray],
    keypoints: list[np.ndarray],
    descriptors: list[np.ndarray],
    homography: np.ndarray,
    options: AdjustOptions,
) -> np.ndarray:
    """(2, M) errors |H x0 - x1| of a pair's correct mutual-nearest matches, before and after
    ``adjust_keypoints`` on the pair's verified matches (inliers of a RANSAC homography, 3 px,
    as ``colmap --refine-keypoints`` adjusts on COLMAP's verified matches)."""
    matches = mutual_nearest(*descriptors)
    if len(matches) >= 4:
        points = [k[m].astype(np.float64) for k, m in zip(keypoints, matches.T)]
        _, inliers = cv2.findHomography(*points, cv2.RANSAC, 3.0)
        matches = matches[inliers.ravel() > 0] if inliers is not None else matches[:0]
    adjusted = adjust_keypoints(list(images), keypoints, [(0, 1, matches)], options)
    errors = [
        np.linalg.norm(warp_points(k[0][matches[:, 0]], homography) - k[1][matches[:, 1]], axis=1)
        for k in (keypoints, adjusted)
    ]
    correct = errors[0] < 3
    return np.stack([errors[0][correct], errors[1][correct]])


if __name__ == "__main__":
    main()
