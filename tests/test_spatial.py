"""Spatial and loop-closure pairs: EXIF GPS read back from written JPEGs, the nearest images
within a distance against plain haversine distances, images without GPS reported."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli, write_image

from sp_extract.pairs.spatial import read_gps


def rationals(*values: float) -> bytes:
    return b"".join(struct.pack("<II", round(v * 1000), 1000) for v in values)


def jpeg_with_gps(path: Path, latitude: float, longitude: float, altitude: float, seed: int) -> Path:
    """A small JPEG whose EXIF holds a GPS IFD (degrees, minutes, seconds; reference letters)."""
    ok, encoded = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (32, 48), np.uint8))
    assert ok

    def dms(value: float) -> bytes:
        value = abs(value)
        minutes = (value - int(value)) * 60
        return rationals(int(value), int(minutes), (minutes - int(minutes)) * 60)

    gps_offset = 8 + 2 + 12 + 4
    data_offset = gps_offset + 2 + 6 * 12 + 4
    values = dms(latitude) + dms(longitude) + rationals(abs(altitude))
    entries = [
        (1, 2, 2, (b"N\0" if latitude >= 0 else b"S\0").ljust(4, b"\0")),
        (2, 5, 3, struct.pack("<I", data_offset)),
        (3, 2, 2, (b"E\0" if longitude >= 0 else b"W\0").ljust(4, b"\0")),
        (4, 5, 3, struct.pack("<I", data_offset + 24)),
        (5, 1, 1, bytes([altitude < 0, 0, 0, 0])),
        (6, 5, 1, struct.pack("<I", data_offset + 48)),
    ]
    ifd0 = struct.pack("<HHHII", 1, 0x8825, 4, 1, gps_offset) + struct.pack("<I", 0)
    gps = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
    payload = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd0 + gps + struct.pack("<I", 0) + values
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes()[:2] + segment + encoded.tobytes()[2:])
    return path


def haversine(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371008.8 * math.asin(math.sqrt(h))


def test_spatial_pairs_from_exif_gps(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = tmp_path / "survey"
    positions = {}
    for i in range(14):  # a drone strip over a few hundred metres, south of the equator, west
        position = (-33.8568 + rng.uniform(0, 0.002), -70.6493 + rng.uniform(0, 0.003))
        name = f"strip/img{i:02d}.jpg"
        jpeg_with_gps(images / name, *position, altitude=520.0 + i, seed=i)
        positions[name] = position
    write_image(images / "nogps.png", seed=1)
    write_image(images / "plain.jpg", seed=2)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM\x00*")  # truncated EXIF

    latitude, longitude, altitude = read_gps(images / "strip/img03.jpg")
    assert (latitude, longitude) == pytest.approx(positions["strip/img03.jpg"], abs=1e-6)  # 1 ms of arc
    assert altitude == pytest.approx(523.0)
    assert read_gps(images / "plain.jpg") is None and read_gps(images / "broken.jpg") is None

    out = tmp_path / "pairs.txt"
    result = run_cli(
        "pairs", "spatial", "--images", str(images), "--max-distance", "150", "-k", "3", "-o", str(out)
    )
    assert result.returncode == 1, result.stderr  # some images could not be placed
    assert (
        "3 image(s) without an EXIF GPS position, not paired: broken.jpg, nogps.png, plain.jpg"
        in result.stderr
    )
    written = [tuple(line.split()) for line in out.read_text().splitlines()]
    expected = set()
    for name, position in positions.items():
        others = sorted((haversine(position, q), other) for other, q in positions.items() if other != name)
        expected |= {frozenset((name, other)) for d, other in others[:3] if d <= 150}
    assert {frozenset(p) for p in written} == expected and len(written) == len(expected)
    assert any(
        d > 150
        for a in positions
        for b in positions
        if a != b
        for d in [haversine(positions[a], positions[b])]
    )
