"""EXIF orientation: the tag from each container, the pixels the network sees, and keypoints mapped
back into the stored frame, against explicit references (OpenCV's rotations and flips, the point
mapping written out by hand, and OpenCV's own EXIF-honouring reader)."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.decode import load_image
from sp_extract.extraction.orientation import read_orientation

# stored pixels -> what a viewer shows, per EXIF orientation, with OpenCV's own operations
VIEW = {
    1: lambda s: s,
    2: lambda s: cv2.flip(s, 1),
    3: lambda s: cv2.rotate(s, cv2.ROTATE_180),
    4: lambda s: cv2.flip(s, 0),
    5: lambda s: cv2.transpose(s),
    6: lambda s: cv2.rotate(s, cv2.ROTATE_90_CLOCKWISE),
    7: lambda s: cv2.rotate(cv2.transpose(s), cv2.ROTATE_180),
    8: lambda s: cv2.rotate(s, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def to_stored(x: np.ndarray, y: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """A point (x, y) of the viewer's image, written out by hand in the stored image's pixels
    (``width`` x ``height``, stored)."""
    w, h = width - 1, height - 1
    return np.stack(
        {
            1: (x, y),
            2: (w - x, y),
            3: (w - x, h - y),
            4: (x, h - y),
            5: (y, x),
            6: (y, h - x),
            7: (w - y, h - x),
            8: (w - y, x),
        }[orientation],
        axis=1,
    )


def exif_tiff(orientation: int, order: str = "<") -> bytes:
    """An EXIF block (a TIFF structure) whose IFD0 holds an unrelated tag and Orientation."""
    mark = b"II" if order == "<" else b"MM"
    entries = struct.pack(order + "HHIHH", 0x010F, 2, 4, 0, 0)  # Make, ASCII, empty: skipped
    entries += struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0)
    return mark + struct.pack(order + "HI", 42, 8) + struct.pack(order + "H", 2) + entries + b"\x00" * 4


def jpeg_bytes(pixels: np.ndarray, orientation: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    payload = b"Exif\x00\x00" + exif_tiff(orientation, ">")
    data = encoded.tobytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def png_bytes(pixels: np.ndarray, orientation: int) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    data, body = encoded.tobytes(), exif_tiff(orientation)
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    return data[:33] + chunk + data[33:]  # after the signature and IHDR


def webp_bytes(pixels: np.ndarray, orientation: int) -> bytes:
    ok, encoded = cv2.imencode(".webp", pixels, [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless
    assert ok
    data = encoded.tobytes()
    height, width = pixels.shape[:2]
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + canvas  # flag: has EXIF
    body = exif_tiff(orientation) + b"\x00"  # odd size: padded
    exif = b"EXIF" + struct.pack("<I", len(body) - 1) + body
    chunks = vp8x + data[12:] + exif
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def tiff_bytes(pixels: np.ndarray, orientation: int) -> bytes:
    """A plain uncompressed 8-bit grayscale TIFF with an Orientation tag."""
    height, width = pixels.shape
    tags = [(256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0)]
    tags += [(274, 3, orientation), (277, 3, 1), (278, 3, height), (279, 4, width * height)]
    directory_size = 2 + 12 * len(tags) + 4
    tags[5] = (273, 4, 8 + directory_size)  # the strip right after the directory
    entries = b"".join(
        struct.pack("<HHIHH", tag, kind, 1, value, 0)
        if kind == 3
        else struct.pack("<HHII", tag, kind, 1, value)
        for tag, kind, value in tags
    )
    return (
        b"II*\x00"
        + struct.pack("<I", 8)
        + struct.pack("<H", len(tags))
        + entries
        + b"\x00" * 4
        + pixels.tobytes()
    )


WRITERS = {"jpg": jpeg_bytes, "png": png_bytes, "webp": webp_bytes, "tif": tiff_bytes}


def stored_pixels(width: int = 72, height: int = 40, seed: int = 0) -> np.ndarray:
    """Blocks with a gradient: no rotation or flip of it equals another."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 200, (height // 8 + 1, width // 8 + 1)), np.ones((8, 8)))[
        :height, :width
    ]
    return (blocks + np.linspace(0, 55, width)[None]).astype(np.uint8)


