"""The int8 network: the ONNX export statically quantized for the CPU backends (``--precision int8``).

ONNX Runtime's quantizer rewrites the float32 graph in QDQ form (QuantizeLinear / DequantizeLinear
pairs around each quantized operator, which ONNX Runtime fuses into integer kernels and OpenVINO
reads as FakeQuantize): weights int8 per output channel (symmetric), activations uint8 per
tensor (``u8s8``; on x86 CPUs without VNNI the weights are uint8, ``u8u8``: ``int8_variant``),
their ranges calibrated on a deterministic set of generated images (``builtin``) or on
the user's photos (``sp-extract export --precision int8 --calibrate IMAGES_DIR``). The detector
head's last convolution, its softmax and the descriptor normalisation stay float32
(``FLOAT_NODES``: measured, docs/performance.md "int8"). The quantized graph is made at first use and cached
beside the float32 export, under a hash of the weights, the network's and this module's code,
ONNX Runtime's version, the calibration images and the variant.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import ConfigError
from .config import ExtractConfig
from .decode import load_image
from .discover import discover_images
from .onnx_export import INPUT_NAME, cached, onnx_model

BUILTIN_SHAPE = (8, 480, 640)  # images, height, width of the generated calibration set
SEED = 20160816  # of the generated set
PERCENTILE = 99.99  # activation ranges: this percentile of the calibration values (both ends)
MAX_CALIBRATION_IMAGES = 64  # of a user's folder, evenly spaced in name order
CALIBRATION_RESIZE = 640  # longest side of a user's calibration images
# kept float32: the detector's last convolution (1x1, 65 channels at 1/64 of the pixels: no
# measurable cost; its logits feed the softmax) and the operators after the convolutions, which
# ONNX Runtime has no integer kernels for (the operator study: docs/performance.md, "int8: how
# the network is made")
FLOAT_NODES = ("/convPb/Conv", "/Softmax", "/ReduceL2", "/Div")
# The int8 graph's integer types, activations x weights, by the CPU that runs it (``int8_variant``).
# ONNX Runtime's x86 kernels without VNNI (AVX2, AVX-512 before VNNI) multiply u8 x s8 with
# VPMADDUBSW, whose 16-bit sums of two products saturate: the descriptors of the u8s8 graph go wrong
# there (issue 22; ONNX Runtime's quantization docs name the cause). Their u8 x u8 kernels widen
# to 16 bits first and sum in 32 bits: no saturation, slower (docs/performance.md, "int8 on x86
# CPUs without VNNI").
# VNNI's VPDPBUSD and ARM's integer kernels sum u8 x s8 in 32 bits: u8s8, the fastest, is right there.
VARIANTS = {"u8s8": "QInt8", "u8u8": "QUInt8"}  # variant: ONNX Runtime's QuantType of the weights
VARIANT_ENV = "SP_EXTRACT_INT8_VARIANT"  # overrides the choice (tests; a graph exported for another CPU)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # /proc/cpuinfo's names
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")  # platform.machine(), lower case


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags (Linux: x86's ``flags``, ARM's ``Features``), None where not readable."""
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def choose_variant(machine: str, flags: frozenset[str] | None) -> str:
    """The variant for a CPU: u8s8 unless x86 without VNNI, or x86 whose flags are unknown (u8u8)."""
    if machine.lower() not in X86_MACHINES:
        return "u8s8"
    return "u8s8" if flags is not None and any(flag in flags for flag in VNNI_FLAGS) else "u8u8"


def int8_variant() -> str:
    """The variant for this CPU, or ``$SP_EXTRACT_INT8_VARIANT`` where set."""
    chosen = os.environ.get(VARIANT_ENV)
    if chosen is None:
        return choose_variant(platform.machine(), cpu_flags())
    if chosen not in VARIANTS:
        raise ConfigError(f"{VARIANT_ENV}={chosen}: not an int8 variant (use {' or '.join(VARIANTS)})")
    return chosen


@dataclass(frozen=True)
class Calibration:
    """Images (H, W) float32 in [0, 1] whose activations set the quantization ranges."""

    label: str  # e.g. "builtin 8x480x640" or "photos/ (40 images)"
    identity: str  # what the cache key of the int8 graph takes from the calibration
    images: Callable[[], tuple[np.ndarray, ...]]  # made when needed: not on a cache hit


def digest(images: tuple[np.ndarray, ...]) -> str:
    hasher = hashlib.sha1()
    for image in images:
        hasher.update(f"{image.shape}".encode())
        hasher.update(np.ascontiguousarray(image, dtype=np.float32).tobytes())
    return hasher.hexdigest()


