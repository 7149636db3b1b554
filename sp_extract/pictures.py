"""Pictures of what a store holds, drawn with OpenCV (``show`` and the ``sfm`` report page).

Keypoints are dots on their image, coloured by score; matches are lines between two images
side by side, coloured by matching score (a store made with ``--verify`` holds only the
inliers, and the caption says so). Images are drawn in the stored pixel frame (EXIF
orientation ignored, as extraction does) and downscaled for the picture only.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np

from .errors import ConfigError, StoreError
from .names import pair_key
from .store.catalog import read_store_info
from .store.failures import H5_ERRORS
from .store.reader import open_store

BANNER_PX = 28
GAP_PX = 10
_READ = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def colours(values: np.ndarray) -> np.ndarray:
    """(N, 3) BGR colours of values in [0, 1] on OpenCV's perceptually ordered 'turbo' map
    (blue low, red high); values are rescaled to their own range first."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return np.zeros((0, 3), np.uint8)
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else np.ones_like(values)
    return cv2.applyColorMap((scaled * 255).astype(np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0]


def read_picture(images: Path, name: str, size: tuple[int, int], max_size: int) -> tuple[np.ndarray, float]:
    """The image in colour, downscaled so its longest side is at most ``max_size``; the scale."""
    path = images / name
    picture = cv2.imread(str(path), _READ) if path.is_file() else None
    if picture is None:
        reason = "no such file" if not path.is_file() else "OpenCV cannot read it"
        raise ConfigError(
            f"{path}: cannot draw this image ({reason}); --images must be the extraction's folder"
        )
    if (picture.shape[1], picture.shape[0]) != tuple(size):
        raise StoreError(
            f"{path}: {picture.shape[1]} x {picture.shape[0]} pixels, but its features were extracted from a "
            f"{size[0]} x {size[1]} image"
        )
    scale = min(1.0, max_size / max(size)) if max_size else 1.0
    if scale < 1.0:
        target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        picture = cv2.resize(picture, target, interpolation=cv2.INTER_AREA)
    return picture, scale


def _to_picture(points: np.ndarray, scale: float) -> np.ndarray:
    """Store pixels (centres at integers) to the downscaled picture's pixels, as cv2.resize maps."""
    return (points + 0.5) * scale - 0.5


def _with_banner(picture: np.ndarray, text: str) -> np.ndarray:
    banner = np.full((BANNER_PX, picture.shape[1], 3), 255, np.uint8)
    cv2.putText(banner, text, (6, BANNER_PX - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([banner, picture])


def _dot(picture: np.ndarray, point: np.ndarray, colour: np.ndarray, radius: int) -> None:
    centre = (int(round(point[0] * 16)), int(round(point[1] * 16)))  # 4 fractional bits
    cv2.circle(picture, centre, radius * 16, tuple(int(c) for c in colour), -1, cv2.LINE_AA, shift=4)


class FeatureSource:
    """Keypoints, scores and image sizes read from a feature store, entry by entry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.settings, names = read_store_info(path, "features")
        self.names = set(names)
        self.h5 = open_store(path, locking=False)

    def get(self, name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        if name not in self.names:
            raise ConfigError(
                f"{self.path}: no image named '{name}' (list them with 'sp-extract info --names')"
            )
        try:
            group = self.h5[name]
            size = tuple(int(v) for v in group["image_size"][()])
            return group["keypoints"][()], group["scores"][()], (size[0], size[1])
        except H5_ERRORS as error:
            raise StoreError(f"{self.path}: features of '{name}' are unreadable ({error})") from error

    def close(self) -> None:
        self.h5.close()


def draw_keypoints(features: FeatureSource, images: Path, name: str, max_size: int) -> tuple[np.ndarray, str]:
    """The picture of one image's keypoints and its caption."""
    keypoints, scores, size = features.get(name)
    picture, scale = read_picture(images, name, size, max_size)
    for point, colour in zip(_to_picture(keypoints, scale), colours(scores)):
        _dot(picture, point, colour, 2)
    caption = f"{name}: {len(keypoints)} keypoints (colour: score)"
    return _with_banner(picture, caption), caption


def read_pair(
    h5: h5py.File, matches: Path, name0: str, name1: str
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(M, 2) keypoint indices (image 0, image 1), their scores and the verified inlier count
    (None without ``--verify``) of one pair, stored in either order."""
    for key, swapped in ((pair_key(name0, name1), False), (pair_key(name1, name0), True)):
        if key in h5:
            try:
                dataset = h5[key]["matches0"]
                matches0 = dataset[()]
                scores0 = h5[key]["matching_scores0"][()]
                inliers = dataset.attrs.get("num_inliers")
            except H5_ERRORS as error:
                raise StoreError(f"{matches}: pair '{key}' is unreadable ({error})") from error
            index = np.flatnonzero(matches0 >= 0)
            pairs = np.stack([index, matches0[index]], 1)
            return (pairs[:, ::-1] if swapped else pairs), scores0[index].astype(np.float32), inliers
    raise ConfigError(f"{matches}: no pair '{name0}' '{name1}' (in either order)")


def draw_matches(
    features: FeatureSource,
    h5: h5py.File,
    matches: Path,
    verify: str | None,
    images: Path,
    names: tuple[str, str],
    max_size: int,
) -> tuple[np.ndarray, str]:
    """The side-by-side picture of one pair's matches and its caption."""
    (k0, _, size0), (k1, _, size1) = features.get(names[0]), features.get(names[1])
    pairs, scores, inliers = read_pair(h5, matches, *names)
    if pairs.size and (pairs[:, 0].max() >= len(k0) or pairs[:, 1].max() >= len(k1)):
        raise StoreError(f"{matches}: the matches of '{names[0]}' '{names[1]}' do not fit {features.path}")
    (left, s0), (right, s1) = (read_picture(images, n, s, max_size) for n, s in zip(names, (size0, size1)))
    height = max(left.shape[0], right.shape[0])
    canvas = np.full((height, left.shape[1] + GAP_PX + right.shape[1], 3), 255, np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + GAP_PX :] = right
    points0 = _to_picture(k0[pairs[:, 0]], s0)
    points1 = _to_picture(k1[pairs[:, 1]], s1) + [left.shape[1] + GAP_PX, 0]
    for p0, p1, colour in zip(points0, points1, colours(scores)):
        colour_tuple = tuple(int(c) for c in colour)
        start, end = tuple(np.round(p0 * 16).astype(int)), tuple(np.round(p1 * 16).astype(int))
        cv2.line(canvas, start, end, colour_tuple, 1, cv2.LINE_AA, shift=4)
        _dot(canvas, p0, colour, 2)
        _dot(canvas, p1, colour, 2)
    kind = f"inliers of {verify} verification" if verify else "raw matches"
    caption = f"{names[0]} - {names[1]}: {len(pairs)} {kind} (colour: score)"
    if inliers is not None and int(inliers) != len(pairs):  # not expected: the store keeps the inliers only
        caption += f", {int(inliers)} inliers recorded"
    return _with_banner(canvas, caption), caption