@pytest.mark.parametrize("ext", sorted(WRITERS))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_container_shows_the_network_the_viewers_image(
    tmp_path: Path, ext: str, orientation: int
) -> None:
    stored = stored_pixels()
    data = WRITERS[ext](stored, orientation)
    (tmp_path / f"a.{ext}").write_bytes(data)
    fmt = {"jpg": "jpeg", "tif": "tiff", "png": "png", "webp": "webp"}[ext]
    assert read_orientation(data, fmt) == orientation

    shown = load_image(tmp_path, f"a.{ext}", ExtractConfig(resize_max=0))
    as_stored = load_image(tmp_path, f"a.{ext}", ExtractConfig(resize_max=0, orientation="ignore"))

    assert shown.error is None and shown.orientation == orientation
    assert shown.original_size == as_stored.original_size == (72, 40)  # the stored frame
    assert as_stored.orientation == 1
    np.testing.assert_array_equal(shown.image, VIEW[orientation](as_stored.image))
    if ext != "jpg":  # lossless: the stored pixels themselves
        np.testing.assert_array_equal(as_stored.image, stored / np.float32(255))
    else:  # OpenCV's reader honours a JPEG's EXIF orientation: the tag means what we wrote
        upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(shown.image * 255, upright.astype(np.float32))


def test_resize_and_reduced_decode_with_orientation(tmp_path: Path) -> None:
    stored = cv2.resize(stored_pixels(seed=3), (720, 400), interpolation=cv2.INTER_NEAREST)
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(stored, 6))
    for options in (
        {"resize_max": 200},
        {"resize_max": 90, "reduced_decode": True},
        {"resize_max": 900, "resize_force": True},
    ):
        shown = load_image(tmp_path, "a.jpg", ExtractConfig(**options))
        as_stored = load_image(tmp_path, "a.jpg", ExtractConfig(orientation="ignore", **options))
        assert shown.original_size == as_stored.original_size == (720, 400)
        assert shown.image.shape == as_stored.image.shape[::-1]
        np.testing.assert_array_equal(shown.image, VIEW[6](as_stored.image))


def read_store(path: Path) -> dict[str, dict[str, np.ndarray]]:
    entries = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(
            lambda name, item: (
                entries.update({name: item}) if isinstance(item, h5py.Group) and "keypoints" in item else None
            )
        )
        return {name: {key: group[key][()] for key in group} for name, group in entries.items()}


def sorted_features(entry: dict[str, np.ndarray], keypoints: np.ndarray) -> tuple[np.ndarray, ...]:
    order = np.lexsort((keypoints[:, 0], keypoints[:, 1]))
    return keypoints[order], entry["scores"][order], entry["descriptors"][:, order]


def test_keypoints_map_back_to_the_stored_frame(
    tmp_path: Path, sacre_coeur: Path, real_weights: Path
) -> None:
    """Each orientation against the reference: the viewer's image written upright (no tag) and
    extracted, its keypoints mapped into the stored frame by hand."""
    from sp_extract import ExtractRun, extract

    photo = cv2.imread(str(sorted(sacre_coeur.glob("*.jpg"))[0]), cv2.IMREAD_GRAYSCALE)
    stored = np.ascontiguousarray(photo[200:344, 300:504])  # 204 x 144, not a multiple of 8
    height, width = stored.shape
    images = tmp_path / "images"
    for orientation in VIEW:
        (images / "upright").mkdir(parents=True, exist_ok=True)
        (images / f"{orientation}.png").write_bytes(png_bytes(stored, orientation))
        assert cv2.imwrite(str(images / "upright" / f"{orientation}.png"), VIEW[orientation](stored))
    (tmp_path / "list.txt").write_text("".join(f"{o}.png\n" for o in VIEW))
    run = ExtractRun(weights=str(real_weights), device="cpu", backend="torch")
    summary = extract(images, tmp_path / "exif.h5", ExtractConfig(resize_max=0), run)
    assert summary.orientation_applied == 7 and summary.to_dict()["orientation_applied"] == 7
    config = ExtractConfig(resize_max=0, orientation="ignore")
    extract(images, tmp_path / "ignored.h5", config, replace(run, image_list=tmp_path / "list.txt"))
    got, ignored = read_store(tmp_path / "exif.h5"), read_store(tmp_path / "ignored.h5")

    for orientation in VIEW:
        name = f"{orientation}.png"
        assert tuple(got[name]["image_size"]) == (width, height)  # the stored frame
        reference = got[f"upright/{name}"]
        viewer_points = reference["keypoints"]
        expected = to_stored(viewer_points[:, 0], viewer_points[:, 1], orientation, width, height)
        assert len(expected) > 30
        for actual, wanted in zip(
            sorted_features(got[name], got[name]["keypoints"]), sorted_features(reference, expected)
        ):
            np.testing.assert_allclose(actual, wanted, rtol=0, atol=1e-3)
        # ignore: exactly today's output, the stored pixels whatever the tag
        for key, value in ignored[name].items():
            np.testing.assert_array_equal(value, ignored["1.png"][key])
    for key, value in got["1.png"].items():
        np.testing.assert_array_equal(value, ignored["1.png"][key])
