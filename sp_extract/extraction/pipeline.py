"""The extraction pipeline: discover -> decode -> batch -> network -> post-process -> store.

``SuperPoint`` is the network with its post-processing, for tensors already in memory;
``extract`` runs the whole pipeline over a folder into a resumable feature store.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch

from ..devices import current_device, device_scope, for_other_thread, release_cached_memory, resolve_device
from ..errors import ConfigError
from ..report import ExtractSummary, counted, listed, warn
from ..runs import StoreRun
from ..store.writer import StoreWriter
from .backends import choose_backend, make_backend, run_torch
from .config import ExtractConfig, ExtractRun
from .decode import DecodedImage
from .discover import find_images, unpairable
from .loader import Batch, decode_all, make_batches
from .model import DESCRIPTOR_DIM, STRIDE
from .orientation import to_stored_frame, viewed_size
from .postprocess import Candidates, Features, postprocess, select_candidates, to_original_frame
from .tiling import TiledNetwork, parse_tile
from .weights import load_weights

DETECTION_NOISE = 2.0  # keypoint uncertainty in working-size pixels, as hloc records it
CPU_FP16_SLOWDOWN = 5  # PyTorch fp16 against fp32 on the CPU, measured (README, Performance)
Dense = tuple[torch.Tensor, torch.Tensor]  # the network's dense (scores, descriptors) of a batch
Tiled = list[list[Candidates]]  # per image of a batch run tile by tile, its tiles' keypoints (``tiling``)
Entry = tuple[str, dict[str, np.ndarray], dict[str, dict[str, float]]]  # StoreWriter.add's arguments


def as_image_batch(images: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """What ``SuperPoint`` accepts as a (B, 1, H, W) float32 tensor in [0, 1] on ``device``.

    A torch tensor or numpy array, shaped (B, 1, H, W) or (H, W) (one image); float values in
    [0, 1], or 8-bit (divided by 255) or, for numpy, 16-bit integers (divided by 65535). Anything
    else raises ``TypeError`` or ``ValueError`` saying what to pass instead.
    """
    if isinstance(images, np.ndarray):
        if images.dtype in (np.uint8, np.uint16):
            images = images.astype(np.float32) / np.iinfo(images.dtype).max
        images = torch.from_numpy(np.ascontiguousarray(images))
    elif not isinstance(images, torch.Tensor):
        raise TypeError(f"SuperPoint takes a torch tensor or a numpy array, not {type(images).__name__}")
    if images.ndim == 2:
        images = images[None, None]
    if images.ndim != 4 or images.shape[1] != 1:
        colour = " (colour: convert to grayscale first)" if 3 in images.shape[-3:] else ""
        raise ValueError(
            f"SuperPoint takes grayscale images shaped (B, 1, H, W) or one (H, W) image, not "
            f"{tuple(images.shape)}{colour}"
        )
    if images.dtype == torch.uint8:
        return images.to(device).float() / 255
    if not images.is_floating_point():
        raise TypeError(f"SuperPoint takes float images in [0, 1] or 8-bit images, not {images.dtype}")
    images = images.to(device, torch.float32)
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"SuperPoint takes float images in [0, 1], these range from {images.min().item()!r} to "
            f"{images.max().item()!r} (8-bit values: divide by 255, or pass them as uint8; "
            f"values a rounding error outside: clip them)"
        )
    return images


class SuperPoint(torch.nn.Module):
    """SuperPoint with the reference post-processing: images in, features out.

    >>> model = SuperPoint("superpoint-v1", ExtractConfig(max_keypoints=2048))
    >>> image = cv2.imread("photo.jpg", cv2.IMREAD_GRAYSCALE)  # (H, W) uint8
    >>> features = model(image)  # or (B, 1, H, W) floats in [0, 1], one size per batch
    """

    def __init__(self, weights: str | None = None, config: ExtractConfig | None = None) -> None:
        super().__init__()
        loaded = load_weights(weights)
        self.net = loaded.build()
        self.config = config or ExtractConfig()
        self.weights_sha1 = loaded.sha1
        self.weights_label = loaded.label

    @torch.inference_mode()
    def forward(self, images: torch.Tensor | np.ndarray) -> list[Features]:
        """Features of each image of ``images`` (see ``as_image_batch`` for what is accepted)."""
        images = as_image_batch(images, next(self.net.parameters()).device)
        network = functools.partial(run_torch, self.net, precision=self.config.precision)
        return self.postprocess(dense_outputs(network, images), len(images))

    def postprocess(
        self, dense: Dense | Tiled | None, count: int, allowed: torch.Tensor | None = None
    ) -> list[Features]:
        """Per-image features of the dense outputs of a batch of ``count`` images (None: images
        smaller than one 8 x 8 cell, which have no keypoint; they are stored so, not failed; a
        list: the keypoints of a batch run tile by tile, ``tiling``). ``allowed``: (B, H, W)
        bool, False on masked pixels (see ``postprocess.postprocess``)."""
        if dense is None:
            empty = torch.zeros((0, 2)), torch.zeros(0), torch.zeros((0, DESCRIPTOR_DIM))
            return [Features(*empty) for _ in range(count)]
        c = self.config
        if isinstance(dense, list):
            masks = [None] * count if allowed is None else allowed
            return [select_candidates(parts, c.max_keypoints, mask) for parts, mask in zip(dense, masks)]
        return postprocess(*dense, c.threshold, c.nms_radius, c.border, c.max_keypoints, c.subpixel, allowed)


def dense_outputs(
    network: Callable[[torch.Tensor], Dense | Tiled], images: torch.Tensor
) -> Dense | Tiled | None:
    """``network``'s dense (scores, descriptors) on a batch (or its tiles' keypoints, ``tiling``),
    None if the images are smaller than one 8 x 8 cell (the network has no output there)."""
    return network(images) if min(images.shape[-2:]) >= STRIDE else None


class MemoryBudget:
    """Pixels one network call may hold: unbounded until the device runs out of memory, then
    half the pixels of the call that failed, for the rest of the run."""

    def __init__(self) -> None:
        self.pixels: int | None = None

    def lower(self, images: list[DecodedImage]) -> None:
        """``images`` together did not fit: allow half their pixels from now on."""
        half = len(images) * images[0].image.size // 2
        self.pixels = half if self.pixels is None else min(self.pixels, half)

    def split(self, images: list[DecodedImage]) -> list[list[DecodedImage]]:
        """``images`` (of one size) in consecutive chunks within the budget, at least one each."""
        count = len(images) if self.pixels is None else max(1, self.pixels // images[0].image.size)
        return [images[start : start + count] for start in range(0, len(images), count)]


def out_of_memory_reason(image: DecodedImage) -> str:
    """Why an image that does not fit the device's memory even alone failed, and what to do."""
    height, width = image.image.shape
    return (
        f"out of device memory at {width} x {height} px, even alone; lower --resize-max "
        f"(say --resize-max {max(height, width) // 2}) or cut the image into tiles"
    )


