"""Stage 3, batch: decode images in worker processes and group them into network batches.

Decoding runs in a ``torch.utils.data.DataLoader`` with ``num_workers`` processes, in order.
Images are grouped by working size (a batch holds images of one size only, so batched results
equal one-at-a-time results); a batch is released when it is full, when its oldest image has
waited for a bounded number of later images, or at the end. Images that failed to decode pass
straight through as failures.

Batches are not padded to shared sizes: SuperPoint's convolutions pad every layer's feature map
with zeros at the image border, and its receptive field spans many cells, so zeros added beside
an image change the scores and descriptors of every cell near that side (and keypoints the
border removal would drop become interior), which would make results depend on the batch.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..processes import child_context, die_with
from .config import ExtractConfig
from .decode import DecodedImage, load_image
from .discover import is_utf8, printable


class ImageDataset(Dataset):
    """Decodes ``root/names[i]`` on access; never raises for a bad image."""

    def __init__(self, root: Path, names: list[str], config: ExtractConfig) -> None:
        self.root = Path(root)
        self.names = names
        self.config = config

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> DecodedImage:
        name = self.names[index]
        if not is_utf8(name):
            reason = "file name is not valid UTF-8 (HDF5 and COLMAP need UTF-8 image names)"
            return DecodedImage(printable(name), None, (0, 0), reason)
        return load_image(self.root, name, self.config)


def _keep(item: DecodedImage) -> DecodedImage:
    return item


def _init_worker(parent: int, _: int) -> None:
    die_with(parent)
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


def decode_all(
    root: Path, names: list[str], config: ExtractConfig, num_workers: int
) -> Generator[DecodedImage, None, None]:
    """Decoded images in ``names`` order, ``num_workers`` processes decoding ahead. ``close()``
    the generator when done with it, in every exit path: that ends the worker processes."""
    dataset = ImageDataset(root, names, config)
    if num_workers == 0:
        return (dataset[i] for i in range(len(dataset)))
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep,
        worker_init_fn=functools.partial(_init_worker, os.getpid()),
        prefetch_factor=4,
        persistent_workers=False,
        # never forked from this process, which may hold OpenCV, OpenMP or ONNX Runtime threads
        multiprocessing_context=child_context(__name__),
    )
    return _workers(loader)


def _workers(loader: DataLoader) -> Generator[DecodedImage, None, None]:
    """Iterate ``loader`` (starting its workers). Close the generator (``decode_all``): that drops
    the last reference to the loader's iterator, whose destructor ends the workers; left
    suspended, the generator would be kept alive, with the workers, by any traceback that holds
    its caller's frame."""
    yield from loader


@dataclass
class Batch:
    """Images of one working size stacked for the network, and failures to report."""

    images: list[DecodedImage] = field(default_factory=list)
    failures: list[DecodedImage] = field(default_factory=list)

    def tensor(self, pin: bool = False) -> torch.Tensor:
        """(B, 1, H, W) float32 tensor of the images; ``pin``: in page-locked memory, stacked
        there directly, so that the copy to a GPU can run asynchronously (``non_blocking``).
        One image, unpinned, is not copied (a huge image's pixels are held once)."""
        if len(self.images) == 1 and not pin:
            return torch.from_numpy(np.ascontiguousarray(self.images[0].image, np.float32))[None, None]
        height, width = self.images[0].image.shape
        stacked = torch.empty((len(self.images), 1, height, width), pin_memory=pin)
        np.stack([item.image for item in self.images], out=stacked.numpy()[:, 0])
        return stacked


def make_batches(
    items: Iterable[DecodedImage], batch_size: int, window: int | None = None
) -> Iterator[Batch]:
    """Group decoded images into same-size batches of at most ``batch_size``.

    An image waits for at most ``window`` later images (default ``2 * batch_size``): then its
    partial batch is released. So at most ``window + 1`` images wait, and on a folder where
    every image has its own size each one reaches the network ``window`` images late, while
    sizes that recur within the window still form full batches.
    """
    window = 2 * batch_size if window is None else window
    waiting: dict[tuple[int, ...], list[tuple[int, DecodedImage]]] = {}  # shape -> (arrival, image)
    for arrival, item in enumerate(items):
        if item.error is not None:
            yield Batch(failures=[item])
            continue
        bucket = waiting.setdefault(item.image.shape, [])
        bucket.append((arrival, item))
        if len(bucket) >= batch_size:
            del waiting[item.image.shape]
            yield Batch(images=[image for _, image in bucket])
        # buckets in order of their oldest image (dicts keep insertion order)
        while waiting and next(iter(waiting.values()))[0][0] < arrival - window:
            yield Batch(images=[image for _, image in waiting.pop(next(iter(waiting)))])
    for bucket in waiting.values():
        yield Batch(images=[image for _, image in bucket])
