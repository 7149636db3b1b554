"""Readers written to the contract of hloc's own (hloc/utils/io.py, hloc/match_features.py).

The store must work with hloc unchanged, so the tests read it the way hloc does: image names are
the parent groups of every dataset in the file, keypoints come from ``name/keypoints`` with the
``uncertainty`` attribute, and the matcher loads every dataset of an image group as a float
tensor and fakes the image from ``image_size`` (width, height). ``snapshot`` records a store
byte for byte, to tell whether entries were rewritten.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch


def list_h5_names(path: Path) -> list[str]:
    """hloc's ``list_h5_names``: the parent group of every dataset, without leading slash."""
    names = []
    with h5py.File(str(path), "r") as fd:

        def visit(_: str, obj: h5py.HLObject) -> None:
            if isinstance(obj, h5py.Dataset):
                names.append(obj.parent.name.strip("/"))

        fd.visititems(visit)
    return list(set(names))


def get_keypoints(path: Path, name: str) -> tuple[np.ndarray, float | None]:
    """hloc's ``get_keypoints(..., return_uncertainty=True)``."""
    with h5py.File(str(path), "r") as fd:
        dataset = fd[name]["keypoints"]
        return dataset.__array__(), dataset.attrs.get("uncertainty")


def load_for_matching(path: Path, name: str, suffix: str = "0") -> dict[str, torch.Tensor]:
    """The per-image half of hloc's ``FeaturePairsDataset.__getitem__``."""
    data = {}
    with h5py.File(str(path), "r") as fd:
        group = fd[name]
        for key, value in group.items():
            data[key + suffix] = torch.from_numpy(value.__array__()).float()
        data["image" + suffix] = torch.empty((1,) + tuple(group["image_size"])[::-1])
    return data


def snapshot(path: Path) -> dict[str, tuple]:
    """Every dataset of a store by path: (dtype, shape, raw bytes, attributes)."""
    entries: dict[str, tuple] = {}
    with h5py.File(str(path), "r") as fd:

        def visit(name: str, obj: h5py.HLObject) -> None:
            if isinstance(obj, h5py.Dataset):
                data = np.asarray(obj[()])
                entries[name] = (data.dtype, data.shape, data.tobytes(), dict(obj.attrs))

        fd.visititems(visit)
    return entries
