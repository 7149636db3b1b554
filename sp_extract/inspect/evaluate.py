"""``sp-extract evaluate``: how accurate the keypoints and descriptors are, on pairs with a
known homography.

Two sources of pairs: ``homography_pairs`` makes synthetic ones from any photos, as the
SuperPoint paper's HPatches-style evaluation (each photo against a random homographic warp
of itself, and against a random illumination change of itself), with a fixed seed;
``hpatches_pairs`` reads the HPatches sequences layout (``i_*`` illumination and ``v_*``
viewpoint folders, ``1.ppm`` against ``2.ppm`` .. ``6.ppm`` with ``H_1_k``). Features are
extracted with the extraction's own code and settings (``ExtractConfig``), so the figures
say what an option costs; ``metrics.evaluate_pair`` scores each pair and ``Evaluation``
averages them per subset, prints the table and writes the JSON report.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..devices import resolve_device
from ..errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError
from ..extraction.config import ExtractConfig
from ..extraction.decode import load_image
from ..extraction.discover import discover_images
from ..extraction.pipeline import SuperPoint
from ..extraction.postprocess import to_original_frame
from ..report import Report
from .metrics import HOMOGRAPHY_EPSILONS, MMA_THRESHOLDS, PairMetrics, evaluate_pair

SUBSETS = ("illumination", "viewpoint")
HPATCHES_TARGETS = range(2, 7)


@dataclass
class Pair:
    """Two grayscale [0, 1] images and the homography from the first's pixels to the second's."""

    name: str
    subset: str
    image0: np.ndarray
    image1: np.ndarray
    homography: np.ndarray
    original_sizes: tuple[tuple[int, int], tuple[int, int]] | None = None  # hpatches: stored frames


# -- synthetic pairs ------------------------------------------------------------------------
def random_homography(
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.7, 0.9),
    max_angle_deg: float = 15.0,
    perspective: float = 0.15,
    tries: int = 100,
) -> np.ndarray:
    """A homography mapping a random quadrilateral inside the image onto the whole frame.

    The quadrilateral is a centred rectangle scaled by ``scale`` of the frame, rotated by up to
    ``max_angle_deg``, its corners moved by up to ``perspective`` of its half-size, then shifted
    at random within the margin left: the warped image has no empty border (as Pautrat's
    ``sample_homography`` without artifacts).
    """
    w, h = size
    frame = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
    centre = frame.mean(0)
    for _ in range(tries):
        half = (frame - centre) * rng.uniform(*scale)
        angle = math.radians(rng.uniform(-max_angle_deg, max_angle_deg))
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        corners = half @ rotation.T + rng.uniform(-perspective, perspective, (4, 2)) * np.abs(half)
        low, high = -centre - corners.min(0), np.array([w - 1, h - 1]) - centre - corners.max(0)
        if np.all(low <= high):
            corners = corners + centre + rng.uniform(low, high)
            return cv2.getPerspectiveTransform(corners.astype(np.float32), frame.astype(np.float32))
    raise ConfigError(f"cannot draw a homography for a {w} x {h} image")  # not for any real image


def illumination_change(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A random gamma, gain and offset, plus sensor noise, on a [0, 1] image."""
    gamma = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    changed = image**gamma * rng.uniform(0.6, 1.2) + rng.uniform(-0.1, 0.1)
    changed = changed + rng.normal(0.0, 2.0 / 255.0, image.shape)
    return np.clip(changed, 0.0, 1.0).astype(np.float32)


def homography_pairs(
    images_dir: Path, config: ExtractConfig, pairs_per_image: int, seed: int, failed: list[dict[str, str]]
) -> Iterator[Pair]:
    """Synthetic pairs of every photo below ``images_dir`` at the working size: ``pairs_per_image``
    illumination and as many viewpoint pairs each. Unreadable photos are added to ``failed``."""
    names = discover_images(images_dir)
    rng = np.random.default_rng(seed)
    for name in names:
        decoded = load_image(images_dir, name, config)
        if decoded.image is None:
            failed.append({"name": name, "reason": decoded.error or "unreadable"})
            continue
        image = decoded.image
        size = (image.shape[1], image.shape[0])
        for k in range(pairs_per_image):
            yield Pair(f"{name} light {k}", "illumination", image, illumination_change(rng, image), np.eye(3))
        for k in range(pairs_per_image):
            homography = random_homography(rng, size)
            # bilinear weights can overshoot [0, 1] by a rounding error: the network takes [0, 1]
            warped = np.clip(cv2.warpPerspective(image, homography, size, flags=cv2.INTER_LINEAR), 0.0, 1.0)
            yield Pair(f"{name} warp {k}", "viewpoint", image, warped, homography)


