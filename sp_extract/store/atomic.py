"""Crash-safe file replacement: a file is written as a temporary beside its target, fsynced,
renamed over the target and the folder fsynced, so a reader (or the next run after a kill)
finds either the old file or the new one whole, never a half-written one. Every
temporary-then-rename write of the package goes through ``atomic_write``; a folder (COLMAP
models, an export) is built as ``NAME.new`` and swapped in by ``swap_in``, and ``recover_folder``
repairs what a kill between its two renames left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_temporary(target: Path) -> Path:
    """The temporary a write of ``target`` goes through unless told otherwise: hidden, beside it,
    one per process (``.NAME.PID.tmp``)."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_write(target: Path, temporary: Path | None = None, durable: bool = True) -> Iterator[Path]:
    """Replace ``target`` whole or not at all: yields the temporary path (``default_temporary``
    unless ``temporary`` names another, one that a stale-file cleanup knows) for the caller to
    write; when the block ends normally the temporary is fsynced, renamed over ``target`` and
    the folder fsynced. ``durable=False`` only renames (a file that is cheap to lose in a power
    cut: a cache, a resume point). On any exception, a Ctrl-C included, the temporary is
    deleted and the exception goes on."""
    temporary = default_temporary(target) if temporary is None else temporary
    try:
        yield temporary
        if durable:
            fsync_path(temporary)
        os.replace(temporary, target)
        if durable:
            fsync_path(target.parent, directory=True)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def recover_folder(target: Path) -> None:
    """Put back the folder a run killed between ``swap_in``'s two renames left aside; drop a
    half-built one (``sparse``: the models; an export folder)."""
    aside, building = target.with_name(target.name + ".old"), building_folder(target)
    if aside.is_dir():
        if target.is_dir():
            shutil.rmtree(aside)
        else:
            os.replace(aside, target)
    shutil.rmtree(building, ignore_errors=True)


def swap_in(building: Path, target: Path) -> None:
    """Replace the folder ``target`` by ``building`` (``building_folder``) with two renames:
    ``target`` -> ``target.old``, ``building`` -> ``target``; ``recover_folder`` undoes a kill
    between them, so there is always a complete folder."""
    aside = target.with_name(target.name + ".old")
    fsync_path(building, directory=True)
    if target.exists():
        os.replace(target, aside)
    os.replace(building, target)
    shutil.rmtree(aside, ignore_errors=True)


def building_folder(target: Path) -> Path:
    """Where a new ``target`` folder is built before ``swap_in`` (``recover_folder`` drops it)."""
    return target.with_name(target.name + ".new")
