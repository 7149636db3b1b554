"""Repair: salvage the readable, complete entries of a damaged store into a new store.

A store cut short by a crash of some older program, or with corrupted bytes (caught by the
datasets' Fletcher-32 checksums), is read entry by entry; what is intact, plus the parts a
killed run left, is written to a new store through ``StoreWriter`` (so crash-safe too), and
what was lost is reported. ``check_store`` (``repair --check``) reads everything the same way
and only reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from ..errors import EXIT_OK, EXIT_SOME_FAILED, StoreError
from ..report import Report, Summary
from .catalog import part_files, read_store_info, segment_files
from .failures import H5_ERRORS, describe_error, open_error
from .format import (
    KIND_ATTR,
    MARKERS,
    REPLACING_ATTR,
    REQUIRED,
    SETTINGS_ATTR,
    STORE_ID_ATTR,
    VERSION_ATTR,
    Entry,
    EntryAttrs,
    shape_problem,
)
from .h5file import DescriptorFile
from .writer import StoreWriter

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def stored_end_of_file(path: Path) -> int | None:
    """The file size an HDF5 file's superblock records (None if no superblock is found).

    A store cut short by a crash is smaller than this; HDF5 then refuses to open it.
    """
    with open(path, "rb") as file:
        head = file.read(4096)
    for base in (0, 512, 1024, 2048):
        if head[base : base + 8] != _HDF5_SIGNATURE or len(head) < base + 64:
            continue
        version = head[base + 8]
        if version in (0, 1):
            size = head[base + 13]
            address = base + 24 + (4 if version == 1 else 0)
        else:
            size = head[base + 9]
            address = base + 12
        base_address = int.from_bytes(head[address : address + size], "little")
        end = int.from_bytes(head[address + 2 * size : address + 3 * size], "little")
        return base_address + end
    return None


class _ZeroPadded(DescriptorFile):
    """A read-only view of a truncated file that reads as zeros up to its recorded size.

    Lets HDF5 open a store cut short by a crash; whatever lay in the lost tail reads as zeros,
    which ``_read_entry`` detects through storage offsets and checksums.
    """

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        self._recorded = size

    def size(self) -> int:
        return self._recorded

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._recorded - self._position))
        real = super().readinto(view[:count])  # what the file still has; advances the position
        view[real:count] = bytes(count - real)
        self._position += count - real
        return count


@contextlib.contextmanager
def _open_damaged(path: Path) -> Iterator[tuple[h5py.File, int]]:
    """Open a possibly truncated store read-only; yields the file and its real size in bytes."""
    real_size = path.stat().st_size
    padded: _ZeroPadded | None = None
    try:
        h5 = h5py.File(path, "r")
    except H5_ERRORS as error:
        recorded = stored_end_of_file(path)
        if recorded is None or recorded <= real_size:
            raise open_error(path, error) from error
        padded = _ZeroPadded(path, recorded)
        try:
            h5 = h5py.File(padded, "r")
        except H5_ERRORS as padded_error:
            padded.close()
            raise StoreError(
                f"{path}: cut short at {real_size} of {recorded} bytes and its index is lost; "
                "nothing can be salvaged"
            ) from padded_error
    try:
        yield h5, real_size
    finally:
        h5.close()
        if padded is not None:
            padded.close()


def _intact(dataset: h5py.Dataset, real_size: int) -> bool:
    """Whether every byte of the dataset's storage lies inside the file (not in a lost tail)."""
    dsid = dataset.id
    if dataset.chunks is None:
        offset = dsid.get_offset()
        return offset is None or offset + dsid.get_storage_size() <= real_size
    for index in range(dsid.get_num_chunks()):
        chunk = dsid.get_chunk_info(index)
        if chunk.byte_offset + chunk.size > real_size:
            return False
    return True


def _read_entry(group: h5py.Group, kind: str, real_size: int) -> tuple[Entry, EntryAttrs]:
    """The datasets and dataset attributes of a complete entry; raises ``ValueError`` if not."""
    datasets: Entry = {}
    attrs: EntryAttrs = {}
    for key in group:
        item = group[key]
        if not isinstance(item, h5py.Dataset):
            continue
        if not _intact(item, real_size):
            raise ValueError(f"'{key}' lies in the lost end of the file")
        datasets[key] = item[()]
        attrs[key] = dict(item.attrs)
    missing = [key for key in REQUIRED[kind] if key not in datasets]
    if missing:
        raise ValueError(f"incomplete, no {', '.join(missing)}")
    return datasets, attrs


