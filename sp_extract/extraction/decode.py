"""Stage 2, decode: read one image file into the network's input.

Output is a grayscale float32 array in [0, 1] at the working size (longest side ``resize_max``,
aspect ratio kept, area interpolation, as hloc does), plus the original size. Pixels are
decoded as stored, the frame COLMAP reads (OpenCV's own EXIF rotation is off, and undone for
TIFF, which it turns regardless); with ``orientation="exif"`` the working
image is then turned as a viewer shows it (``orientation``), and the pipeline maps keypoints back,
so they live in the stored pixel frame that COLMAP and hloc use. With ``masks``, the image's mask
is read and checked here too (``masks``). HEIF/HEIC is decoded by pillow-heif (``heif``).

Hostile files are refused before decoding: the header (JPEG SOF, PNG IHDR, BMP, PNM, TIFF,
WebP) is parsed first, so a file whose content is not an image, or a decompression bomb, costs
no memory. With ``reduced_decode`` (and always above 100 Mpx, so memory stays bounded for
600 Mpx photos), a JPEG whose working size is at most half its stored size is decoded at 1/2,
1/4 or 1/8 scale by the JPEG decoder itself, then area-resized to the exact working size; the
default full decode gives hloc's pixels exactly. Every failure is a ``DecodeError`` with a
short reason.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from ..errors import DecodeError
from .config import ExtractConfig
from .heif import decode_heif, is_heif
from .masks import allowed_pixels, read_mask
from .orientation import read_orientation, to_viewer_frame, undo_orientation

_READ_FLAGS = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
_REDUCED_FLAGS = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
MAX_DECODE_PIXELS = 250_000_000  # larger decodes are refused (decompression bombs)
MAX_FULL_DECODE_PIXELS = 100_000_000  # larger JPEGs are always decoded reduced (bounded memory)
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class DecodedImage:
    """One image ready for the network, or the reason it is not."""

    name: str
    image: np.ndarray | None  # (H, W) float32 in [0, 1] at the working size
    original_size: tuple[int, int]  # (width, height) of the file's pixels
    error: str | None = None
    orientation: int = 1  # EXIF orientation applied to ``image`` (1: as stored)
    allowed: np.ndarray | None = None  # (H, W) bool, False on masked pixels; None: no mask
    masked_share: float | None = None  # share of the mask's pixels that are zero; None: no mask


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says: its format and size; for JPEG, where the image data starts."""

    format: str
    width: int
    height: int
    scan_start: int = 0


def working_size(width: int, height: int, resize_max: int, resize_force: bool) -> tuple[int, int]:
    """(width, height) the network sees: hloc's ``resize_max`` / ``resize_force`` rule."""
    longest = max(width, height)
    if resize_max and (resize_force or longest > resize_max):
        scale = resize_max / longest
        return max(1, round(width * scale)), max(1, round(height * scale))
    return width, height


def _read_exact(file: BinaryIO, count: int, what: str) -> bytes:
    data = file.read(count)
    if len(data) < count:
        raise DecodeError(f"truncated {what} (file ends inside the header)")
    return data


def _jpeg_header(file: BinaryIO) -> ImageHeader:
    file.seek(2)
    size: tuple[int, int] | None = None
    while True:
        marker = _read_exact(file, 2, "JPEG")
        if marker[0] != 0xFF:
            raise DecodeError("corrupt JPEG (bad marker in the header)")
        while marker[1] == 0xFF:  # fill bytes
            marker = marker[1:] + _read_exact(file, 1, "JPEG")
        code = marker[1]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a length
            continue
        if code == 0xD9:
            raise DecodeError("corrupt JPEG (no image data)")
        (length,) = struct.unpack(">H", _read_exact(file, 2, "JPEG"))
        if code == 0xDA:
            if size is None:
                raise DecodeError("corrupt JPEG (image data before the frame header)")
            return ImageHeader("jpeg", *size, scan_start=file.tell())
        if code in _JPEG_FRAMES:
            _, height, width = struct.unpack(">BHH", _read_exact(file, 5, "JPEG"))
            size = (width, height)
            length -= 5
        file.seek(length - 2, os.SEEK_CUR)


