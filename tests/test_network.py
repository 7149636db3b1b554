"""The SuperPoint network and pipeline against the plain reference in ``superpoint_reference``.

Real weights (../shared) on crops of real photos: dense outputs, end-to-end features and batched
vs one-at-a-time results; the v6 (BatchNorm) architecture on synthetic weights in its own layout.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from support.superpoint_reference import (
    RefFeatures,
    assert_same_features,
    dense_v1,
    dense_v6,
    postprocess,
    random_v6_state,
)

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.pipeline import SuperPoint
from sp_extract.extraction.weights import load_weights


def photo_crops(folder: Path, count: int, height: int = 240, width: int = 320) -> torch.Tensor:
    """(count, 1, height, width) grayscale crops in [0, 1] from the middle of the first photos."""
    crops = []
    for path in sorted(folder.glob("*.jpg"))[:count]:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        top, left = (gray.shape[0] - height) // 2, (gray.shape[1] - width) // 2
        crops.append(gray[top : top + height, left : left + width].astype(np.float32) / 255)
    return torch.from_numpy(np.stack(crops))[:, None]


@pytest.fixture(scope="module")
def v1_state(real_weights: Path) -> dict[str, torch.Tensor]:
    return torch.load(real_weights, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(("height", "width"), [(240, 320), (123, 205)])
def test_dense_outputs_match_reference(real_weights, sacre_coeur, v1_state, height, width) -> None:
    images = photo_crops(sacre_coeur, 2, height, width)
    net = load_weights(str(real_weights)).build()
    with torch.inference_mode():
        scores, descriptors = net(images)
        ref_scores, ref_descriptors = dense_v1(v1_state, images)
    assert scores.shape == (2, height // 8 * 8, width // 8 * 8)
    assert descriptors.shape == (2, 256, height // 8, width // 8)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(descriptors, ref_descriptors, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [ExtractConfig(), ExtractConfig(max_keypoints=300, nms_radius=3, border=2, threshold=0.01)],
    ids=["defaults", "top300-r3-b2"],
)
def test_end_to_end_matches_reference_pipeline(real_weights, sacre_coeur, v1_state, config) -> None:
    image = photo_crops(sacre_coeur, 1)
    (ours,) = SuperPoint(str(real_weights), config)(image)
    scores, descriptors = dense_v1(v1_state, image)
    ref = postprocess(
        scores[0].numpy(),
        descriptors[0].numpy(),
        config.threshold,
        config.nms_radius,
        config.border,
        config.max_keypoints,
    )
    assert len(ref.scores) > 100  # a real photo: hundreds of keypoints, not a vacuous comparison
    assert_same_features(ours, ref, config.max_keypoints)


def test_batch_equals_one_at_a_time(real_weights, sacre_coeur) -> None:
    images = photo_crops(sacre_coeur, 3, 192, 256)
    model = SuperPoint(str(real_weights), ExtractConfig(max_keypoints=300))
    batched = model(images)
    assert len(batched) == 3
    for index, together in enumerate(batched):
        (alone,) = model(images[index : index + 1])
        assert len(alone.scores) > 100
        as_reference = RefFeatures(
            alone.keypoints.numpy().astype(int), alone.scores.numpy(), alone.descriptors.numpy()
        )
        assert_same_features(together, as_reference, 300)


def test_v6_batchnorm_architecture_matches_reference(tmp_path, sacre_coeur) -> None:
    state = random_v6_state(seed=3)
    path = tmp_path / "superpoint_v6.pth"
    torch.save(state, path)
    loaded = load_weights(str(path))
    assert loaded.batch_norm
    net = loaded.build()
    images = photo_crops(sacre_coeur, 2, 96, 128)
    with torch.inference_mode():
        scores, descriptors = net(images)
        ref_scores, ref_descriptors = dense_v6(state, images)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(descriptors, ref_descriptors, rtol=0, atol=1e-5)
    assert ref_scores.std() > 1e-4  # the random BatchNorm network is not degenerate
