"""Stage 6, store: the only code that writes HDF5 stores (features and matches).

Crash safety by construction: an HDF5 file modified in place is not atomic, so a store is
never modified in place. Finished entries are buffered, written to a complete part file,
fsynced and renamed into ``STORE.parts/`` (from then on they are durable and reported saved).
``close`` folds the parts into a new copy of the store and renames it over the old one, an
atomic step; a run killed at any instant leaves the old store intact and its parts folded in
by the next run. Every directory entry that durability depends on (the parts folder, each
part, the renamed store) is fsynced in its folder. Datasets carry a Fletcher-32 checksum, so
bit rot is detected on read. One writer at a time: an OS-level lock (``lockf``) on
``STORE.lock``, released by the kernel when its holder dies. ``repair.py`` salvages damaged
stores through this writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import StoreError
from ..interrupt import graceful_stop

KIND_ATTR = "sp_extract_kind"
VERSION_ATTR = "sp_extract_version"
SETTINGS_ATTR = "sp_extract_settings"
MARKERS = {"features": "keypoints", "matches": "matches0"}  # the dataset that marks an entry
REQUIRED = {  # the datasets of a complete entry
    "features": ("keypoints", "scores", "descriptors", "image_size"),
    "matches": ("matches0", "matching_scores0"),
}
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)  # what h5py raises on damaged files

Entry = dict[str, np.ndarray]
EntryAttrs = dict[str, dict[str, Any]]


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_error(error: BaseException) -> str:
    """One short line for an I/O failure; h5py hides the errno in its message text."""
    code = getattr(error, "errno", None)
    if not code:
        found = re.search(r"errno = (\d+)", str(error))
        code = int(found[1]) if found else None
    named = {
        errno.ENOSPC: "disk full",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large (file size limit reached)",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }
    if code in named:
        return named[code]
    if code:
        return os.strerror(code)
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def entry_names(h5: h5py.File | h5py.Group, marker: str) -> list[str]:
    """Paths of the groups holding a ``marker`` dataset (image names or pair keys), sorted."""
    names: list[str] = []

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Group) and isinstance(obj.get(marker, getlink=True), h5py.HardLink):
            names.append(name)

    h5.visititems(visit)
    return sorted(names)


def unreadable_error(path: Path, error: BaseException) -> StoreError:
    return StoreError(
        f"{path}: unreadable store, truncated or corrupt ({describe_error(error)}); "
        f"salvage it with 'sp-extract repair {path}' or pass --overwrite"
    )


def read_store_info(path: Path, kind: str, option: str = "--out") -> tuple[dict[str, Any], list[str]]:
    """Settings and entry names of an existing store, checking that it is ours and of ``kind``.

    ``option`` is the option that named ``path``: a refused input (``--features``, ``--matches``)
    is answered with what that option needs, never with advice to replace or remove the file.
    """
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
            return settings, entry_names(h5, MARKERS[kind])
    except StoreError:
        raise
    except H5_ERRORS as error:
        raise unreadable_error(path, error) from error


def settings_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Human-readable list of settings that differ, e.g. ``nms_radius: 3 (store) vs 4 (now)``."""
    keys = sorted(set(old) | set(new))
    return ", ".join(
        f"{k}: {old.get(k)!r} (store) vs {new.get(k)!r} (now)" for k in keys if old.get(k) != new.get(k)
    )


def parts_dir(store: Path) -> Path:
    """The folder holding a store's durable, not yet folded part files."""
    return store.with_name(store.name + ".parts")


def part_files(store: Path) -> list[Path]:
    """A store's part files, oldest first (their names start with a nanosecond timestamp)."""
    folder = parts_dir(store)
    return sorted(folder.glob("part-*.h5")) if folder.is_dir() else []