def _entry_groups(h5: h5py.File) -> tuple[list[str], list[str]]:
    """Paths of the groups holding datasets (candidate entries), and of groups whose index is lost."""
    entries: list[str] = []
    lost: list[str] = []

    def walk(group: h5py.Group, prefix: str) -> None:
        try:
            keys = list(group)
        except H5_ERRORS:
            lost.append(prefix.rstrip("/") or "/")
            return
        has_data = False
        for key in keys:
            try:
                item = group[key]
            except H5_ERRORS:
                lost.append(prefix + key)
                continue
            if isinstance(item, h5py.Group):
                walk(item, f"{prefix}{key}/")
            else:
                has_data = True
        if has_data and prefix:
            entries.append(prefix.rstrip("/"))

    walk(h5, "")
    return sorted(entries), lost


def _match_count(datasets: Entry) -> int:
    return int((datasets["matches0"] >= 0).sum())


_ENTRY_COUNTS = {"features": lambda d: len(d["scores"]), "matches": _match_count}


def _check_source(path: Path) -> None:
    if not path.is_file():
        raise StoreError(f"{path}: no such store")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{path}: not an HDF5 file, nothing to repair")


def _read_header(h5: h5py.File, path: Path) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The store's kind, settings and other attributes (what a repaired store takes over; not
    the store's identity: the repaired store is a new store)."""
    try:
        kind = str(h5.attrs[KIND_ATTR])
        settings = json.loads(h5.attrs[SETTINGS_ATTR])
        own = (KIND_ATTR, VERSION_ATTR, SETTINGS_ATTR, STORE_ID_ATTR, REPLACING_ATTR)
        info = {key: str(value) for key, value in h5.attrs.items() if key not in settings and key not in own}
    except KeyError as error:
        raise StoreError(f"{path}: not an sp-extract store (no {KIND_ATTR} attribute)") from error
    except H5_ERRORS as error:
        raise StoreError(f"{path}: its settings are unreadable; nothing can be salvaged") from error
    if kind not in MARKERS:
        raise StoreError(f"{path}: unknown store kind {kind!r}")
    return kind, settings, info


def repair_store(path: Path, out: Path | None = None) -> Summary:
    """Copy every readable, complete entry of ``path`` (and of its parts) into a new store ``out``.

    ``out`` defaults to ``STORE.repaired.h5`` beside it and must not exist; it is written with
    ``StoreWriter``, so it appears atomically. The returned ``Summary`` lists what was lost.
    """
    path = Path(path)
    out = Path(out) if out else path.with_name(f"{path.stem}.repaired{path.suffix or '.h5'}")
    if out.exists() or out.is_symlink():
        raise StoreError(f"{out}: exists; remove it or choose another --out")
    _check_source(path)
    started = time.monotonic()
    failures: dict[str, str] = {}
    counts: dict[str, int] = {}
    with _open_damaged(path) as (h5, real_size):
        kind, settings, info = _read_header(h5, path)
        store_id = h5.attrs.get(STORE_ID_ATTR)
        with StoreWriter(out, kind, settings, info=info) as writer:
            _salvage(h5, real_size, writer, counts, failures)
            for segment in _segments(path, store_id, failures):
                with _open_damaged(segment) as (source, size):
                    _salvage(source, size, writer, counts, failures)
            for part in part_files(path):  # durable results a killed run had not folded in yet
                try:
                    part_settings, _ = read_store_info(part, kind)
                    if part_settings != settings:
                        raise StoreError(f"{part}: made with other settings, skipped")
                    with _open_damaged(part) as (source, size):
                        _salvage(source, size, writer, counts, failures)
                except StoreError as error:
                    failures[str(part)] = str(error)
            if not counts:  # leave no empty store behind
                lost = "; ".join(f"{name}: {reason}" for name, reason in sorted(failures.items())[:3])
                raise StoreError(f"{path}: no complete entry could be read ({lost or 'the store is empty'})")
    unit, label = ("images", "keypoints per image") if kind == "features" else ("pairs", "matches per pair")
    return Summary(
        command="repair",
        output=str(out),
        total=len(counts) + len(failures),
        done=len(counts),
        failed=[{"name": name, "reason": reason} for name, reason in sorted(failures.items())],
        counts=list(counts.values()),
        wall_time_s=time.monotonic() - started,
        exit_code=1 if failures else 0,
        unit=unit,
        count_label=label,
    )


