"""Stage 2, decode: read one image file into the network's input.

Output is a grayscale float32 array in [0, 1] at the working size (longest side ``resize_max``,
aspect ratio kept, area interpolation, as hloc does), plus the original size. EXIF orientation
is ignored, as COLMAP and hloc do, so keypoints live in the stored pixel frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .config import ExtractConfig
from .errors import DecodeError

_READ_FLAGS = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION


@dataclass
class DecodedImage:
    """One image ready for the network, or the reason it is not."""

    name: str
    image: np.ndarray | None  # (H, W) float32 in [0, 1] at the working size
    original_size: tuple[int, int]  # (width, height) of the file's pixels
    error: str | None = None


def working_size(width: int, height: int, resize_max: int, resize_force: bool) -> tuple[int, int]:
    """(width, height) the network sees: hloc's ``resize_max`` / ``resize_force`` rule."""
    longest = max(width, height)
    if resize_max and (resize_force or longest > resize_max):
        scale = resize_max / longest
        return max(1, round(width * scale)), max(1, round(height * scale))
    return width, height


def read_gray(path: Path) -> np.ndarray:
    """The file's pixels as a 2-D grayscale array with values in [0, 255] (float32)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DecodeError(error.strerror or str(error)) from error
    if data.size == 0:
        raise DecodeError("empty file")
    pixels = cv2.imdecode(data, _READ_FLAGS)
    if pixels is None or pixels.size == 0:
        raise DecodeError("not a readable image (corrupt, truncated or unsupported format)")
    if pixels.ndim == 3:  # some decoders keep the channels: convert as OpenCV's gray read does
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32)
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) * np.float32(255.0 / 65535.0)
    return np.clip(pixels.astype(np.float32), 0.0, 1.0) * np.float32(255.0)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height): area interpolation down, bilinear up (as hloc)."""
    height, width = image.shape
    if (width, height) == size:
        return image
    upscale = size[0] > width or size[1] > height
    interpolation = cv2.INTER_LINEAR if upscale else cv2.INTER_AREA
    return cv2.resize(image, size, interpolation=interpolation)


def load_image(root: Path, name: str, config: ExtractConfig) -> DecodedImage:
    """Decode ``root/name`` for the network; errors are returned, not raised."""
    try:
        gray = read_gray(Path(root) / name)
    except DecodeError as error:
        return DecodedImage(name, None, (0, 0), str(error))
    height, width = gray.shape
    size = working_size(width, height, config.resize_max, config.resize_force)
    image = resize(gray, size) / np.float32(255.0)
    return DecodedImage(name, image.astype(np.float32, copy=False), (width, height))
