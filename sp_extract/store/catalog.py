"""The read side of the store: which files make a store (main file, segments, parts), what they
hold (settings, entry names, identity) and whether they are ours and intact, without opening a
writer. ``reader.py`` reads the entries themselves; ``writer.py`` is the only code that writes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from .failures import H5_ERRORS, damaged_error, is_locked, open_error, segment_errors
from .format import (
    KIND_ATTR,
    MARKERS,
    REPLACING_ATTR,
    SETTINGS_ATTR,
    STORE_ID_ATTR,
    parts_dir,
    segments_dir,
    shape_problem,
)
from .index import NameIndex, indexed_names, load_index, name_hashes, remove_index, write_index


@dataclass
class StoreInfo:
    """What a run needs of an existing store: its settings, entry names and identity."""

    settings: dict[str, Any]
    names: list[str]
    store_id: str | None  # None for a store written before sp-extract recorded one
    replacing: bool = False  # a part of a run replacing the store (--overwrite), not yet folded


def scan_entries(h5: h5py.File, kind: str) -> list[str]:
    """The store's entry names, sorted, after checking what a run can check cheaply: every
    dataset's header opens, and the dataset shapes of each entry agree (metadata only: no data
    is read, so checksums are not verified here). Raises ``ValueError`` naming the first
    damaged entry."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Dataset):
            group, _, key = name.rpartition("/")
            shapes.setdefault(group, {})[key] = obj.shape

    h5.visititems(visit)
    names = sorted(group for group, datasets in shapes.items() if group and MARKERS[kind] in datasets)
    for name in names:
        problem = shape_problem(kind, shapes[name])
        if problem:
            raise ValueError(f"entry '{name}': {problem}")
    return names


def read_store_info(path: Path, kind: str, option: str = "--out") -> tuple[dict[str, Any], list[str]]:
    """Settings and entry names of an existing store, checking that it is ours and of ``kind``."""
    info = read_store(path, kind, option)
    return info.settings, info.names


def read_settings(path: Path, kind: str) -> dict[str, Any] | None:
    """The settings of an existing store of ``kind``, read from its attributes alone (no scan of
    its entries); None if it is not one (``read_store`` says why)."""
    with contextlib.suppress(*H5_ERRORS), h5py.File(path, "r") as h5:
        if h5.attrs.get(KIND_ATTR) == kind:
            return json.loads(h5.attrs[SETTINGS_ATTR])
    return None


def read_store(path: Path, kind: str, option: str = "--out") -> StoreInfo:
    """``StoreInfo`` of an existing store of ``kind`` (its main file and its segments), refusing
    another tool's file or a store whose structure is damaged (``scan_entries``), with a one-line
    ``StoreError``.

    ``option`` is the option that named ``path``: a refused input (``--features``, ``--matches``)
    is answered with what that option needs, never with advice to replace or remove the file.
    """
    info = read_store_file(path, kind, option)
    segments = live_segments(path, kind, info.store_id)
    if segments:
        names = set(info.names)
        for segment in segments:
            with segment_errors(path, segment):
                names.update(read_store_file(segment, kind, option).names)
        info.names = sorted(names)
    return info


def indexed_file(file: Path, kind: str, option: str = "--out") -> tuple[StoreInfo, np.ndarray]:
    """Attributes and sorted name hashes of a main file or segment. A file with a valid sidecar
    index was checked when it was written and is not walked again; one without (an older
    store, a kill between two renames, a copied or edited file) is walked and checked
    (``read_store_file``) and gets its index, so the next run skips it."""
    info = read_store_file(file, kind, option, scan=False)
    hashes = load_index(file)
    if hashes is None:
        info = read_store_file(file, kind, option)
        hashes = np.unique(name_hashes(info.names))
        with contextlib.suppress(OSError):  # only an optimisation: a read-only folder is fine
            write_index(file, hashes)
    return info, hashes


def stored_names(path: Path, kind: str, option: str = "--out") -> tuple[NameIndex, int]:
    """The entries of a store (its main file and its segments) as a ``NameIndex`` loaded from
    their sidecar indexes (no Python set of every name, no walk of indexed files), and their
    number. Damage is refused as ``read_store`` refuses it."""
    info, hashes = indexed_file(path, kind, option)
    index, count = NameIndex(), len(hashes)
    index.add_hashes(hashes)
    for segment in live_segments(path, kind, info.store_id):
        with segment_errors(path, segment):
            _, hashes = indexed_file(segment, kind, option)
        index.add_hashes(hashes)
        count += len(hashes)
    return index, count


