"""``sp-extract info``: what a feature or match store holds, read from attributes and shapes.

No keypoint or descriptor is read: entry counts come from dataset shapes, so a store of 10^5
images is described in seconds. A match store's counts need its ``matches0`` vectors (one
small integer vector a pair; unmatched keypoints are -1), the only data read. Damage visible
without reading data is reported (a file shorter than its superblock records, entries with
missing datasets or inconsistent shapes, unreadable object headers); checksums are verified
only by ``sp-extract repair``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from ..report import Report, count_statistics
from ..store.catalog import part_files, segment_files
from ..store.failures import H5_ERRORS
from ..store.format import KIND_ATTR, REQUIRED, SETTINGS_ATTR, STORE_ID_ATTR, VERSION_ATTR
from ..store.format import MARKERS as _MARKERS
from ..store.repair import stored_end_of_file

CHECK_HINT = "verify every checksum with 'sp-extract repair --check {path}'"
HISTOGRAM_BINS = 10


@dataclass
class StoreInfo(Report):
    """A store's description; ``to_dict`` is the ``--json`` output."""

    command: str = field(default="info", kw_only=True)
    path: str
    kind: str
    version: str
    attributes: dict[str, Any]  # weights, images folder, backend, pairs file ...
    settings: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)  # entry -> keypoints (or matches)
    descriptor_dtype: str | None = None
    parts_pending: int = 0
    segments: int = 0  # segment files of the store (see docs/store-format.md), read with it
    damaged: dict[str, str] = field(default_factory=dict)  # entry (or the file) -> reason
    size_bytes: int = 0

    @property
    def unit(self) -> str:
        return "keypoints" if self.kind == "features" else "matches"

    def statistics(self) -> dict[str, float]:
        empty = {"min": 0, "median": 0.0, "mean": 0.0, "max": 0}
        return count_statistics(list(self.counts.values())) or empty

    def histogram(self) -> list[tuple[int, int, int]]:
        """(low, high, entries) bins of the counts per entry, at most ``HISTOGRAM_BINS``."""
        values = np.fromiter(self.counts.values(), np.int64, len(self.counts))
        if not len(values):
            return []
        low, high = int(values.min()), int(values.max())
        bins = min(HISTOGRAM_BINS, high - low + 1)
        frequency, edges = np.histogram(values, bins=bins, range=(low, high + 1))
        return [
            (int(np.ceil(edges[i])), int(np.ceil(edges[i + 1])) - 1, int(f)) for i, f in enumerate(frequency)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.shared(),
            "path": self.path,
            "kind": self.kind,
            "version": self.version,
            "attributes": self.attributes,
            "settings": self.settings,
            "entries": len(self.counts),
            f"{self.unit}_per_entry": self.statistics(),
            "histogram": [{"low": lo, "high": hi, "entries": n} for lo, hi, n in self.histogram()],
            "descriptor_dtype": self.descriptor_dtype,
            "parts_pending": self.parts_pending,
            "segments": self.segments,
            "damaged": self.damaged,
            "size_bytes": self.size_bytes,
        }

    def body(self, width: int = 40) -> list[str]:
        """The human-readable description, histogram included."""
        stats = self.statistics()
        lines = [
            f"{self.path}: sp-extract {self.kind} store, written by sp-extract {self.version}, "
            f"{self.size_bytes / 2**20:.1f} MiB",
            *(f"  {key}: {value}" for key, value in sorted(self.attributes.items())),
            "settings:",
            *(f"  {key}: {json.dumps(value)}" for key, value in sorted(self.settings.items())),
            f"entries: {len(self.counts)}",
            f"{self.unit} per entry: min {stats['min']}, median {stats['median']}, mean {stats['mean']}, "
            f"max {stats['max']}",
        ]
        histogram = self.histogram()
        most = max((n for _, _, n in histogram), default=0)
        for low, high, count in histogram:
            bar = "#" * (round(width * count / most) if most else 0)
            span = f"{low:>7}" + (f" - {high:<7}" if high > low else " " * 10)
            lines.append(f"  {span} {bar:<{width}} {count}")
        if self.descriptor_dtype:
            lines.append(f"descriptors: {self.descriptor_dtype}")
        pending = " (folded in by the next run that writes the store)" if self.parts_pending else ""
        lines.append(f"parts pending: {self.parts_pending}{pending}")
        if self.segments:
            lines.append(
                f"segments: {self.segments} (part of the store; 'sp-extract compact {self.path}' folds them "
                "into the main file, for hloc)"
            )
        lines.append(f"damaged: {len(self.damaged)}")
        lines += [f"  {name}: {reason}" for name, reason in sorted(self.damaged.items())]
        if self.damaged:
            lines.append(f"  salvage the intact entries with 'sp-extract repair {self.path}'")
        else:
            lines.append(f"  (structure only; {CHECK_HINT.format(path=self.path)})")
        return lines


