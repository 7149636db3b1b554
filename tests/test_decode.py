"""Decode: bit depths and channel layouts to grayscale in [0, 1], EXIF orientation, hloc's resize."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.decode import load_image, working_size

# ITU-R BT.601 luma, the weights of OpenCV's and libpng's RGB -> gray conversion
LUMA_RGB = np.array([0.299, 0.587, 0.114])


def expected_gray(pixels: np.ndarray, maximum: int) -> np.ndarray:
    """Plain grayscale in [0, 1] of an OpenCV (BGR / BGRA) array: luma of the colours, alpha ignored."""
    values = pixels.astype(np.float64)
    if values.ndim == 3:
        values = values[..., 2] * LUMA_RGB[0] + values[..., 1] * LUMA_RGB[1] + values[..., 0] * LUMA_RGB[2]
    return values / maximum


@pytest.mark.parametrize("ext", ["png", "tif"])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_bit_depths_and_channels_give_gray_in_unit_range(
    tmp_path: Path, ext: str, channels: int, dtype: type
) -> None:
    maximum = int(np.iinfo(dtype).max)
    rng = np.random.default_rng(channels)
    shape = (24, 40) if channels == 1 else (24, 40, channels)
    pixels = rng.integers(0, maximum + 1, shape).astype(dtype)
    pixels[0, 0] = 0  # the extremes of the range must map to exactly 0 and 1
    pixels[0, 1] = maximum
    assert cv2.imwrite(str(tmp_path / f"im.{ext}"), pixels)

    decoded = load_image(tmp_path, f"im.{ext}", ExtractConfig(resize_max=0))

    assert decoded.error is None
    assert decoded.original_size == (40, 24)
    assert decoded.image.dtype == np.float32 and decoded.image.shape == (24, 40)
    assert decoded.image.min() >= 0.0 and decoded.image.max() <= 1.0
    assert decoded.image[0, 0] == 0.0 and decoded.image[0, 1] == pytest.approx(1.0, abs=1e-6)
    # one grey level of rounding in the decoder's integer colour conversion
    tolerance = 1e-6 if channels == 1 else 1.01 / 255 if dtype == np.uint8 else 1.01 / 65535 * 4
    np.testing.assert_allclose(decoded.image, expected_gray(pixels, maximum), atol=tolerance, rtol=0)


def test_sixteen_bit_keeps_its_precision(tmp_path: Path) -> None:
    # levels 256 apart in 16 bit are one 8-bit level: a decoder that drops to 8 bit merges them
    pixels = (np.arange(40 * 24, dtype=np.uint16).reshape(24, 40) * 7).astype(np.uint16)
    assert cv2.imwrite(str(tmp_path / "deep.png"), pixels)
    decoded = load_image(tmp_path, "deep.png", ExtractConfig(resize_max=0))
    np.testing.assert_allclose(decoded.image, pixels / 65535.0, atol=1e-6, rtol=0)
    assert len(np.unique(decoded.image)) == pixels.size


def exif_orientation_segment(orientation: int) -> bytes:
    """An APP1 Exif segment whose only IFD0 entry is Orientation (tag 0x0112, SHORT)."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8)  # big-endian TIFF header, IFD0 at offset 8
    tiff += struct.pack(">H", 1)  # one entry
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)  # tag, SHORT, count 1, value, pad
    tiff += struct.pack(">I", 0)  # no next IFD
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def test_jpeg_exif_orientation_is_ignored_with_orientation_ignore(tmp_path: Path) -> None:
    height, width = 32, 64
    pixels = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    pixels[: height // 2] //= 2  # not symmetric under any rotation or flip
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    data = encoded.tobytes()
    assert data[:2] == b"\xff\xd8"
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data[:2] + exif_orientation_segment(6) + data[2:])  # 6: rotate 90 degrees CW
    # the crafted tag is real: a reader that honours EXIF turns the image upright
    assert cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape == (width, height)

    decoded = load_image(tmp_path, "rotated.jpg", ExtractConfig(resize_max=0, orientation="ignore"))

    assert decoded.error is None
    assert decoded.original_size == (width, height)
    assert decoded.image.shape == (height, width)
    np.testing.assert_allclose(decoded.image, pixels / 255.0, atol=3 / 255)


