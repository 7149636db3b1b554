"""--subpixel: sub-pixel peaks recovered on synthetic score maps, a plain per-keypoint reference,
the post-processing wiring (descriptors at the refined positions) and the recorded setting."""

from __future__ import annotations

import h5py
import numpy as np
import torch
from conftest import run_cli

from sp_extract.extraction.postprocess import postprocess, sample_descriptors
from sp_extract.extraction.refine import MAX_OFFSET, refine_keypoints


def gaussian_blobs(shape: tuple[int, int], centres: np.ndarray, sigma: float = 1.3) -> np.ndarray:
    """A score map with one Gaussian peak per (x, y) centre, values in (0, 0.9]."""
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    scores = np.full(shape, 1e-6)
    for x, y in centres:
        scores = np.maximum(scores, 0.9 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)))
    return scores


def test_recovers_gaussian_peaks_better_than_the_pixel_grid() -> None:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(8, 90, 12), np.arange(8, 60, 12)), -1).reshape(-1, 2)
    maps, truths, integers = [], [], []
    for _ in range(2):  # a batch of two maps
        centres = grid + rng.uniform(-0.5, 0.5, size=grid.shape)
        maps.append(gaussian_blobs((64, 96), centres))
        truths.append(centres)
        integers.append(torch.from_numpy(np.round(centres)).float())  # the integer peaks
    scores = torch.from_numpy(np.stack(maps)).float()
    half = refine_keypoints(scores.half(), integers)  # half-precision maps are refined in float32
    for found, truth, start in zip(refine_keypoints(scores, integers), truths, integers):
        refined_error = np.abs(found.numpy() - truth).max()
        grid_error = np.abs(start.numpy() - truth)
        assert grid_error.max() > 0.3  # the test is not trivial
        assert refined_error < 0.01 < grid_error.mean()  # log-scores of a Gaussian are a quadratic
    for found, truth in zip(half, truths):
        assert found.dtype == torch.float32 and np.abs(found.numpy() - truth).max() < 0.05


def plain_refine(scores: np.ndarray, x: int, y: int) -> np.ndarray:
    """One keypoint: Newton step on the log-scores of its 3x3 neighbourhood (edges repeated)."""
    height, width = scores.shape

    def value(dx: int, dy: int) -> float:
        return float(
            np.log(max(scores[min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)], 1e-12))
        )

    gradient = np.array([value(1, 0) - value(-1, 0), value(0, 1) - value(0, -1)]) / 2
    hessian = np.array(
        [
            [value(1, 0) + value(-1, 0) - 2 * value(0, 0), 0.0],
            [0.0, value(0, 1) + value(0, -1) - 2 * value(0, 0)],
        ]
    )
    hessian[0, 1] = hessian[1, 0] = (value(1, 1) - value(1, -1) - value(-1, 1) + value(-1, -1)) / 4
    if not (hessian[0, 0] < 0 and np.linalg.det(hessian) > 0):
        return np.zeros(2)
    return np.clip(-np.linalg.solve(hessian, gradient), -0.5, 0.5)


