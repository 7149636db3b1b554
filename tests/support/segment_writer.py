"""A store writer process for tests/test_segments.py: deterministic entries, one part each.

Kept apart from the test module so that a writer process starts without pytest or torch:
``python segment_writer.py STORE NAME...`` adds the entries not yet in STORE, as a run does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sp_extract.store.writer import StoreWriter

SETTINGS = {"weights_sha1": "test", "max_keypoints": 1000}


def entry(name: str, keypoints: int = 1000) -> dict[str, np.ndarray]:
    """The entry of ``name``: the same arrays whoever computes them."""
    rng = np.random.default_rng(int.from_bytes(name.encode(), "little") % 2**32)
    return {
        "keypoints": rng.uniform(0, 90, (keypoints, 2)).astype(np.float32),
        "scores": rng.uniform(0, 1, keypoints).astype(np.float32),
        "descriptors": rng.normal(size=(256, keypoints)).astype(np.float16),
        "image_size": np.array([96, 64], np.int64),
    }


def write_entries(store: Path, names: list[str], overwrite: bool = False) -> list[str]:
    """What a run does: add the entries not yet in the store (one part per entry), then close;
    returns the writer's notes for the user."""
    with StoreWriter(Path(store), "features", SETTINGS, overwrite=overwrite, flush_entries=1) as writer:
        for name in names:
            if name not in writer.done:
                writer.add(name, entry(name))
    return writer.notes


if __name__ == "__main__":
    write_entries(Path(sys.argv[1]), sys.argv[2:])
