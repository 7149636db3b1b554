"""The COLMAP stage's settings (cameras, model formats), light to import: the CLI builds its options
from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

DEFAULT_CAMERA_MODEL = "SIMPLE_RADIAL"
# which images share a camera (``colmap.camera_group``): auto by image size and EXIF focal length
CAMERA_MODES = ("auto", "single", "per-image")
DEFAULT_CAMERA_MODE = "auto"
# a registered image's refined focal length outside these (times max(width, height)) is
# implausible, the model likely wrong (COLMAP's own mapper bounds, min/max_focal_length_ratio)
PLAUSIBLE_FOCAL_RATIO = (0.1, 10.0)
# a model's pair agreement (``consistency``: the median share of its verified pairs' inlier matches
# its poses explain; docs/accuracy.md "Inconsistent models"): a model mapped from scratch under
# REMAP_BELOW is mapped again with the next seeds, up to MAPPING_ATTEMPTS mappings in all, the most
# consistent kept (right models of the shared photos 0.81-0.96, wrong ones 0.00-0.58, poor ones of 8
# Internet photos at 640 px 0.56-0.63); one still under WRONG_BELOW, which explains less than half
# of its pairs, is reported as likely wrong (exit 1)
REMAP_BELOW = 0.7
WRONG_BELOW = 0.5
MAPPING_ATTEMPTS = 3
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
    their threads (-1 all; 1 with a seed: repeatable), whether COLMAP's own log is shown, the
    inliers a pair needs to pass verification (COLMAP's 15; docs/sfm.md "Which mapper": 40 kept
    every cross-scene pair of the shared photos out) and the descriptor distance of the matches
    that guide it (``verification``; docs/accuracy.md "Guided verification")."""

    seed: int = 0
    num_threads: int = -1
    verbose: bool = False
    min_inliers: int = 15
    guide_distance: float = 0.7

    def __post_init__(self) -> None:
        if self.min_inliers < 1:
            raise ConfigError(f"--min-inliers {self.min_inliers}: expected an integer >= 1")
        if not 0 <= self.guide_distance <= 2:  # unit descriptors: distances from 0 to 2
            raise ConfigError(f"--guide-distance {self.guide_distance}: expected a number from 0 to 2")


# -- sfm's pairs (issue 27) --------------------------------------------------------------------
# sfm --pairs auto: exhaustive up to EXHAUSTIVE_UP_TO images, retrieval:RETRIEVAL_K above (docs/sfm.md
# "Which pairs": on the 50 fox frames retrieval:20 matched exhaustive's pose AUC in a third of the time)
EXHAUSTIVE_UP_TO = 30
RETRIEVAL_K = 20  # sfm --pairs retrieval's K, and auto's above EXHAUSTIVE_UP_TO
SEQUENTIAL_K = 10  # sfm --pairs sequential's K

# -- the mapper (issue 24) ---------------------------------------------------------------------
MAPPERS = ("incremental", "global")  # COLMAP's incremental mapper; GLOMAP, COLMAP 4's global mapper
MAPPER_CHOICES = ("auto", *MAPPERS)  # sfm's: auto chooses by the number of images
# sfm --mapper auto: global from this many images of the database (docs/sfm.md "Which mapper"):
# below, global saved seconds of a minutes-long run for 35-45 % fewer points (fox frames: 5.4
# against 17.4 s at 50 frames, quiet 2 cores), and at 9 frames lost 7 points of pose AUC@5. From 300,
# where sfm pairs by retrieval, the other stages grow linearly with the photos and the incremental
# mapper faster (not measured here: the shared photos are 90)
GLOBAL_FROM_IMAGES = 300
# a model of more registered images is not mapped again (``REMAP_BELOW``), only reported: its
# mapping is long, and the wrong models seen were of few, sparse views (9 frames)
REMAP_UP_TO = GLOBAL_FROM_IMAGES
# sfm growing a globally mapped model: the new images are registered into it (then bundle
# adjustment) while they are at most this share of the images it was solved with; more: re-solved.
# Fox frames, 25 mapped globally + K (benchmarks/mapper.py, quiet 2 cores): registering matched the
# re-solve's pose AUC at every K (within 0.5 points; 2 points better at K = 25) and was faster up
# to K = 5 (3.1 against 4.9 s), slower from K = 10 (4.9 against 4.5 s; 8.6 against 4.4 s at 25)
GLOBAL_RESOLVE_SHARE = 0.3


@dataclass(frozen=True)
class MapperOptions:
    """Which mapper ``reconstruct`` and ``sfm`` run, and the settings of the global mapper (GLOMAP)
    that users tune: COLMAP's defaults but the floor of inliers of its view graph (15 there; 40
    measured better, docs/sfm.md 'Which mapper'); pycolmap 4.2 exposes no iteration limit of the
    global positioning, whose options are all on/off switches."""

    mapper: str = field(
        default="auto",
        metadata={
            "choices": MAPPER_CHOICES,
            "help": "incremental: COLMAP's incremental mapper; global: GLOMAP (COLMAP 4), rotation "
            f"averaging then global positioning; auto: incremental below {GLOBAL_FROM_IMAGES} images, "
            f"global from {GLOBAL_FROM_IMAGES}. A global model grows by registering the new photos "
            f"until they pass {GLOBAL_RESOLVE_SHARE:.0%} of those it was solved with, then is solved "
            "again (docs/sfm.md 'Which mapper').",
        },
    )
    global_min_inliers: int = field(
        default=40,
        metadata={
            "help": "Global mapper: the verified inliers a pair needs to enter its view graph. "
            "Chance geometries between unrelated photos pass COLMAP's verification with 15-37 "
            "inliers and mislead the rotation averaging (docs/sfm.md 'Which mapper')."
        },
    )
    view_graph_calibration: bool = field(
        default=False,
        metadata={
            "help": "Global mapper: first estimate the cameras' focal lengths from the verified pairs "
            "(COLMAP's calibrate_view_graph; for photos without EXIF focal length of unknown cameras)."
        },
    )
    rotation_iterations: int = field(
        default=100,
        metadata={"help": "Global mapper: iterations of the rotation averaging's reweighted least squares."},
    )
    ba_rounds: int = field(
        default=3,
        metadata={
            "help": "Global mapper: rounds of the final bundle adjustment (each followed by outlier "
            "filtering); 0 skips it."
        },
    )
    ba_iterations: int = field(
        default=200, metadata={"help": "Global mapper: solver iterations of each bundle adjustment."}
    )

    def __post_init__(self) -> None:
        if self.mapper not in MAPPER_CHOICES:
            raise ConfigError(f"--mapper {self.mapper}: expected one of {', '.join(MAPPER_CHOICES)}")
        for name, least in (
            ("global_min_inliers", 1),
            ("rotation_iterations", 1),
            ("ba_rounds", 0),
            ("ba_iterations", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: expected an integer >= {least}")

    def chosen(self, images: int) -> str:
        """The mapper for a database of ``images`` images (``auto``: by ``GLOBAL_FROM_IMAGES``)."""
        if self.mapper != "auto":
            return self.mapper
        return "global" if images >= GLOBAL_FROM_IMAGES else "incremental"