def hloc_size(width: int, height: int, resize_max: int, resize_force: bool) -> tuple[int, int]:
    """hloc's extract_features rule, written out: scale the longest side to resize_max."""
    if resize_max and (resize_force or max(width, height) > resize_max):
        scale = resize_max / max(width, height)
        return int(round(width * scale)), int(round(height * scale))
    return width, height


@pytest.mark.parametrize("resize_force", [False, True])
def test_working_size_matches_hloc(resize_force: bool) -> None:
    sizes = [(1, 1), (640, 480), (480, 640), (1024, 768), (1025, 30), (4000, 3000), (999, 1001), (333, 1667)]
    for width, height in sizes:
        for resize_max in (0, 100, 640, 1024, 1600):
            expected = hloc_size(width, height, resize_max, resize_force)
            assert working_size(width, height, resize_max, resize_force) == expected


def test_working_size_never_collapses_a_side() -> None:
    # hloc would round 3 * 100 / 1025 to an empty image; a side keeps at least one pixel
    assert working_size(1025, 3, 100, False) == (100, 1)


def test_downscale_uses_area_interpolation(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (90, 150)).astype(np.uint8)
    assert cv2.imwrite(str(tmp_path / "big.png"), pixels)

    decoded = load_image(tmp_path, "big.png", ExtractConfig(resize_max=50))

    assert decoded.original_size == (150, 90)
    assert decoded.image.shape == (30, 50)
    # exact factor 3: area interpolation is the plain mean of each 3 x 3 block
    block_means = pixels.astype(np.float64).reshape(30, 3, 50, 3).mean(axis=(1, 3)) / 255
    np.testing.assert_allclose(decoded.image, block_means, atol=1e-5)


def test_resize_force_upscales_bilinearly_and_otherwise_keeps_small_images(tmp_path: Path) -> None:
    pixels = np.array([[0, 255], [255, 0]], dtype=np.uint8).repeat(10, 0).repeat(10, 1)  # 20 x 20
    assert cv2.imwrite(str(tmp_path / "small.png"), pixels)

    kept = load_image(tmp_path, "small.png", ExtractConfig(resize_max=40))
    assert kept.image.shape == (20, 20)
    np.testing.assert_array_equal(kept.image, pixels / np.float32(255))

    forced = load_image(tmp_path, "small.png", ExtractConfig(resize_max=40, resize_force=True))
    assert forced.original_size == (20, 20)
    assert forced.image.shape == (40, 40)
    # bilinear (hloc falls back from area to linear when enlarging): a ramp across each edge
    row = forced.image[5]
    assert row[0] == 0.0 and row[-1] == pytest.approx(1.0)
    assert np.all(np.diff(row[:20]) >= 0) and 0 < row[19] < 1 and 0 < row[20] < 1
    np.testing.assert_allclose(
        forced.image,
        cv2.resize(pixels.astype(np.float32), (40, 40), interpolation=cv2.INTER_LINEAR) / 255,
        atol=1e-6,
    )


def test_resize_max_zero_keeps_native_size(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (300, 2100)).astype(np.uint8)
    assert cv2.imwrite(str(tmp_path / "wide.png"), pixels)
    decoded = load_image(tmp_path, "wide.png", ExtractConfig(resize_max=0, resize_force=True))
    assert decoded.image.shape == (300, 2100)
    np.testing.assert_array_equal(decoded.image, pixels / np.float32(255))


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"hello, not an image\n", "format")],
)
def test_unreadable_files_are_returned_as_errors(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "bad.jpg").write_bytes(content)
    decoded = load_image(tmp_path, "bad.jpg", ExtractConfig())
    assert decoded.image is None
    assert decoded.name == "bad.jpg"
    assert reason in decoded.error


def test_missing_file_is_returned_as_error(tmp_path: Path) -> None:
    decoded = load_image(tmp_path, "gone.png", ExtractConfig())
    assert decoded.image is None and decoded.error
