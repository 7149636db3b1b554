"""Network runners: the SuperPoint CNN on PyTorch, ONNX Runtime or OpenVINO, behind one interface.

A backend maps a (B, 1, H, W) float32 batch in [0, 1] to the network's dense outputs, as float32
torch tensors: ``scores`` (B, 8*(H//8), 8*(W//8)) and ``descriptors`` (B, 256, H//8, W//8), so
post-processing (``postprocess``) is the same whatever runs the network.

ONNX Runtime and OpenVINO run an ONNX export of this package's own PyTorch module, made at first
use and cached (``onnx_export``); ``export_model`` writes the same graph for deployment. At
``--precision int8`` they run that graph statically quantized (``quantize``), cached the same way.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import torch

from ..devices import ShapeTuning, to_device
from ..errors import ConfigError
from ..store.atomic import atomic_write
from .config import BACKENDS, CPU_ONLY_PRECISIONS, EXPORT_FORMATS, EXPORT_PRECISIONS
from .onnx_export import INPUT_NAME, OUTPUT_NAMES, onnx_model
from .weights import load_weights

OPENVINO_HINT = "OpenVINO is not installed: pip install 'sp-extract[openvino]' (or pip install openvino)"
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_OPENVINO_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}  # int8: its float rest


class Backend(Protocol):
    """Runs the network on a batch; ``name`` is recorded in the store's attributes."""

    name: str

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def run_torch(
    net: torch.nn.Module, images: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (scores, descriptors) of ``net`` on ``images``, autocast to ``precision``, as float32."""
    if precision in CPU_ONLY_PRECISIONS:  # e.g. the API's SuperPoint module: never fp32 in disguise
        raise ConfigError(f"--precision {precision} runs on --backend onnxruntime or openvino, not PyTorch")
    with torch.autocast(images.device.type, _AUTOCAST.get(precision), enabled=precision in _AUTOCAST):
        scores, descriptors = net(images)
    return scores.float(), descriptors.float()


class TorchBackend:
    """PyTorch eager on any device; channels-last layout (about 2x faster on the CPU than NCHW)."""

    def __init__(self, net: torch.nn.Module, device: torch.device, precision: str) -> None:
        self.device = device
        self.precision = precision
        self.layout = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
        self.net = net.to(device, memory_format=self.layout)
        self.tuning = ShapeTuning()
        if device.type == "cuda" and precision == "fp32":  # GPU-only: fp32 is fp32, not TF32
            torch.backends.cudnn.allow_tf32 = False
        self.name = f"torch {torch.__version__} ({device.type}, {precision})"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":  # cuDNN tunes the convolutions of the shapes that repeat
            torch.backends.cudnn.benchmark = self.tuning.benchmark(images.shape)
        images = to_device(images, self.device).contiguous(memory_format=self.layout)
        return run_torch(self.net, images, self.precision)


@functools.cache
def exact_cpu_arena() -> None:
    """Register, once a process, a CPU memory arena for ONNX Runtime sessions that grows by what
    is requested. Its default arena grows by powers of two and kept 794 bytes per input pixel
    from the second run on (666 the first); this one keeps 528 (measured, 1632 x 1632 input)."""
    import onnxruntime

    info = onnxruntime.OrtMemoryInfo(
        "Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT
    )
    onnxruntime.create_and_register_allocator(info, onnxruntime.OrtArenaCfg({"arena_extend_strategy": 1}))


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU, ``threads`` intra-op threads, no spinning between calls, no
    memory-pattern planning (it costs more than it saves when batch shapes vary), the arena of
    ``exact_cpu_arena``. ``precision`` is what its name says of the graph (e.g. ``int8 u8s8``)."""

    def __init__(self, onnx_model: bytes, threads: int, precision: str = "fp32") -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the memory-pattern planner made the second run of each input shape about 3x slower
        options.enable_mem_pattern = False
        exact_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
        self.session = onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        self.name = f"onnxruntime {onnxruntime.__version__} (cpu, {precision})"

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        array = np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)
        scores, descriptors = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        return torch.from_numpy(scores), torch.from_numpy(descriptors)


def import_openvino() -> ModuleType:
    """The ``openvino`` module (an optional dependency), or a ``ConfigError`` saying how to install it."""
    try:
        import openvino
    except ImportError as error:
        raise ConfigError(OPENVINO_HINT) from error
    return openvino


class OpenVinoBackend:
    """OpenVINO on the CPU; ``precision`` sets its inference precision (its own default is bf16),
    ``label`` what its name says of it (default: ``precision``)."""

    def __init__(self, onnx_model: bytes, threads: int, precision: str, label: str | None = None) -> None:
        openvino = import_openvino()
        core = openvino.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        compiled = core.compile_model(core.read_model(io.BytesIO(onnx_model)), "CPU", config)
        self.request = compiled.create_infer_request()
        self.name = f"openvino {openvino.__version__.split('-')[0]} (cpu, {label or precision})"

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        array = np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)
        result = self.request.infer({INPUT_NAME: array})
        return tuple(torch.from_numpy(np.asarray(result[name])) for name in OUTPUT_NAMES)