class DescriptorFile(io.RawIOBase):
    """A file for h5py's file-object driver: positioned reads (``pread``) on a descriptor."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._position = 0

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size()}[whence]
        self._position = start + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self._fd, len(view), self._position)
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _WriteThrough(DescriptorFile):
    """The file HDF5 writes a part or a new store through, which never reports a failure to it.

    An HDF5 library that saw a write fail cannot close that file any more and crashes the
    process at exit. So the first I/O error (disk full, file size limit) is kept here, HDF5
    carries on into nothing, and ``commit`` raises the error once HDF5 has closed the file;
    the half-written temporary is then deleted by the caller.
    """

    def __init__(self, path: Path, create: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        super().__init__(os.open(path, flags, 0o644))
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], self._position + done)
            except OSError as error:
                self.error = error
        self._position += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as error:
                self.error = error
        return size

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        """fsync and close; raises the first error met on the way."""
        try:
            if self.error is None:
                os.fsync(self._fd)
        except OSError as error:
            self.error = error
        finally:
            self.close()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def _hdf5_writing(path: Path, create: bool) -> Iterator[h5py.File]:
    """``h5py.File`` writing ``path`` through ``_WriteThrough``; durable (fsynced) on exit."""
    target = _WriteThrough(path, create)
    try:
        with h5py.File(target, "w" if create else "r+") as h5:
            yield h5
    finally:
        target.commit()


class StoreLock:
    """Exclusive lock on ``STORE.lock``; the file holds the holder's pid.

    A POSIX record lock (``lockf``): the kernel releases it the moment its process dies, and,
    unlike ``flock``, forked children (decoding workers) do not inherit it, so a killed run
    whose workers are still winding down does not block the next one. POSIX locks do not
    exclude the process holding them, so a second writer in the same process is refused here.
    """

    _held: set[tuple[int, int]] = set()  # (device, inode) of the lock files this process holds

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store.with_name(store.name + ".lock")
        self.fd: int | None = None
        self._key: tuple[int, int] | None = None

    def _refuse(self, holder: str) -> StoreError:
        return StoreError(
            f"{self.store}: another sp-extract process (pid {holder or 'unknown'}) is writing this "
            "store; wait for it to finish"
        )

    def acquire(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) in self._held:  # never open it: closing would unlock it
                raise self._refuse(str(os.getpid()))
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as error:
                raise StoreError(
                    f"{self.store}: cannot write in {self.store.parent} ({describe_error(error)})"
                ) from error
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    raise StoreError(f"{self.path}: cannot lock ({describe_error(error)})") from error
                raise self._refuse(holder) from None
            info = os.fstat(fd)
            try:  # the file may have been unlinked by its previous holder between open and lock
                same = info.st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd, self._key = fd, (info.st_dev, info.st_ino)
        self._held.add(self._key)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self._held.discard(self._key)
        self.fd = self._key = None


class StoreWriter:
    """Durable, resumable writer of one store of ``kind`` ("features" or "matches").

    ``done`` holds the entries already stored or durable in parts; ``add`` buffers an entry and
    returns the names made durable by the flush it may trigger (every ``flush_entries`` entries
    or ``flush_seconds`` seconds); ``close`` folds everything into the store atomically. Use as
    a context manager; on an exception the parts stay for the next run, the store is not touched.
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
    def _remove_stale_temporaries(self) -> None:
        """Delete what killed runs left half-written: fold copies and part files not renamed."""
        fold_temporary = re.compile(re.escape(f".{self.path.name}.") + r"\d+\.tmp")
        with os.scandir(self.path.parent) as entries:
            for entry in entries:
                if fold_temporary.fullmatch(entry.name):
                    Path(entry.path).unlink(missing_ok=True)
        if self.parts_dir.is_dir():
            for stale in self.parts_dir.glob("*.tmp"):
                stale.unlink(missing_ok=True)

    def _open(self, overwrite: bool) -> set[str]:
        self._remove_stale_temporaries()
        if overwrite:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return set()
        done: set[str] = set()
        if self.path.exists():
            settings, names = read_store_info(self.path, self.kind)
            self._check_settings(settings, self.path)
            done.update(names)
        for part in part_files(self.path):
            settings, names = read_store_info(part, self.kind)  # complete: renamed after fsync
            self._check_settings(settings, self.path)
            done.update(names)
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
        self._sequence += 1
        final = self.parts_dir / f"part-{time.time_ns():020d}-{os.getpid()}-{self._sequence:06d}.h5"
        temporary = final.with_name(final.name + ".tmp")
        try:
            if not self.parts_dir.is_dir():
                self.parts_dir.mkdir()
                fsync_path(self.parts_dir.parent, directory=True)
            with _hdf5_writing(temporary, create=True) as h5:
                self._write_header(h5)
                for name, datasets, attrs in self._buffer:
                    group = h5.create_group(name)
                    for key, array in datasets.items():
                        dataset = group.create_dataset(key, data=array, fletcher32=np.ndim(array) > 0)
                        for attr, value in attrs.get(key, {}).items():
                            dataset.attrs[attr] = value
            os.replace(temporary, final)
            fsync_path(self.parts_dir, directory=True)
        except (OSError, RuntimeError) as error:
            temporary.unlink(missing_ok=True)
            raise StoreError(
                f"{self.path}: cannot save results in {self.parts_dir} ({describe_error(error)}); "
                "the store is intact"
            ) from error
        names = [name for name, _, _ in self._buffer]
        self.done.update(names)
        self._buffer.clear()
        return names

    def fold(self) -> None:
        """Fold all parts into the store: write a new file, fsync, rename it over the old one."""
        parts = part_files(self.path)
        if not parts and not self._discard_existing and self.path.exists():
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            copy = self.path.exists() and not self._discard_existing
            if copy:
                shutil.copyfile(self.path, temporary)
            with _hdf5_writing(temporary, create=not copy) as out:
                self._write_header(out)
                for part in parts:
                    with h5py.File(part, "r") as source:
                        for name in entry_names(source, MARKERS[self.kind]):
                            if name in out:  # folded already by a run killed before deleting parts
                                del out[name]
                            source.copy(source[name], out, name=name)
            os.replace(temporary, self.path)
            fsync_path(self.path.parent, directory=True)
        except (OSError, RuntimeError) as error:
            temporary.unlink(missing_ok=True)
            raise StoreError(
                f"{self.path}: cannot update the store ({describe_error(error)}); the previous "
                "store is intact and finished results are kept for the next run"
            ) from error
        except BaseException:  # a second Ctrl-C: the old store and the parts are intact
            temporary.unlink(missing_ok=True)
            raise
        self._discard_existing = False
        for part in parts:
            part.unlink()
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def close(self) -> None:
        """Flush, fold and release the lock. A first SIGINT/SIGTERM meanwhile lets the fold
        finish (and is then handled as usual); a second one aborts it, the old store intact."""
        try:
            with graceful_stop(redeliver=True):
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
