"""Tiled network: the dense outputs of a huge image, computed tile by tile in bounded memory.

The network's activations take some 600 bytes per input pixel (64 float32 channels at full
resolution, and more), so a 50 Mpx photo at native size would need about 29 GiB at once. Tiled,
the image is cut into tiles on the 8-pixel cell grid; each runs through the network with
``MARGIN`` pixels of the image around it, and only its own cells are kept. Why that is exact:
the receptive field of an output cell is 84 pixels (8 convolutions and 3 max-pools, then the
heads' 3 x 3 convolution), and the zero padding at a tile's cut edge disturbs the outputs of the
5 cells (40 pixels) next to it; with a 48-pixel margin on a cell-aligned grid, every kept output
sees exactly the pixels (and the image-border padding) of the whole-image forward. The results
equal the whole-image outputs up to floating-point summation order (tested).

Memory then stays near the decoded image plus the output maps (a float32 score per pixel and a
256-d float32 descriptor per 8 x 8 cell: 8 bytes per pixel in all) plus one tile's activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from .model import STRIDE

Dense = tuple[torch.Tensor, torch.Tensor]
MARGIN = 48  # context on each side of a tile (px): a multiple of the cell, past the 40 px disturbed
BYTES_PER_PIXEL = 640  # peak memory per input pixel untiled (measured: 7.2 GiB at 12 Mpx, 14.1 at 24)
AUTO_BUDGET = 3 * 2**30  # --tile auto: tile an image whose network pass would need more than this


def parse_tile(value: str | int) -> int:
    """``--tile``: ``auto`` (-1), 0 (never tile) or a tile size in pixels (a multiple of 8)."""
    text = str(value).strip().lower()
    if text == "auto":
        return -1
    try:
        size = int(text)
    except ValueError:
        size = -1
    if size < 0 or size % STRIDE:
        raise ConfigError(
            f"--tile must be auto, 0 (never tile) or a tile size in pixels, a multiple of 8; got {value!r}"
        )
    return size


def auto_tile_size(budget: int = AUTO_BUDGET) -> int:
    """The largest tile (a multiple of 8) whose network pass, margins included, fits ``budget``."""
    side = int((budget / BYTES_PER_PIXEL) ** 0.5) - 2 * MARGIN
    return max(STRIDE, side // STRIDE * STRIDE)


def _edges(cells: int, tile: int) -> list[int]:
    """Cell-aligned tile boundaries (px) over ``cells`` cells, tiles of at most ``tile`` px, even sizes."""
    count = -(-cells * STRIDE // tile)
    return [STRIDE * (index * cells // count) for index in range(count + 1)]


class TiledNetwork:
    """Wraps a network (a backend): images larger than the tile size run tile by tile.

    ``tile``: -1 auto (tile when an image's pass would need more than ``AUTO_BUDGET``, in tiles
    that fit it), 0 never, else the tile size in pixels. ``tiled_images`` counts the images run tiled.
    """

    def __init__(self, network: Callable[[torch.Tensor], Dense], tile: int = -1) -> None:
        self.network = network
        self.tile = tile
        self.tiled_images = 0

    def tile_size(self, height: int, width: int) -> int:
        """The tile size for an image of this size; 0 when it runs whole."""
        if self.tile == -1:
            fits = height * width * BYTES_PER_PIXEL <= AUTO_BUDGET
            return 0 if fits else auto_tile_size()
        return self.tile if self.tile and max(height, width) > self.tile + MARGIN else 0

    def __call__(self, images: torch.Tensor) -> Dense:
        height, width = images.shape[-2:]
        tile = self.tile_size(height, width)
        if not tile:
            return self.network(images)
        self.tiled_images += len(images)
        return tiled_forward(self.network, images, tile)


def _window(top: int, bottom: int, length: int, size: int) -> tuple[int, int]:
    """The input rows (or columns) to run for the tile [top, bottom): ``size`` of them around it,
    moved inside the image at its ends, so that (nearly) every tile runs at one shape (fewer
    allocations, one cuDNN plan). A window starts on the cell grid and ends at the image's end
    or on the cell grid at least ``MARGIN`` past the tile."""
    if size >= length:
        return 0, length
    start = max(0, min(top - MARGIN, (length - size) // STRIDE * STRIDE))
    stop = start + size
    return start, length if length - stop < STRIDE else stop


def tiled_forward(network: Callable[[torch.Tensor], Dense], images: torch.Tensor, tile: int) -> Dense:
    """``network(images)`` computed in tiles of at most ``tile`` pixels (a multiple of 8)."""
    height, width = images.shape[-2:]
    rows, columns = _edges(height // STRIDE, tile), _edges(width // STRIDE, tile)
    size = max(b - a for a, b in zip(rows, rows[1:])) + 2 * MARGIN
    size_x = max(b - a for a, b in zip(columns, columns[1:])) + 2 * MARGIN
    scores = descriptors = None
    for top, bottom in zip(rows, rows[1:]):
        y0, y1 = _window(top, bottom, height, size)
        for left, right in zip(columns, columns[1:]):
            x0, x1 = _window(left, right, width, size_x)
            part_scores, part_descriptors = network(images[..., y0:y1, x0:x1])
            if scores is None:
                batch, channels = part_descriptors.shape[:2]
                cells = (height // STRIDE, width // STRIDE)
                scores = part_scores.new_empty((batch, cells[0] * STRIDE, cells[1] * STRIDE))
                descriptors = part_descriptors.new_empty((batch, channels, *cells))
            scores[:, top:bottom, left:right] = part_scores[:, top - y0 : bottom - y0, left - x0 : right - x0]
            c = STRIDE
            descriptors[:, :, top // c : bottom // c, left // c : right // c] = part_descriptors[
                :, :, (top - y0) // c : (bottom - y0) // c, (left - x0) // c : (right - x0) // c
            ]
            del part_scores, part_descriptors
    return scores, descriptors
