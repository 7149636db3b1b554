"""Sub-pixel refinement methods compared with ``sp-extract evaluate homography``'s yardstick.

Usage: python benchmarks/subpixel.py [--images DIR] [--weights FILE] [--pairs-per-image 1]

The synthetic pairs of ``evaluate homography`` (same seed) are made once; the network runs
once per image and every method of ``sp_extract.extraction.refine.METHODS`` (and none: integer
keypoints) post-processes the same dense maps, so the table compares the methods alone. The
figures are accuracy, not speed: the load of the machine does not change them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.pipeline import SuperPoint
from sp_extract.extraction.postprocess import postprocess
from sp_extract.extraction.refine import METHODS
from sp_extract.inspect.evaluate import homography_pairs, summarize
from sp_extract.inspect.metrics import evaluate_pair

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/sacre_coeur")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared/weights/superpoint_v1.pth"))
    parser.add_argument("--pairs-per-image", type=int, default=1)
    parser.add_argument("--max-keypoints", type=int, default=1000)
    args = parser.parse_args()
    config = ExtractConfig(max_keypoints=args.max_keypoints)
    model = SuperPoint(args.weights, config).eval()
    dense: dict[int, tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor]]] = {}

    def maps(image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if id(image) not in dense:  # the image is kept with its maps, so its id stays unique
            with torch.inference_mode():
                dense[id(image)] = (image, model.net(torch.from_numpy(image)[None, None]))
        return dense[id(image)][1]

    pairs = list(homography_pairs(args.images, config, args.pairs_per_image, seed=0, failed=[]))
    methods = ["none", *METHODS]
    results: dict[str, dict[str, list]] = {m: {"illumination": [], "viewpoint": []} for m in methods}
    for pair in pairs:
        size = (pair.image0.shape[1], pair.image0.shape[0])
        for method in methods:
            found = []
            for image in (pair.image0, pair.image1):
                c = config
                features = postprocess(
                    *maps(image), c.threshold, c.nms_radius, c.border, c.max_keypoints,
                    subpixel=method != "none", refine_method=method if method != "none" else "log-quadratic",
                )[0]  # fmt: skip
                found += [features.keypoints.numpy(), features.descriptors.numpy()]
            results[method][pair.subset].append(evaluate_pair(*found, pair.homography, size, size))
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


if __name__ == "__main__":
    main()
