"""Extraction settings: the options that change what lands in a feature store (``ExtractConfig``),
and those of how one run goes (``ExtractRun``).

Every ``ExtractConfig`` field is recorded in the store's attributes; a store made with other values
is refused on resume (unless ``--overwrite``). Defaults are those of the reference SuperPoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..shards import Shard

PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # network arithmetic; all but fp32 change the features slightly
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_EXTENSIONS += (".heic", ".heif", ".hif")  # HEIF: read with the [heif] extra (pillow-heif)
# image files that are not read: reported as "unsupported format", never skipped silently
RAW_EXTENSIONS = (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf", ".rw2")
RAW_EXTENSIONS += (".raf", ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".kdc", ".dcr", ".mrw", ".rwl")
OTHER_IMAGE_EXTENSIONS = (".gif", ".avif", ".jxl", ".jp2", ".j2k", ".exr", ".hdr", ".psd", ".svg", ".ico")
ORIENTATIONS = ("exif", "ignore")  # exif: the network sees images as a viewer shows them
CPU_ONLY_PRECISIONS = ("int8",)  # run by onnxruntime or openvino only
TORCH_PRECISIONS = tuple(p for p in PRECISIONS if p not in CPU_ONLY_PRECISIONS)  # what PyTorch runs
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")  # what runs the network (``backends``)
EXPORT_FORMATS = ("onnx", "openvino")
EXPORT_PRECISIONS = ("fp32", "int8")
# each field's ``help`` (and ``choices``) is what the CLI shows; ``cli/options.py`` builds the options


@dataclass(frozen=True)
class ExtractConfig:
    """Detector, resize and storage settings of one extraction."""

    max_keypoints: int = field(default=-1, metadata={"help": "Keep the best N per image; -1 keeps all."})
    threshold: float = field(default=0.005, metadata={"help": "Detection score threshold."})
    nms_radius: int = field(default=4, metadata={"help": "Non-maximum suppression radius (px)."})
    border: int = field(default=4, metadata={"help": "Drop keypoints this close to the border (px)."})
    resize_max: int = field(
        default=1024,
        metadata={"help": "Downscale so the longest side is at most this (px); 0 keeps the native size."},
    )
    resize_force: bool = field(
        default=False, metadata={"help": "Also upscale smaller images to --resize-max."}
    )
    fp32_descriptors: bool = field(
        default=False, metadata={"help": "Store descriptors as float32 (default float16)."}
    )
    precision: str = field(
        default="fp32",
        metadata={
            "choices": PRECISIONS,
            "help": "Network arithmetic; fp16/bf16 are faster on GPUs, int8 (statically quantized, CPU "
            'backends only; README "int8") on CPUs, but they change the features slightly '
            "(a setting of the store).",
        },
    )
    subpixel: bool = field(
        default=False,
        metadata={
            "help": "Move keypoints to sub-pixel score peaks (quadratic fit); lowers SfM reprojection error."
        },
    )
    reduced_decode: bool = field(
        default=False,
        metadata={
            "help": "Decode JPEGs at 1/2, 1/4 or 1/8 scale when the working size allows (faster on large "
            "photos; pixels differ slightly from a full decode). Always on above 100 Mpx."
        },
    )
    orientation: str = field(
        default="exif",
        metadata={
            "choices": ORIENTATIONS,
            "help": "exif: the network sees each photo as a viewer shows it (EXIF orientation of JPEG, TIFF, "
            "PNG, WebP); keypoints and image_size stay in the stored pixel frame, the one COLMAP reads. "
            "ignore: the stored pixels as they are (a setting of the store).",
        },
    )
    masks: str = field(  # folder of COLMAP-style masks, recorded as its absolute path; "": none
        default="",
        metadata={
            "help": "COLMAP-style masks: DIR/NAME.png for image NAME, the stored image's size; no keypoints "
            "on zero pixels. An image without a mask uses the whole image (a setting of the store)."
        },
    )

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


@dataclass(frozen=True)
class ExtractRun:
    """How one extraction runs, beside its settings (``ExtractConfig``): the weights (which the store
    records by checksum), what runs the network and where, which images, resume or start afresh."""

    weights: str | None = None  # superpoint-v1 (default), superpoint-v6-mit or a file (``load_weights``)
    device: str = "auto"
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images of one size per network batch, halved when the GPU runs out of memory [default: "
            "1 on the CPU, where batching is no faster; 8 on a GPU]."
        },
    )
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Decoding processes, 0 to decode in the main process [default: 0 when the network runs "
            "on a CPU of at most 2 cores, else cores - 1, at most 4]."
        },
    )
    image_list: Path | str | None = field(
        default=None,
        metadata={"help": "Extract only these images: one path relative to IMAGES_DIR a line."},
    )
    overwrite: bool = False  # start the store afresh instead of resuming
    quiet: bool = True  # no progress output
    backend: str = BACKENDS[0]  # what runs the network (``backends``)
    tile: str | int = "auto"  # auto, 0 (never) or a tile size in pixels (``tiling.parse_tile``)
    shard: Shard | None = None  # extract only the images of this shard (``sp_extract.shards``)

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(
                f"--num-workers must be >= 0 (0 decodes in the main process), got {self.num_workers}"
            )