def _salvage(
    h5: h5py.File, real_size: int, writer: StoreWriter, counts: dict[str, int], failures: dict[str, str]
) -> None:
    """Add the complete entries of one file to ``writer``; record the others in ``failures``."""
    entries, lost = _entry_groups(h5)
    for name in lost:
        failures.setdefault(name, "index unreadable; the entries below it are lost")
    for name in entries:
        try:
            datasets, attrs = _read_entry(h5[name], writer.kind, real_size)
        except H5_ERRORS as error:
            if name not in counts:
                failures[name] = describe_error(error)
            continue
        failures.pop(name, None)
        counts[name] = _ENTRY_COUNTS[writer.kind](datasets)
        writer.add(name, datasets, attrs)


@dataclass
class CheckReport(Report):
    """What ``check_store`` found; ``to_dict`` is the ``--json-report`` content."""

    command: str = field(default="check", kw_only=True)
    store: str
    kind: str = ""
    entries: int = 0
    parts: int = 0
    segments: int = 0
    damaged: list[dict[str, str]] = field(default_factory=list)

    def body(self) -> list[str]:
        files = [
            f"{n} {label}" for n, label in ((self.segments, "segments"), (self.parts, "part files")) if n
        ]
        parts = f" (and {', '.join(files)})" if files else ""
        lines = [
            f"check: {self.entries} {self.kind} entries read in {self.store}{parts}, "
            f"{len(self.damaged)} damaged, {self.wall_time_s:.1f} s"
        ]
        lines += [f"damaged: {d['name']}: {d['reason']}" for d in self.damaged]
        if self.damaged:
            lines.append(f"'sp-extract repair {self.store}' copies the intact entries into a new store")
        return lines


def check_store(path: Path) -> CheckReport:
    """Read every dataset of the store ``path`` and of its parts, so that every Fletcher-32
    checksum is verified, and check each entry's shapes; writes nothing. Damaged entries are
    listed in the report (exit code 1), as ``repair`` would lose them."""
    path = Path(path)
    _check_source(path)
    started = time.monotonic()
    report = CheckReport(str(path))
    damaged: dict[str, str] = {}
    with _open_damaged(path) as (h5, real_size):
        report.kind, _, _ = _read_header(h5, path)
        report.entries += _verify(h5, report.kind, real_size, damaged, "")
        store_id = h5.attrs.get(STORE_ID_ATTR)
    for segment in _segments(path, store_id, damaged):
        report.segments += 1
        with _open_damaged(segment) as (h5, size):
            report.entries += _verify(h5, report.kind, size, damaged, f"{segment.name}: ")
    for part in part_files(path):
        report.parts += 1
        try:
            with _open_damaged(part) as (h5, size):
                report.entries += _verify(h5, report.kind, size, damaged, f"{part.name}: ")
        except StoreError as error:
            damaged[str(part)] = str(error)
    report.damaged = [{"name": name, "reason": reason} for name, reason in sorted(damaged.items())]
    report.exit_code = EXIT_SOME_FAILED if damaged else EXIT_OK
    report.wall_time_s = time.monotonic() - started
    return report


def _segments(path: Path, store_id: Any, damaged: dict[str, str]) -> list[Path]:
    """The segments of the store whose main file has ``store_id`` (those of a replaced store are
    not part of it); a segment whose header cannot be read goes into ``damaged``."""
    found = []
    for segment in segment_files(path):
        try:
            with _open_damaged(segment) as (h5, _):
                if h5.attrs.get(STORE_ID_ATTR) == store_id:
                    found.append(segment)
        except StoreError as error:
            damaged[str(segment)] = str(error)
    return found


def _verify(h5: h5py.File, kind: str, real_size: int, damaged: dict[str, str], prefix: str) -> int:
    """Read every entry of one file, the damaged ones into ``damaged``; returns the entry count."""
    entries, lost = _entry_groups(h5)
    for name in lost:
        damaged[prefix + name] = "index unreadable; the entries below it are lost"
    for name in entries:
        try:
            datasets, _ = _read_entry(h5[name], kind, real_size)
            problem = shape_problem(kind, {key: values.shape for key, values in datasets.items()})
            if problem:
                raise ValueError(problem)
        except H5_ERRORS as error:
            damaged[prefix + name] = describe_error(error)
    return len(entries)
