"""EXIF orientation: read the tag, show the network the image as a viewer does, map keypoints back.

Phones store portrait photos sideways with an EXIF ``Orientation`` tag (274) that tells viewers
how to turn them. The tag is read from the file's bytes (JPEG APP1, TIFF's first directory, PNG
``eXIf``, WebP ``EXIF``) without decoding anything. The decoded pixels (the stored frame, the
one COLMAP and hloc use) are turned into the viewer's frame for the network, and the keypoints
found there are mapped back into the stored frame, exactly, by integer pixel transforms.

Orientation values (the transform from the stored pixels to what a viewer shows):
1 as stored, 2 mirrored left-right, 3 turned 180 degrees, 4 mirrored top-bottom, 5 transposed
(mirrored about the main diagonal), 6 turned 90 degrees clockwise, 7 transversed (mirrored
about the other diagonal), 8 turned 90 degrees counter-clockwise.
"""

from __future__ import annotations

import struct

import numpy as np

ORIENTATION_TAG = 274
TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
# orientation -> (transpose first, then flip rows, flip columns) taking stored pixels to the view
_STEPS = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}


def orientation_from_tiff(data: bytes | memoryview) -> int:
    """The Orientation tag of a TIFF structure's first directory (an EXIF block is one); 1 when
    absent or unreadable: a broken tag never fails an image, it only leaves it as stored."""
    try:
        order = {b"II": "<", b"MM": ">"}[bytes(data[:2])]
        (offset,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, offset)
        for index in range(min(count, 1024)):
            tag, kind, _, value = struct.unpack_from(order + "HHIH", data, offset + 2 + 12 * index)
            if tag == ORIENTATION_TAG:
                return value if kind == 3 and value in _STEPS else 1
    except (KeyError, struct.error):
        pass
    return 1


def _without_exif_prefix(payload: bytes | memoryview) -> bytes | memoryview:
    return payload[6:] if bytes(payload[:6]) == b"Exif\x00\x00" else payload


def _jpeg_orientation(data: bytes) -> int:
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        code = data[position + 1]
        if code == 0xFF:  # fill byte
            position += 1
            continue
        if code == 0xDA or code == 0xD9:  # image data: no APP1 after it
            break
        if code == 0x01 or 0xD0 <= code <= 0xD8:
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        segment = memoryview(data)[position + 4 : position + 2 + length]
        if code == 0xE1 and bytes(segment[:6]) == b"Exif\x00\x00":
            return orientation_from_tiff(segment[6:])
        position += 2 + length
    return 1


def _chunk_orientation(data: bytes, png: bool) -> int:
    """The orientation in the EXIF chunk of a PNG (``eXIf``) or WebP (RIFF ``EXIF``) file."""
    position, layout, wanted = (8, ">I4s", b"eXIf") if png else (12, "<4sI", b"EXIF")
    while position + 8 <= len(data):
        first, second = struct.unpack_from(layout, data, position)
        kind, length = (second, first) if png else (first, second)
        if kind == wanted:
            payload = memoryview(data)[position + 8 : position + 8 + length]
            return orientation_from_tiff(_without_exif_prefix(payload))
        if kind == b"IEND":
            break
        position += 8 + length + (4 if png else length & 1)  # PNG: a CRC; RIFF: padded to even
    return 1


def read_orientation(data: bytes, fmt: str) -> int:
    """The EXIF orientation (1-8) of an image file's bytes of format ``fmt``; 1 if it has none."""
    if fmt == "jpeg":
        return _jpeg_orientation(data)
    if fmt == "tiff":
        return orientation_from_tiff(data)
    if fmt in ("png", "webp"):
        return _chunk_orientation(data, png=fmt == "png")
    return 1


def viewed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of a stored image of ``size`` as a viewer shows it."""
    return (size[1], size[0]) if orientation in TRANSPOSED else size


def to_viewer_frame(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """A (H, W) array of stored pixels turned as a viewer shows it (a contiguous copy)."""
    transpose, flip_rows, flip_columns = _STEPS[orientation]
    if transpose:
        pixels = pixels.T
    if flip_rows:
        pixels = pixels[::-1]
    if flip_columns:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def undo_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels of a (H, W) array that ``to_viewer_frame`` turned (a contiguous copy)."""
    transpose, flip_rows, flip_columns = _STEPS[orientation]
    if flip_columns:
        pixels = pixels[:, ::-1]
    if flip_rows:
        pixels = pixels[::-1]
    return np.ascontiguousarray(pixels.T if transpose else pixels)


def to_stored_frame(keypoints: np.ndarray, orientation: int, viewed: tuple[int, int]) -> np.ndarray:
    """Map (N, 2) x, y keypoints of an image seen at ``viewed`` (width, height) by
    ``to_viewer_frame`` back into its stored pixels (pixel centres at integer coordinates)."""
    transpose, flip_rows, flip_columns = _STEPS[orientation]
    points = np.array(keypoints, dtype=np.float32, copy=True)
    if flip_columns:
        points[:, 0] = viewed[0] - 1 - points[:, 0]
    if flip_rows:
        points[:, 1] = viewed[1] - 1 - points[:, 1]
    return points[:, ::-1].copy() if transpose else points