def network_chunks(
    runner: Callable[[torch.Tensor], Dense | Tiled],
    images: list[DecodedImage],
    pin: bool,
    budget: MemoryBudget,
) -> Iterator[tuple[list[DecodedImage], Dense | Tiled | None | str]]:
    """The dense outputs of a batch's images, in chunks that fit the device's memory, ready for
    post-processing on another thread (``for_other_thread``).

    A chunk that runs out of memory is halved and retried (``budget`` remembers the limit for
    later batches); an image that does not fit alone comes with the reason, a string, instead.
    """
    pending = budget.split(images) if images else []
    while pending:
        chunk = pending.pop(0)
        fits = True
        try:
            dense = dense_outputs(runner, Batch(chunk).tensor(pin=pin))
        except torch.cuda.OutOfMemoryError:  # = torch.OutOfMemoryError, as CUDA raises it
            fits = False  # handled below, once the error and the frames it holds are released
        if fits:
            yield chunk, dense if dense is None or isinstance(dense, list) else for_other_thread(dense)
            continue
        release_cached_memory()
        if len(chunk) == 1:
            yield chunk, out_of_memory_reason(chunk[0])
        else:
            budget.lower(chunk)
            pending[:0] = budget.split(chunk)


def feature_datasets(
    features: Features, image: DecodedImage, config: ExtractConfig
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """One image's features as the store's datasets (hloc layout) and dataset attributes."""
    height, width = image.image.shape  # as the network saw it; keypoints go back to the stored frame
    keypoints = to_stored_frame(features.keypoints.cpu().numpy(), image.orientation, (width, height))
    width, height = viewed_size((width, height), image.orientation)
    keypoints = to_original_frame(keypoints, (width, height), image.original_size)
    scale = np.asarray(image.original_size, np.float32) / np.asarray((width, height), np.float32)
    descriptors = features.descriptors.cpu().numpy().T
    datasets = {
        "keypoints": keypoints,
        "scores": features.scores.cpu().numpy().astype(np.float32),
        "descriptors": descriptors.astype(np.float32 if config.fp32_descriptors else np.float16),
        "image_size": np.asarray(image.original_size, dtype=np.int64),
    }
    return datasets, {"keypoints": {"uncertainty": float(DETECTION_NOISE * scale.mean())}}


def finish_batch(
    model: SuperPoint,
    images: list[DecodedImage],
    dense: Dense | Tiled | None,
    summary: ExtractSummary,
    timings: dict[str, float],
) -> list[Entry]:
    """Post-process one batch's dense outputs into store entries (run on the writer's thread,
    with their device as its current CUDA device: a thread starts with GPU 0 current)."""
    device = torch.device("cpu") if dense is None or isinstance(dense, list) else dense[0].device
    with torch.inference_mode(), timed(timings, "postprocess", time.thread_time), current_device(device):
        entries = []
        for image, features in zip(images, model.postprocess(dense, len(images), allowed_pixels(images))):
            datasets, attrs = feature_datasets(features, image, model.config)
            summary.counts.append(len(datasets["scores"]))
            summary.note_image(image.orientation, image.masked_share)
            entries.append((image.name, datasets, attrs))
    return entries


def allowed_pixels(images: list[DecodedImage]) -> torch.Tensor | None:
    """(B, H, W) bool of a batch's masks (True for an image without one); None if none has one."""
    if all(image.allowed is None for image in images):
        return None
    return torch.from_numpy(
        np.stack(
            [
                image.allowed if image.allowed is not None else np.ones_like(image.image, bool)
                for image in images
            ]
        )
    )


def store_settings(config: ExtractConfig, weights_sha1: str) -> dict:
    """The settings a feature store records (and a run must match to extend it)."""
    return {**asdict(config), "weights_sha1": weights_sha1}


def default_workers(device: torch.device) -> int:
    """Decoding processes: none (decode in the main process, between network calls) when the
    network runs on a CPU of at most 2 cores, which it fills: there a worker process slowed it
    more than decoding costs (measured, 2 cores); else cores - 1, at most 4."""
    cores = cpu_cores()
    if device.type == "cpu" and cores <= 2:
        return 0
    return max(1, min(4, cores - 1))


def default_batch_size(device: torch.device) -> int:
    """Images per network batch: 1 on the CPU, where batching measured no faster (and a batch
    would wait for images of its size), 8 on a GPU."""
    return 1 if device.type == "cpu" else 8


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class BackgroundWriter:
    """Finishes work on its own thread behind a bounded queue, so it overlaps the network.

    A job (``add``) is called on the thread and returns store entries, which the thread hands
    to ``StoreWriter.add``: the pipeline queues the post-processing of each batch this way.
    ``saved`` returns how many entries became durable since its last call, so progress counts
    only saved images. An error on the thread is raised again by the next call.
    """

    def __init__(self, writer: StoreWriter, depth: int = 2) -> None:
        self.writer = writer
        self.busy_s = 0.0  # CPU time spent writing, for the stage breakdown
        self._queue: queue.Queue[Callable[[], list[Entry]] | None] = queue.Queue(depth)
        self._lock = threading.Lock()
        self._saved = 0
        self._error: BaseException | None = None
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="sp-extract-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is not None or self._discard:
                continue
            try:
                entries = job()
                started = time.thread_time()
                count = sum(len(self.writer.add(*entry)) for entry in entries)
            except BaseException as error:  # handed to the main thread by _check
                self._error = error
                continue
            with self._lock:
                self._saved += count
            self.busy_s += time.thread_time() - started

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def add(self, job: Callable[[], list[Entry]]) -> None:
        """Queue a job that makes store entries; blocks while the queue is full."""
        self._check()
        self._queue.put(job)

    def saved(self) -> int:
        """Entries made durable since the last call."""
        self._check()
        with self._lock:
            count, self._saved = self._saved, 0
        return count

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> int:
        """Write everything queued and flush; returns the entries saved since ``saved``."""
        self._stop()
        count = self.saved()
        started = time.thread_time()
        count += len(self.writer.flush())
        self.busy_s += time.thread_time() - started
        return count

    def abandon(self) -> None:
        """Stop the thread without writing what is still queued (after an error)."""
        self._discard = True
        self._stop()

    def salvage(self) -> None:
        """After an error: save what is finished. Write what is queued (unless the thread itself
        failed: then it skips the rest) and flush the writer's buffer; errors doing so are
        dropped, the error that ended the run is the one to report."""
        self._stop()
        with contextlib.suppress(Exception):
            self.writer.flush()


@contextlib.contextmanager
def library_threads(torch_count: int, opencv_count: int | None = None) -> Iterator[None]:
    """Run the block with ``torch_count`` PyTorch CPU threads and, if given, ``opencv_count``
    OpenCV threads; restore the previous counts after it."""
    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(torch_count)
    if opencv_count is not None:
        cv2.setNumThreads(opencv_count)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


@contextlib.contextmanager
def timed(
    timings: dict[str, float], stage: str, clock: Callable[[], float] = time.perf_counter
) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]``, by ``clock`` (wall time; for work
    on a background thread, ``time.thread_time``: the thread's own CPU time)."""
    started = clock()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + clock() - started


def timed_items(items: Iterable, timings: dict[str, float], stage: str) -> Iterator:
    """The items of ``items``, the time spent waiting for each added to ``timings[stage]``."""
    iterator = iter(items)
    while True:
        with timed(timings, stage):
            item = next(iterator, StopIteration)
        if item is StopIteration:
            return
        yield item


def images_to_extract(
    root: Path, out: Path, config: ExtractConfig, run: ExtractRun
) -> tuple[ExtractSummary, list[str]]:
    """The run's summary, begun (the images' count, what the scan of ``root`` found to report),
    and the names of the images to extract below ``root`` (those of ``run.image_list``, of
    ``run.shard``). Raises ``ConfigError`` if there is no image."""
    scan = find_images(root, Path(run.image_list) if run.image_list else None)
    names = scan.names
    if not names:
        found = (
            f"; not read: {len(scan.unsupported)} files of unsupported formats" if scan.unsupported else ""
        )
        raise ConfigError(
            f"{root}: no images found (extensions: jpg, jpeg, png, ppm, pgm, bmp, tif, tiff, webp, "
            f"heic, heif){found}"
        )
    if run.shard is not None:
        names = [name for name in names if run.shard.holds_image(name)]
    summary = ExtractSummary(command="extract", output=str(out), total=len(names))
    summary.unsupported, summary.other_files = scan.unsupported, scan.other_files
    summary.masks_used = bool(config.masks)
    spaced = unpairable(names)
    if spaced:
        warn(
            f"{counted(len(spaced), 'image name')} with white space can never be paired (pairs files, as "
            f"hloc and COLMAP read them, separate names by white space): {listed(spaced)}; rename them"
        )
    return summary, names


def extract_batches(
    batches: Iterable[Batch],
    network: Callable[[torch.Tensor], Dense | Tiled],
    pin: bool,
    finish: Callable[[list[DecodedImage], Dense | Tiled | None], list[Entry]],
    background: BackgroundWriter,
    run: StoreRun,
    timings: dict[str, float],
) -> None:
    """Run ``network`` over ``batches`` in chunks that fit the device's memory (``network_chunks``;
    ``pin``: page-locked host memory) and queue each chunk's ``finish`` on ``background``. Images
    that fail are recorded in ``run``; it stops after a batch when ``run`` is asked to stop."""
    budget = MemoryBudget()
    for batch in timed_items(batches, timings, "decode"):
        failed = [([failure], failure.error) for failure in batch.failures]
        chunks = network_chunks(network, batch.images, pin, budget)
        for chunk, dense in timed_items(chunks, timings, "network"):
            if isinstance(dense, str):
                failed.append((chunk, dense))
            else:
                background.add(functools.partial(finish, chunk, dense))
        for (image,), reason in failed:
            run.fail(image.name, reason)
        run.progress.advance(background.saved())
        if run.stopped():
            return


def no_keypoints_warning(summary: ExtractSummary, config: ExtractConfig) -> None:
    """Warn when the run saved images and none has a keypoint: the settings are likely wrong."""
    if summary.counts and not any(summary.counts):
        warn(
            f"no keypoints in any of the {counted(len(summary.counts), 'image')} saved: check --resize-max "
            f"{config.resize_max} (a side under 8 px has none), --threshold {config.threshold} and --border "
            f"{config.border} (defaults 1024, 0.005, 4)"
        )


def extract(
    images: Path | str,
    out: Path | str,
    config: ExtractConfig | None = None,
    run: ExtractRun | None = None,
    timings: dict[str, float] | None = None,
) -> ExtractSummary:
    """Extract SuperPoint features of every image below ``images`` into the store ``out``.

    ``config``: what lands in the store (``ExtractConfig``); ``run``: how the run goes
    (``ExtractRun``: weights, device, batch size, decoding workers, image list, overwrite, quiet,
    backend, tiling, shard); both default to their defaults. Images already in the store are
    skipped (resume). Returns the run's ``Summary``; a failed image is recorded there and the run
    goes on. Raises ``SpExtractError`` for configuration problems (no images, bad weights,
    unusable store). ``timings``, if given, receives the seconds spent per stage: on the main
    thread (wall time) ``decode`` (waiting for the decoding workers) and ``network``; on the
    background thread (its CPU time) ``postprocess`` and ``write``.
    """
    config, run = config or ExtractConfig(), run or ExtractRun()
    tile_size = parse_tile(run.tile)
    root, out = Path(images), Path(out)
    summary, names = images_to_extract(root, out, config, run)
    store_run = StoreRun(summary, run.quiet)
    target = resolve_device(run.device)
    backend = choose_backend(run.backend, target, config.precision)
    if backend == "torch" and target.type == "cpu" and config.precision == "fp16":
        warn(
            f"--precision fp16 on the CPU: PyTorch runs it about {CPU_FP16_SLOWDOWN}x slower than "
            "fp32 (no fast fp16 convolutions); use bf16 or fp32, unless finishing a store made with fp16"
        )
    model = SuperPoint(run.weights, config)
    settings = store_settings(config, model.weights_sha1)
    num_workers = default_workers(target) if run.num_workers is None else run.num_workers
    batch_size = run.batch_size or default_batch_size(target)
    timings = {} if timings is None else timings
    # Thread budget: the network gets every core; decoding (single-threaded workers) and
    # post-processing with writing (one thread, PyTorch and OpenCV single-threaded unless
    # PyTorch runs the network) cost a few % of its time and overlap it.
    threads = library_threads(cpu_cores() if backend == "torch" else 1, opencv_count=1)
    with threads, device_scope(target):
        runner = make_backend(backend, model.net, target, config.precision, cpu_cores(), model.weights_sha1)
        summary.device, summary.backend = str(target), runner.name
        network = TiledNetwork(runner, config, tile_size)
        info = {"weights": model.weights_label, "images": str(root), "backend": runner.name}
        with store_run.writing(out, "features", settings, run.overwrite, info) as writer:
            todo = [n for n, done in zip(names, writer.done.contains(names)) if not done]
            summary.skipped = len(names) - len(todo)
            background = BackgroundWriter(writer)

            def finish(images: list[DecodedImage], dense: Dense | Tiled | None) -> list[Entry]:
                return finish_batch(model, images, dense, summary, timings)

            try:
                with (  # finished results are saved whatever failed
                    store_run.running(len(todo), salvage=background.salvage),
                    torch.inference_mode(),
                    contextlib.closing(decode_all(root, todo, config, num_workers)) as decoded,
                ):
                    batches = make_batches(decoded, batch_size)
                    pin = target.type == "cuda"
                    extract_batches(batches, network, pin, finish, background, store_run, timings)
                    store_run.progress.advance(background.close())
            finally:
                background.abandon()
                timings["write"] = background.busy_s
                summary.tiled = network.tiled_images
    no_keypoints_warning(summary, config)
    store_run.finish()
    return summary
