"""Tiled network: the stitched dense outputs equal the whole-image forward, and the pipeline's
features with tiles equal those without."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sp_extract.errors import ConfigError
from sp_extract.extraction import tiling
from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.model import SuperPoint
from sp_extract.extraction.postprocess import nms_opencv, nms_opencv_bands
from sp_extract.extraction.tiling import TiledNetwork, parse_tile, tiled_forward


@pytest.fixture(scope="module")
def net() -> SuperPoint:
    torch.manual_seed(0)
    return SuperPoint().eval()


@pytest.mark.parametrize("tile", [32, 64])
@pytest.mark.parametrize("size", [(203, 261), (96, 160)])  # off and on the 8-pixel grid
def test_tiles_equal_the_whole_image_forward(net: SuperPoint, tile: int, size: tuple[int, int]) -> None:
    images = torch.rand(1 if size[0] > 100 else 2, 1, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole, tiled = net(images), tiled_forward(net, images, tile)
    for expected, actual in zip(whole, tiled):
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_a_margin_below_the_disturbed_band_is_not_exact(
    net: SuperPoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The margin matters: with 32 px (4 cells, fewer than the 5 that padding disturbs) tiles differ."""
    images = torch.rand(1, 1, 160, 200, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(tiling, "MARGIN", 32)
    with torch.inference_mode():
        whole, tiled = net(images), tiled_forward(net, images, 32)
    assert (whole[1] - tiled[1]).abs().max() > 1e-5


def test_tile_option_and_auto_decision(net: SuperPoint) -> None:
    assert parse_tile("auto") == -1 and parse_tile("0") == 0 and parse_tile(512) == 512
    for bad in ("12", "-8", "big"):
        with pytest.raises(ConfigError, match="--tile"):
            parse_tile(bad)
    auto = TiledNetwork(net, -1)
    assert auto.tile_size(1024, 768) == 0  # the default working sizes never tile
    side = auto.tile_size(7000, 7000)
    assert side % 8 == 0 and (side + 2 * tiling.MARGIN) ** 2 * tiling.BYTES_PER_PIXEL <= tiling.AUTO_BUDGET
    assert TiledNetwork(net, 0).tile_size(20000, 20000) == 0
    counted = TiledNetwork(net, 32)
    with torch.inference_mode():
        counted(torch.rand(3, 1, 96, 96))
    assert counted.tiled_images == 3


def test_pipeline_features_with_tiles_equal_those_without(
    tmp_path: Path, small_images: Path, random_weights: Path
) -> None:
    from sp_extract import extract

    options = {"weights": str(random_weights), "device": "cpu", "backend": "torch"}
    config = ExtractConfig(resize_max=0, max_keypoints=200)
    whole = extract(small_images, tmp_path / "whole.h5", config, tile=0, **options)
    tiled = extract(small_images, tmp_path / "tiled.h5", config, tile="32", **options)
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