def _pnm_header(head: bytes) -> tuple[int, int]:
    tokens: list[bytes] = []
    for line in head[2:].splitlines():
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            return int(tokens[0]), int(tokens[1])
    raise DecodeError("truncated PNM (file ends inside the header)")


def _tiff_header(file: BinaryIO, head: bytes) -> tuple[int, int]:
    order = "<" if head[:2] == b"II" else ">"
    big = struct.unpack(order + "H", head[2:4])[0] == 43  # BigTIFF
    count_format, entry_size, value_at = (order + "Q", 20, 12) if big else (order + "H", 12, 8)
    offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    file.seek(offset)
    count_size = struct.calcsize(count_format)
    (count,) = struct.unpack(count_format, _read_exact(file, count_size, "TIFF"))
    entries = _read_exact(file, min(count, 4096) * entry_size, "TIFF")
    found: dict[int, int] = {}
    for start in range(0, len(entries), entry_size):
        tag, kind = struct.unpack(order + "HH", entries[start : start + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG (or LONG8)
            value_format = {3: "H", 4: "I", 16: "Q"}.get(kind, "I")
            size = struct.calcsize(value_format)
            value = entries[start + value_at : start + value_at + size]
            found[tag] = struct.unpack(order + value_format, value)[0]
    if 256 not in found or 257 not in found:
        raise DecodeError("corrupt TIFF (no image size in the first directory)")
    return found[256], found[257]


def _webp_header(head: bytes) -> tuple[int, int]:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    raise DecodeError("corrupt WebP (unknown bitstream header)")


def read_header(file: BinaryIO) -> ImageHeader:
    """Format and pixel size from the first bytes of an image file, without decoding it."""
    head = file.read(64)
    try:
        if head.startswith(b"\xff\xd8\xff"):
            return _jpeg_header(file)
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            if head[12:16] != b"IHDR" or len(head) < 24:
                raise DecodeError("corrupt PNG (no IHDR header)")
            return ImageHeader("png", *struct.unpack(">II", head[16:24]))
        if head.startswith(b"BM") and len(head) >= 26:
            if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 header: 16-bit sizes
                return ImageHeader("bmp", *struct.unpack("<HH", head[18:22]))
            width, height = struct.unpack("<ii", head[18:26])
            return ImageHeader("bmp", abs(width), abs(height))
        if head[:1] == b"P" and head[1:2] in b"123456" and len(head) > 2:
            file.seek(0)
            return ImageHeader("pnm", *_pnm_header(file.read(4096)))
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return ImageHeader("tiff", *_tiff_header(file, head))
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
            return ImageHeader("webp", *_webp_header(head))
        if is_heif(head):
            return ImageHeader("heif", 0, 0)  # its size is read by the decoder, before decoding
    except (struct.error, ValueError, OverflowError, OSError) as error:
        raise DecodeError(f"corrupt image header ({error})") from error
    raise DecodeError(
        "not a readable image: unknown format (supported: jpeg, png, bmp, pnm, tiff, webp, heif)"
    )


def _reduction(header: ImageHeader, size: tuple[int, int]) -> int:
    """The JPEG decoder's downscale factor (8, 4, 2 or 1) that still covers the working size."""
    if header.format != "jpeg":
        return 1
    for factor in (8, 4, 2):
        if size[0] * factor <= header.width and size[1] * factor <= header.height:
            return factor
    return 1


def _open_regular(path: Path) -> BinaryIO:
    """Open an image file for reading, with a clear reason when that is not possible."""
    try:
        info = path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DecodeError("symbolic link loop") from error
        if error.errno == errno.ENOENT and path.is_symlink():
            raise DecodeError(f"broken symbolic link (to {os.readlink(path)})") from error
        raise DecodeError(error.strerror or str(error)) from error
    if not stat.S_ISREG(info.st_mode):
        raise DecodeError("not a regular file (a FIFO, socket or device)")
    if info.st_size == 0:
        raise DecodeError("empty file")
    try:
        return open(path, "rb")  # noqa: SIM115 (the caller closes it)
    except OSError as error:
        raise DecodeError(error.strerror or str(error)) from error


def _to_gray_255(pixels: np.ndarray) -> np.ndarray:
    """A decoded array as 2-D grayscale float32 with values in [0, 255]."""
    if pixels.ndim == 3:  # some decoders keep the channels: convert as OpenCV's gray read does
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32)
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) * np.float32(255.0 / 65535.0)
    return np.clip(pixels.astype(np.float32), 0.0, 1.0) * np.float32(255.0)


