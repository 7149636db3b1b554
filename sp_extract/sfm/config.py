"""The COLMAP stage's settings (cameras, model formats), light to import: the CLI builds its options
from them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_CAMERA_MODEL = "SIMPLE_RADIAL"
# which images share a camera (``colmap.camera_group``): auto by image size and EXIF focal length
CAMERA_MODES = ("auto", "single", "per-image")
DEFAULT_CAMERA_MODE = "auto"
# a registered image's refined focal length outside these (times max(width, height)) is
# implausible, the model likely wrong (COLMAP's own mapper bounds, min/max_focal_length_ratio)
PLAUSIBLE_FOCAL_RATIO = (0.1, 10.0)
# what export-model and sfm --export write (``handoff``)
MODEL_FORMATS = ("gaussian-splatting", "nerfstudio", "ply")
MODEL_FORMATS_HELP = (
    "gaussian-splatting: undistorted images/ and PINHOLE sparse/0 (3DGS; OpenMVS reads sparse/); "
    "nerfstudio: transforms.json, images/, sparse_pc.ply (nerfstudio, instant-ngp); "
    "ply: points.ply (coloured) and cameras.ply."
)
CAMERA_MODEL_HELP = "COLMAP camera model: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, ..."
CAMERA_MODE_HELP = (
    "Which images share a camera (intrinsics): auto: those of one size and EXIF focal length "
    "(without EXIF: of one size, as frames of a video); single: all (one size required); "
    "per-image: none (COLMAP's own default)."
)


def check_camera_mode(camera_mode: str) -> str:
    if camera_mode not in CAMERA_MODES:
        raise ConfigError(f"--camera-mode {camera_mode}: expected one of {', '.join(CAMERA_MODES)}")
    return camera_mode


@dataclass(frozen=True)
class CameraOptions:
    """The cameras a COLMAP database gets: COLMAP's camera model and which images share one
    (``camera_mode``, ``colmap.camera_group``); checked where pycolmap is at hand."""

    camera_model: str = DEFAULT_CAMERA_MODEL
    camera_mode: str = DEFAULT_CAMERA_MODE


@dataclass(frozen=True)
class ColmapRun:
    """How pycolmap's long steps (verification, mapping) run: the seed of their random choices,
    their threads (-1 all; 1 with a seed: repeatable) and whether COLMAP's own log is shown."""

    seed: int = 0
    num_threads: int = -1
    verbose: bool = False