def generated_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic grayscale scene: a shaded background, filled polygons, ellipses, lines,
    checkerboards and stripes, blurred a little and noised, as float32 in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.normal(size=2)
    ramp = (direction[0] * y / height + direction[1] * x / width) * rng.uniform(40, 120)
    canvas = np.clip(rng.uniform(40, 200) + ramp, 0, 255).astype(np.uint8)
    size = np.array([width, height])
    for _ in range(rng.integers(12, 24)):
        kind, shade = rng.integers(5), int(rng.integers(0, 256))
        centre = (rng.random(2) * size).astype(int)
        extent = int(rng.uniform(0.03, 0.25) * min(height, width))
        if kind == 0:
            corners = centre + rng.integers(-extent, extent + 1, (int(rng.integers(3, 7)), 2))
            cv2.fillPoly(canvas, [cv2.convexHull(corners.astype(np.int32))], shade)
        elif kind == 1:
            axes = (extent, int(extent * rng.uniform(0.3, 1.0)))
            cv2.ellipse(canvas, tuple(centre), axes, float(rng.uniform(0, 180)), 0, 360, shade, -1)
        elif kind == 2:
            end = centre + rng.integers(-2 * extent, 2 * extent + 1, 2)
            cv2.line(canvas, tuple(centre), tuple(int(v) for v in end), shade, int(rng.integers(1, 6)))
        else:  # a checkerboard (3) or stripes (4) patch
            cell = int(rng.integers(4, 24))
            top, left = max(centre[1] - extent, 0), max(centre[0] - extent, 0)
            patch = canvas[top : centre[1] + extent, left : centre[0] + extent]
            py, px = np.indices(patch.shape)
            on = ((py // cell + px // cell) % 2 if kind == 3 else (px + py) // cell % 2).astype(bool)
            patch[on] = shade
    image = cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.5, 1.5))).astype(np.float32)
    image += rng.normal(0, rng.uniform(1, 6), image.shape).astype(np.float32)
    return np.clip(image / 255.0, 0.0, 1.0).astype(np.float32)


def builtin_calibration() -> Calibration:
    """The default calibration set: ``BUILTIN_SHAPE`` generated images, the same on every machine."""
    count, height, width = BUILTIN_SHAPE

    def images() -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng(SEED)
        return tuple(generated_image(height, width, rng) for _ in range(count))

    # the generator's code is in the cache key; NumPy's and OpenCV's versions may change its images
    identity = f"builtin {BUILTIN_SHAPE} {SEED} numpy {np.__version__} opencv {cv2.__version__}"
    return Calibration(f"builtin {count}x{height}x{width}", identity, images)


def folder_calibration(folder: Path, limit: int = MAX_CALIBRATION_IMAGES) -> Calibration:
    """Up to ``limit`` images of ``folder`` (evenly spaced in name order) at the calibration size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--calibrate {folder}: not a folder")
    names = discover_images(folder)
    if not names:
        raise ConfigError(f"--calibrate {folder}: no images found")
    picked = [names[int(i)] for i in np.linspace(0, len(names) - 1, min(limit, len(names)))]
    config = ExtractConfig(resize_max=CALIBRATION_RESIZE)
    images = []
    for name in dict.fromkeys(picked):
        decoded = load_image(folder, name, config)
        if decoded.image is None:
            raise ConfigError(f"--calibrate {folder / name}: {decoded.error}")
        images.append(decoded.image)
    loaded = tuple(images)
    return Calibration(f"{folder} ({len(loaded)} images)", digest(loaded), lambda: loaded)


class _Reader:
    """ONNX Runtime's calibration data reader: one image a batch. ``set_range`` lets the
    quantizer collect the statistics a few images at a time, so memory stays bounded."""

    def __init__(self, images: tuple[np.ndarray, ...], input_name: str) -> None:
        self.images, self.input_name = images, input_name
        self.batches: Iterator[np.ndarray] = iter(images)

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.batches = iter(self.images[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.batches, None)
        return None if image is None else {self.input_name: image[None, None]}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizer, which prints its progress on stdout and logs advice as warnings."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def quantize(
    fp32_model: bytes,
    calibration: Calibration,
    float_nodes: tuple[str, ...] = FLOAT_NODES,
    ranges: Path | None = None,
    variant: str = "u8s8",
) -> bytes:
    """``fp32_model`` (ONNX) statically quantized in QDQ form as ``variant``, ``float_nodes`` left float32.

    ``ranges``: a file keeping the calibrated ranges (read if there, else written), so that
    variants of one graph are calibrated once."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = {
        "CalibTensorRangeSymmetric": False,
        "CalibPercentile": PERCENTILE,
        "CalibStridedMinMax": 1,  # statistics of one image at a time (any method, despite the name)
    }
    cache = {"calibration_cache_path": ranges} if ranges else {}  # an option of recent versions only
    with tempfile.TemporaryDirectory(prefix="sp-extract-int8-") as work, _quiet():
        source, out = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        source.write_bytes(fp32_model)  # a path: older versions take no ModelProto
        quantize_static(
            source,
            out,
            _Reader(calibration.images(), INPUT_NAME),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=getattr(QuantType, VARIANTS[variant]),
            nodes_to_exclude=list(float_nodes),
            calibrate_method=CalibrationMethod.Percentile,
            extra_options=options,
            **cache,
        )
        return out.read_bytes()


def cache_key(weights_sha1: str, calibration: Calibration, variant: str) -> str:
    """Hash of what the int8 graph depends on: weights, code, quantizer version, calibration, variant."""
    import onnxruntime

    from . import model as model_module

    code = Path(inspect.getfile(model_module)).read_bytes() + Path(__file__).read_bytes()
    text = f"{weights_sha1}:{onnxruntime.__version__}:{calibration.identity}:{variant}:".encode()
    return hashlib.sha1(text + code).hexdigest()[:20]


def int8_model(net: torch.nn.Module, weights_sha1: str, calibration: Calibration | None = None) -> bytes:
    """The int8 graph of ``net`` for this CPU (``int8_variant``) calibrated on ``calibration``
    (default: the built-in set), from the cache if there, else quantized and cached (best effort)."""
    calibration, variant = calibration or builtin_calibration(), int8_variant()
    key = cache_key(weights_sha1, calibration, variant)

    def make() -> bytes:
        return quantize(onnx_model(net, weights_sha1), calibration, variant=variant)

    return cached(f"superpoint-int8-{key}.onnx", make)
