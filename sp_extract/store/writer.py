"""Stage 6, store: the only code that writes HDF5 stores (features and matches).

Crash safety by construction: an HDF5 file modified in place is not atomic, so no store file
is ever modified in place. Finished entries are buffered, written to a complete part file,
fsynced and renamed into ``STORE.parts/`` (from then on they are durable and reported saved).
``close`` turns the parts into one immutable segment file in ``STORE.segments/`` (cost: what
was added), merges segments of one size class, and folds the segments into a new copy of the
main file only when they reach 1/8 of it (or the main file is small), so the copy of the
store is paid once per eighth of its size added; ``compact`` folds everything. Each step
writes a new file, fsyncs it, renames it into place and fsyncs the folder before deleting its
sources, so a run killed at any instant leaves either the old or the new set of files, and an
entry found in two files is the same entry. Each file's entry names are indexed in a sidecar
(``index.py``). Datasets carry a Fletcher-32 checksum, so bit rot is detected on read. One
writer at a time: an OS-level lock (``lockf``) on ``STORE.lock``, released by the kernel when
its holder dies. ``reader.py`` reads a store's files as one; ``repair.py`` salvages damaged
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
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import StoreError
from ..interrupt import graceful_stop, stop_requests
from .index import NameIndex, index_path, indexed_names, load_index, name_hashes, remove_index, write_index

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
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)  # what h5py raises on damaged files

FOLD_FRACTION = 8  # segments are folded into the main file when they reach 1/8 of it
TIER_FANOUT = 4  # this many segments of one size class are merged into one
# a main file smaller than this is always folded into at once (a copy of well under a second),
# so small stores stay one file; SP_EXTRACT_FOLD_BELOW (bytes) changes it, e.g. for tests
FOLD_BELOW = int(os.environ.get("SP_EXTRACT_FOLD_BELOW", 64 << 20))

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


def is_locked(error: BaseException) -> bool:
    """Whether HDF5 refused to open a file because another program holds it (file locking)."""
    text = str(error).lower()
    return "unable to lock file" in text or "already open for" in text


def open_error(path: Path, error: BaseException) -> StoreError:
    """The one-line error for a store h5py cannot open or read: in use, unreadable, or damaged.

    Only damage is answered with ``repair``; never ``--overwrite``, which would delete a store
    that may well be intact (a store locked by hloc or a notebook, or not readable by us).
    """
    if is_locked(error):
        return StoreError(
            f"{path}: in use by another program (HDF5 file lock held by a process that opened it for "
            "writing: an hloc run, a notebook's h5py.File); close it there and run again. The store "
            "was not changed"
        )
    code = getattr(error, "errno", None)
    if code in (errno.EACCES, errno.EPERM):
        return StoreError(f"{path}: cannot read the store ({describe_error(error)})")
    return damaged_error(path, describe_error(error))


def damaged_error(path: Path, cause: str) -> StoreError:
    """A store found damaged (truncated, corrupted bytes): name the way out, ``repair``."""
    return StoreError(
        f"{path}: damaged store, truncated or corrupt ({cause}); 'sp-extract repair --check "
        f"{path}' lists the damaged entries, 'sp-extract repair {path}' copies the intact "
        "ones into a new store"
    )


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


@dataclass
class StoreInfo:
    """What a run needs of an existing store: its settings, entry names and identity."""

    settings: dict[str, Any]
    names: list[str]
    store_id: str | None  # None for a store written before sp-extract recorded one
    replacing: bool = False  # a part of a run replacing the store (--overwrite), not yet folded


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


@contextlib.contextmanager
def segment_errors(store: Path, segment: Path) -> Iterator[None]:
    """Report a damaged segment as damage to its store (``repair`` takes the store's path)."""
    try:
        yield
    except StoreError as error:
        cause = str(error).partition(" (")[2].rpartition(")")[0] or "unreadable"
        raise damaged_error(store, f"its segment {segment.name}: {cause}") from error
    except H5_ERRORS as error:
        raise damaged_error(store, f"its segment {segment.name}: {describe_error(error)}") from error


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


def parts_dir(store: Path) -> Path:
    """The folder holding a store's durable, not yet folded part files."""
    return store.with_name(store.name + ".parts")


def part_files(store: Path) -> list[Path]:
    """A store's part files, oldest first (their names start with a nanosecond timestamp)."""
    folder = parts_dir(store)
    return sorted(folder.glob("part-*.h5")) if folder.is_dir() else []


def segments_dir(store: Path) -> Path:
    """The folder holding a store's immutable segment files."""
    return store.with_name(store.name + ".segments")


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


def size_class(size: int) -> int:
    """Segments of one size class (powers of 4 bytes) are merged once there are ``TIER_FANOUT``."""
    return max(size, 1).bit_length() // 2


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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as error:  # disk full, quota: give the lock up, leak no descriptor
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)
            raise StoreError(
                f"{self.store}: cannot write the lock file {self.path} ({describe_error(error)}); "
                "the store was not changed"
            ) from error
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
        and match-pairs' resume point not renamed."""
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
        temporary = final.with_name(final.name + ".tmp")
        try:
            if not self.parts_dir.is_dir():
                self.parts_dir.mkdir()
                fsync_path(self.parts_dir.parent, directory=True)
            with _hdf5_writing(temporary, create=True) as h5:
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
        temporary = (
            self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            if final == self.path
            else final.with_name(final.name + ".tmp")
        )
        try:
            if keep:
                shutil.copyfile(self.path, temporary)
            with _hdf5_writing(temporary, create=not keep) as out:
                self._write_header(out)
                added = self._copy_entries(sources, out)
            kept = self._main_hashes if keep else np.empty(0, np.uint64)
            write_index(final, np.concatenate([kept, added]), described=temporary)
            os.replace(temporary, final)
            fsync_path(final.parent, directory=True)
        except (OSError, RuntimeError) as error:
            temporary.unlink(missing_ok=True)
            if not final.exists():  # a new file's index, written before a failed rename
                remove_index(final)
            raise StoreError(
                f"{self.path}: cannot update the store ({describe_error(error)}); the previous "
                "store is intact and finished results are kept for the next run"
            ) from error
        except BaseException:  # a second Ctrl-C: the old files are intact
            temporary.unlink(missing_ok=True)
            raise

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