def decode_file(path: Path, config: ExtractConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Grayscale [0, 255] pixels of ``path`` at least as large as the working size, and the
    original (width, height). JPEGs may be decoded reduced (see the module's docstring)."""
    return decode_stored(path, config)[:2]


def _check_pixels(width: int, height: int, factor: int = 1) -> None:
    pixels = -(-width // factor) * -(-height // factor)
    if pixels > MAX_DECODE_PIXELS:
        raise DecodeError(
            f"too large to decode: {width} x {height} pixels "
            f"({pixels / 1e6:.0f} Mpx to decode, limit {MAX_DECODE_PIXELS / 1e6:.0f} Mpx)"
        )


def decode_stored(path: Path, config: ExtractConfig) -> tuple[np.ndarray, tuple[int, int], int]:
    """``decode_file`` and the file's EXIF orientation (1 when it has none, or when
    ``config.orientation`` is ``ignore``). HEIF is returned as its decoder turns it (1)."""
    with _open_regular(Path(path)) as file:
        try:
            header = read_header(file)
            if header.format == "heif":
                gray = _to_gray_255(decode_heif(file, _check_pixels))
                return gray, (gray.shape[1], gray.shape[0]), 1
            if header.width <= 0 or header.height <= 0:
                raise DecodeError(f"corrupt {header.format} header (size {header.width} x {header.height})")
            size = working_size(header.width, header.height, config.resize_max, config.resize_force)
            huge = header.width * header.height > MAX_FULL_DECODE_PIXELS
            factor = _reduction(header, size) if config.reduced_decode or huge else 1
            _check_pixels(header.width, header.height, factor)
            file.seek(0)
            data = file.read()
        except OSError as error:
            raise DecodeError(error.strerror or str(error)) from error
    if header.format == "jpeg" and data.find(b"\xff\xd9", header.scan_start) < 0:
        raise DecodeError("truncated JPEG (the image data has no end marker)")
    flags = _READ_FLAGS if factor == 1 else _REDUCED_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if decoded is None or decoded.size == 0:
        raise DecodeError(f"corrupt or truncated {header.format} image data")
    gray = _to_gray_255(decoded)
    orientation = read_orientation(data, header.format)
    if header.format == "tiff" and orientation != 1:  # OpenCV turns TIFFs whatever its flags say
        gray = undo_orientation(gray, orientation)
    if config.orientation == "ignore":
        orientation = 1
    if factor == 1:
        return gray, (gray.shape[1], gray.shape[0]), orientation
    return gray, (header.width, header.height), orientation


def read_gray(path: Path) -> np.ndarray:
    """The file's pixels at full size as a 2-D grayscale array with values in [0, 255] (float32)."""
    return decode_file(path, ExtractConfig(resize_max=0))[0]


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
        gray, (width, height), orientation = decode_stored(Path(root) / name, config)
        mask = read_mask(config.masks, name, (width, height)) if config.masks else None
    except DecodeError as error:
        return DecodedImage(name, None, (0, 0), str(error))
    size = working_size(width, height, config.resize_max, config.resize_force)
    image = resize(gray, size)
    del gray  # at native size ``image`` is ``gray``: divide in place, no second full-size copy
    np.divide(image, np.float32(255.0), out=image)
    np.clip(image, 0.0, 1.0, out=image)  # area resizing can overshoot 255 by a rounding error
    decoded = DecodedImage(
        name, to_viewer_frame(image, orientation), (width, height), orientation=orientation
    )
    if mask is not None:
        decoded.allowed = to_viewer_frame(allowed_pixels(mask, size), orientation)
        decoded.masked_share = float(np.count_nonzero(mask == 0) / mask.size)
    return decoded
