"""Feature store layout, read back the way hloc reads it (see support/hloc_reader.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from support.hloc_reader import get_keypoints, list_h5_names, load_for_matching

import sp_extract
from sp_extract.extraction.config import ExtractConfig, ExtractRun
from sp_extract.extraction.decode import load_image
from sp_extract.extraction.pipeline import SuperPoint, extract

NAMES = {"a.png", "b.jpg", "sub/c.png"}
CONFIG = ExtractConfig(resize_max=64, max_keypoints=300)


def git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def store(small_images: Path, random_weights: Path, tmp_path: Path) -> Path:
    out = tmp_path / "feats.h5"
    summary = extract(small_images, out, CONFIG, ExtractRun(str(random_weights), "cpu", num_workers=0))
    assert summary.exit_code == 0 and summary.done == 3
    return out


def test_hloc_lists_exactly_the_image_names(store: Path) -> None:
    assert sorted(list_h5_names(store)) == sorted(NAMES)


def test_image_groups_hold_the_hloc_datasets(store: Path, small_images: Path) -> None:
    with h5py.File(store, "r") as h5:
        for name in NAMES:
            group = h5[name]
            assert set(group) == {"keypoints", "scores", "descriptors", "image_size"}
            n = len(group["scores"])
            assert n > 0
            assert group["keypoints"].shape == (n, 2) and group["keypoints"].dtype == np.float32
            assert group["scores"].shape == (n,) and group["scores"].dtype == np.float32
            assert group["descriptors"].shape == (256, n) and group["descriptors"].dtype == np.float16
            height, width = cv2.imread(str(small_images / name), cv2.IMREAD_UNCHANGED).shape[:2]
            assert group["image_size"].dtype == np.int64
            assert group["image_size"][()].tolist() == [width, height]
        # nested names are nested groups, as h5py creates them for "sub/c.png"
        assert isinstance(h5["sub"], h5py.Group) and "c.png" in h5["sub"]


def working_frame(store: Path, small_images: Path, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Stored keypoints mapped back to the network's pixels by inverting hloc's rule
    ``k_original = (k + 0.5) * scale - 0.5``; also the scale and the stored uncertainty."""
    decoded = load_image(small_images, name, CONFIG)
    working_h, working_w = decoded.image.shape
    scale = np.array(decoded.original_size, np.float64) / (working_w, working_h)
    keypoints, uncertainty = get_keypoints(store, name)
    return (keypoints.astype(np.float64) + 0.5) / scale - 0.5, scale, uncertainty


def test_keypoints_are_network_pixels_mapped_with_hlocs_rule(store: Path, small_images: Path) -> None:
    # the resize really happens, so the mapping is not the identity
    assert load_image(small_images, "sub/c.png", CONFIG).image.shape == (64, 43)
    for name in NAMES:
        working, scale, uncertainty = working_frame(store, small_images, name)
        # without --subpixel a keypoint is a pixel of the network's image: an integer there
        np.testing.assert_allclose(working, np.round(working), atol=1e-3)
        height, width = load_image(small_images, name, CONFIG).image.shape
        upper = np.array([width, height]) - 1 - CONFIG.border
        assert np.all(working >= CONFIG.border - 1e-3) and np.all(working <= upper + 1e-3)
        assert uncertainty == pytest.approx(2.0 * scale.mean(), rel=1e-6)  # hloc: 2 px at the working size


def test_features_are_the_networks(store: Path, small_images: Path, random_weights: Path) -> None:
    model = SuperPoint(str(random_weights), CONFIG)
    for name in NAMES:
        decoded = load_image(small_images, name, CONFIG)
        (features,) = model(torch.from_numpy(decoded.image)[None, None])
        expected = {tuple(k): i for i, k in enumerate(features.keypoints.numpy().round().astype(int))}
        working, _, _ = working_frame(store, small_images, name)
        stored = [tuple(k) for k in np.round(working).astype(int)]
        # the store may come from another backend (onnxruntime): allow a rare tie broken otherwise
        matched = [(i, expected[k]) for i, k in enumerate(stored) if k in expected]
        assert len(matched) >= 0.98 * max(len(stored), len(expected)), name
        ours, theirs = np.array(matched).T
        with h5py.File(store, "r") as h5:
            scores = h5[name]["scores"][()]
            descriptors = h5[name]["descriptors"][()].astype(np.float32)
        np.testing.assert_allclose(scores[ours], features.scores.numpy()[theirs], atol=1e-5)
        np.testing.assert_allclose(descriptors[:, ours], features.descriptors.numpy()[theirs].T, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(descriptors, axis=0), 1.0, atol=2e-3)
        width, height = decoded.original_size
        keypoints, _ = get_keypoints(store, name)
        assert np.all(keypoints >= 0) and np.all(keypoints <= [width - 1, height - 1])


def test_hloc_matcher_loads_each_image_unchanged(store: Path) -> None:
    data = load_for_matching(store, "sub/c.png")
    n = data["keypoints0"].shape[0]
    assert set(data) == {"keypoints0", "scores0", "descriptors0", "image_size0", "image0"}
    assert data["descriptors0"].shape == (256, n) and data["scores0"].shape == (n,)
    assert data["image0"].shape == (1, 120, 80)  # (1, height, width) from image_size


def test_file_attributes_record_version_weights_and_every_setting(store: Path, random_weights: Path) -> None:
    with h5py.File(store, "r") as h5:
        attrs = dict(h5.attrs)
    assert attrs["sp_extract_version"] == sp_extract.__version__
    assert attrs["weights"] == random_weights.name
    assert attrs["weights_sha1"] == git_blob_sha1(random_weights)
    settings = json.loads(attrs["sp_extract_settings"])
    assert settings.pop("weights_sha1") == git_blob_sha1(random_weights)
    assert settings == {f.name: getattr(CONFIG, f.name) for f in fields(ExtractConfig)}
    assert settings["max_keypoints"] == 300 and settings["resize_max"] == 64 and settings["nms_radius"] == 4
    for key, value in settings.items():  # one attribute each, too
        assert attrs[key] == value, key


def test_fp32_descriptors_and_nothing_outside_image_groups(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fp32.h5"
    config = ExtractConfig(resize_max=64, fp32_descriptors=True)
    extract(small_images, out, config, ExtractRun(str(random_weights), "cpu", num_workers=0))
    datasets = []
    with h5py.File(out, "r") as h5:
        h5.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert h5["a.png/descriptors"].dtype == np.float32
    keys = ("keypoints", "scores", "descriptors", "image_size")
    assert set(datasets) == {f"{name}/{key}" for name in NAMES for key in keys}
    leftovers = [path.name for path in tmp_path.glob("fp32.h5.*")]
    assert leftovers == ["fp32.h5.index"]  # its name index; no parts, segments or lock left beside it
