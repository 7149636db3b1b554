"""Post-processing against the plain reference in ``superpoint_reference`` on crafted and random maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.superpoint_reference import assert_same_features, to_original_hloc
from support.superpoint_reference import nms as reference_nms
from support.superpoint_reference import postprocess as reference_postprocess

from sp_extract.extraction.postprocess import nms_opencv, nms_torch, postprocess, to_original_frame

THRESHOLD = 0.005
# every device here: a GPU machine also checks the non-CPU code paths
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_both(
    score_maps: np.ndarray,
    dense: np.ndarray,
    nms_radius: int = 4,
    border: int = 4,
    max_keypoints: int = -1,
    threshold: float = THRESHOLD,
    device: str = "cpu",
) -> list:
    """Run ours on the batch and compare each image with the reference; return our features."""
    ours = postprocess(
        torch.from_numpy(score_maps.astype(np.float32)).to(device),
        torch.from_numpy(dense.astype(np.float32)).to(device),
        threshold=threshold,
        nms_radius=nms_radius,
        border=border,
        max_keypoints=max_keypoints,
    )
    assert len(ours) == len(score_maps)
    for mine, scores, desc in zip(ours, score_maps.astype(np.float32), dense.astype(np.float32)):
        ref = reference_postprocess(scores, desc, threshold, nms_radius, border, max_keypoints)
        assert_same_features(mine, ref, max_keypoints)
    return ours


def descriptor_maps(batch: int, height: int, width: int, seed: int = 0, channels: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(batch, channels, height // 8, width // 8))
    return dense / np.linalg.norm(dense, axis=1, keepdims=True)


def keypoint_set(features) -> set[tuple[int, int]]:
    return {(int(x), int(y)) for x, y in features.keypoints.tolist()}


def crafted_map(height: int, width: int, points: dict[tuple[int, int], float]) -> np.ndarray:
    """A (1, H, W) map of zeros with the given {(x, y): score}."""
    scores = np.zeros((1, height, width), np.float32)
    for (x, y), value in points.items():
        scores[0, y, x] = value
    return scores


@pytest.mark.parametrize("nms_radius", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("border", [0, 1, 2, 4])
@pytest.mark.parametrize("max_keypoints", [-1, 1, 7, 50])
@pytest.mark.parametrize("device", DEVICES)
def test_random_dense_maps_match_reference(nms_radius: int, border: int, max_keypoints: int, device) -> None:
    rng = np.random.default_rng(100 * nms_radius + 10 * border + max_keypoints % 97)
    scores = rng.random((3, 48, 64)) ** 6  # many values under the threshold
    dense = descriptor_maps(3, 48, 64, seed=nms_radius)
    ours = run_both(scores, dense, nms_radius, border, max_keypoints, device=device)
    assert sum(len(f.scores) for f in ours) > 0


@pytest.mark.parametrize("nms_radius", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("border", [0, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_quantised_maps_with_plateaus_and_ties_match_reference(nms_radius: int, border: int, device) -> None:
    """Few distinct values: plateaus, equal neighbours and ties at the top-k cut everywhere."""
    rng = np.random.default_rng(nms_radius)
    scores = rng.integers(0, 5, (2, 40, 56)) / 8.0
    dense = descriptor_maps(2, 40, 56, seed=1)
    for max_keypoints in (-1, 5, 20):
        run_both(scores, dense, nms_radius, border, max_keypoints, device=device)


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_opencv_and_torch_nms_equal_the_reference(radius: int) -> None:
    """Both implementations, whichever device runs this: plateaus and ties, then smooth maps."""
    rng = np.random.default_rng(radius)
    ties = rng.integers(0, 5, size=(2, 37, 53)) / 4
    maps = np.concatenate([ties, rng.random((2, 37, 53)) ** 6]).astype(np.float32)
    by_torch = nms_torch(torch.from_numpy(maps), radius).numpy()
    for image, torch_result in zip(maps, by_torch):
        expected = reference_nms(image, radius)
        assert 0 < np.count_nonzero(expected) < np.count_nonzero(image)
        np.testing.assert_array_equal(nms_opencv(image, radius), expected)
        np.testing.assert_array_equal(torch_result, expected)


def test_plateau_is_kept_whole_and_lower_neighbour_dropped() -> None:
    points = {(x, y): 0.5 for x in range(10, 13) for y in range(10, 13)}
    points[(13, 11)] = 0.4  # next to the plateau: suppressed
    scores = crafted_map(32, 32, points)
    (ours,) = run_both(scores, descriptor_maps(1, 32, 32))
    assert keypoint_set(ours) == {(x, y) for x in range(10, 13) for y in range(10, 13)}


def test_second_round_recovers_maximum_only_suppressed_by_a_suppressed_point() -> None:
    # a (0.9) suppresses b (0.85); c (0.8) is within 4 px of b only, so round 1 brings it back
    scores = crafted_map(32, 40, {(10, 12): 0.9, (14, 12): 0.85, (18, 12): 0.8})
    (ours,) = run_both(scores, descriptor_maps(1, 32, 40), nms_radius=4)
    assert keypoint_set(ours) == {(10, 12), (18, 12)}
    (ours,) = run_both(scores, descriptor_maps(1, 32, 40), nms_radius=0)
    assert keypoint_set(ours) == {(10, 12), (14, 12), (18, 12)}


def test_adjacent_maxima_and_radius() -> None:
    scores = crafted_map(24, 24, {(8, 8): 0.7, (9, 8): 0.6, (11, 8): 0.65})
    expected = {
        0: {(8, 8), (9, 8), (11, 8)},
        1: {(8, 8), (11, 8)},
        2: {(8, 8), (11, 8)},  # (11, 8) is 3 px from the maximum and outside its window
        3: {(8, 8)},
    }
    for radius, keypoints in expected.items():
        (ours,) = run_both(scores, descriptor_maps(1, 24, 24), nms_radius=radius)
        assert keypoint_set(ours) == keypoints


@pytest.mark.parametrize("border", [0, 1, 2, 3, 4])
def test_maxima_near_borders(border: int) -> None:
    height, width = 24, 32
    points = {}
    for offset in range(6):
        points[(offset, 12)] = 0.30 + 0.01 * offset  # left edge
        points[(width - 1 - offset, 5 + 3 * offset % 12)] = 0.40 + 0.01 * offset  # right edge
        points[(8 + 4 * offset, offset)] = 0.50 + 0.01 * offset  # top edge
        points[(6 + 4 * offset, height - 1 - offset)] = 0.60 + 0.01 * offset  # bottom edge
    scores = crafted_map(height, width, points)
    for radius in (0, 1, 2):
        (ours,) = run_both(scores, descriptor_maps(1, height, width), nms_radius=radius, border=border)
        xy = ours.keypoints.numpy()
        assert ((xy >= border) & (xy < np.array([width, height]) - border)).all()
        if radius == 0:
            inside = {
                p for p in points if border <= p[0] < width - border and border <= p[1] < height - border
            }
            assert keypoint_set(ours) == inside


def test_threshold_is_strict() -> None:
    at = np.float32(THRESHOLD)
    above = np.nextafter(at, np.float32(1))
    scores = crafted_map(24, 24, {(6, 6): at, (16, 16): above})
    (ours,) = run_both(scores, descriptor_maps(1, 24, 24))
    assert keypoint_set(ours) == {(16, 16)}


def test_top_k_keeps_the_best_scores() -> None:
    points = {(6 + 10 * i, 6 + 10 * j): 0.1 + 0.05 * i + 0.01 * j for i in range(4) for j in range(3)}
    scores = crafted_map(40, 48, points)
    for k in (1, 3, 12, 100):
        (ours,) = run_both(scores, descriptor_maps(1, 40, 48), max_keypoints=k)
        best = sorted(points, key=points.get, reverse=True)[:k]
        assert keypoint_set(ours) == set(best)


@pytest.mark.parametrize("max_keypoints", [-1, 3])
def test_empty_and_below_threshold_maps_give_no_features(max_keypoints: int) -> None:
    scores = np.zeros((3, 32, 24), np.float32)
    scores[1] = THRESHOLD / 2
    scores[2, 4:-4, 4:-4] = 0.004
    scores[2, 0, 0] = 0.9  # in the border
    for features in run_both(scores, descriptor_maps(3, 32, 24), max_keypoints=max_keypoints):
        assert features.keypoints.shape == (0, 2)
        assert features.scores.shape == (0,)
        assert features.descriptors.shape == (0, 256)


def test_batch_mixes_empty_and_full_images() -> None:
    rng = np.random.default_rng(5)
    scores = rng.random((3, 32, 40)) ** 4
    scores[1] = 0
    ours = run_both(scores, descriptor_maps(3, 32, 40, seed=2), max_keypoints=10)
    assert [len(f.scores) for f in ours] == [10, 0, 10]


def test_descriptors_are_unit_norm_and_sampled_off_cell_centres() -> None:
    # a keypoint at every position of a 24 x 32 map, descriptor map not normalised: checks the
    # interpolation weights everywhere, including where the grid falls outside the cells
    dense = np.random.default_rng(3).normal(size=(1, 16, 3, 4)) * 3
    scores = np.full((1, 24, 32), 0.5, np.float32)
    (ours,) = run_both(scores, dense, nms_radius=0, border=0)
    assert len(ours.scores) == 24 * 32
    np.testing.assert_allclose(ours.descriptors.norm(dim=1).numpy(), 1, atol=1e-5)


@pytest.mark.parametrize(
    ("working", "original"),
    [((640, 480), (1280, 960)), ((1024, 683), (3000, 2000)), ((320, 240), (100, 75)), ((50, 80), (77, 123))],
)
def test_to_original_frame_follows_hloc_and_stays_inside(working, original) -> None:
    width, height = working
    rng = np.random.default_rng(0)
    corners = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], np.float32)
    keypoints = np.concatenate([corners, rng.integers(0, (width, height), (200, 2)).astype(np.float32)])
    mapped = to_original_frame(keypoints, working, original)
    assert mapped.dtype == np.float32 and mapped.shape == keypoints.shape
    assert (mapped >= 0).all() and (mapped <= np.array(original) - 1).all()
    hloc = to_original_hloc(keypoints, working, original)
    np.testing.assert_allclose(mapped, np.clip(hloc, 0, np.array(original) - 1), rtol=0, atol=1e-3)
    if original[0] >= working[0] and original[1] >= working[1]:  # downscaled: no clipping needed
        np.testing.assert_allclose(mapped, hloc, rtol=0, atol=1e-3)
