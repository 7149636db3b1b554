"""``merge``: fold stores of one run (shards, ``sp_extract.shards``) into one store.

The inputs must be stores of one kind made with the same settings (weights and, for match
stores, the same feature store included); an entry held by several inputs is kept once if its
copies are equal and refused otherwise. The output is written through ``StoreWriter``, so it
is crash-safe and resumable like any store, and an existing output is extended (its entries
kept as they are). Each input is locked while it is read: a shard still being written is
refused. Names that a list (``--image-list``, ``--pairs``) or the shard naming (``K-of-N.h5``)
expects and no input holds are reported as failures (exit 1); what is present is merged.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ConfigError, StoreError
from ..interrupt import graceful_stop
from ..names import pair_key
from ..report import Progress, Summary
from .catalog import StoreInfo, part_files, read_store, settings_difference
from .failures import H5_ERRORS, damaged_error, describe_error, open_error
from .format import (
    KIND_ATTR,
    MARKERS,
    REPLACING_ATTR,
    SETTINGS_ATTR,
    STORE_ID_ATTR,
    VERSION_ATTR,
    Entry,
    EntryAttrs,
)
from .lock import StoreLock
from .reader import StoreReader, open_store
from .writer import StoreWriter

OWN_ATTRS = {KIND_ATTR, VERSION_ATTR, SETTINGS_ATTR, STORE_ID_ATTR, REPLACING_ATTR}
# entries are copied from the inputs at flush time (add_copy: the buffer holds no data), so a
# merge writes bigger parts than a run: fewer files, fsyncs and fold sources per entry; a kill
# loses at most one part's worth, redone by the same command
MERGE_FLUSH_ENTRIES = 1024
MERGE_FLUSH_SECONDS = 10.0


def input_stores(paths: list[Path]) -> list[Path]:
    """The stores named, each once: a folder stands for the ``*.h5`` stores in it (a shard folder)."""
    stores: dict[str, Path] = {}
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.h5"))
            if not found:
                raise ConfigError(f"{path}: a folder without stores (*.h5)")
        elif not path.is_file():
            raise ConfigError(f"{path}: no such store")
        else:
            found = [path]
        for store in found:
            stores.setdefault(os.path.realpath(store), store)
    return list(stores.values())


def store_kind(path: Path) -> str:
    """``features`` or ``matches``: the kind of an sp-extract store (else a one-line error)."""
    with contextlib.suppress(*H5_ERRORS), h5py.File(path, "r") as h5:
        kind = h5.attrs.get(KIND_ATTR)
        if kind in MARKERS:
            return str(kind)
    read_store(path, "features", "each STORE")  # raises the reason (not HDF5, not ours, damaged)
    return "features"


def read_entry(group: h5py.Group) -> tuple[Entry, EntryAttrs]:
    """An entry's datasets and their attributes, as ``StoreWriter.add`` takes them."""
    datasets = {key: item[()] for key, item in group.items() if isinstance(item, h5py.Dataset)}
    attrs = {key: dict(group[key].attrs) for key in datasets if group[key].attrs}
    return datasets, attrs


def verified(store: Path, name: str, group: h5py.Group) -> Entry:
    """An entry's datasets, read: HDF5 checks each one's Fletcher-32 checksum on the way (a
    damaged entry is a one-line error naming the store and the entry)."""
    try:
        return {key: item[()] for key, item in group.items() if isinstance(item, h5py.Dataset)}
    except H5_ERRORS as error:
        raise damaged_error(store, f"entry '{name}': {describe_error(error)}") from error


