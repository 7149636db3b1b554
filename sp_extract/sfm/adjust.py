"""Keypoint adjustment on matched image patches (``colmap --refine-keypoints``).

Each keypoint is detected in its own image, so the two ends of a match disagree by the
detector's localisation noise (a fraction of a pixel), which ends up in the reconstruction's
reprojection error. ``adjust_keypoints`` moves every matched keypoint so that the image patches
around the two ends of every match agree, all images at once, in the spirit of pixSfM's
featuremetric keypoint adjustment (with normalised image intensities for the features):

* each match gives a Lucas-Kanade step: the relative shift of its two ends that best aligns
  their zero-mean, unit-norm patches (translation only, symmetric gradients) and the 2x2
  information matrix of that shift;
* the shifts of all matches are reconciled by one sparse least-squares solve over every matched
  keypoint (a match's ends move in opposite directions, a keypoint's matches pull together),
  with a small pull towards the detected positions that fixes the common translation;
* a few such Gauss-Newton rounds; in each, a match whose patches correlate below
  ``min_correlation`` (views too different for a translation, a wrong match) takes no part,
  and no keypoint moves more than ``max_shift`` pixels per axis from where it was detected.

Keypoints are in the store's frame (pixel centres at integers). Unmatched keypoints stay put.
The matches must be verified ones: raw nearest-neighbour matches, two thirds of them wrong, pull
keypoints to the bound (docs/accuracy.md). ``adjust_database_keypoints`` takes the inlier
matches of COLMAP's verification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from ..errors import ConfigError, DecodeError, StoreError
from ..extraction.decode import read_gray
from ..store.failures import describe_error
from .environment import COLMAP_OFFSET, import_pycolmap


@dataclass(frozen=True)
class AdjustOptions:
    """Settings of ``adjust_keypoints`` (defaults are those of ``colmap --refine-keypoints``)."""

    radius: int = 4  # patch of (2 radius + 1)^2 samples, one pixel apart
    sigma: float = 1.0  # Gaussian blur of the images before sampling, pixels
    iterations: int = 5
    max_shift: float = 1.0  # pixels per axis from the detected position
    min_correlation: float = 0.5  # normalised cross-correlation of a match's patches
    prior: float = 0.3  # pull towards the detected position, relative to a match's mean information
    # (the defaults were chosen on benchmarks/subpixel.py's synthetic pairs, docs/accuracy.md)


class Windows:
    """Blurred intensity and its x, y derivatives in a square window around every keypoint,
    cut once from each image (so only one image is in memory at a time), sampled bilinearly."""

    def __init__(self, size: int, count: int) -> None:
        self.half = size // 2
        self.values = np.zeros((3, count, size, size), np.float32)
        self.centres = np.zeros((count, 2))

    def cut(self, gray: np.ndarray, chosen: np.ndarray, points: np.ndarray, sigma: float) -> None:
        """Fill the windows ``chosen`` (indices) around ``points`` (x, y) of one image."""
        image = np.asarray(gray, dtype=np.float32)
        if sigma > 0:
            image = cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        planes = np.stack([image, *np.gradient(image)[::-1]])  # intensity, d/dx, d/dy
        centres = np.rint(points)
        steps = np.arange(-self.half, self.half + 1)
        rows = np.clip(centres[:, 1, None, None] + steps[None, :, None], 0, image.shape[0] - 1).astype(int)
        cols = np.clip(centres[:, 0, None, None] + steps[None, None, :], 0, image.shape[1] - 1).astype(int)
        self.values[:, chosen] = planes[:, rows, cols]
        self.centres[chosen] = centres

    def sample(self, chosen: np.ndarray, points: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """(3, N, S) intensity, d/dx, d/dy of windows ``chosen`` at ``points`` (N, 2) plus
        ``offsets`` (S, 2), image coordinates; outside a window its edge repeats."""
        local = points - self.centres[chosen] + self.half
        x = np.clip(local[:, None, 0] + offsets[None, :, 0], 0, self.values.shape[-1] - 1)
        y = np.clip(local[:, None, 1] + offsets[None, :, 1], 0, self.values.shape[-1] - 1)
        x0 = np.minimum(np.floor(x).astype(int), self.values.shape[-1] - 2)
        y0 = np.minimum(np.floor(y).astype(int), self.values.shape[-1] - 2)
        fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
        size = self.values.shape[-1]
        flat = self.values.reshape(3, -1)
        corner = (chosen[:, None] * size + y0) * size + x0  # top-left neighbour, flat index
        top = flat[:, corner] * (1 - fx) + flat[:, corner + 1] * fx
        bottom = flat[:, corner + size] * (1 - fx) + flat[:, corner + size + 1] * fx
        return top * (1 - fy) + bottom * fy


def _normalised(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-mean, unit-norm patches (N, S) and their gradients (N, S, 2) scaled alike."""
    values, gx, gy = samples
    centred = values - values.mean(axis=1, keepdims=True)
    norm = np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-6)
    return centred / norm, np.stack([gx, gy], axis=-1) / norm[..., None]


