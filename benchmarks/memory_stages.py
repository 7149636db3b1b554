"""Where one huge image's memory goes: the peak of each extraction stage, in-process.

Usage: python benchmarks/memory_stages.py IMAGE [--weights W]

Runs the stages of ``sp-extract --resize-max 0`` on the CPU (onnxruntime, default settings, tile
auto) for one image: start-up (Python, PyTorch, the ONNX Runtime session), decoding, the tiled
network with its per-tile post-processing, the image-wide selection. Linux only: the process's
peak resident set (``VmHWM``) is reset between stages (``/proc/self/clear_refs``), so each line
gives the stage's own peak.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sp_extract.extraction.backends import make_backend
from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.decode import load_image
from sp_extract.extraction.loader import Batch
from sp_extract.extraction.pipeline import SuperPoint, allowed_pixels
from sp_extract.extraction.tiling import TiledNetwork

SHARED = Path(__file__).resolve().parents[2] / "shared"


def gib(key: str) -> float:
    """A /proc/self/status memory line (VmRSS, VmHWM) in GiB."""
    return int(Path("/proc/self/status").read_text().split(f"{key}:")[1].split()[0]) / 2**20


class Stage:
    """Prints the peak resident memory of the block, and how far it rose over its start."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.start = gib("VmRSS")

    def __exit__(self, *_: object) -> None:
        peak, after = gib("VmHWM"), gib("VmRSS")
        print(f"{self.name:<30} peak {peak:5.2f} GiB (+{peak - self.start:.2f}), after {after:5.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--weights", default=str(SHARED / "weights" / "superpoint_v1.pth"))
    args = parser.parse_args()
    config = ExtractConfig(resize_max=0)
    with Stage("start-up (model, ORT session)"):
        model = SuperPoint(args.weights, config)
        runner = make_backend("onnxruntime", model.net, torch.device("cpu"), "fp32", 2, model.weights_sha1)
    with Stage("decode"):
        image = load_image(args.image.parent, args.image.name, config)
    with torch.inference_mode():
        with Stage("network, per-tile features"):
            found = TiledNetwork(runner, config)(Batch([image]).tensor())
        with Stage("image-wide selection"):
            (features,) = model.postprocess(found, 1, allowed_pixels([image]))
    print(f"{len(features.scores)} keypoints")


if __name__ == "__main__":
    main()