def entry_difference(first: tuple[Entry, EntryAttrs], second: tuple[Entry, EntryAttrs]) -> str | None:
    """How two copies of an entry differ (None: equal in datasets, types, shapes, values, attributes)."""
    (data0, attrs0), (data1, attrs1) = first, second
    if data0.keys() != data1.keys():
        return f"datasets {sorted(data0)} vs {sorted(data1)}"
    for key, a in data0.items():
        a, b = np.asarray(a), np.asarray(data1[key])
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{key}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        if not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            return f"{key}: different values"
    for key in sorted(set(attrs0) | set(attrs1)):
        x, y = attrs0.get(key, {}), attrs1.get(key, {})
        if x.keys() != y.keys() or any(not np.array_equal(x[k], y[k]) for k in x):
            return f"attributes of {key}: {x} vs {y}"
    return None


def entry_count(kind: str, datasets: Entry) -> int:
    """The summary's count of an entry: keypoints of an image, matches of a pair."""
    if kind == "features":
        return len(datasets["keypoints"])
    return int((np.asarray(datasets["matches0"]) >= 0).sum())


def listed_names(path: Path, kind: str) -> list[str]:
    """The entry names an ``--image-list`` (one image a line) or ``--pairs`` file (``a b`` a
    line; the pair's group in either order, ``a/b`` or ``b/a`` as hloc flattens it) expects."""
    names: list[str] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                if kind == "features":
                    names.append(posixpath.normpath(text.replace("\\", "/")))  # as extract names it
                    continue
                fields = text.split()
                if len(fields) != 2:
                    raise ConfigError(f"{path}:{number}: expected 'name0 name1', got {len(fields)} field(s)")
                names.append(pair_key(*fields))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read ({error})") from error
    return names


def _unheld(kind: str, expected: list[str], held: dict[str, Any]) -> list[str]:
    """The expected names no input holds (a pair in either order counts)."""
    missing = []
    for name in dict.fromkeys(expected):
        if kind == "matches":
            first, _, second = name.partition("/")
            if name in held or f"{second}/{first}" in held:
                continue
        elif name in held:
            continue
        missing.append(name)
    return missing


def missing_shards(stores: list[Path]) -> list[str]:
    """Shards absent from ``stores`` when all are named as shards ``K-of-N.h5`` of one N."""
    from ..shards import shard_of_store

    shards = [shard_of_store(path) for path in stores]
    counts = {shard.count for shard in shards if shard}
    if None in shards or len(counts) != 1:
        return []
    count, present = counts.pop(), {shard.index for shard in shards if shard}
    return [f"{index}-of-{count}" for index in range(1, count + 1) if index not in present]


@contextlib.contextmanager
def locked_inputs(stores: list[Path]) -> Iterator[list[StoreReader]]:
    """The inputs open for reading, each locked against writers and checked to have no
    unfinished results (``STORE.parts``, a run interrupted or still going)."""
    with contextlib.ExitStack() as stack:
        files = []
        for store in stores:
            lock = StoreLock(store)
            lock.acquire()
            stack.callback(lock.release)
            if part_files(store):
                raise StoreError(
                    f"{store}: holds unfinished results (its run was interrupted); run its command "
                    "again to finish it, then merge"
                )
            try:
                files.append(stack.enter_context(open_store(store)))
            except H5_ERRORS as error:
                raise open_error(store, error) from error
        yield files


def _check_alike(kind: str, stores: list[Path], infos: list[StoreInfo]) -> None:
    """Refuse inputs made with other settings than the first, naming the difference."""
    for store, info in zip(stores[1:], infos[1:]):
        if info.settings != infos[0].settings:
            names = (stores[0].name, store.name) if stores[0].name != store.name else ("first", "second")
            difference = settings_difference(infos[0].settings, info.settings, names)
            hint = ""
            if kind == "matches" and "features_id" in difference:
                hint = (
                    "; match stores of one merge must be made from one feature store: merge the feature "
                    "shards first, then match (all shards) against the merged store"
                )
            raise StoreError(f"{store}: made with other settings than {stores[0]} ({difference}){hint}")


