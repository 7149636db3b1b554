"""Tiled network: the features of a huge image, found tile by tile in bounded memory.

The network's activations take some 530 to 800 bytes per input pixel (64 float32 channels at
full resolution twice over, and the allocator's slack), so a 50 Mpx photo at native size would
need 25 to 37 GiB at once. Tiled, the image is cut into tiles on the 8-pixel cell grid; each runs
through the network with a margin of image around it (its window). Why that is exact: the
receptive field of an output cell is 84 pixels (8 convolutions and 3 max-pools, then the heads'
3 x 3 convolution), and the zero padding at a window's cut edge disturbs the outputs of the 5
cells (``DISTURBED``, 40 pixels) next to it; past them, on a cell-aligned grid, every output sees
exactly the pixels (and the image-border padding) of the whole-image forward, and equals its
output up to floating-point summation order (tested).

Each window is post-processed at once (``postprocess.tile_candidates``), so the dense maps never
exist whole: the margin also covers what a tile's keypoints depend on beyond it (``margin``),
6 NMS radii of scores and the descriptor cell beside the tile. Only the keypoints found, with
their descriptors, are kept; the image's mask and top-k then apply to all of them
(``postprocess.select_candidates``). Memory stays near the decoded image (4 bytes a pixel), one
window's activations and the keypoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..errors import ConfigError
from .config import ExtractConfig
from .model import STRIDE
from .postprocess import Candidates, tile_candidates

Dense = tuple[torch.Tensor, torch.Tensor]
DISTURBED = 40  # px along a window's cut edge whose outputs the zero padding there changes
# memory per network input pixel, for the budget: ONNX Runtime's default arena kept 794 B from
# its second run on (measured at 1152 and 1632 px square); the arena it runs with here
# (``backends.exact_cpu_arena``) keeps 528 B, so the budget leaves room for the other backends
BYTES_PER_PIXEL = 800
AUTO_BUDGET = 2 * 2**30  # --tile auto: tile an image whose network pass would need more than this


def margin(nms_radius: int) -> int:
    """Image around a tile in its window (px, a multiple of 8): the disturbed band, then what a
    tile's keypoints read beyond it, exact: 6 radii of scores for the non-maximum suppression
    (``postprocess.nms_opencv_bands``), at least the descriptor cell beside the tile."""
    halo = max(6 * nms_radius, STRIDE)
    return DISTURBED + -(-halo // STRIDE) * STRIDE


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


def auto_tile_size(context: int, budget: int = AUTO_BUDGET) -> int:
    """The largest tile (a multiple of 8) whose window, ``context`` px on each side, fits ``budget``."""
    side = int((budget / BYTES_PER_PIXEL) ** 0.5) - 2 * context
    return max(STRIDE, side // STRIDE * STRIDE)


def _edges(cells: int, tile: int) -> list[int]:
    """Cell-aligned tile boundaries (px) over ``cells`` cells, tiles of at most ``tile`` px, even sizes."""
    count = -(-cells * STRIDE // tile)
    return [STRIDE * (index * cells // count) for index in range(count + 1)]


class TiledNetwork:
    """Wraps a network (a backend): images larger than the tile size run tile by tile, and
    come back as their keypoint candidates (``tiled_candidates``) instead of dense maps.

    ``tile``: -1 auto (tile when an image's pass would need more than ``AUTO_BUDGET``, in tiles
    whose windows fit it), 0 never, else the tile size in pixels. ``config``: the post-processing
    settings. ``tiled_images`` counts the images run tiled.
    """

    def __init__(
        self, network: Callable[[torch.Tensor], Dense], config: ExtractConfig, tile: int = -1
    ) -> None:
        self.network = network
        self.config = config
        self.tile = tile
        self.margin = margin(config.nms_radius)
        self.tiled_images = 0

    def tile_size(self, height: int, width: int) -> int:
        """The tile size for an image of this size; 0 when it runs whole."""
        if self.tile == -1:
            fits = height * width * BYTES_PER_PIXEL <= AUTO_BUDGET
            return 0 if fits else auto_tile_size(self.margin)
        return self.tile if self.tile and max(height, width) > self.tile + self.margin else 0

    def __call__(self, images: torch.Tensor) -> Dense | list[list[Candidates]]:
        height, width = images.shape[-2:]
        tile = self.tile_size(height, width)
        if not tile:
            return self.network(images)
        self.tiled_images += len(images)
        return tiled_candidates(self.network, images, tile, self.config)


def _window(top: int, bottom: int, length: int, size: int, context: int) -> tuple[int, int]:
    """The input rows (or columns) to run for the tile [top, bottom): ``size`` of them around it,
    moved inside the image at its ends, so that (nearly) every tile runs at one shape (fewer
    allocations, one cuDNN plan). A window starts on the cell grid and ends at the image's end
    or on the cell grid at least ``context`` past the tile."""
    if size >= length:
        return 0, length
    start = max(0, min(top - context, (length - size) // STRIDE * STRIDE))
    stop = start + size
    return start, length if length - stop < STRIDE else stop


def windows(
    height: int, width: int, tile: int, context: int
) -> Iterator[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """The tiles (top, bottom, left, right) of an image, at most ``tile`` px, each with its
    window (y0, y1, x0, x1): at least ``context`` px of image around it where the image has them."""
    rows, columns = _edges(height // STRIDE, tile), _edges(width // STRIDE, tile)
    size = max(b - a for a, b in zip(rows, rows[1:])) + 2 * context
    size_x = max(b - a for a, b in zip(columns, columns[1:])) + 2 * context
    for top, bottom in zip(rows, rows[1:]):
        y0, y1 = _window(top, bottom, height, size, context)
        for left, right in zip(columns, columns[1:]):
            yield (top, bottom, left, right), (y0, y1, *_window(left, right, width, size_x, context))


def tiled_candidates(
    network: Callable[[torch.Tensor], Dense], images: torch.Tensor, tile: int, config: ExtractConfig
) -> list[list[Candidates]]:
    """Per image of ``images``, the keypoint candidates of each tile (at most ``tile`` px, a
    multiple of 8), found from its window's outputs alone; on the CPU (for another thread)."""
    height, width = images.shape[-2:]
    size = (height // STRIDE * STRIDE, width // STRIDE * STRIDE)
    found: list[list[Candidates]] = [[] for _ in range(len(images))]
    for region, (y0, y1, x0, x1) in windows(height, width, tile, margin(config.nms_radius)):
        scores, descriptors = network(images[..., y0:y1, x0:x1])
        parts = tile_candidates(scores, descriptors, (y0, x0), region, size, config)
        del scores, descriptors
        for image, part in zip(found, parts):
            image.append(part.cpu())
    return found
