"""Masks (COLMAP's convention): keypoints on zero pixels removed before the top-k, in the stored
frame whatever the orientation and resize; missing, wrong-size and unreadable masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from test_orientation import jpeg_bytes

from sp_extract.errors import StoreError
from sp_extract.extraction.config import ExtractConfig


def entry(path: Path, name: str) -> dict[str, np.ndarray]:
    with h5py.File(path) as h5:
        return {key: value[()] for key, value in h5[name].items()}


def test_masked_keypoints_are_removed_before_the_top_k(
    tmp_path: Path, sacre_coeur: Path, real_weights: Path
) -> None:
    from sp_extract import ExtractRun, extract

    photo = cv2.imread(str(sorted(sacre_coeur.glob("*.jpg"))[1]), cv2.IMREAD_GRAYSCALE)
    stored = np.ascontiguousarray(cv2.resize(photo, (300, 200), interpolation=cv2.INTER_AREA))
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    (images / "sub" / "side.jpg").write_bytes(jpeg_bytes(stored, 6))  # sideways, with a tag
    assert cv2.imwrite(str(images / "plain.png"), stored)
    assert cv2.imwrite(str(images / "unmasked.png"), stored)  # no mask: the whole image
    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, 2, (10, 15)), np.ones((20, 20))).astype(np.uint8) * 255
    assert cv2.imwrite(str(masks / "sub" / "side.jpg.png"), mask)
    assert cv2.imwrite(str(masks / "plain.png.png"), mask)
    run = ExtractRun(weights=str(real_weights), device="cpu", backend="torch")
    all_points = extract(images, tmp_path / "all.h5", ExtractConfig(resize_max=240), run)
    assert all_points.masks_missing == 0 and not all_points.masks_used
    config = ExtractConfig(resize_max=240, max_keypoints=60, masks=str(masks))
    summary = extract(images, tmp_path / "masked.h5", config, run)

    assert summary.exit_code == 0 and summary.masks_missing == 1 and len(summary.masked_shares) == 2
    share = float(np.mean(mask == 0))
    report = summary.to_dict()
    assert report["masked_images"] == 2 and report["masked_share_mean"] == pytest.approx(share, abs=1e-4)
    assert "1 without a mask (whole image used)" in "\n".join(summary.lines())
    for name in ("sub/side.jpg", "plain.png"):
        reference, got = entry(tmp_path / "all.h5", name), entry(tmp_path / "masked.h5", name)
        # reference: every keypoint, those on zero mask pixels (COLMAP's int(x + 0.5) lookup in
        # the stored frame) dropped, then the 60 best
        x, y = np.floor(reference["keypoints"].T + 0.5).astype(int)
        kept = mask[y, x] != 0
        assert 60 < kept.sum() < len(kept)
        order = np.argsort(-reference["scores"][kept], kind="stable")[:60]
        np.testing.assert_array_equal(got["keypoints"], reference["keypoints"][kept][order])
        np.testing.assert_array_equal(got["descriptors"], reference["descriptors"][:, kept][:, order])
    unmasked = entry(tmp_path / "masked.h5", "unmasked.png")
    np.testing.assert_array_equal(
        unmasked["scores"], np.sort(entry(tmp_path / "all.h5", "unmasked.png")["scores"])[::-1][:60]
    )

    # the mask folder is a store setting
    with h5py.File(tmp_path / "masked.h5") as h5:
        assert json.loads(h5.attrs["sp_extract_settings"])["masks"] == str(masks.resolve())
    other = tmp_path / "other_masks"
    other.mkdir()
    with pytest.raises(StoreError, match="masks"):
        extract(
            images,
            tmp_path / "masked.h5",
            ExtractConfig(resize_max=240, max_keypoints=60, masks=str(other)),
            run,
        )


def test_wrong_size_and_unreadable_masks_fail_their_image(tmp_path: Path, random_weights: Path) -> None:
    from conftest import write_image

    from sp_extract import ExtractRun, extract

    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("good.png", "small.png", "garbage.png", "notpng.png"):
        write_image(images / name, 96, 64)
    masks.mkdir()
    assert cv2.imwrite(str(masks / "good.png.png"), np.full((64, 96), 255, np.uint8))
    assert cv2.imwrite(str(masks / "small.png.png"), np.full((32, 48), 255, np.uint8))
    (masks / "garbage.png.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + bytes([0, 0, 0, 96, 0, 0, 0, 64]) + b"junk"
    )
    assert cv2.imwrite(str(masks / "notpng.png.png.jpg"), np.zeros((64, 96), np.uint8))
    (masks / "notpng.png.png.jpg").rename(masks / "notpng.png.png")
    summary = extract(
        images, tmp_path / "f.h5", ExtractConfig(masks=str(masks)), ExtractRun(str(random_weights), "cpu")
    )
    reasons = {f["name"]: f["reason"] for f in summary.failed}
    assert summary.done == 1 and summary.exit_code == 1
    assert (
        "is 48 x 32 pixels, the image 96 x 64" in reasons["small.png"]
        and "small.png.png" in reasons["small.png"]
    )
    assert "corrupt or truncated PNG" in reasons["garbage.png"]
    assert "not a PNG file" in reasons["notpng.png"]
    with pytest.raises(Exception, match="not a directory"):
        ExtractConfig(masks=str(tmp_path / "nowhere"))
