"""The extraction pipeline: discover -> decode -> batch -> network -> post-process -> store.

``SuperPoint`` is the network with its post-processing, for tensors already in memory;
``extract`` runs the whole pipeline over a folder into a resumable feature store.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import ExtractConfig
from .decode import DecodedImage
from .discover import discover_images, read_image_list
from .errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError
from .interrupt import graceful_stop
from .loader import decode_all, make_batches
from .postprocess import Features, postprocess, to_original_frame
from .report import Progress, Summary
from .store import StoreWriter
from .weights import load_weights

DETECTION_NOISE = 2.0  # keypoint uncertainty in working-size pixels, as hloc records it


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; else ``cpu``, ``cuda[:N]``, ``mps``."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise ConfigError(f"--device {spec}: not a device (auto, cpu, cuda, cuda:N, mps)") from error
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        raise ConfigError(f"--device {spec}: not available on this machine")
    return device


class SuperPoint(torch.nn.Module):
    """SuperPoint with the reference post-processing: images in, features out.

    >>> model = SuperPoint("superpoint-v1", ExtractConfig(max_keypoints=2048))
    >>> features = model(images)  # (B, 1, H, W) float in [0, 1], one size per batch
    """

    def __init__(self, weights: str | None = None, config: ExtractConfig | None = None) -> None:
        super().__init__()
        loaded = load_weights(weights)
        self.net = loaded.build()
        self.config = config or ExtractConfig()
        self.weights_sha1 = loaded.sha1
        self.weights_label = loaded.label

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[Features]:
        scores, descriptors = self.net(images)
        c = self.config
        return postprocess(
            scores, descriptors, c.threshold, c.nms_radius, c.border, c.max_keypoints, c.subpixel
        )


def feature_datasets(
    features: Features, image: DecodedImage, fp32_descriptors: bool
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """One image's features as the store's datasets (hloc layout) and dataset attributes."""
    height, width = image.image.shape
    keypoints = to_original_frame(features.keypoints.cpu().numpy(), (width, height), image.original_size)
    scale = np.asarray(image.original_size, np.float32) / np.asarray((width, height), np.float32)
    descriptors = features.descriptors.cpu().numpy().T
    datasets = {
        "keypoints": keypoints,
        "scores": features.scores.cpu().numpy().astype(np.float32),
        "descriptors": descriptors.astype(np.float32 if fp32_descriptors else np.float16),
        "image_size": np.asarray(image.original_size, dtype=np.int64),
    }
    return datasets, {"keypoints": {"uncertainty": float(DETECTION_NOISE * scale.mean())}}


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def extract(
    images: Path | str,
    out: Path | str,
    config: ExtractConfig | None = None,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 4,
    num_workers: int | None = None,
    image_list: Path | str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
) -> Summary:
    """Extract SuperPoint features of every image below ``images`` into the store ``out``.

    Images already in the store are skipped (resume). Returns the run's ``Summary``; a failed
    image is recorded there and the run goes on. Raises ``SpExtractError`` for configuration
    problems (no images, bad weights, unusable store).
    """
    config = config or ExtractConfig()
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0 (0 decodes in the main process), got {num_workers}")
    root, out = Path(images), Path(out)
    names = read_image_list(Path(image_list), root) if image_list else discover_images(root)
    if not names:
        raise ConfigError(
            f"{root}: no images found (extensions: jpg, jpeg, png, ppm, pgm, bmp, tif, tiff, webp)"
        )
    summary = Summary(command="extract", output=str(out), total=len(names))
    started = time.monotonic()
    target = resolve_device(device)
    model = SuperPoint(weights, config)
    settings = {**asdict(config), "weights_sha1": model.weights_sha1}
    info = {"weights": model.weights_label, "images": str(root)}
    num_workers = default_workers() if num_workers is None else num_workers
    with StoreWriter(out, "features", settings, overwrite=overwrite, info=info) as writer:
        todo = [n for n in names if n not in writer.done]
        summary.skipped = len(names) - len(todo)
        progress = Progress(len(todo), "images", quiet=quiet)
        model = model.to(target)
        try:
            with graceful_stop() as stop:
                loader = decode_all(root, todo, config, num_workers)
                for batch in make_batches(loader, batch_size):
                    for failure in batch.failures:
                        summary.failed.append({"name": failure.name, "reason": failure.error})
                        progress.message(f"failed: {failure.name}: {failure.error}")
                    if batch.images:
                        tensor = batch.tensor(pin=target.type == "cuda").to(target, non_blocking=True)
                        for image, features in zip(batch.images, model(tensor)):
                            datasets, attrs = feature_datasets(features, image, config.fp32_descriptors)
                            summary.counts.append(len(datasets["scores"]))
                            progress.advance(len(writer.add(image.name, datasets, attrs)))
                    if stop:
                        summary.interrupted, summary.exit_code = True, stop.exit_code
                        break
                progress.advance(len(writer.flush()))
        finally:
            progress.close()
    summary.done = progress.completed
    if not summary.interrupted:
        summary.exit_code = EXIT_SOME_FAILED if summary.failed else EXIT_OK
    summary.wall_time_s = time.monotonic() - started
    return summary
