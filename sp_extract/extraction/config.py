"""Extraction settings: the options that change what lands in a feature store.

Every field here is recorded in the store's attributes; a store made with other values is
refused on resume (unless ``--overwrite``). Defaults are those of the reference SuperPoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # network arithmetic; all but fp32 change the features slightly
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_EXTENSIONS += (".heic", ".heif", ".hif")  # HEIF: read with the [heif] extra (pillow-heif)
# image files that are not read: reported as "unsupported format", never skipped silently
RAW_EXTENSIONS = (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf", ".rw2")
RAW_EXTENSIONS += (".raf", ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".kdc", ".dcr", ".mrw", ".rwl")
OTHER_IMAGE_EXTENSIONS = (".gif", ".avif", ".jxl", ".jp2", ".j2k", ".exr", ".hdr", ".psd", ".svg", ".ico")
ORIENTATIONS = ("exif", "ignore")  # exif: the network sees images as a viewer shows them


@dataclass(frozen=True)
class ExtractConfig:
    """Detector, resize and storage settings of one extraction."""

    max_keypoints: int = -1
    threshold: float = 0.005
    nms_radius: int = 4
    border: int = 4
    resize_max: int = 1024
    resize_force: bool = False
    fp32_descriptors: bool = False
    precision: str = "fp32"
    subpixel: bool = False
    reduced_decode: bool = False
    orientation: str = "exif"  # "exif": the network sees images as a viewer shows them; "ignore"
    masks: str = ""  # folder of COLMAP-style masks, recorded as its absolute path; "": none

    def __post_init__(self) -> None:
        if self.max_keypoints == 0 or self.max_keypoints < -1:
            raise ConfigError(f"--max-keypoints must be -1 (all) or positive, got {self.max_keypoints}")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"--threshold must be in [0, 1), got {self.threshold}")
        if self.nms_radius < 0:
            raise ConfigError(f"--nms-radius must be >= 0, got {self.nms_radius}")
        if self.border < 0:
            raise ConfigError(f"--border must be >= 0, got {self.border}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.resize_max < 0:
            raise ConfigError(f"--resize-max must be >= 0 (0 = native size), got {self.resize_max}")
        if self.orientation not in ORIENTATIONS:
            raise ConfigError(
                f"--orientation must be one of {', '.join(ORIENTATIONS)}, got {self.orientation!r}"
            )
        if self.masks:
            if not Path(self.masks).is_dir():
                raise ConfigError(f"--masks {self.masks}: not a directory")
            object.__setattr__(self, "masks", str(Path(self.masks).resolve()))