def _match_steps(
    windows: Windows, positions: np.ndarray, edges: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per match: the Lucas-Kanade shift of end 1 relative to end 0 (E, 2), its information
    (E, 2, 2) and the patches' correlation (E,)."""
    samples = [windows.sample(edges[:, end], positions[edges[:, end]], offsets) for end in range(2)]
    (patch0, grad0), (patch1, grad1) = (_normalised(s) for s in samples)
    correlation = (patch0 * patch1).sum(axis=1)
    jacobian = (grad0 + grad1) / 2  # d residual / d (shift of end 1 relative to end 0)
    residual = patch1 - patch0
    information = np.einsum("esi,esj->eij", jacobian, jacobian)
    gradient = np.einsum("esi,es->ei", jacobian, residual)
    determinant = np.linalg.det(information)
    solvable = determinant > 1e-9 * np.maximum(np.trace(information, axis1=1, axis2=2), 1e-12) ** 2
    safe = np.where(solvable[:, None, None], information, np.eye(2)[None])
    shift = -np.linalg.solve(safe, gradient[..., None])[..., 0]
    information = np.where(solvable[:, None, None], information, 0.0)
    return np.where(solvable[:, None], shift, 0.0), information, correlation


def adjust_keypoints(
    images: Sequence[np.ndarray],
    keypoints: list[np.ndarray],
    matches: list[tuple[int, int, np.ndarray]],
    options: AdjustOptions | None = None,
) -> list[np.ndarray]:
    """Adjusted copies of ``keypoints`` (one (N_i, 2) array of x, y per image).

    ``images`` are the grayscale images (any value range) in the keypoints' frame, each read
    once, in order, and only where it has matches (a lazy sequence keeps one in memory at a
    time); ``matches`` are (image index 0, image index 1, (M, 2) keypoint indices) triples.
    """
    options = options or AdjustOptions()
    adjusted = [np.array(k, dtype=np.float64, copy=True) for k in keypoints]
    first = np.cumsum([0, *(len(k) for k in keypoints)])  # keypoint k of image i is node first[i] + k
    ends = [np.zeros((0, 2), np.int64)]
    for i, j, pairs in matches:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        ends.append(np.stack([first[i] + pairs[:, 0], first[j] + pairs[:, 1]], axis=1))
    global_edges = np.concatenate(ends)
    if not len(global_edges):
        return [a.astype(np.float32) for a in adjusted]
    used, edges = np.unique(global_edges, return_inverse=True)
    edges = edges.reshape(-1, 2)
    image_of = np.searchsorted(first, used, side="right") - 1
    nodes = np.stack([image_of, used - first[image_of]], axis=1)
    detected = np.concatenate(adjusted)[used]
    positions = detected.copy()
    windows = Windows(2 * (options.radius + int(np.ceil(options.max_shift)) + 2) + 1, len(used))
    for image in np.unique(image_of):
        chosen = np.flatnonzero(image_of == image)
        windows.cut(images[image], chosen, detected[chosen], options.sigma)
    steps = np.arange(-options.radius, options.radius + 1, dtype=np.float64)
    offsets = np.stack(np.meshgrid(steps, steps), axis=-1).reshape(-1, 2)
    count = len(used)
    for _ in range(options.iterations):
        shift, information, correlation = _match_steps(windows, positions, edges, offsets)
        keep = correlation >= options.min_correlation
        if not keep.any():
            break
        shift, information, kept = shift[keep], information[keep], edges[keep]
        prior = options.prior * float(np.trace(information, axis1=1, axis2=2).mean()) / 2
        # Normal equations of sum_e |d1 - d0 - shift_e|^2_{I_e} + prior sum_n |p_n + d_n - detected_n|^2
        rows, cols, values = [], [], []
        right = np.zeros((count, 2))
        for a, b, sign in ((0, 0, 1.0), (1, 1, 1.0), (0, 1, -1.0), (1, 0, -1.0)):
            for r in range(2):
                for c in range(2):
                    rows.append(2 * kept[:, a] + r)
                    cols.append(2 * kept[:, b] + c)
                    values.append(sign * information[:, r, c])
        pull = np.einsum("eij,ej->ei", information, shift)
        np.add.at(right, kept[:, 1], pull)
        np.add.at(right, kept[:, 0], -pull)
        right += prior * (detected - positions)
        diagonal = np.arange(2 * count)
        matrix = scipy.sparse.csr_matrix(
            (np.concatenate([*values, np.full(2 * count, prior)]),
             (np.concatenate([*rows, diagonal]), np.concatenate([*cols, diagonal]))),
            shape=(2 * count, 2 * count),
        )  # fmt: skip
        step = scipy.sparse.linalg.spsolve(matrix.tocsc(), right.reshape(-1)).reshape(-1, 2)
        positions = detected + np.clip(positions + step - detected, -options.max_shift, options.max_shift)
    for image, points in enumerate(adjusted):
        chosen = nodes[:, 0] == image
        points[nodes[chosen, 1]] = positions[chosen]
    return [a.astype(np.float32) for a in adjusted]


class _DatabaseImages(Sequence):
    """A database's images, decoded on access from the image folder, size checked."""

    def __init__(self, images: Path, names: list[str], sizes: list[tuple[int, int]]) -> None:
        self.images, self.names, self.sizes = images, names, sizes

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        path = self.images / self.names[index]
        try:
            gray = read_gray(path)
        except (OSError, DecodeError) as error:
            cause = describe_error(error)
            raise ConfigError(f"{path}: cannot read it to refine the keypoints: {cause}") from error
        if (gray.shape[1], gray.shape[0]) != self.sizes[index]:
            width, height = self.sizes[index]
            raise StoreError(
                f"{path}: {gray.shape[1]} x {gray.shape[0]} pixels, but its features were extracted from a "
                f"{width} x {height} image; --images must be the extraction's folder"
            )
        return gray


def adjust_database_keypoints(database: Path, images: Path, options: AdjustOptions | None = None) -> int:
    """``adjust_keypoints`` on a COLMAP database's verified matches (the inlier matches of its
    two-view geometries), the images from the folder ``images``; the keypoints are updated in
    place (COLMAP's convention: pixel centres at +0.5). Returns how many moved."""
    pycolmap = import_pycolmap()
    with pycolmap.Database.open(database) as db:
        found = sorted(db.read_all_images(), key=lambda image: image.image_id)
        index = {image.image_id: i for i, image in enumerate(found)}
        keypoints = [db.read_keypoints(image.image_id)[:, :2] - COLMAP_OFFSET for image in found]
        cameras = [db.read_camera(image.camera_id) for image in found]
        matches = []
        for pair_id, geometry in zip(*db.read_two_view_geometries()):
            first, second = pycolmap.pair_id_to_image_pair(pair_id)
            inliers = np.asarray(geometry.inlier_matches).reshape(-1, 2)
            matches.append((index[first], index[second], inliers))
        sizes = [(camera.width, camera.height) for camera in cameras]
        folder = _DatabaseImages(images, [image.name for image in found], sizes)
        adjusted = adjust_keypoints(folder, keypoints, matches, options)
        moved = 0
        for image, before, after in zip(found, keypoints, adjusted):
            changed = int((after != before.astype(np.float32)).any(axis=1).sum())
            if changed:
                db.update_keypoints(image.image_id, after + np.float32(COLMAP_OFFSET))
                moved += changed
    return moved
