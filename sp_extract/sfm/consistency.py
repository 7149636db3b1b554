"""How well a model's poses agree with the verified pairs it was built from.

A right model explains most inlier matches of each verified pair between its images: its relative
pose puts them on their epipolar lines. A wrong one can register every image with a low
reprojection error and still contradict its pairs: 9 frames of a phone video mapped with a shared
focal length of 550 px instead of 1,390 px explained a median 49-58 % of each pair's inlier
matches, the right models of the shared photos 84-95 % (docs/accuracy.md "Inconsistent models").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .environment import import_pycolmap
from .verification import epipolar_inliers

MIN_PAIRS = 3  # fewer verified pairs between a model's images tell nothing


def pair_agreements(models: list[Any], database: Path, error: float) -> list[float | None]:
    """For each of ``models``: the median, over the verified pairs of ``database`` between two
    images registered in it, of the share of the pair's inlier matches whose Sampson distance from
    the model's relative pose is within ``error`` pixels (taken to normalized coordinates by the
    cameras' focal lengths, as COLMAP's verification does); None when there are fewer than
    ``MIN_PAIRS`` such pairs. The database is read once for all the models."""
    pycolmap = import_pycolmap()
    registered = [{model.images[i].name: model.images[i] for i in model.reg_image_ids()} for model in models]
    shares: list[list[float]] = [[] for _ in models]
    db = pycolmap.Database.open(database)
    try:
        names = {image.image_id: image.name for image in db.read_all_images()}
        keypoints: dict[int, np.ndarray] = {}
        for pair_id, geometry in zip(*db.read_two_view_geometries(), strict=True):
            ids = pycolmap.pair_id_to_image_pair(pair_id)
            matches = np.asarray(geometry.inlier_matches).reshape(-1, 2)
            for model, images_by_name, found in zip(models, registered, shares, strict=True):
                images = [images_by_name.get(names.get(image_id, "")) for image_id in ids]
                if images[0] is None or images[1] is None or not len(matches):
                    continue
                for image_id in ids:
                    if image_id not in keypoints:
                        keypoints[image_id] = np.asarray(db.read_keypoints(image_id), dtype=np.float64)[:, :2]
                points = [keypoints[image_id][matches[:, side]] for side, image_id in enumerate(ids)]
                found.append(_explained(model, images, points, error))
    finally:
        db.close()
    return [float(np.median(found)) if len(found) >= MIN_PAIRS else None for found in shares]


def _explained(model: Any, images: list[Any], points: list[np.ndarray], error: float) -> float:
    """The share of a pair's matched points (pixels) that the model's relative pose of its two
    ``images`` explains within ``error`` pixels."""
    camera0, camera1 = (model.cameras[image.camera_id] for image in images)
    relative = images[1].cam_from_world() * images[0].cam_from_world().inverse()
    essential = _cross(relative.translation) @ relative.rotation.matrix()
    return float(np.mean(epipolar_inliers(essential, camera0, points[0], camera1, points[1], error)))


def _cross(vector: np.ndarray) -> np.ndarray:
    """The matrix of the cross product with ``vector``."""
    x, y, z = vector
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
