"""Formats of real collections: HEIF/HEIC (pillow-heif, the [heif] extra), and files that are not
read (camera RAW, GIF, other files) listed or counted in the summary, never skipped silently."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_image

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.decode import load_image
from sp_extract.extraction.discover import find_images


def write_heic(path: Path, pixels: np.ndarray, orientation: int) -> None:
    """An HEIC of RGB ``pixels`` whose EXIF orientation pillow-heif turns into HEIF's own rotation."""
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[274] = orientation
    image.save(path, format="HEIF", quality=-1, exif=exif.tobytes())  # quality -1: lossless


def test_heic_is_read_upright(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (5, 9, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 40 x 72
    write_heic(tmp_path / "phone.heic", pixels, 6)

    decoded = load_image(tmp_path, "phone.heic", ExtractConfig(resize_max=0))

    assert decoded.error is None
    assert decoded.original_size == (40, 72)  # turned 90 degrees clockwise by the decoder
    gray = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(decoded.image, np.rot90(gray, -1), atol=6 / 255)  # HEVC: near-lossless


def test_heic_without_pillow_heif_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_heic(tmp_path / "phone.heic", np.zeros((16, 16, 3), np.uint8), 1)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails as when not installed

    decoded = load_image(tmp_path, "phone.heic", ExtractConfig())

    assert (
        decoded.error
        == "HEIF/HEIC needs pillow-heif: pip install 'sp-extract[heif]' (or pip install pillow-heif)"
    )


def test_unsupported_formats_are_listed_and_other_files_counted(tmp_path: Path, random_weights: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "a.jpg")
    write_image(images / "raw" / "b.png")
    write_heic(images / "raw" / "c.HEIC", np.full((64, 96, 3), 128, np.uint8), 1)
    for name in ("raw/b.NEF", "raw/c.dng", "d.CR2", "e.arw", "f.gif"):
        (images / name).write_bytes(b"II*\x00" + b"\x00" * 100)  # RAW files are TIFF-like: not decoded
    for name in ("notes.txt", "raw/b.xmp", "raw/c.xmp", "Makefile"):
        (images / name).write_text("x")
    report = tmp_path / "report.json"

    result = run_cli(str(images), "--out", str(tmp_path / "f.h5"), "--weights", str(random_weights), "-q",
                     "--json-report", str(report))  # fmt: skip

    assert result.returncode == 0, result.stderr
    unsupported = ["d.CR2", "e.arw", "f.gif", "raw/b.NEF", "raw/c.dng"]
    for name in unsupported:
        assert f"unsupported format: {name}" in result.stderr
    assert "not images, not read: 4 files (1 (no extension), 1 .txt, 2 .xmp)" in result.stderr
    data = json.loads(report.read_text())
    assert data["unsupported"] == unsupported and data["unsupported_count"] == 5
    assert data["other_files"] == {"": 1, ".txt": 1, ".xmp": 2}
    assert data["done"] == 3  # a.jpg, raw/b.png and the HEIC

    # an image list naming a RAW file: set apart as unsupported too
    listed = tmp_path / "list.txt"
    listed.write_text("a.jpg\nraw/b.NEF\n")
    scan = find_images(images, listed)
    assert scan.names == ["a.jpg"] and scan.unsupported == ["raw/b.NEF"]
