"""Stage 6, store: the only code that writes HDF5 stores (features and matches).

Crash safety by construction: an HDF5 file modified in place is not atomic, so no store file
is ever modified in place. Finished entries are buffered, written to a complete part file,
fsynced and renamed into ``STORE.parts/`` (from then on they are durable and reported saved).
``close`` turns the parts into one immutable segment file in ``STORE.segments/`` (cost: what
was added), merges segments of one size class, and folds the segments into a new copy of the
main file only when they reach 1/8 of it (or the main file is small), so the copy of the
store is paid once per eighth of its size added; ``compact`` folds everything. Each step
writes a new file, fsyncs it, renames it into place and fsyncs the folder (``atomic.py``)
before deleting its sources, so a run killed at any instant leaves either the old or the new
set of files, and an entry found in two files is the same entry. Each file's entry names are
indexed in a sidecar (``index.py``). Datasets carry a Fletcher-32 checksum, so bit rot is
detected on read. One writer at a time: an OS-level lock on ``STORE.lock`` (``lock.py``). The
format is defined in ``format.py``; ``catalog.py`` reads a store's metadata, ``reader.py`` its
entries, and ``repair.py`` salvages damaged stores through this writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import StoreError
from ..interrupt import graceful_stop, stop_requests
from .atomic import atomic_write, fsync_path
from .catalog import (
    StoreInfo,
    indexed_file,
    part_files,
    parts_store_id,
    read_store_file,
    segment_files,
    settings_difference,
)
from .failures import H5_ERRORS, describe_error, segment_errors
from .format import (
    KIND_ATTR,
    MARKERS,
    REPLACING_ATTR,
    SETTINGS_ATTR,
    STORE_ID_ATTR,
    VERSION_ATTR,
    Entry,
    EntryAttrs,
    entry_names,
    parts_dir,
    segments_dir,
)
from .h5file import hdf5_writing
from .index import NameIndex, index_path, name_hashes, remove_index, write_index
from .lock import StoreLock

FOLD_FRACTION = 8  # segments are folded into the main file when they reach 1/8 of it
TIER_FANOUT = 4  # this many segments of one size class are merged into one
# a main file smaller than this is always folded into at once (a copy of well under a second),
# so small stores stay one file; SP_EXTRACT_FOLD_BELOW (bytes) changes it, e.g. for tests
FOLD_BELOW = int(os.environ.get("SP_EXTRACT_FOLD_BELOW", 64 << 20))


def size_class(size: int) -> int:
    """Segments of one size class (powers of 4 bytes) are merged once there are ``TIER_FANOUT``."""
    return max(size, 1).bit_length() // 2


class StoreWriter:
    """Durable, resumable writer of one store of ``kind`` ("features" or "matches").

    ``done`` holds the entries already stored or durable in parts; ``add`` buffers an entry and
    returns the names made durable by the flush it may trigger (every ``flush_entries`` entries
    or ``flush_seconds`` seconds); ``close`` folds everything into the store atomically. Use as
    a context manager; on an exception the parts stay for the next run, the store is not touched.

    Identity: a store carries ``sp_extract_store_id``, a random id made when the store is
    created or replaced (``overwrite``) and kept by every fold that only adds entries, so it
    survives a copy or a move, stays while the store grows and changes whenever existing
    entries may change. Match stores record it (see ``matching.run``).

    Replacing (``overwrite``): the old store stays untouched until the new one is complete.
    The new run's parts are marked as replacing (with the new store's id); an interrupted
    (SIGINT/SIGTERM) or killed replacement leaves them beside the old store, and the same
    command run again resumes them. A run without ``overwrite`` refuses such parts.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        settings: dict[str, Any],
        overwrite: bool = False,
        info: dict[str, str] | None = None,
        flush_entries: int = 64,
        flush_seconds: float = 2.0,
    ) -> None:
        path = Path(path)
        self.path = Path(os.path.realpath(path)) if path.is_symlink() else path  # replace the target
        if not self.path.parent.is_dir():
            raise StoreError(f"{self.path}: the output folder {self.path.parent} does not exist")
        self.kind = kind
        self.settings = settings
        self.info = info or {}
        self.flush_entries = flush_entries
        self.flush_seconds = flush_seconds
        self.parts_dir = parts_dir(self.path)
        self.store_id: str | None = None  # set by _open
        self.notes: list[str] = []  # what the user should know about the store after ``close``
        self.lock = StoreLock(self.path)
        self._buffer: list[tuple[str, Entry | h5py.Group, EntryAttrs]] = []  # a group: add_copy
        self._stops_at_open = stop_requests()
        self._last_flush = time.monotonic()
        self._sequence = 0
        self.segments_dir = segments_dir(self.path)
        self._main_hashes = np.empty(0, np.uint64)  # of the main file, when kept (set by _open)
        self._segments: list[Path] = []  # the store's segments, oldest first (set by _open)
        self.lock.acquire()
        try:
            self._discard_existing = overwrite
            self.done = self._open(overwrite)
        except BaseException:
            self.lock.release()
            raise

    # -- opening ---------------------------------------------------------------------------
    def _remove_stale_temporaries(self) -> None:
        """Delete what killed runs left half-written: fold copies, part, segment and index files
        and match-pairs' resume point not renamed, and the folders of parts and segments they
        left empty."""
        fold_temporary = re.compile(re.escape(f".{self.path.name}.") + r"(\d+|resume)\.tmp")
        with os.scandir(self.path.parent) as entries:
            for entry in entries:
                if fold_temporary.fullmatch(entry.name):
                    Path(entry.path).unlink(missing_ok=True)
        index_path(self.path).with_name(index_path(self.path).name + ".tmp").unlink(missing_ok=True)
        for folder in (self.parts_dir, self.segments_dir):
            if folder.is_dir():
                for stale in folder.glob("*.tmp"):
                    stale.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # left empty by a kill before its first file
                    folder.rmdir()
        for index in self.segments_dir.glob("seg-*.h5.index"):  # a kill before its segment's rename
            if not index.with_suffix("").exists():
                index.unlink(missing_ok=True)

    def _open(self, overwrite: bool) -> NameIndex:
        self._remove_stale_temporaries()
        if overwrite:
            return self._open_replacing()
        done = NameIndex()
        checked: list[tuple[StoreInfo, Path]] = []  # settings checked once leftovers are
        if self.path.exists():
            store, self._main_hashes = indexed_file(self.path, self.kind)
            self.store_id = store.store_id  # an older store without an id stays without one
            checked.append((store, self.path))
            done.add_hashes(self._main_hashes)
        elif segment_files(self.path):
            raise StoreError(
                f"{self.path}: the main file is missing but {self.segments_dir} holds part of the "
                f"store; restore {self.path.name}, or delete {self.segments_dir} to start afresh"
            )
        else:  # a new store; or the parts of its first run, killed before its close: their id
            self.store_id = parts_store_id(self.path, self.kind) or uuid.uuid4().hex
        for segment in segment_files(self.path):
            with segment_errors(self.path, segment):
                info, hashes = indexed_file(segment, self.kind)
            if info.store_id != self.store_id:  # left by an --overwrite run killed before deleting it
                segment.unlink()
                remove_index(segment)
                continue
            checked.append((info, segment))
            self._segments.append(segment)
            done.add_hashes(hashes)
        parts = [read_store_file(part, self.kind) for part in part_files(self.path)]  # complete: renamed
        if any(part.replacing and part.store_id != self.store_id for part in parts):
            raise StoreError(
                f"{self.path}: {self.parts_dir} holds the unfinished results of an --overwrite run; "
                "run that command again (with --overwrite) to finish replacing the store, or delete "
                f"{self.parts_dir} to keep the store as it is"
            )
        for info, where in [*checked, *((part, self.path) for part in parts)]:
            self._check_settings(info.settings, where)
        for part in parts:
            done.update(part.names)
        return done

    def _open_replacing(self) -> NameIndex:
        """Resume the parts of an unfinished replacement with these settings; delete any other
        part (of the old store, of a replacement with other settings, or already folded)."""
        current = None
        with contextlib.suppress(*H5_ERRORS), h5py.File(self.path, "r") as h5:
            current = h5.attrs.get(STORE_ID_ATTR)
        done = NameIndex()
        for part in part_files(self.path):
            try:
                info = read_store_file(part, self.kind)
            except StoreError:
                info = None
            resumable = (
                info is not None
                and info.replacing
                and info.settings == self.settings
                and info.store_id not in (None, current)
                and self.store_id in (None, info.store_id)
            )
            if resumable:
                self.store_id = info.store_id
                done.update(info.names)
            else:
                part.unlink()
        self.store_id = self.store_id or uuid.uuid4().hex
        return done

    def _check_settings(self, stored: dict[str, Any], where: Path) -> None:
        if stored != self.settings:
            raise StoreError(
                f"{where}: made with other settings ({settings_difference(stored, self.settings)}); "
                "use the same options, another --out, or --overwrite"
            )

    # -- writing ---------------------------------------------------------------------------
    def add(self, name: str, datasets: Entry, attrs: EntryAttrs | None = None) -> list[str]:
        """Buffer one entry; returns the names that became durable (possibly none)."""
        self._buffer.append((name, datasets, attrs or {}))
        return self._flush_if_due()

    def add_copy(self, name: str, source: h5py.Group) -> list[str]:
        """``add`` of an entry of another store, copied as HDF5 objects (``H5Ocopy``: each dataset
        with its chunks, filters, Fletcher-32 checksums and attributes as stored, not decoded and
        encoded again). ``source``'s file must stay open until the entry is flushed; verifying its
        checksums (reading it) is the caller's."""
        self._buffer.append((name, source, {}))
        return self._flush_if_due()

    def _flush_if_due(self) -> list[str]:
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if len(self._buffer) >= self.flush_entries or due:
            return self.flush()
        return []

    def _write_header(self, h5: h5py.File, part: bool = False) -> None:
        h5.attrs[KIND_ATTR] = self.kind
        h5.attrs[VERSION_ATTR] = __version__
        h5.attrs[SETTINGS_ATTR] = json.dumps(self.settings, sort_keys=True)
        if self.store_id is not None:
            h5.attrs[STORE_ID_ATTR] = self.store_id
        if part and self._discard_existing:
            h5.attrs[REPLACING_ATTR] = True
        for key, value in {**self.settings, **self.info}.items():
            h5.attrs[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)

    def flush(self) -> list[str]:
        """Write the buffered entries to a new durable part file; returns their names."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return []
        self._sequence += 1
        final = self.parts_dir / f"part-{time.time_ns():020d}-{os.getpid()}-{self._sequence:06d}.h5"
        try:
            if not self.parts_dir.is_dir():
                self.parts_dir.mkdir()
                fsync_path(self.parts_dir.parent, directory=True)
            with (
                atomic_write(final, final.with_name(final.name + ".tmp")) as temporary,
                hdf5_writing(temporary, create=True) as h5,
            ):
                self._write_header(h5, part=True)
                for name, datasets, attrs in self._buffer:
                    group = h5.create_group(name)
                    if isinstance(datasets, h5py.Group):  # add_copy: its datasets, not subgroups
                        for key in datasets:
                            if datasets.get(key, getclass=True) is h5py.Dataset:
                                h5py.h5o.copy(datasets.id, key.encode(), group.id, key.encode())
                        continue
                    for key, array in datasets.items():
                        dataset = group.create_dataset(key, data=array, fletcher32=np.ndim(array) > 0)
                        for attr, value in attrs.get(key, {}).items():
                            dataset.attrs[attr] = value
        except (OSError, RuntimeError) as error:
            raise StoreError(
                f"{self.path}: cannot save results in {self.parts_dir} ({describe_error(error)}); "
                "the store is intact"
            ) from error
        names = [name for name, _, _ in self._buffer]
        self.done.update(names)
        self._buffer.clear()
        return names

    def fold(self, compact: bool = False) -> None:
        """Bring the durable parts into the store: into a new main file when the store is new,
        replaced, small (under ``FOLD_BELOW`` bytes), compacted, or when its segments and parts
        together reach ``1/FOLD_FRACTION`` of the main file; otherwise into one new segment,
        then segments of one size class are merged."""
        parts = part_files(self.path)
        if self._discard_existing or not self.path.exists():
            self._write_main(parts, keep=False)
            return
        if not parts and not (compact and self._segments):
            return
        added = sum(file.stat().st_size for file in [*parts, *self._segments])
        main = self.path.stat().st_size
        if compact or main < FOLD_BELOW or added * FOLD_FRACTION >= main:
            self._write_main([*self._segments, *parts], keep=True)
            return
        if parts:
            self._write_segment(parts)
        while True:
            tiers: dict[int, list[Path]] = {}
            for segment in self._segments:
                tiers.setdefault(size_class(segment.stat().st_size), []).append(segment)
            full = [tier for tier in tiers.values() if len(tier) >= TIER_FANOUT]
            if not full:
                return
            self._write_segment(full[0])

    def _copy_entries(self, sources: list[Path], out: h5py.File) -> np.ndarray:
        """Copy every entry of ``sources`` (in order: a later copy of a name wins) into ``out``;
        returns their name hashes."""
        names: list[str] = []
        for source_path in sources:
            with h5py.File(source_path, "r") as source:
                for name in entry_names(source, MARKERS[self.kind]):
                    if name in out:  # copied already by a run killed before deleting its sources
                        del out[name]
                    source.copy(source[name], out, name=name)
                    names.append(name)
        return name_hashes(names)

    def _write_file(self, final: Path, sources: list[Path], keep: bool) -> None:
        """Write ``final`` (a copy of the main file if ``keep``, else a new file) with the entries
        of ``sources`` as a temporary, fsync it and its index, rename it into place and fsync the
        folder. The sources are not touched."""
        # a new main file: the default temporary beside the store; a segment: ``seg-*.h5.tmp``
        named = None if final == self.path else final.with_name(final.name + ".tmp")
        try:
            with atomic_write(final, named) as temporary:
                if keep:
                    shutil.copyfile(self.path, temporary)
                with hdf5_writing(temporary, create=not keep) as out:
                    self._write_header(out)
                    added = self._copy_entries(sources, out)
                kept = self._main_hashes if keep else np.empty(0, np.uint64)
                write_index(final, np.concatenate([kept, added]), described=temporary)
        except (OSError, RuntimeError) as error:
            if not final.exists():  # a new file's index, written before a failed rename
                remove_index(final)
            raise StoreError(
                f"{self.path}: cannot update the store ({describe_error(error)}); the previous "
                "store is intact and finished results are kept for the next run"
            ) from error

    def _write_main(self, sources: list[Path], keep: bool) -> None:
        """Fold ``sources`` (segments, parts) into a new main file (a copy of the current one if
        ``keep``), then delete them; a new (replacing) main file ends every segment."""
        self._write_file(self.path, sources, keep)
        self._discard_existing = False
        for file in [*sources, *segment_files(self.path)]:
            file.unlink(missing_ok=True)
            remove_index(file)
        self._segments.clear()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        shutil.rmtree(self.segments_dir, ignore_errors=True)

    def _write_segment(self, sources: list[Path]) -> None:
        """Consolidate ``sources`` (parts, or segments of one size class) into one new segment,
        then delete them."""
        if not self.segments_dir.is_dir():
            self.segments_dir.mkdir()
            fsync_path(self.segments_dir.parent, directory=True)
        final = self.segments_dir / f"seg-{time.time_ns():020d}-{os.getpid()}.h5"
        self._write_file(final, sources, keep=False)
        self._segments = [segment for segment in self._segments if segment not in sources] + [final]
        for file in sources:
            file.unlink(missing_ok=True)
            remove_index(file)
        with contextlib.suppress(OSError):  # the parts folder, once empty
            self.parts_dir.rmdir()

    def close(self, compact: bool = False) -> None:
        """Flush, fold (``compact``: everything into the main file) and release the lock. A first
        SIGINT/SIGTERM meanwhile lets the fold finish (and is then handled as usual); a second one
        aborts it, the old files intact. A replacement whose run a signal stopped is not folded:
        the old store stays as it is."""
        try:
            with graceful_stop(redeliver=True):
                self.flush()
                if self._discard_existing and stop_requests() != self._stops_at_open:
                    self.notes.append(
                        f"{self.path} is unchanged: the new store replaces it once complete; run the "
                        "same command (with --overwrite) again to finish it"
                    )
                    return
                self.fold(compact)
                if self._segments:
                    self.notes.append(
                        f"{self.path} holds {len(self._segments)} segment file(s) beside it; "
                        f"sp-extract reads them, hloc after 'sp-extract compact {self.path}'"
                    )
        finally:
            self.lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.lock.release()
