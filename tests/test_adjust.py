"""Keypoint adjustment on matched patches (``colmap --refine-keypoints``), on synthetic images
whose true correspondences are known exactly: a smooth random texture seen shifted by known
sub-pixel translations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest
from conftest import ROOT, run_cli
from test_colmap import IMAGES, POINTS, colmap, make_scene, match

from sp_extract.sfm.adjust import AdjustOptions, adjust_keypoints

SIZE = 96
SHIFTS = np.array([[0.0, 0.0], [0.37, -0.21], [-0.44, 0.3]])  # image i shows the texture moved by SHIFTS[i]


def texture(shift: np.ndarray, seed: int = 3) -> np.ndarray:
    """A sum of random Gaussian blobs evaluated on the pixel grid, moved by ``shift`` (x, y):
    the shift is exact, no resampling."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, SIZE + 10, size=(400, 2))
    widths = rng.uniform(1.5, 4.0, size=400)
    weights = rng.uniform(-1, 1, size=400)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    image = np.zeros((SIZE, SIZE))
    for (cx, cy), width, weight in zip(centres + shift, widths, weights):
        image += weight * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))
    return (image * 60 + 128).astype(np.float32)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [texture(shift) for shift in SHIFTS]


def truth_and_noisy(count: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scene points and every image's keypoints of them with detection noise (up to 0.45 px)."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(14, SIZE - 14, size=(count, 2))
    return points, [
        (points + shift + rng.uniform(-0.45, 0.45, size=points.shape)).astype(np.float32) for shift in SHIFTS
    ]


def pair_error(keypoints: list[np.ndarray], i: int, j: int) -> float:
    """Mean distance between image j's keypoints and image i's moved by the true relative shift."""
    return float(np.linalg.norm(keypoints[j] - keypoints[i] - (SHIFTS[j] - SHIFTS[i]), axis=1).mean())


def test_matches_agree_after_adjusting(images: list[np.ndarray]) -> None:
    _, noisy = truth_and_noisy(60)
    same = np.stack([np.arange(60)] * 2, axis=1)
    matches = [(0, 1, same), (1, 2, same), (0, 2, same[:30])]  # image 0 and 2: half the points
    adjusted = adjust_keypoints(images, noisy, matches)
    for i, j in ((0, 1), (1, 2), (0, 2)):
        before, after = pair_error(noisy, i, j), pair_error(adjusted, i, j)
        assert before > 0.3 and after < 0.4 * before, (i, j, before, after)
    for k, a in zip(noisy, adjusted):
        assert a.dtype == np.float32 and a.shape == k.shape
        assert np.abs(a - k).max() <= AdjustOptions().max_shift + 1e-5


def correlation(image0: np.ndarray, point0: np.ndarray, image1: np.ndarray, point1: np.ndarray) -> float:
    """Normalised cross-correlation of the blurred 9 x 9 patches at two points (OpenCV's
    bilinear sampling, pixel centres at integers)."""
    patches = []
    for image, point in ((image0, point0), (image1, point1)):
        blurred = cv2.GaussianBlur(image, (0, 0), AdjustOptions().sigma, borderType=cv2.BORDER_REPLICATE)
        patch = cv2.getRectSubPix(blurred, (9, 9), (float(point[0]), float(point[1]))).ravel()
        patches.append((patch - patch.mean()) / np.linalg.norm(patch - patch.mean()))
    return float(patches[0] @ patches[1])


def test_only_matched_keypoints_move_and_uncorrelated_matches_stay(images: list[np.ndarray]) -> None:
    _, noisy = truth_and_noisy(40, seed=1)
    right = np.stack([np.arange(20)] * 2, axis=1)  # keypoints 20-29: wrong partners; 30-39 unmatched
    wrong = np.stack([np.arange(20, 30), np.arange(21, 31)], axis=1)
    adjusted = adjust_keypoints(images[:2], noisy[:2], [(0, 1, np.concatenate([right, wrong]))])
    moved = [np.abs(a - k).max(axis=1) > 0 for a, k in zip(adjusted, noisy[:2])]
    assert moved[0][:20].all() and moved[1][:20].all() and not moved[0][30:].any()
    assert not moved[1][np.r_[20, 31:40]].any()
    assert pair_error([a[:20] for a in adjusted], 0, 1) < 0.4 * pair_error([k[:20] for k in noisy], 0, 1)
    uncorrelated = [
        (i, j) for i, j in wrong if correlation(images[0], noisy[0][i], images[1], noisy[1][j]) < 0.45
    ]
    assert len(uncorrelated) >= 3  # a wrong match may correlate by chance; these do not
    for i, j in uncorrelated:
        assert not moved[0][i] and not moved[1][j]


def test_the_common_position_stays_where_it_was_detected(images: list[np.ndarray]) -> None:
    """Matches fix only the relative positions; the pull towards the detections keeps a pair's
    mean where the two detections put it."""
    _, noisy = truth_and_noisy(30, seed=2)
    same = np.stack([np.arange(30)] * 2, axis=1)
    adjusted = adjust_keypoints(images[:2], noisy[:2], [(0, 1, same)])
    centre_before = (noisy[0] + noisy[1]) / 2
    centre_after = (adjusted[0] + adjusted[1]) / 2
    assert np.abs(centre_after - centre_before).max() < 0.05


def test_nothing_to_adjust() -> None:
    keypoints = [np.zeros((3, 2), np.float32), np.ones((2, 2), np.float32)]
    flat = [np.full((32, 32), 100, np.float32)] * 2
    for matches in ([], [(0, 1, np.zeros((0, 2), int))]):
        for a, k in zip(adjust_keypoints(flat, keypoints, matches), keypoints):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, k)


