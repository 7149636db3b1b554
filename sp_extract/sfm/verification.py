"""Geometric verification of a database's matched pairs, guided by each pair's closest matches.

Nearest-neighbour matches of SuperPoint are mostly outliers on many pairs, and RANSAC's trials
grow with the share of outliers: COLMAP's verification ran its most trials on nearly every pair
of the fox frames and took most of ``sfm``'s time. ``verify_database`` first estimates each
pair's two-view geometry with COLMAP's own estimator (``estimate_two_view_geometry``, the
verification's options) from the guide, the pair's matches whose descriptors are within
``ColmapRun.guide_distance`` of each other, which hold few outliers, so RANSAC stops after few
trials; the pair's inliers are then counted among all its matches under that geometry, with the
model and threshold COLMAP's verification takes its inliers from. A pair whose guide is too
small, yields too few inliers or a planar or panoramic configuration (which the mapper treats
apart, and which a small guide shows by chance) is left to COLMAP's verification of all its
matches, which runs
last on every pair still without a two-view geometry. The database keeps all raw matches; the
verified pairs and their inliers equal those of COLMAP's verification of all matches within
RANSAC's own spread (docs/accuracy.md "Guided verification").
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..store.failures import damaged_error, describe_error
from ..store.reader import StoreReader, open_store
from .config import ColmapRun
from .environment import MAX_IMAGE_ID, colmap_logging, import_pycolmap, verification_options

CHUNK_PAIRS = 128  # pairs estimated together, written in one transaction
DESCRIPTORS_KEPT = 16  # images whose descriptors are kept while a chunk's guides are made
Pair = tuple[str, str]
# a guided geometry needs this many times the verification's floor of inliers among the guide's
# matches: a geometry fitted to fewer is imprecise, and such weak pairs hold sparse collections
# together, so COLMAP's verification of all matches decides them as before
GUIDE_SUPPORT = 2


def unverified_pairs(database: Path) -> list[Pair]:
    """The image names of every matched pair of ``database`` without a two-view geometry (read
    with Python's SQLite, so before pycolmap opens the database in this process)."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        names = dict(db.execute("SELECT image_id, name FROM images"))
        rows = db.execute(
            "SELECT pair_id FROM matches WHERE pair_id NOT IN (SELECT pair_id FROM two_view_geometries)"
        ).fetchall()
    return [(names[pair_id // MAX_IMAGE_ID], names[pair_id % MAX_IMAGE_ID]) for (pair_id,) in rows]


def verify_database(database: Path, features: Path, pairs: list[Pair], run: ColmapRun) -> int:
    """Verify ``pairs`` of ``database`` (module doc), their descriptors read from the feature store
    ``features``: guided, then COLMAP's verification of every pair still without a two-view
    geometry. Returns how many pairs the guide verified. Run in a child process (``child``)."""
    pycolmap = import_pycolmap()
    guided = 0
    with colmap_logging(run.verbose):
        if run.guide_distance > 0 and pairs:
            guided = _verify_guided(database, features, pairs, run)
        verifier = pycolmap.GeometricVerifierOptions()
        verifier.num_threads = run.num_threads
        pycolmap.geometric_verification(
            database, verifier_options=verifier, two_view_geometry_options=verification_options(run)
        )
    return guided


def _verify_guided(database: Path, features: Path, pairs: list[Pair], run: ColmapRun) -> int:
    """Write the two-view geometry of each of ``pairs`` whose guide verifies; how many."""
    pycolmap = import_pycolmap()
    options = verification_options(run)
    threads = run.num_threads if run.num_threads > 0 else os.cpu_count() or 1
    written = 0
    db = pycolmap.Database.open(database)
    try:
        images = {image.name: image for image in db.read_all_images()}
        with open_store(features) as fh5, ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(pairs), CHUNK_PAIRS):
                chunk = [_ordered(images, a, b) for a, b in pairs[start : start + CHUNK_PAIRS]]
                tasks = list(_tasks(db, fh5, Path(features), chunk, run.guide_distance))
                found = pool.map(lambda task: _estimate(task, options, run.min_inliers), tasks)
                with pycolmap.DatabaseTransaction(db):
                    for (image0, image1), geometry in zip(chunk, found, strict=True):
                        if geometry is not None:
                            db.write_two_view_geometry(image0.image_id, image1.image_id, geometry)
                            written += 1
    finally:
        db.close()
    return written


def _ordered(images: dict[str, Any], name0: str, name1: str) -> tuple[Any, Any]:
    """The two images of a pair, the lower image id first (COLMAP's order of a pair's matches)."""
    image0, image1 = images[name0], images[name1]
    return (image0, image1) if image0.image_id < image1.image_id else (image1, image0)


def _tasks(
    db: Any, fh5: StoreReader, features: Path, chunk: list[tuple[Any, Any]], guide_distance: float
) -> Iterator[tuple[Any, ...]]:
    """What ``_estimate`` needs of each pair of ``chunk``: cameras, keypoints, all matches and the
    guide (the matches within ``guide_distance``); the descriptors of the last
    ``DESCRIPTORS_KEPT`` images read are kept, so that a chunk of large images fits in memory."""

    @functools.lru_cache(maxsize=DESCRIPTORS_KEPT)
    def descriptors(name: str) -> np.ndarray:
        try:
            return np.asarray(fh5[name]["descriptors"], dtype=np.float32).T
        except (OSError, KeyError, ValueError) as error:
            cause = f"descriptors of '{name}' unreadable: {describe_error(error)}"
            raise damaged_error(features, cause) from error

    cameras, points = {}, {}
    for image in {image.image_id: image for pair in chunk for image in pair}.values():
        cameras[image.image_id] = db.read_camera(image.camera_id)
        points[image.image_id] = np.asarray(db.read_keypoints(image.image_id), dtype=np.float64)[:, :2]
    for image0, image1 in chunk:
        id0, id1 = image0.image_id, image1.image_id
        matches = np.asarray(db.read_matches(id0, id1), dtype=np.uint32).reshape(-1, 2)
        difference = descriptors(image0.name)[matches[:, 0]] - descriptors(image1.name)[matches[:, 1]]
        guide = matches[np.einsum("ij,ij->i", difference, difference) <= guide_distance**2]
        yield cameras[id0], points[id0], cameras[id1], points[id1], matches, guide


def _estimate(task: tuple[Any, ...], options: Any, min_inliers: int) -> Any:
    """The pair's two-view geometry estimated on its guide, with the inliers among all its matches;
    None when fewer than ``GUIDE_SUPPORT`` times ``min_inliers`` of the guide's matches support it."""
    camera0, points0, camera1, points1, matches, guide = task
    if len(guide) < GUIDE_SUPPORT * min_inliers:
        return None
    pycolmap = import_pycolmap()
    geometry = pycolmap.estimate_two_view_geometry(camera0, points0, camera1, points1, guide, options)
    if len(geometry.inlier_matches) < GUIDE_SUPPORT * min_inliers:
        return None
    x0, x1 = points0[matches[:, 0]], points1[matches[:, 1]]
    inliers = inlier_matches(geometry, camera0, x0, camera1, x1, options.ransac.max_error)
    if inliers is None or inliers.sum() < min_inliers:
        return None
    geometry.inlier_matches = matches[inliers]
    return geometry


def inlier_matches(
    geometry: Any, camera0: Any, x0: np.ndarray, camera1: Any, x1: np.ndarray, error: float
) -> np.ndarray | None:
    """Which of the matched points ``x0`` - ``x1`` (pixels) ``geometry`` explains within ``error``
    pixels, as COLMAP's verification counts them: for a calibrated pair the larger inlier set of
    the essential matrix (the threshold taken to normalized coordinates) and the fundamental
    matrix, for an uncalibrated pair the fundamental matrix's. None for any other configuration
    (planar or panoramic, degenerate, ...): a guide, a small share of the matches, may look planar
    where all matches are not, and the mapper treats such pairs apart, so COLMAP decides them on
    all matches."""
    config = import_pycolmap().TwoViewGeometryConfiguration
    if geometry.config not in (config.CALIBRATED, config.UNCALIBRATED) or not np.any(geometry.F):
        return None
    inliers = sampson_squared(geometry.F, x0, x1) <= error**2
    if geometry.config == config.CALIBRATED and np.any(geometry.E):
        essential = epipolar_inliers(geometry.E, camera0, x0, camera1, x1, error)
        inliers = max(inliers, essential, key=np.sum)
    return inliers


def epipolar_inliers(
    essential: Any, camera0: Any, x0: np.ndarray, camera1: Any, x1: np.ndarray, error: float
) -> np.ndarray:
    """Which of the matched points ``x0`` - ``x1`` (pixels) the essential matrix explains within
    ``error`` pixels: their Sampson distance in normalized coordinates, the threshold taken there
    by the two cameras' focal lengths (COLMAP's ``CamFromImgThreshold``, averaged as its
    verification does)."""
    threshold = (camera0.cam_from_img_threshold(error) + camera1.cam_from_img_threshold(error)) / 2
    return sampson_squared(essential, camera0.cam_from_img(x0), camera1.cam_from_img(x1)) <= threshold**2


def sampson_squared(matrix: Any, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """The squared Sampson distance of each correspondence ``x0`` - ``x1`` from the epipolar
    geometry ``matrix`` (fundamental or essential: x1^T M x0 = 0), as COLMAP's residuals."""
    matrix = np.asarray(matrix, dtype=np.float64)
    h0, h1 = np.c_[x0, np.ones(len(x0))], np.c_[x1, np.ones(len(x1))]
    line1, line0 = h0 @ matrix.T, h1 @ matrix  # M x0, M^T x1
    numerator = np.sum(h1 * line1, axis=1) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return numerator / (line1[:, 0] ** 2 + line1[:, 1] ** 2 + line0[:, 0] ** 2 + line0[:, 1] ** 2)