# -- HPatches ------------------------------------------------------------------------------
def hpatches_sequences(root: Path) -> list[Path]:
    """The sequence folders (``i_*``, ``v_*``) of an HPatches root, sorted."""
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    sequences = sorted(p for p in root.iterdir() if p.is_dir() and p.name[:2] in ("i_", "v_"))
    if not sequences:
        raise ConfigError(
            f"{root}: no HPatches sequences (folders i_* and v_* holding 1.ppm .. 6.ppm and H_1_2 .. H_1_6)"
        )
    return sequences


def read_homography(path: Path) -> np.ndarray:
    """A 3x3 homography from an HPatches ``H_1_k`` text file."""
    try:
        matrix = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a 3x3 homography ({error})") from error
    if matrix.shape != (3, 3):
        raise ConfigError(f"{path}: not a 3x3 homography (shape {matrix.shape})")
    return matrix


def hpatches_pairs(root: Path, config: ExtractConfig, failed: list[dict[str, str]]) -> Iterator[Pair]:
    """Pairs (1, k) of every HPatches sequence; images at the working size, homographies in the
    files' pixels. Unreadable images are added to ``failed``."""
    for sequence in hpatches_sequences(root):
        subset = "illumination" if sequence.name.startswith("i_") else "viewpoint"
        first = sequence / "1.ppm"
        reference = load_image(sequence, first.name, config)
        if reference.image is None:
            failed.append({"name": str(first), "reason": reference.error or "unreadable"})
            continue
        for k in HPATCHES_TARGETS:
            target = load_image(sequence, f"{k}.ppm", config)
            if target.image is None:
                failed.append({"name": str(sequence / f"{k}.ppm"), "reason": target.error or "unreadable"})
                continue
            homography = read_homography(sequence / f"H_1_{k}")
            yield Pair(
                f"{sequence.name} 1-{k}",
                subset,
                reference.image,
                target.image,
                homography,
                (reference.original_size, target.original_size),
            )


# -- running and averaging -----------------------------------------------------------------
def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarize(metrics: list[PairMetrics]) -> dict[str, Any]:
    """Means over pairs (pairs without a value left out); homography accuracy is the share of
    all pairs whose estimate is within epsilon (a pair without an estimate counts as wrong)."""
    accuracy = {
        str(e): (float(np.mean([m.corner_error_px is not None and m.corner_error_px <= e for m in metrics]))
                 if metrics else None)
        for e in HOMOGRAPHY_EPSILONS
    }  # fmt: skip
    return {
        "pairs": len(metrics),
        "keypoints": _mean([m.keypoints for m in metrics]),
        "matches": _mean([m.matches for m in metrics]),
        "repeatability": _mean([m.repeatability for m in metrics]),
        "localization_error_px": _mean([m.localization_error_px for m in metrics]),
        "matching_score": _mean([m.matching_score for m in metrics]),
        "mma": _mean([m.mma[3] for m in metrics]),
        "mma_by_threshold": {str(t): _mean([m.mma[t] for m in metrics]) for t in MMA_THRESHOLDS},
        "homography_accuracy": accuracy,
    }


@dataclass
class Evaluation(Report):
    """The figures of one ``evaluate`` run, overall and per subset."""

    source: str
    weights: str
    settings: dict[str, Any]
    by_subset: dict[str, list[PairMetrics]] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        every = [m for subset in self.by_subset.values() for m in subset]
        return {
            **self.shared(),
            "source": self.source,
            "weights": self.weights,
            "settings": self.settings,
            **summarize(every),
            "subsets": {name: summarize(values) for name, values in self.by_subset.items()},
            "failed": self.failed,
            "pair_results": {name: [asdict(m) for m in values] for name, values in self.by_subset.items()},
        }

    def body(self) -> list[str]:
        """The table: one row per subset and one for all pairs."""

        def cell(value: float | None, digits: int = 3) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        header = (
            f"{'pairs':<13}{'n':>4}{'kpts':>7}{'repeat.':>9}{'loc.err':>9}{'M.score':>9}"
            f"{'MMA@3':>7}{'H@1':>7}{'H@3':>7}{'H@5':>7}"
        )
        rows = [f"{self.command} {self.source} (weights {self.weights})", header]
        every = [m for subset in self.by_subset.values() for m in subset]
        for label, values in [*self.by_subset.items(), ("all", every)]:
            s = summarize(values)
            h = s["homography_accuracy"]
            rows.append(
                f"{label:<13}{s['pairs']:>4}{cell(s['keypoints'], 0):>7}{cell(s['repeatability']):>9}"
                f"{cell(s['localization_error_px']):>9}{cell(s['matching_score']):>9}{cell(s['mma']):>7}"
                f"{cell(h['1'], 2):>7}{cell(h['3'], 2):>7}{cell(h['5'], 2):>7}"
            )
        rows += [f"failed: {f['name']}: {f['reason']}" for f in self.failed]
        return rows


