"""HEIF/HEIC decoding (the iPhone's default format) with pillow-heif, the optional ``[heif]`` extra.

libheif applies the image's own rotation and mirroring (HEIF's ``irot``/``imir`` properties,
which phones write instead of turning the pixels), so the decoded pixels are already as a viewer
shows them: that is the stored frame of a HEIF image, and no EXIF orientation is applied on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import cv2
import numpy as np

from ..errors import DecodeError

HEIF_HINT = "HEIF/HEIC needs pillow-heif: pip install 'sp-extract[heif]' (or pip install pillow-heif)"
_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


def is_heif(head: bytes) -> bool:
    """Whether a file's first bytes are an ISO base media file of a HEIF brand."""
    return head[4:8] == b"ftyp" and head[8:12] in _BRANDS


def decode_heif(file: BinaryIO, check_size: Callable[[int, int], None]) -> np.ndarray:
    """The primary image of a HEIF file as 2-D uint8 grayscale; ``check_size(width, height)``
    runs before any pixel is decoded (it raises for sizes that must not be decoded)."""
    try:
        import pillow_heif
    except ImportError as error:
        raise DecodeError(HEIF_HINT) from error
    file.seek(0)
    try:
        heif = pillow_heif.open_heif(file, convert_hdr_to_8bit=True)
        check_size(*heif.size)
        pixels = np.asarray(heif)
    except (ValueError, RuntimeError, OSError, SyntaxError) as error:
        raise DecodeError(f"corrupt or unsupported HEIF image ({error})") from error
    if pixels.ndim == 3:
        code = cv2.COLOR_RGBA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_RGB2GRAY
        pixels = cv2.cvtColor(pixels, code)
    return pixels
