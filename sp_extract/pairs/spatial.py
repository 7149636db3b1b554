"""Spatial pairs (COLMAP's spatial matcher): each image with its K nearest images within a
distance, by the GPS position in its EXIF, for drone and phone surveys.

Positions are read from the EXIF GPS tags of JPEG and TIFF files by a small parser of our own
(no imaging library): latitude, longitude and, with ``use_altitude``, altitude, turned into
Earth-centred (WGS84) metres, where straight-line distances are exact. An image without a
readable position is reported, never placed.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from .search import merge_best

Pair = tuple[str, str]
GPS_IFD = 0x8825
WGS84_A, WGS84_E2 = 6378137.0, 6.69437999014e-3
BLOCK = 4096  # query and database rows per block of distances
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 9: 4, 10: 8}


class _Tiff:
    """Reading IFD entries of a TIFF structure (the body of an EXIF block)."""

    def __init__(self, data: bytes) -> None:
        if data[:2] not in (b"II", b"MM"):
            raise ValueError("not a TIFF header")
        self.data = data
        self.order = "<" if data[:2] == b"II" else ">"

    def unpack(self, fmt: str, offset: int) -> tuple:
        return struct.unpack_from(self.order + fmt, self.data, offset)

    def entries(self, offset: int) -> dict[int, tuple[int, int, int]]:
        """Tag -> (type, count, offset of the value) of the IFD at ``offset``."""
        (count,) = self.unpack("H", offset)
        found = {}
        for position in range(offset + 2, offset + 2 + 12 * count, 12):
            tag, kind, number = self.unpack("HHI", position)
            size = _TYPE_SIZES.get(kind, 1) * number
            found[tag] = (kind, number, position + 8 if size <= 4 else self.unpack("I", position + 8)[0])
        return found

    def rationals(self, entry: tuple[int, int, int]) -> list[float]:
        kind, number, offset = entry
        if kind not in (5, 10):
            raise ValueError("GPS coordinate is not a rational")
        values = self.unpack(("I" if kind == 5 else "i") * 2 * number, offset)
        return [a / b for a, b in zip(values[::2], values[1::2])]

    def text(self, entry: tuple[int, int, int]) -> str:
        _, number, offset = entry
        return self.data[offset : offset + number].split(b"\0")[0].decode("ascii", "replace")


def _exif_block(path: Path) -> bytes | None:
    """The TIFF body of a JPEG's EXIF segment (APP1 ``Exif``), or a TIFF file's start."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 17)
        if head[:4] in (b"II*\0", b"MM\0*"):
            return head
        if head[:2] != b"\xff\xd8":
            return None
        position = 2
        while position + 4 <= len(head) and head[position] == 0xFF:
            marker, length = head[position + 1], struct.unpack_from(">H", head, position + 2)[0]
            if marker == 0xE1 and head[position + 4 : position + 10] == b"Exif\0\0":
                handle.seek(position + 10)
                return handle.read(length - 8)
            if marker in (0xDA, 0xD9):  # image data: no EXIF before it
                return None
            position += 2 + length
    return None


def read_gps(path: Path) -> tuple[float, float, float | None] | None:
    """Latitude and longitude (degrees, north and east positive) and altitude (metres above sea
    level, None if absent) of an image's EXIF GPS tags; None if it has no readable position."""
    try:
        block = _exif_block(path)
        if block is None:
            return None
        tiff = _Tiff(block)
        ifd0 = tiff.entries(tiff.unpack("I", 4)[0])
        if GPS_IFD not in ifd0:
            return None
        kind, _, offset = ifd0[GPS_IFD]
        gps = tiff.entries(tiff.unpack("I", offset)[0] if kind == 4 else offset)
        if not {1, 2, 3, 4} <= gps.keys():
            return None
        degrees = [sum(v / 60**i for i, v in enumerate(tiff.rationals(gps[tag]))) for tag in (2, 4)]
        latitude = -degrees[0] if tiff.text(gps[1]).upper() == "S" else degrees[0]
        longitude = -degrees[1] if tiff.text(gps[3]).upper() == "W" else degrees[1]
        altitude = None
        if 6 in gps:
            altitude = tiff.rationals(gps[6])[0]
            if 5 in gps and tiff.data[gps[5][2]] == 1:  # below sea level
                altitude = -altitude
    except (OSError, ValueError, IndexError, ZeroDivisionError, struct.error):
        return None
    if (
        not (math.isfinite(latitude) and math.isfinite(longitude))
        or abs(latitude) > 90
        or abs(longitude) > 180
    ):
        return None
    return latitude, longitude, altitude


def earth_centred(latitude: float, longitude: float, altitude: float) -> tuple[float, float, float]:
    """WGS84 geodetic coordinates (degrees, metres) to Earth-centred Cartesian metres."""
    lat, lon = math.radians(latitude), math.radians(longitude)
    radius = WGS84_A / math.sqrt(1 - WGS84_E2 * math.sin(lat) ** 2)
    return (
        (radius + altitude) * math.cos(lat) * math.cos(lon),
        (radius + altitude) * math.cos(lat) * math.sin(lon),
        (radius * (1 - WGS84_E2) + altitude) * math.sin(lat),
    )


def spatial_pairs(
    images: Path, names: Sequence[str], max_distance: float, num_matched: int, use_altitude: bool = False
) -> tuple[list[Pair], list[str]]:
    """Each image paired with its ``num_matched`` nearest images at most ``max_distance`` metres
    away (exact, by blocks of distances); returns the pairs (each once) and the names of the
    images without a GPS position, which are not paired. Without ``use_altitude`` (COLMAP's
    default) positions are taken at sea level."""
    if max_distance <= 0:
        raise ConfigError(f"--max-distance must be > 0 metres, got {max_distance}")
    if num_matched < 1:
        raise ConfigError(f"--num-matched must be >= 1, got {num_matched}")
    located, points, missing = [], [], []
    for name in names:
        position = read_gps(Path(images) / name)
        if position is None:
            missing.append(name)
            continue
        latitude, longitude, altitude = position
        located.append(name)
        points.append(earth_centred(latitude, longitude, (altitude or 0.0) if use_altitude else 0.0))
    if not located:
        return [], missing
    coordinates = torch.tensor(points, dtype=torch.float64)
    coordinates -= coordinates.mean(0)
    width = min(num_matched + 1, len(located))  # + 1: an image is its own nearest
    pairs: list[Pair] = []
    seen: set[frozenset[int]] = set()
    for q_start in range(0, len(located), BLOCK):
        query = coordinates[q_start : q_start + BLOCK]
        best_score = torch.full((len(query), width), -torch.inf, dtype=torch.float64)
        best_index = torch.full((len(query), width), -1, dtype=torch.int64)
        for d_start in range(0, len(located), BLOCK):
            scores = -torch.cdist(query, coordinates[d_start : d_start + BLOCK])
            columns = torch.arange(d_start, min(len(located), d_start + BLOCK))
            best_score, best_index = merge_best(best_score, best_index, scores, columns)
        for row, (found, score) in enumerate(zip(best_index.tolist(), best_score.tolist())):
            i = q_start + row
            near = [j for j, s in zip(found, score) if j != i and -s <= max_distance][:num_matched]
            for j in near:
                if frozenset((i, j)) not in seen:
                    seen.add(frozenset((i, j)))
                    pairs.append((located[i], located[j]))
    return pairs, missing