def _check_duplicates(stores: list[Path], files: list[StoreReader], holders: dict[str, list[int]]) -> None:
    """An entry held by several inputs must be equal in all (else an error naming it)."""
    for name, indices in holders.items():
        if len(indices) < 2:
            continue
        first = read_entry(files[indices[0]][name])
        for index in indices[1:]:
            difference = entry_difference(first, read_entry(files[index][name]))
            if difference:
                raise StoreError(
                    f"entry '{name}' differs between {stores[indices[0]]} and {stores[index]} "
                    f"({difference}); merge only stores of one run, or leave one of them out"
                )


def merge_summary(kind: str, out: Path) -> Summary:
    """An empty summary of a merge into ``out`` of stores of ``kind``."""
    if kind == "features":
        return Summary(command="merge", output=str(out), unit="images", count_label="keypoints per image")
    return Summary(command="merge", output=str(out), unit="pairs", count_label="matches per pair")


def merge_stores(
    out: Path | str,
    inputs: list[Path | str],
    expected: Path | str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    all_shards: bool = True,
    info: dict[str, str] | None = None,
) -> Summary:
    """Merge the stores ``inputs`` (files, or folders of ``*.h5`` stores) into ``out``.

    ``expected``: an image list (feature stores) or pairs file (match stores) whose names no
    input holds are reported as failures. Raises ``SpExtractError`` for inputs that cannot be
    merged (other settings, an entry differing between two of them, unfinished, damaged).
    ``all_shards``: report the shards missing from inputs named as a series ``K-of-N.h5``.
    ``info``: attributes for people (as ``StoreWriter`` takes them) replacing the first input's.
    """
    out = Path(out)
    stores = input_stores([Path(path) for path in inputs])
    if not stores:
        raise ConfigError("no stores to merge")
    for store in stores:
        with contextlib.suppress(OSError):
            if os.path.samefile(store, out):
                raise ConfigError(f"{store}: is the output too; merge into another file")
    started = time.monotonic()
    kind = store_kind(stores[0])
    summary = merge_summary(kind, out)
    unit = summary.unit
    with locked_inputs(stores) as files:
        infos = [read_store(store, kind, "each STORE") for store in stores]
        _check_alike(kind, stores, infos)
        holders: dict[str, list[int]] = {}
        for index, store_info in enumerate(infos):
            for name in store_info.names:
                holders.setdefault(name, []).append(index)
        _check_duplicates(stores, files, holders)
        absent = [
            {"name": f"shard {shard}", "reason": "not among the stores merged"}
            for shard in (missing_shards(stores) if all_shards else [])
        ]
        if expected is not None:
            unheld = _unheld(kind, listed_names(Path(expected), kind), holders)
            absent += [{"name": name, "reason": "listed but in no store merged"} for name in unheld]
        summary.failed = absent
        summary.total = len(holders)
        attributes = {
            key: value.item() if hasattr(value, "item") else value
            for key, value in files[0].attrs.items()
            if key not in OWN_ATTRS and key not in infos[0].settings
        } | (info or {})
        sizes = {"flush_entries": MERGE_FLUSH_ENTRIES, "flush_seconds": MERGE_FLUSH_SECONDS}
        with StoreWriter(out, kind, infos[0].settings, overwrite, attributes, **sizes) as writer:
            todo = [name for name in holders if name not in writer.done]
            summary.skipped = summary.total - len(todo)
            progress = Progress(len(todo), unit, quiet=quiet)
            try:
                with graceful_stop() as stop:
                    for name in todo:
                        source = stores[holders[name][0]]
                        group = files[holders[name][0]][name]
                        summary.counts.append(entry_count(kind, verified(source, name, group)))
                        progress.advance(len(writer.add_copy(name, group)))
                        if stop:
                            summary.interrupted, summary.exit_code = True, stop.exit_code
                            break
                    progress.advance(len(writer.flush()))
            finally:
                progress.close()
        summary.notes += writer.notes
    return summary.finish(progress.completed, started)
