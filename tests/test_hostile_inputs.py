"""Hostile inputs, generated here, through one real run: each bad file is reported with its
reason while the run goes on (exit 1); odd but valid files are stored. Plus the two memory
guards: a 30000 x 20000 JPEG decoded at reduced size, a decompression bomb refused unread."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_image
from support.reliability import cli_env, drop_root_file_override, read_entries, run_limited

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.decode import load_image


def flat_jpeg(width: int, height: int, components: int = 1, adobe: bool = False) -> bytes:
    """A baseline JPEG whose 8 x 8 blocks are all flat mid-grey, built by hand in no time.

    One-code Huffman tables make every block two zero bits (DC difference 0, end of block), so
    even a 600 Mpx image is a few MB of zero bytes. ``components=4`` with ``adobe`` is CMYK.
    """

    def segment(code: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([code]) + struct.pack(">H", len(payload) + 2) + payload

    one_code = bytes([1] + [0] * 15) + b"\x00"  # one code, of length 1, for symbol 0
    ids = range(1, components + 1)
    data = b"\xff\xd8"
    if adobe:
        data += segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0))
    data += segment(0xDB, b"\x00" + bytes([1] * 64))
    frame = struct.pack(">BHHB", 8, height, width, components) + b"".join(bytes([i, 0x11, 0]) for i in ids)
    data += segment(0xC0, frame) + segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code)
    data += segment(0xDA, bytes([components]) + b"".join(bytes([i, 0]) for i in ids) + b"\x00\x3f\x00")
    blocks = -(-width // 8) * -(-height // 8) * components
    return data + bytes(-(-blocks * 2 // 8)) + b"\xff\xd9"


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels (10 Gpx, 10 GB to decode)."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    rows = zlib.compress(bytes(100_001 * 16))
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
    )


def gray(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width)).astype(np.uint8)


FAILED = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated JPEG",
    "broken-crc.png": "corrupt or truncated png",
    "text.jpg": "not a readable image",
    "bomb.png": "too large to decode: 100000 x 100000",
    "unreadable.png": "Permission denied",
    "fifo.jpg": "not a regular file",
    "dangling.jpg": "broken symbolic link",
    "loop-a.jpg": "symbolic link loop",
    "loop-b.jpg": "symbolic link loop",
}
STORED = {  # name: (width, height) as stored
    "png-named.jpg": (64, 48),
    "deep16.png": (64, 48),
    "deep16.tif": (64, 48),
    "cmyk.jpg": (64, 48),
    "rgba.png": (64, 48),
    "one.png": (1, 1),
    "seven.png": (7, 7),
    "huge.jpg": (30000, 20000),
    "with space.png": (96, 64),
    "ünïcødé 写真.png": (96, 64),
    "-n 1.png": (96, 64),
    "--out.png": (96, 64),
    "Case.png": (40, 30),
    "case.png": (48, 36),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "images"
    root.mkdir()
    (root / "empty.jpg").write_bytes(b"")
    jpeg = cv2.imencode(".jpg", gray(96, 64, 1))[1].tobytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    png = bytearray(cv2.imencode(".png", gray(64, 48, 2))[1].tobytes())
    idat = png.find(b"IDAT")
    png[idat + 4 + struct.unpack(">I", png[idat - 4 : idat])[0]] ^= 0xFF  # the IDAT chunk's CRC
    (root / "broken-crc.png").write_bytes(bytes(png))
    (root / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "bomb.png").write_bytes(bomb_png())
    write_image(root / "unreadable.png").chmod(0)
    os.mkfifo(root / "fifo.jpg")
    (root / "dangling.jpg").symlink_to("nowhere.jpg")
    (root / "loop-a.jpg").symlink_to("loop-b.jpg")
    (root / "loop-b.jpg").symlink_to("loop-a.jpg")

    (root / "png-named.jpg").write_bytes(cv2.imencode(".png", gray(64, 48, 3))[1].tobytes())
    deep = gray(64, 48, 4).astype(np.uint16) * 257
    assert cv2.imwrite(str(root / "deep16.png"), deep) and cv2.imwrite(str(root / "deep16.tif"), deep)
    (root / "cmyk.jpg").write_bytes(flat_jpeg(64, 48, components=4, adobe=True))
    assert cv2.imwrite(str(root / "rgba.png"), np.dstack([gray(64, 48, seed) for seed in range(4)]))
    assert cv2.imwrite(str(root / "one.png"), gray(1, 1, 5))
    assert cv2.imwrite(str(root / "seven.png"), gray(7, 7, 6))
    (root / "huge.jpg").write_bytes(flat_jpeg(30000, 20000))
    for seed, name in enumerate(["with space.png", "ünïcødé 写真.png", "-n 1.png", "--out.png"]):
        write_image(root / name, seed=10 + seed)
    write_image(root / "Case.png", 40, 30, seed=20)
    write_image(root / "case.png", 48, 36, seed=21)
    return root


def test_each_bad_file_is_reported_and_the_rest_is_stored(
    hostile: Path, random_weights: Path, tmp_path: Path
) -> None:
    store = tmp_path / "feats.h5"
    # as root, chmod 000 only binds once the DAC-override capabilities are dropped (see helper)
    result = run_limited(
        str(hostile),
        "--out",
        str(store),
        "--weights",
        str(random_weights),
        "--num-workers",
        "2",
        preexec=drop_root_file_override,
    )

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    failed = dict(re.findall(r"^failed: (.+?): (.+)$", result.stderr, re.MULTILINE))
    assert failed.keys() == FAILED.keys(), result.stderr
    for name, reason in FAILED.items():
        assert reason in failed[name], (name, failed[name])
    entries = read_entries(store)
    assert entries.keys() == STORED.keys()
    for name, size in STORED.items():
        assert tuple(entries[name]["image_size"][0]) == size, name
        keypoints = entries[name]["keypoints"][0]
        assert ((keypoints >= 0) & (keypoints <= np.array(size) - 1)).all(), name
    for tiny in ("one.png", "seven.png"):  # smaller than one 8 x 8 cell: stored, no keypoint
        assert entries[tiny]["keypoints"][0].shape == (0, 2)
        assert entries[tiny]["descriptors"][0].shape == (256, 0)


def test_huge_jpeg_is_decoded_reduced(tmp_path: Path) -> None:
    (tmp_path / "huge.jpg").write_bytes(flat_jpeg(30000, 20000))
    decoded = load_image(tmp_path, "huge.jpg", ExtractConfig(resize_max=1024))
    assert decoded.original_size == (30000, 20000)
    assert decoded.image.shape == (683, 1024)  # hloc's rule: round(20000 * 1024 / 30000)
    np.testing.assert_allclose(decoded.image, 128 / 255, atol=1e-6, rtol=0)


@pytest.mark.parametrize("resize_max", [800, 400, 200])
def test_reduced_decoding_matches_full_decoding_and_area_resize(tmp_path: Path, resize_max: int) -> None:
    smooth = cv2.GaussianBlur(gray(1600, 1200, 7), (0, 0), 3)
    smooth = cv2.normalize(smooth, None, 0, 255, cv2.NORM_MINMAX)
    assert cv2.imwrite(str(tmp_path / "photo.jpg"), smooth, [cv2.IMWRITE_JPEG_QUALITY, 95])

    decoded = load_image(tmp_path, "photo.jpg", ExtractConfig(resize_max=resize_max, reduced_decode=True))

    full = cv2.imread(str(tmp_path / "photo.jpg"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    size = (resize_max, resize_max * 3 // 4)
    expected = cv2.resize(full, size, interpolation=cv2.INTER_AREA) / 255
    assert decoded.original_size == (1600, 1200) and decoded.image.shape == expected.shape
    difference = np.abs(decoded.image - expected)
    assert difference.mean() < 0.5 / 255 and difference.max() <= 1.5 / 255


def peak_memory_mb(*args: str) -> float:
    """Peak resident memory of one ``sp-extract`` run, measured by a wrapper process."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run([sys.executable, '-m', 'sp_extract', *sys.argv[1:]]).returncode\n"
        "assert code == 0, code\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *args], capture_output=True, text=True, env=cli_env()
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) / 1024


def test_huge_jpeg_memory_stays_bounded(tmp_path: Path, random_weights: Path) -> None:
    # the baseline has the huge image's working size, so the network needs the same memory
    for name, (width, height) in {"small": (1024, 683), "huge": (30000, 20000)}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "image.jpg").write_bytes(flat_jpeg(width, height))
    common = ["--weights", str(random_weights), "--num-workers", "0", "--quiet"]
    small = peak_memory_mb(str(tmp_path / "small"), "--out", str(tmp_path / "small.h5"), *common)
    huge = peak_memory_mb(str(tmp_path / "huge"), "--out", str(tmp_path / "huge.h5"), *common)
    # a full decode would hold 600 MB of 8-bit pixels (and 2.4 GB as float32)
    assert huge - small < 200, (small, huge)
