"""The photos behind a growing model: a fingerprint per image, to find the changed and the deleted.

``WORK/photos.json`` maps each image name to the size, modification time and SHA-1 of the file
its features were extracted from. A later run compares the folder with it: a file of the same
size and modification time is taken as unchanged without being read; any other is hashed again,
and a file whose content differs is *changed* (its features, matches and place in the model
describe the old photo). Only new photos and touched ones are read in full, so the check costs
what the night's new photos cost, not the collection. Written through a temporary file and a
rename.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, StoreError
from ..store.atomic import atomic_write

MANIFEST = "photos.json"
MANIFEST_FORMAT = 1
HASH_BLOCK = 1 << 20


def file_sha1(path: Path) -> str:
    """The SHA-1 of a file's bytes."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> dict[str, int | str]:
    """Size, modification time (ns) and SHA-1 of a file."""
    status = path.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "sha1": file_sha1(path)}


@dataclass
class PhotoCheck:
    """The folder against the manifest: names of photos changed, deleted and never seen."""

    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)


class PhotoManifest:
    """Fingerprints of the photos of a work folder (module doc)."""

    def __init__(self, work: Path) -> None:
        self.path = Path(work) / MANIFEST
        self.entries: dict[str, dict[str, int | str]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") != MANIFEST_FORMAT:
                    raise ValueError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
                self.entries = dict(data["photos"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise StoreError(
                    f"{self.path}: unreadable photo fingerprints ({error}); run with --rebuild"
                ) from error

    def check(self, images: Path, names: list[str]) -> PhotoCheck:
        """Compare the photos ``names`` of ``images`` with their fingerprints. A touched file
        whose content is the same gets its new modification time recorded (``save``)."""
        result = PhotoCheck()
        present = set(names)
        result.deleted = sorted(name for name in self.entries if name not in present)
        for name in names:
            entry = self.entries.get(name)
            if entry is None:
                result.new.append(name)
                continue
            path = images / name
            try:
                status = path.stat()
                if (status.st_size, status.st_mtime_ns) == (entry["size"], entry["mtime_ns"]):
                    continue
                same = status.st_size == entry["size"] and file_sha1(path) == entry["sha1"]
            except OSError as error:
                raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from error
            if same:
                entry["mtime_ns"] = status.st_mtime_ns
            else:
                result.changed.append(name)
        return result

    def record(self, images: Path, names: list[str]) -> None:
        """Fingerprint the photos ``names`` of ``images`` (read in full)."""
        for name in names:
            path = images / name
            try:
                self.entries[name] = fingerprint(path)
            except OSError as error:
                raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from error

    def keep_only(self, names: set[str]) -> None:
        """Forget the photos not in ``names`` (their features were never stored)."""
        self.entries = {name: entry for name, entry in self.entries.items() if name in names}

    def save(self) -> None:
        data = {"format": MANIFEST_FORMAT, "photos": dict(sorted(self.entries.items()))}
        try:
            with atomic_write(self.path, durable=False) as temporary:
                temporary.write_text(json.dumps(data, indent=0) + "\n", encoding="utf-8")
        except OSError as error:
            raise StoreError(f"{self.path}: cannot write ({error.strerror or error})") from error
