"""Batching: same-size batches, bounded waiting, and batched extraction equal to one image at a time."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import write_image

from sp_extract import ExtractConfig, ExtractRun, extract
from sp_extract.extraction import pipeline
from sp_extract.extraction.decode import DecodedImage
from sp_extract.extraction.loader import make_batches


def decoded(name: str, height: int, width: int = 16) -> DecodedImage:
    return DecodedImage(name, np.zeros((height, width), np.float32), (width, height))


def test_batches_hold_one_size_and_pass_failures_through() -> None:
    items = [decoded("a", 8), decoded("b", 16), DecodedImage("bad", None, (0, 0), "corrupt")]
    items += [decoded("c", 8), decoded("d", 16), decoded("e", 8)]
    batches = list(make_batches(items, batch_size=2))
    assert [[i.name for i in b.images] for b in batches if b.images] == [["a", "c"], ["b", "d"], ["e"]]
    assert [[i.name for i in b.failures] for b in batches if b.failures] == [["bad"]]
    for batch in batches:
        assert len({i.image.shape for i in batch.images}) <= 1
        assert not (batch.images and batch.failures)


def consume(items: list[DecodedImage], batch_size: int, window: int | None = None) -> list[tuple]:
    """make_batches on ``items``: per batch released, (names, images consumed so far)."""
    consumed = []

    def source():
        for item in items:
            consumed.append(item.name)
            yield item

    return [([i.name for i in b.images], len(consumed)) for b in make_batches(source(), batch_size, window)]


def test_waiting_is_bounded_when_every_image_has_its_own_size() -> None:
    """Each image waits for at most ``window`` later ones, so no more than window + 1 wait."""
    items = [decoded(str(i), 8 + 8 * i) for i in range(10)]  # ten different sizes
    batches = consume(items, batch_size=4, window=3)
    assert batches[0] == (["0"], 5)  # released when the 4th image after it arrived
    for index, (_, consumed) in enumerate(batches):  # batches of one image each
        assert consumed - (index + 1) <= 3 + 1  # read but not released, once this one is
    assert [n for names, _ in batches for n in names] == [i.name for i in items]  # in order, once each


def test_recurring_sizes_still_fill_batches() -> None:
    """Two sizes in alternation (portrait and landscape photos) fill batches within the
    default window of twice the batch size; only the tail is partial."""
    items = [decoded(str(i), 8 if i % 2 else 16) for i in range(19)]
    batches = consume(items, batch_size=4)
    assert [len(names) for names, _ in batches] == [4, 4, 4, 4, 2, 1]
    assert batches[0] == (["0", "2", "4", "6"], 7)


def test_batched_extraction_equals_one_image_at_a_time(tmp_path: Path, random_weights: Path) -> None:
    root = tmp_path / "images"
    for index in range(5):  # two sizes, so that batches of 2 form and a partial one remains
        write_image(root / f"{index}.png", 96 if index % 2 else 64, 64, seed=index)
    config = ExtractConfig(threshold=0.0)
    stores = {}
    for batch_size in (1, 2):
        stores[batch_size] = tmp_path / f"batch{batch_size}.h5"
        summary = extract(
            root, stores[batch_size], config, ExtractRun(str(random_weights), batch_size=batch_size)
        )
        assert summary.done == 5
    with h5py.File(stores[1], "r") as one, h5py.File(stores[2], "r") as batched:
        for index in range(5):
            name = f"{index}.png"
            assert len(one[name]["keypoints"]) > 0
            for key in ("keypoints", "scores", "descriptors"):
                np.testing.assert_allclose(batched[name][key][()], one[name][key][()], atol=1e-3)


@pytest.mark.parametrize(
    ("device", "cores", "workers"),
    [("cpu", 1, 0), ("cpu", 2, 0), ("cpu", 3, 2), ("cpu", 16, 4), ("cuda", 2, 1), ("cuda", 16, 4)],
)
def test_default_decoding_workers(
    monkeypatch: pytest.MonkeyPatch, device: str, cores: int, workers: int
) -> None:
    """A network filling a CPU of 2 cores decodes in the main process; otherwise workers decode."""
    monkeypatch.setattr(pipeline, "cpu_cores", lambda: cores)
    assert pipeline.default_workers(torch.device(device)) == workers