def _entry_datasets(h5: h5py.File, kind: str, damaged: dict[str, str]) -> dict[str, set[str]]:
    """Entry name -> names of its required datasets present, from one walk of the link index
    (HDF5's own iteration: no object is opened). A walk the damaged index breaks off is noted
    in ``damaged``; the entries seen until then are kept."""
    required = set(REQUIRED[kind])
    entries: dict[str, set[str]] = {}

    def visit(link: bytes) -> None:
        parent, _, last = link.decode(errors="surrogateescape").rpartition("/")
        if last in required and parent:
            entries.setdefault(parent, set()).add(last)

    try:
        h5.id.links.visit(visit)
    except H5_ERRORS as error:
        damaged["(index)"] = (
            f"the group index is unreadable ({_first_line(error)}); entries after it are lost"
        )
    return entries


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _entry_count(h5: h5py.File, name: str, info: StoreInfo) -> int:
    """Keypoints (from shapes) or matches (from ``matches0``) of one complete entry; ``ValueError``
    when the shapes disagree. Low-level opens: a third of the cost of ``h5py.Dataset``."""

    def open_dataset(key: str) -> h5py.h5d.DatasetID:
        return h5py.h5d.open(h5.id, f"{name}/{key}".encode(errors="surrogateescape"))

    if info.kind == "features":
        keypoints, descriptors = open_dataset("keypoints"), open_dataset("descriptors")
        shapes = keypoints.shape, descriptors.shape
        if len(shapes[0]) != 2 or shapes[0][1] != 2 or len(shapes[1]) != 2 or shapes[1][1] != shapes[0][0]:
            raise ValueError(f"inconsistent shapes: keypoints {shapes[0]}, descriptors {shapes[1]}")
        if info.descriptor_dtype is None:
            info.descriptor_dtype = str(descriptors.dtype)
        return shapes[0][0]
    matches = h5[f"{name}/matches0"][()]  # the one read of data
    if matches.ndim != 1:
        raise ValueError(f"inconsistent shape: matches0 {matches.shape}")
    return int((matches >= 0).sum())


def _describe_entries(h5: h5py.File, info: StoreInfo) -> None:
    """Fill ``info.counts`` and ``info.damaged``."""
    for name, present in sorted(_entry_datasets(h5, info.kind, info.damaged).items()):
        missing = [key for key in REQUIRED[info.kind] if key not in present]
        if missing:
            info.damaged[name] = f"incomplete, no {', '.join(missing)}"
            continue
        try:
            info.counts[name] = _entry_count(h5, name, info)
        except H5_ERRORS as error:
            info.damaged[name] = f"unreadable ({_first_line(error)})"


def store_info(path: Path) -> StoreInfo:
    """Describe the store at ``path`` (a ``StoreError`` if it is not an sp-extract store)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such store")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{path}: not an HDF5 file")
    started = time.monotonic()
    size = path.stat().st_size
    recorded = stored_end_of_file(path)
    try:
        h5 = h5py.File(path, "r", locking=False)  # stores are never modified in place
    except H5_ERRORS as error:
        if recorded is not None and recorded > size:
            raise StoreError(
                f"{path}: cut short at {size} of {recorded} bytes; salvage it with 'sp-extract repair {path}'"
            ) from error
        raise StoreError(
            f"{path}: unreadable ({error}); salvage it with 'sp-extract repair {path}'"
        ) from error
    with h5:
        try:
            kind = str(h5.attrs[KIND_ATTR])
            settings = json.loads(h5.attrs[SETTINGS_ATTR])
            version = str(h5.attrs.get(VERSION_ATTR, "unknown"))
            attributes = {
                key: _plain(value)
                for key, value in h5.attrs.items()
                if key not in settings and key not in (KIND_ATTR, VERSION_ATTR, SETTINGS_ATTR)
            }
        except KeyError as error:
            raise StoreError(
                f"{path}: an HDF5 file not written by sp-extract (no {error.args[0]})"
            ) from error
        except H5_ERRORS as error:
            raise StoreError(
                f"{path}: its settings are unreadable; try 'sp-extract repair {path}'"
            ) from error
        if kind not in _MARKERS:
            raise StoreError(f"{path}: unknown store kind {kind!r}")
        info = StoreInfo(str(path), kind, version, attributes, settings, size_bytes=size)
        if recorded is not None and recorded > size:
            info.damaged["(file)"] = f"cut short at {size} of {recorded} bytes"
        _describe_entries(h5, info)
        store_id = h5.attrs.get(STORE_ID_ATTR)
    for segment in segment_files(path):  # those of a store an --overwrite replaced are not its
        try:
            with h5py.File(segment, "r", locking=False) as h5:
                if h5.attrs.get(STORE_ID_ATTR) == store_id:
                    info.segments += 1
                    info.size_bytes += segment.stat().st_size
                    _describe_entries(h5, info)
        except H5_ERRORS as error:
            info.damaged[f"(segment {segment.name})"] = f"unreadable ({_first_line(error)})"
    info.parts_pending = len(part_files(path))
    info.wall_time_s = time.monotonic() - started
    return info


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a JSON-friendly value."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def entry_list(path: Path) -> list[str]:
    """The entry names of a store (image names, or pair keys), sorted."""
    return sorted(store_info(path).counts)