def choose_backend(name: str, device: torch.device, precision: str) -> str:
    """Resolve ``auto`` and check that the backend can run on ``device`` at ``precision``."""
    if name not in BACKENDS:
        raise ConfigError(f"--backend {name}: not one of {', '.join(BACKENDS)}")
    if precision in CPU_ONLY_PRECISIONS and (name == "torch" or device.type != "cpu"):
        raise ConfigError(
            f"--precision {precision} runs on the CPU only, with --backend onnxruntime or openvino "
            f"(not {'torch' if name == 'torch' else device})"
        )
    if name == "auto":
        return "onnxruntime" if device.type == "cpu" and precision in ("fp32", "int8") else "torch"
    if name != "torch" and device.type != "cpu":
        raise ConfigError(f"--backend {name} runs on the CPU only; use --backend torch on {device}")
    if name == "onnxruntime" and precision not in ("fp32", "int8"):
        raise ConfigError(
            f"--backend onnxruntime runs fp32 and int8 only; use --backend torch or openvino "
            f"for --precision {precision}"
        )
    return name


def make_backend(
    name: str,
    net: torch.nn.Module,
    device: torch.device,
    precision: str,
    threads: int,
    weights_sha1: str,
) -> Backend:
    """A ready backend (``name`` from ``choose_backend``) running ``net`` with ``threads`` threads.
    Its name says the precision, at int8 with the graph's variant (e.g. ``int8 u8s8``)."""
    if name == "torch":
        return TorchBackend(net, device, precision)
    if precision == "int8":
        from .quantize import int8_variant

        label = f"int8 {int8_variant()}"
    else:
        label = precision
    if name == "openvino":
        import_openvino()  # fail before exporting
        return OpenVinoBackend(network_model(net, weights_sha1, precision), threads, precision, label)
    return OnnxRuntimeBackend(network_model(net, weights_sha1, precision), threads, label)


def network_model(
    net: torch.nn.Module, weights_sha1: str, precision: str, calibrate: Path | None = None
) -> bytes:
    """The ONNX graph a CPU backend runs at ``precision``: the float32 export, or at int8 that
    export quantized, calibrated on the images of the folder ``calibrate`` or the built-in set."""
    if precision == "int8":
        from .quantize import folder_calibration, int8_model

        return int8_model(net, weights_sha1, folder_calibration(calibrate) if calibrate else None)
    return onnx_model(net, weights_sha1)


def export_model(
    out: Path,
    fmt: str | None = None,
    weights: str | None = None,
    precision: str = "fp32",
    calibrate: Path | None = None,
) -> list[Path]:
    """Write the network with ``weights`` for deployment; returns the files written.

    ``onnx``: the ONNX graph the onnxruntime backend runs. ``openvino``: that graph as OpenVINO
    IR, ``out`` (.xml) with its weights beside it (.bin). ``precision`` int8: the quantized graph
    (QDQ) for this CPU (``quantize.int8_variant``), calibrated on the images of the folder
    ``calibrate`` or on the built-in set. ``fmt``
    None: from ``out``'s extension (.onnx, .xml), else ``ConfigError``.
    """
    out = Path(out)
    by_suffix = {".onnx": "onnx", ".xml": "openvino"}
    if fmt is None:
        if out.suffix.lower() not in by_suffix:
            raise ConfigError(f"{out}: end OUT in .onnx (ONNX) or .xml (OpenVINO IR), or pass --format")
        fmt = by_suffix[out.suffix.lower()]
    if fmt == "onnx" and out.suffix.lower() == ".xml":
        raise ConfigError(f"{out}: .xml is OpenVINO's extension; end an ONNX model in .onnx")
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt}: not one of {', '.join(EXPORT_FORMATS)}")
    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"--precision {precision}: export writes {' or '.join(EXPORT_PRECISIONS)}")
    if calibrate is not None and precision != "int8":
        raise ConfigError("--calibrate sets the ranges of an int8 network: add --precision int8")
    if fmt == "openvino" and out.suffix != ".xml":
        raise ConfigError(f"{out}: an OpenVINO model is written as NAME.xml with NAME.bin; end OUT in .xml")
    if not out.parent.is_dir():
        raise ConfigError(f"{out}: the folder {out.parent} does not exist")
    openvino = import_openvino() if fmt == "openvino" else None
    loaded = load_weights(weights)
    data = network_model(loaded.build(), loaded.sha1, precision, calibrate)
    partial = out.with_name(f".{out.name}.{os.getpid()}.part{out.suffix}")  # OpenVINO: .xml, .bin beside
    try:
        with atomic_write(out, partial, durable=False):
            if openvino is None:
                partial.write_bytes(data)
                written = [out]
            else:
                model = openvino.Core().read_model(io.BytesIO(data))
                openvino.save_model(model, partial, compress_to_fp16=False)
                os.replace(partial.with_suffix(".bin"), out.with_suffix(".bin"))
                written = [out, out.with_suffix(".bin")]
    except OSError as error:
        partial.with_suffix(".bin").unlink(missing_ok=True)
        raise ConfigError(f"{out}: cannot write the model ({error.strerror or error})") from error
    return written