def test_equals_plain_reference_on_random_maps() -> None:
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, size=(3, 20, 30)) ** 4
    scores[1, 5:8, 5:8] = 0.25  # a flat patch: no proper maximum
    keypoints = []
    for image in scores:  # the local maxima (most get an offset) and some random pixels (most do not)
        padded = np.pad(image, 1, constant_values=-1.0)
        neighbours = [padded[1 + dy : 21 + dy, 1 + dx : 31 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        ys, xs = np.nonzero(image >= np.max(neighbours, axis=0))
        random = np.stack([rng.integers(0, 30, 20), rng.integers(0, 20, 20)], -1)
        keypoints.append(torch.from_numpy(np.concatenate([np.stack([xs, ys], -1), random])).float())
    keypoints[1] = torch.cat([keypoints[1], torch.tensor([[6.0, 6.0], [0.0, 0.0], [29.0, 19.0]])])
    keypoints[2] = keypoints[2][:0]  # an image without keypoints
    refined = refine_keypoints(torch.from_numpy(scores).float(), keypoints)
    for image, (found, start) in enumerate(zip(refined, keypoints)):
        assert found.shape == start.shape
        for (x, y), position in zip(start.long().tolist(), found.numpy()):
            expected = np.array([x, y]) + plain_refine(scores[image], x, y)
            np.testing.assert_allclose(position, expected, atol=1e-4)
        assert torch.all((found - start).abs() <= MAX_OFFSET)
    assert (refined[0] != keypoints[0]).any(dim=1).float().mean() > 0.3
    assert refined[1][-3].tolist() == [6.0, 6.0]  # flat: unchanged


def test_postprocess_samples_descriptors_at_refined_positions() -> None:
    rng = np.random.default_rng(2)
    centres = np.stack(np.meshgrid(np.arange(10, 60, 9), np.arange(10, 40, 9)), -1).reshape(-1, 2)
    centres = centres + rng.uniform(-0.5, 0.5, size=centres.shape)
    scores = torch.from_numpy(gaussian_blobs((48, 64), centres)).float()[None]
    descriptors = torch.nn.functional.normalize(torch.randn(1, 16, 6, 8), dim=1)
    (plain,) = postprocess(scores, descriptors, 0.005, 4, 4, -1)
    (refined,) = postprocess(scores, descriptors, 0.005, 4, 4, -1, subpixel=True)
    assert torch.equal(plain.scores, refined.scores)  # same keypoints, same order
    assert torch.equal(plain.keypoints, plain.keypoints.round())  # the reference stays on the grid
    offsets = refined.keypoints - plain.keypoints
    assert 0 < offsets.abs().max() <= MAX_OFFSET
    (expected,) = sample_descriptors([refined.keypoints], descriptors)
    torch.testing.assert_close(refined.descriptors, expected)
    assert not torch.allclose(refined.descriptors, plain.descriptors)


def test_cli_records_subpixel_and_stores_refined_keypoints(tmp_path, small_images, random_weights) -> None:
    stores = {}
    for flag in ((), ("--subpixel",)):
        out = tmp_path / f"feats{len(flag)}.h5"
        result = run_cli(str(small_images), "--out", str(out), "--weights", str(random_weights), "-q",
                         "--num-workers", "0", *flag)  # fmt: skip
        assert result.returncode == 0, result.stderr
        stores[bool(flag)] = out
    with h5py.File(stores[False], "r") as plain, h5py.File(stores[True], "r") as refined:
        assert plain.attrs["subpixel"] == False  # noqa: E712  (numpy bool)
        assert refined.attrs["subpixel"] == True  # noqa: E712
        for name in ("a.png", "b.jpg", "sub/c.png"):
            before, after = plain[name]["keypoints"][()], refined[name]["keypoints"][()]
            assert (
                before.shape == after.shape
                and refined[name]["descriptors"].shape == plain[name]["descriptors"].shape
            )
            assert np.abs(after - before).max() <= MAX_OFFSET + 1e-6  # native size: no scaling
            assert np.any(after != np.round(after))
    result = run_cli(str(small_images), "--out", str(stores[True]), "--weights", str(random_weights), "-q")
    assert result.returncode == 2 and "subpixel" in result.stderr  # resume with other settings refused


def test_every_compared_method_moves_towards_the_true_peak() -> None:
    """The methods of benchmarks/subpixel.py: each beats the pixel grid on Gaussian peaks."""
    from sp_extract.extraction.refine import METHODS

    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(np.arange(8, 90, 12), np.arange(8, 60, 12)), -1).reshape(-1, 2)
    centres = grid + rng.uniform(-0.45, 0.45, size=grid.shape)
    scores = torch.from_numpy(gaussian_blobs((64, 96), centres)[None]).float()
    start = torch.from_numpy(np.round(centres)).float()
    grid_error = np.abs(start.numpy() - centres).mean()
    for method in METHODS:
        found = refine_keypoints(scores, [start], method)[0].numpy()
        assert np.abs(found - centres).mean() < 0.5 * grid_error, method
        assert np.abs(found - start.numpy()).max() <= MAX_OFFSET + 1e-6, method
