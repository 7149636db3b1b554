"""Extraction settings: the options that change what lands in a feature store.

Every field here is recorded in the store's attributes; a store made with other values is
refused on resume (unless ``--overwrite``). Defaults are those of the reference SuperPoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # network arithmetic; all but fp32 change the features slightly
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


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
