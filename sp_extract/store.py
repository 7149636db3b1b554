"""Stage 6, store: the only code that writes HDF5 stores (features and matches).

Crash safety by construction: an HDF5 file modified in place is not atomic, so a store is
never modified in place. Finished entries are buffered, written to a complete part file,
fsynced and renamed into ``STORE.parts/`` (from then on they are durable and reported saved).
``close`` folds the parts into a new copy of the store and renames it over the old one, an
atomic step; a run killed at any instant leaves the old store intact and its parts folded in
by the next run. One writer at a time: an OS-level lock (``flock``) on ``STORE.lock``,
released by the kernel when its holder dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .errors import StoreError

KIND_ATTR = "sp_extract_kind"
VERSION_ATTR = "sp_extract_version"
SETTINGS_ATTR = "sp_extract_settings"
MARKERS = {"features": "keypoints", "matches": "matches0"}  # the dataset that marks an entry

Entry = dict[str, np.ndarray]
EntryAttrs = dict[str, dict[str, Any]]


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_os_error(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "disk full"
    if error.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if error.errno == errno.EFBIG:
        return "file too large"
    return error.strerror or str(error)


def entry_names(h5: h5py.File | h5py.Group, marker: str) -> list[str]:
    """Paths of the groups holding a ``marker`` dataset (image names or pair keys), sorted."""
    names: list[str] = []

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Group) and isinstance(obj.get(marker, getlink=True), h5py.HardLink):
            names.append(name)

    h5.visititems(visit)
    return sorted(names)


def read_store_info(path: Path, kind: str) -> tuple[dict[str, Any], list[str]]:
    """Settings and entry names of an existing store, checking that it is ours and of ``kind``."""
    if not h5py.is_hdf5(path):
        raise StoreError(f"{path}: exists but is not an HDF5 file; choose another --out or remove it")
    try:
        with h5py.File(path, "r") as h5:
            found = h5.attrs.get(KIND_ATTR)
            if found is None:
                raise StoreError(
                    f"{path}: an HDF5 file not written by sp-extract; choose another --out, "
                    "or pass --overwrite to replace it"
                )
            if found != kind:
                raise StoreError(f"{path}: an sp-extract {found} store, not a {kind} store")
            settings = json.loads(h5.attrs[SETTINGS_ATTR])
            return settings, entry_names(h5, MARKERS[kind])
    except StoreError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise StoreError(
            f"{path}: unreadable store, truncated or corrupt ({error}); "
            f"salvage it with 'sp-extract repair {path}' or pass --overwrite"
        ) from error


def settings_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Human-readable list of settings that differ, e.g. ``nms_radius: 3 (store) vs 4 (now)``."""
    keys = sorted(set(old) | set(new))
    return ", ".join(
        f"{k}: {old.get(k)!r} (store) vs {new.get(k)!r} (now)" for k in keys if old.get(k) != new.get(k)
    )


