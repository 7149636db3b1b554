"""How store failures are worded: the one-line errors for a store that cannot be opened, is
locked by another program or is damaged, and the short cause of an I/O error."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import StoreError

H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)  # what h5py raises on damaged files


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
