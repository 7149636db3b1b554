"""The store format: the attributes that mark a file as an sp-extract store, the datasets of an
entry and their shapes, and the names of a store's part and segment folders. The layout is
described in docs/store-format.md; this module is its one definition in code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

KIND_ATTR = "sp_extract_kind"
REPLACING_ATTR = "sp_extract_replacing"  # on the parts of an --overwrite run not yet folded
VERSION_ATTR = "sp_extract_version"
SETTINGS_ATTR = "sp_extract_settings"
STORE_ID_ATTR = "sp_extract_store_id"  # see StoreWriter: kept while a store grows, new when replaced
MARKERS = {"features": "keypoints", "matches": "matches0"}  # the dataset that marks an entry
REQUIRED = {  # the datasets of a complete entry
    "features": ("keypoints", "scores", "descriptors", "image_size"),
    "matches": ("matches0", "matching_scores0"),
}

Entry = dict[str, np.ndarray]
EntryAttrs = dict[str, dict[str, Any]]


def entry_names(h5: h5py.File | h5py.Group, marker: str) -> list[str]:
    """Paths of the groups holding a ``marker`` dataset (image names or pair keys), sorted."""
    names: list[str] = []
    suffix = f"/{marker}".encode()

    def visit(path: bytes) -> None:  # every link below h5, by path; no object is opened
        if path.endswith(suffix) and h5.id.links.get_info(path).type == h5py.h5l.TYPE_HARD:
            names.append(path[: -len(suffix)].decode("utf-8", "surrogateescape"))

    h5.id.links.visit(visit)
    return sorted(names)


def shape_problem(kind: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why an entry's dataset shapes cannot be right (None if they can); absent datasets pass.
    ``None`` in an expected shape matches any size (the descriptor dimension)."""
    marker = shapes[MARKERS[kind]]
    count = marker[0] if marker else -1
    expected = (
        {"keypoints": (count, 2), "scores": (count,), "descriptors": (None, count), "image_size": (2,)}
        if kind == "features"
        else {"matches0": (count,), "matching_scores0": (count,)}
    )
    for key, shape in expected.items():
        found = shapes.get(key, shape)
        if len(found) != len(shape) or any(e is not None and f != e for f, e in zip(found, shape)):
            return f"{key} of shape {found} does not fit {MARKERS[kind]} of shape {marker}"
    return None


def parts_dir(store: Path) -> Path:
    """The folder holding a store's durable, not yet folded part files."""
    return store.with_name(store.name + ".parts")


def segments_dir(store: Path) -> Path:
    """The folder holding a store's immutable segment files."""
    return store.with_name(store.name + ".segments")
