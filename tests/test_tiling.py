"""Tiled network: each window's outputs equal the whole-image forward near its tile, and the
features found tile by tile (in the pipeline too) equal those of the whole image's maps."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from sp_extract.errors import ConfigError
from sp_extract.extraction import tiling
from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.model import SuperPoint
from sp_extract.extraction.postprocess import nms_opencv, nms_opencv_bands, postprocess, select_candidates
from sp_extract.extraction.tiling import TiledNetwork, parse_tile
from sp_extract.extraction.weights import load_weights


@pytest.fixture(scope="module")
def net() -> SuperPoint:
    torch.manual_seed(0)
    return SuperPoint().eval()


def window_errors(net: SuperPoint, images: torch.Tensor, tile: int, context: int, exact: int) -> list[float]:
    """Per window, the largest difference of its outputs from the whole image's within ``exact``
    px of its tile (scores, then descriptors), the tile's cells included."""
    with torch.inference_mode():
        whole = net(images)
        errors = []
        for (top, bottom, left, right), (y0, y1, x0, x1) in tiling.windows(*images.shape[-2:], tile, context):
            part = net(images[..., y0:y1, x0:x1])
            a, b = max(top - exact, y0), min(bottom + exact, y0 + part[0].shape[1])
            c, d = max(left - exact, x0), min(right + exact, x0 + part[0].shape[2])
            errors.append((part[0][:, a - y0 : b - y0, c - x0 : d - x0] - whole[0][:, a:b, c:d]).abs().max())
            a, b, c, d = (max(v, 0) // 8 for v in (top - exact, bottom + exact, left - exact, right + exact))
            a, c = max(a, y0 // 8), max(c, x0 // 8)
            b, d = min(b, y0 // 8 + part[1].shape[2]), min(d, x0 // 8 + part[1].shape[3])
            window = part[1][..., a - y0 // 8 : b - y0 // 8, c - x0 // 8 : d - x0 // 8]
            errors.append((window - whole[1][..., a:b, c:d]).abs().max())
    return [float(error) for error in errors]


@pytest.mark.parametrize("nms_radius", [0, 4])
@pytest.mark.parametrize("tile", [40, 72])
@pytest.mark.parametrize("size", [(203, 261), (96, 160)])  # off and on the 8-pixel grid
def test_windows_equal_the_whole_image_forward_near_their_tile(
    net: SuperPoint, tile: int, size: tuple[int, int], nms_radius: int
) -> None:
    """Within the halo a tile's keypoints read (6 NMS radii, at least a cell), a window's outputs
    are the whole image's."""
    images = torch.rand(1 if size[0] > 100 else 2, 1, *size, generator=torch.Generator().manual_seed(1))
    context = tiling.margin(nms_radius)
    assert context == 40 + max(6 * nms_radius, 8) // 8 * 8
    errors = window_errors(net, images, tile, context, context - tiling.DISTURBED)
    assert len(errors) > 2 and max(errors) <= 1e-6


def test_a_margin_below_the_disturbed_band_is_not_exact(net: SuperPoint) -> None:
    """The margin matters: with 32 px (4 cells, fewer than the 5 that padding disturbs) tiles differ."""
    images = torch.rand(1, 1, 160, 200, generator=torch.Generator().manual_seed(2))
    assert max(window_errors(net, images, 32, tiling.DISTURBED - 8, 0)) > 1e-5


def test_tile_option_and_auto_decision(net: SuperPoint) -> None:
    assert parse_tile("auto") == -1 and parse_tile("0") == 0 and parse_tile(512) == 512
    for bad in ("12", "-8", "big"):
        with pytest.raises(ConfigError, match="--tile"):
            parse_tile(bad)
    config = ExtractConfig()
    auto = TiledNetwork(net, config, -1)
    assert auto.tile_size(1024, 768) == 0  # the default working sizes never tile
    side = auto.tile_size(7000, 7000)
    window = side + 2 * tiling.margin(config.nms_radius)
    assert side % 8 == 0 and window**2 * tiling.BYTES_PER_PIXEL <= tiling.AUTO_BUDGET
    assert TiledNetwork(net, config, 0).tile_size(20000, 20000) == 0
    counted = TiledNetwork(net, config, 64)
    with torch.inference_mode():
        found = counted(torch.rand(3, 1, 136, 136))
    assert counted.tiled_images == 3 and len(found) == 3


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"max_keypoints": 150, "border": 0},
        {"nms_radius": 0, "threshold": 0.05, "max_keypoints": 300},
        {"nms_radius": 2, "border": 30, "subpixel": True},
        {"max_keypoints": 100, "masked": True},
    ],
    ids=["defaults", "top-k", "no-nms", "subpixel", "mask"],
)
def test_features_tile_by_tile_equal_the_whole_maps_postprocessed(
    real_weights: Path, sacre_coeur: Path, settings: dict
) -> None:
    """Tile by tile (dense maps never whole), the features are ``postprocess`` of the whole
    image's maps: same keypoints in the same order, scores and descriptors to float tolerance
    (trained weights: a random network's flat scores tie at the top-k)."""
    masked = settings.pop("masked", False)
    config = ExtractConfig(**settings)
    net = load_weights(str(real_weights)).build().eval()
    photos = sorted(sacre_coeur.glob("*.jpg"))[:2]
    crops = [cv2.imread(str(photo), cv2.IMREAD_GRAYSCALE)[100:383, 200:541] for photo in photos]
    images = torch.from_numpy(np.stack(crops)[:, None].astype(np.float32) / 255)
    allowed = torch.rand(2, 283, 341, generator=torch.Generator().manual_seed(4)) > 0.3 if masked else None
    with torch.inference_mode():
        c = config
        whole = postprocess(
            *net(images), c.threshold, c.nms_radius, c.border, c.max_keypoints, c.subpixel, allowed
        )
        parts = tiling.tiled_candidates(net, images, 64, config)
        masks = [None, None] if allowed is None else allowed
        tiled = [select_candidates(found, c.max_keypoints, mask) for found, mask in zip(parts, masks)]
    assert [len(found) for found in parts] == [30, 30]  # 5 x 6 tiles of at most 64 px
    for expected, actual in zip(whole, tiled):
        assert len(expected.scores) > 50
        torch.testing.assert_close(actual.keypoints, expected.keypoints, rtol=0, atol=1e-4)
        torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(actual.descriptors, expected.descriptors, rtol=0, atol=1e-5)


def test_pipeline_features_with_tiles_equal_those_without(
    tmp_path: Path, small_images: Path, random_weights: Path
) -> None:
    from sp_extract import ExtractRun, extract

    options = {"weights": str(random_weights), "device": "cpu", "backend": "torch"}
    config = ExtractConfig(resize_max=0, max_keypoints=200)
    whole = extract(small_images, tmp_path / "whole.h5", config, ExtractRun(tile=0, **options))
    tiled = extract(small_images, tmp_path / "tiled.h5", config, ExtractRun(tile="16", **options))
    assert whole.tiled == 0 and tiled.tiled == 3 and tiled.to_dict()["tiled"] == 3
    assert "tiled network on 3" in "\n".join(tiled.lines())
    with h5py.File(tmp_path / "whole.h5") as a, h5py.File(tmp_path / "tiled.h5") as b:
        for name in ("a.png", "b.jpg", "sub/c.png"):
            np.testing.assert_array_equal(a[name]["keypoints"][()], b[name]["keypoints"][()])
            np.testing.assert_allclose(a[name]["scores"][()], b[name]["scores"][()], atol=1e-6)
            np.testing.assert_allclose(
                a[name]["descriptors"][()].astype(np.float32),
                b[name]["descriptors"][()].astype(np.float32),
                atol=1e-3,
            )


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_nms_in_bands_equals_nms_in_one_piece(radius: int) -> None:
    """Huge score maps are suppressed in bands of rows (small temporaries): same result."""
    scores = (np.random.default_rng(radius).random((203, 150)) ** 8).astype(np.float32)
    scores[100:110] = 0.5  # plateaus across a band edge
    whole = nms_opencv(scores, radius)
    for band in (1, 7, 16, 64):
        banded = np.empty_like(scores)
        nms_opencv_bands(scores, radius, banded, band)
        np.testing.assert_array_equal(banded, whole)
