"""End to end: the real weights on the real photos, one CLI run shared by every check."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
from conftest import CliExtraction
from support.hloc_reader import get_keypoints, list_h5_names


@pytest.fixture(scope="module")
def run(sacre_coeur_features: CliExtraction) -> CliExtraction:
    """The session's CLI run on the photos (conftest), shared with test_colmap."""
    return sacre_coeur_features


def test_exit_code_and_report(run: CliExtraction) -> None:
    assert run.result.returncode == 0, run.result.stderr
    assert "Traceback" not in run.result.stderr
    report = run.report
    assert (report["total"], report["done"], report["skipped"], report["failed"]) == (10, 10, 0, [])
    stats = report["keypoints_per_image"]
    assert 200 <= stats["min"] <= stats["median"] <= stats["max"] <= 5000
    assert report["wall_time_s"] > 0 and report["throughput_per_s"] > 0


def test_every_photo_is_in_the_store(run: CliExtraction) -> None:
    photos = sorted(path.name for path in run.images.glob("*.jpg"))
    assert len(photos) == 10
    assert sorted(list_h5_names(run.store)) == photos


def test_keypoints_lie_inside_each_image(run: CliExtraction) -> None:
    for name in list_h5_names(run.store):
        pixels = cv2.imread(str(run.images / name), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
        height, width = pixels.shape
        keypoints, uncertainty = get_keypoints(run.store, name)
        with h5py.File(run.store, "r") as h5:
            assert h5[name]["image_size"][()].tolist() == [width, height], name
        assert 200 <= len(keypoints) <= 5000, (name, len(keypoints))
        assert np.all(keypoints >= 0), name
        assert np.all(keypoints[:, 0] <= width - 1) and np.all(keypoints[:, 1] <= height - 1), name
        assert len(np.unique(keypoints, axis=0)) == len(keypoints), name
        # hloc's noise: 2 px at the working size (longest side 1024), in original pixels
        factor = min(1.0, 1024 / max(width, height))
        working = np.array([round(width * factor), round(height * factor)])
        assert uncertainty == pytest.approx(2.0 * np.mean(np.array([width, height]) / working), rel=1e-4)


def test_scores_and_unit_norm_descriptors(run: CliExtraction) -> None:
    with h5py.File(run.store, "r") as h5:
        for name in list_h5_names(run.store):
            scores = h5[name]["scores"][()]
            descriptors = h5[name]["descriptors"][()]
            assert descriptors.dtype == np.float16 and descriptors.shape == (256, len(scores))
            assert np.all(scores >= 0.005) and np.all(scores <= 1.0)
            norms = np.linalg.norm(descriptors.astype(np.float64), axis=0)
            np.testing.assert_allclose(norms, 1.0, atol=2e-3, err_msg=name)
