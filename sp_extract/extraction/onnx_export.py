"""The network's ONNX export: this package's own PyTorch module as an ONNX graph (dynamic batch,
height and width), made at first use and cached in ``weights.cache_dir()/onnx`` under a hash of
the weights and of the network's code. ``cached`` is that cache, which the int8 graph
(``quantize``) shares; the CPU backends (``backends``) run what it holds.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..store.atomic import atomic_write
from . import model as model_module
from .weights import cache_dir

INPUT_NAME = "image"
OUTPUT_NAMES = ("scores", "descriptors")
OPSET = 17


def export_onnx(net: torch.nn.Module, destination: Path | io.BytesIO) -> None:
    """Write ``net`` (on the CPU, NCHW float32) as ONNX with dynamic batch, height and width."""
    example = torch.rand(1, 1, 64, 96)
    axes = {
        INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
        "scores": {0: "batch", 1: "height8", 2: "width8"},
        "descriptors": {0: "batch", 2: "cells_y", 3: "cells_x"},
    }
    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but exact and dependency-light
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (example,),
            destination,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=OPSET,
            **options,
        )


def onnx_model(net: torch.nn.Module, weights_sha1: str) -> bytes:
    """The ONNX export of ``net``, from the cache if there, else exported and cached (best effort)."""
    code = Path(inspect.getfile(model_module)).read_bytes()
    key = hashlib.sha1(f"{weights_sha1}:{OPSET}:".encode() + code).hexdigest()[:20]

    def export() -> bytes:
        buffer = io.BytesIO()
        export_onnx(net, buffer)
        return buffer.getvalue()

    return cached(f"superpoint-{key}.onnx", export)


def cached(name: str, make: Callable[[], bytes]) -> bytes:
    """The file ``name`` of the ONNX cache, else ``make()``, written there (best effort)."""
    path = cache_dir() / "onnx" / name
    if path.is_file():
        return path.read_bytes()
    data = make()
    try:  # an unwritable cache only costs the export again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, durable=False) as partial:
            partial.write_bytes(data)
    except OSError:
        pass
    return data