class FeatureExtractor:
    """SuperPoint with the extraction's settings, on in-memory [0, 1] images."""

    def __init__(self, weights: str | None, config: ExtractConfig, device: str) -> None:
        self.device = resolve_device(device)
        self.model = SuperPoint(weights, config).eval().to(self.device)
        self.label = self.model.weights_label
        self._last: tuple[np.ndarray, tuple[np.ndarray, np.ndarray]] | None = None

    def __call__(
        self, image: np.ndarray, original_size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints (N, 2) and descriptors (N, D) of a (H, W) image, in its own pixels, or in
        the pixels of ``original_size`` (mapped as the store maps them). The features of the
        last image are kept: synthetic pairs share their first image."""
        if self._last is not None and self._last[0] is image:
            features = self._last[1]
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None].to(self.device)
            found = self.model(tensor)[0]
            features = (found.keypoints.cpu().numpy(), found.descriptors.float().cpu().numpy())
            self._last = (image, features)
        keypoints, descriptors = features
        if original_size is not None:
            keypoints = to_original_frame(keypoints, (image.shape[1], image.shape[0]), original_size)
        return keypoints, descriptors


def run_evaluation(
    kind: str,
    source: Path,
    config: ExtractConfig,
    weights: str | None = None,
    device: str = "cpu",
    pairs_per_image: int = 3,
    seed: int = 0,
    quiet: bool = False,
) -> Evaluation:
    """Evaluate the features of ``config`` on ``kind`` "homography" (synthetic pairs of the photos
    in ``source``) or "hpatches" (the HPatches sequences in ``source``)."""
    started = time.monotonic()
    if kind not in ("homography", "hpatches"):
        raise ConfigError(f"unknown evaluation {kind!r} (homography or hpatches)")
    if pairs_per_image < 1:
        raise ConfigError(f"--pairs-per-image must be >= 1, got {pairs_per_image}")
    source = Path(source)
    if not source.is_dir():
        raise ConfigError(f"{source}: no such folder")
    if kind == "hpatches":
        hpatches_sequences(source)  # a wrong folder is refused before the network loads
    elif not discover_images(source):
        raise ConfigError(f"{source}: no images found")
    extractor = FeatureExtractor(weights, config, device)
    settings = {**asdict(config), "device": str(extractor.device)}
    if kind == "homography":
        settings.update(pairs_per_image=pairs_per_image, seed=seed)
    evaluation = Evaluation(str(source), extractor.label, settings, command=f"evaluate {kind}")
    evaluation.by_subset = {subset: [] for subset in SUBSETS}
    if kind == "homography":
        pairs = homography_pairs(source, config, pairs_per_image, seed, evaluation.failed)
    else:
        pairs = hpatches_pairs(source, config, evaluation.failed)
    with torch.inference_mode():
        for pair in pairs:
            frames = pair.original_sizes or (None, None)
            k0, d0 = extractor(pair.image0, frames[0])
            k1, d1 = extractor(pair.image1, frames[1])
            sizes = pair.original_sizes or ((pair.image0.shape[1], pair.image0.shape[0]),) * 2
            result = evaluate_pair(k0, d0, k1, d1, pair.homography, sizes[0], sizes[1])
            evaluation.by_subset[pair.subset].append(result)
            if not quiet:
                rep = "-" if result.repeatability is None else f"{result.repeatability:.3f}"
                print(f"{pair.name}: repeatability {rep}, {result.matches} matches", file=sys.stderr)
    if not any(evaluation.by_subset.values()):
        raise ConfigError(f"{source}: no pair could be evaluated (every image failed to load)")
    evaluation.exit_code = EXIT_SOME_FAILED if evaluation.failed else EXIT_OK
    evaluation.wall_time_s = time.monotonic() - started
    return evaluation