class StoreLock:
    """Exclusive ``flock`` on ``STORE.lock``; the file holds the holder's pid."""

    def __init__(self, store: Path) -> None:
        self.path = store.with_name(store.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise StoreError(
                    f"{self.path}: cannot create lock file ({_describe_os_error(error)})"
                ) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreError(
                    f"{self.path.with_suffix('')}: another sp-extract process (pid {holder}) is "
                    "writing this store; wait for it to finish"
                ) from None
            try:  # the file may have been unlinked by its previous holder between open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


class StoreWriter:
    """Durable, resumable writer of one store of ``kind`` ("features" or "matches").

    ``done`` holds the entries already stored or durable in parts; ``add`` buffers an entry and
    returns the names made durable by the flush it may trigger; ``close`` folds everything into
    the store atomically. Use as a context manager; on an exception the parts stay for the next
    run, the store is not touched.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        settings: dict[str, Any],
        overwrite: bool = False,
        info: dict[str, str] | None = None,
        flush_entries: int = 64,
        flush_seconds: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.settings = settings
        self.info = info or {}
        self.flush_entries = flush_entries
        self.flush_seconds = flush_seconds
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.lock = StoreLock(self.path)
        self._buffer: list[tuple[str, Entry, EntryAttrs]] = []
        self._last_flush = time.monotonic()
        self._sequence = 0
        self.lock.acquire()
        try:
            self._discard_existing = overwrite
            self.done = self._open(overwrite)
        except BaseException:
            self.lock.release()
            raise

    # -- opening ---------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> set[str]:
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        if overwrite:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return set()
        done: set[str] = set()
        if self.path.exists():
            settings, names = read_store_info(self.path, self.kind)
            self._check_settings(settings, self.path)
            done.update(names)
        for part in self._parts():
            try:
                settings, names = read_store_info(part, self.kind)
            except StoreError:
                part.unlink(missing_ok=True)  # cannot happen for renamed parts; be safe
                continue
            self._check_settings(settings, self.path)
            done.update(names)
        return done

    def _check_settings(self, stored: dict[str, Any], where: Path) -> None:
        if stored != self.settings:
            raise StoreError(
                f"{where}: made with other settings ({settings_difference(stored, self.settings)}); "
                "use the same options, another --out, or --overwrite"
            )

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.h5")) if self.parts_dir.is_dir() else []

    # -- writing ---------------------------------------------------------------------------
    def add(self, name: str, datasets: Entry, attrs: EntryAttrs | None = None) -> list[str]:
        """Buffer one entry; returns the names that became durable (possibly none)."""
        self._buffer.append((name, datasets, attrs or {}))
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if len(self._buffer) >= self.flush_entries or due:
            return self.flush()
        return []

    def _write_header(self, h5: h5py.File) -> None:
        h5.attrs[KIND_ATTR] = self.kind
        h5.attrs[VERSION_ATTR] = __version__
        h5.attrs[SETTINGS_ATTR] = json.dumps(self.settings, sort_keys=True)
        for key, value in {**self.settings, **self.info}.items():
            h5.attrs[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)

    def flush(self) -> list[str]:
        """Write the buffered entries to a new durable part file; returns their names."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return []
        self.parts_dir.mkdir(exist_ok=True)
        self._sequence += 1
        final = self.parts_dir / f"part-{os.getpid()}-{time.time_ns()}-{self._sequence:06d}.h5"
        temporary = final.with_name(final.name + ".tmp")
        try:
            with h5py.File(temporary, "w") as h5:
                self._write_header(h5)
                for name, datasets, attrs in self._buffer:
                    group = h5.create_group(name)
                    for key, array in datasets.items():
                        group.create_dataset(key, data=array)
                        for attr, value in attrs.get(key, {}).items():
                            group[key].attrs[attr] = value
            _fsync_path(temporary)
            os.replace(temporary, final)
            _fsync_path(self.parts_dir, directory=True)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise StoreError(
                f"{final}: cannot write results ({_describe_os_error(error)}); "
                f"the store {self.path} is intact"
            ) from error
        names = [name for name, _, _ in self._buffer]
        self.done.update(names)
        self._buffer.clear()
        return names

    def fold(self) -> None:
        """Fold all parts into the store: write a new file, fsync, rename it over the old one."""
        parts = self._parts()
        if not parts and not self._discard_existing and self.path.exists():
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            if self.path.exists() and not self._discard_existing:
                shutil.copyfile(self.path, temporary)
            with h5py.File(temporary, "a" if temporary.exists() else "w") as out:
                self._write_header(out)
                for part in parts:
                    with h5py.File(part, "r") as source:
                        for name in entry_names(source, MARKERS[self.kind]):
                            if name in out:
                                del out[name]
                            source.copy(source[name], out, name=name)
            _fsync_path(temporary)
            os.replace(temporary, self.path)
            _fsync_path(self.path.parent, directory=True)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise StoreError(
                f"{self.path}: cannot update the store ({_describe_os_error(error)}); the previous "
                "store is intact and finished results are kept for the next run"
            ) from error
        self._discard_existing = False
        for part in parts:
            part.unlink()
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def close(self) -> None:
        """Flush, fold and release the lock."""
        try:
            self.flush()
            self.fold()
        finally:
            self.lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.lock.release()