def test_colmap_refine_keypoints(tmp_path: Path) -> None:
    """``colmap --refine-keypoints`` on the synthetic scene of test_colmap, its images redrawn as
    blobs on every projected point (so matched patches agree): the database holds the adjusted
    keypoints, moved at most 1 px, the unmatched ones untouched."""
    images, features, keypoints, point_ids = make_scene(tmp_path)
    matches = match(tmp_path, features)
    rng = np.random.default_rng(5)
    weights = rng.uniform(-1, 1, size=POINTS)
    widths = rng.uniform(2.0, 4.0, size=POINTS)
    for name, (width, height, _) in IMAGES.items():
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        picture = np.full((height, width), 128.0, np.float32)
        for (px, py), point in zip(keypoints[name], point_ids[name]):
            if point >= 0:
                blob = np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * widths[point] ** 2))
                picture += 100 * weights[point] * blob
        assert cv2.imwrite(str(images / name), np.clip(picture, 0, 255).astype(np.uint8))
    scene = {"images": images, "features": features, "matches": matches}
    database, report = tmp_path / "db.db", tmp_path / "report.json"
    result = colmap(scene, database, "--refine-keypoints", "--json-report", str(report))
    assert result.returncode == 0, result.stderr
    with pycolmap.Database.open(database) as db:
        written = {
            image.name: db.read_keypoints(image.image_id)[:, :2] - 0.5 for image in db.read_all_images()
        }
    moved = 0
    for name, points in keypoints.items():
        shift = np.abs(written[name] - points).max(axis=1)
        assert shift.max() <= 1.0 + 1e-4
        assert (shift[point_ids[name] < 0] < 1e-4).all()  # seen by one image: never matched
        moved += int((shift >= 1e-4).sum())  # (+0.5 and back in float32 leaves 1e-5)
    assert moved > POINTS and json.loads(report.read_text())["refined_keypoints"] == moved
    assert f"({moved} refined)" in result.stderr

    blocker = tmp_path / "blocker" / "scipy"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named scipy')\n")
    blocked = os.pathsep.join([str(blocker.parent), str(ROOT)])  # this checkout's sp_extract, no scipy
    args = ("colmap", "--images", str(images), "--features", str(features), "--matches", str(matches))
    result = run_cli(
        *args, "--database", str(tmp_path / "x.db"), "--refine-keypoints", env={"PYTHONPATH": blocked}
    )
    assert (
        result.returncode == 2
        and "pip install scipy" in result.stderr
        and "sp-extract[colmap]" in result.stderr
    )
    assert not (tmp_path / "x.db").exists()

    cv2.imwrite(str(images / "b.png"), np.zeros((100, 100), np.uint8))
    result = colmap(scene, tmp_path / "new.db", "--refine-keypoints")
    assert result.returncode == 2 and "b.png: 100 x 100 pixels" in result.stderr
    assert not (tmp_path / "new.db").exists()