def file_names(path: Path, h5: h5py.File, walk: Callable[[], list[str]]) -> list[str]:
    """The entry names of the store file ``path`` open as ``h5``: listed with the help of its
    valid sidecar index (the file was checked when it was written; a few us an entry), else
    by ``walk`` (``scan_entries`` checks as it walks: about 1 ms an entry)."""
    hashes = load_index(path)
    names = None if hashes is None else indexed_names(h5, hashes)
    return walk() if names is None else names


def read_store_file(path: Path, kind: str, option: str = "--out", scan: bool = True) -> StoreInfo:
    """``read_store`` of one file (a main file, segment or part); without ``scan``, only its
    attributes are read and checked (``names`` is then empty). A file with a valid sidecar
    index is not walked: it was checked when it was written."""
    needed = f"{option} must name a {kind[:-1].replace('matche', 'match')} store written by sp-extract"
    if not h5py.is_hdf5(path):
        advice = "choose another --out" if option == "--out" else needed
        raise StoreError(f"{path}: exists but is not an HDF5 file; {advice}")
    try:
        with h5py.File(path, "r") as h5:
            found = h5.attrs.get(KIND_ATTR)
            if found is None:
                if option == "--out":
                    needed = "choose another --out, or pass --overwrite to replace it"
                raise StoreError(f"{path}: an HDF5 file not written by sp-extract; {needed}")
            if found != kind:
                raise StoreError(f"{path}: an sp-extract {found} store, not a {kind} store")
            settings = json.loads(h5.attrs[SETTINGS_ATTR])
            store_id = h5.attrs.get(STORE_ID_ATTR)
            return StoreInfo(
                settings,
                file_names(path, h5, lambda: scan_entries(h5, kind)) if scan else [],
                None if store_id is None else str(store_id),
                bool(h5.attrs.get(REPLACING_ATTR, False)),
            )
    except StoreError:
        raise
    except ValueError as error:
        if is_locked(error):
            raise open_error(path, error) from error
        raise damaged_error(path, str(error)) from error
    except H5_ERRORS as error:
        raise open_error(path, error) from error


def settings_difference(
    old: dict[str, Any], new: dict[str, Any], labels: tuple[str, str] = ("store", "now")
) -> str:
    """Human-readable list of settings that differ, e.g. ``nms_radius: 3 (store) vs 4 (now)``."""
    keys = sorted(set(old) | set(new))
    return ", ".join(
        f"{k}: {old.get(k)!r} ({labels[0]}) vs {new.get(k)!r} ({labels[1]})"
        for k in keys
        if old.get(k) != new.get(k)
    )


def part_files(store: Path) -> list[Path]:
    """A store's part files, oldest first (their names start with a nanosecond timestamp)."""
    folder = parts_dir(store)
    return sorted(folder.glob("part-*.h5")) if folder.is_dir() else []


def segment_files(store: Path) -> list[Path]:
    """A store's segment files, oldest first (their names start with a nanosecond timestamp)."""
    folder = segments_dir(store)
    return sorted(folder.glob("seg-*.h5")) if folder.is_dir() else []


def parts_store_id(store: Path, kind: str) -> str | None:
    """The store id of the parts a store's first run left (killed before its close created the
    main file), which the next run keeps; None if there are none."""
    for part in part_files(store):
        with contextlib.suppress(StoreError):
            info = read_store_file(part, kind, scan=False)
            if info.store_id and not info.replacing:
                return info.store_id
    return None


def current_store_id(store: Path, kind: str) -> str | None:
    """The id the store at ``store`` has, or will keep when a writer opens it (see
    ``parts_store_id``); None for no store, or one written before stores had ids."""
    if store.exists():
        with contextlib.suppress(StoreError):
            return read_store_file(store, kind, scan=False).store_id
        return None
    return parts_store_id(store, kind)


def remove_store(store: Path) -> None:
    """Delete a finished store whole: its main file, segments and their name indexes (a merged
    shard, for example). The caller holds no writer on it."""
    for file in [*segment_files(store), store]:
        file.unlink(missing_ok=True)
        remove_index(file)
    with contextlib.suppress(OSError):  # kept if it holds anything else
        segments_dir(store).rmdir()


def live_segments(store: Path, kind: str, store_id: str | None) -> list[Path]:
    """The segments belonging to the store whose main file has ``store_id``. Segments of a store
    that an ``--overwrite`` run replaced (killed before deleting them) are not part of it."""
    found = []
    for segment in segment_files(store):
        with segment_errors(store, segment):
            if read_store_file(segment, kind, scan=False).store_id == store_id:
                found.append(segment)
    return found
