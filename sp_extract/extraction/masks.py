"""Masks: COLMAP's convention, ``MASKS/NAME.png`` for image ``NAME``; zero pixels get no features.

A mask has the stored image's size and lives in its stored pixel frame, whatever the EXIF
orientation and the working size. ``allowed_pixels`` samples it, per working-size pixel, at the
nearest stored pixel of the point a keypoint there is saved at (hloc's resize rule, then
COLMAP's ``int(x + 0.5)`` lookup), so a keypoint is removed exactly when it lands on a zero pixel.
The masks are read at decode time, checked first from the PNG header (size, no decompression bomb).
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from ..errors import DecodeError
from .postprocess import to_original_frame

_READ_FLAGS = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION


def mask_path(masks: Path | str, name: str) -> Path:
    """Where COLMAP looks for the mask of image ``name``: ``masks/name.png``."""
    return Path(masks) / f"{name}.png"


def read_mask(masks: Path | str, name: str, size: tuple[int, int]) -> np.ndarray | None:
    """The mask of image ``name`` of stored ``size`` (width, height), or None if it has none.

    Raises ``DecodeError`` for a mask that is not a readable PNG or not of the image's size."""
    path = mask_path(masks, name)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DecodeError(f"mask {path}: cannot read it ({error.strerror or error})") from error
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR" or len(data) < 24:
        raise DecodeError(f"mask {path}: not a PNG file")
    found = struct.unpack(">II", data[16:24])
    if found != tuple(size):
        raise DecodeError(
            f"mask {path} is {found[0]} x {found[1]} pixels, the image {size[0]} x {size[1]} "
            "(masks have the stored image's size)"
        )
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), _READ_FLAGS)
    if mask is None or mask.shape != (size[1], size[0]):
        raise DecodeError(f"mask {path}: corrupt or truncated PNG data")
    return mask


def _nearest(working: int, original: int) -> np.ndarray:
    centres = np.stack([np.arange(working, dtype=np.float32), np.zeros(working, np.float32)], 1)
    mapped = to_original_frame(centres, (working, 1), (original, 1))[:, 0]
    return np.minimum(np.floor(mapped + 0.5).astype(np.int64), original - 1)


def allowed_pixels(mask: np.ndarray, working_size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool at ``working_size`` (stored frame): True where a keypoint may be kept."""
    height, width = mask.shape
    rows = _nearest(working_size[1], height)
    columns = _nearest(working_size[0], width)
    return mask[np.ix_(rows, columns)] != 0
