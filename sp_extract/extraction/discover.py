"""Stage 1, discover: find the images to extract and name them as COLMAP does.

An image's name is its path relative to the images folder, with forward slashes. Folders are
walked recursively, symbolic links followed, each real folder visited once (no link loops).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .config import IMAGE_EXTENSIONS, OTHER_IMAGE_EXTENSIONS, RAW_EXTENSIONS


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the supported image extensions, in any case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_utf8(name: str) -> bool:
    """Whether a file-system name is valid UTF-8 (undecodable bytes arrive as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """A name for messages: undecodable bytes written as ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unpairable(names: Collection[str]) -> list[str]:
    """The names a pairs file cannot hold: with white space, which separates its two names (as
    hloc and COLMAP read it)."""
    return [name for name in names if len(name.split()) != 1]


@dataclass
class Scan:
    """What a folder (or an image list) holds: the images to extract, the image files in formats
    that are not read (camera RAW, GIF, ...), and how many other files, by extension."""

    names: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    other_files: dict[str, int] = field(default_factory=dict)

    def add(self, name: str) -> None:
        lower = name.lower()
        if is_image_name(name):
            self.names.append(name)
        elif lower.endswith(RAW_EXTENSIONS + OTHER_IMAGE_EXTENSIONS):
            self.unsupported.append(name)
        else:
            extension = posixpath.splitext(lower)[1]
            self.other_files[extension] = self.other_files.get(extension, 0) + 1


def scan_folder(root: Path) -> Scan:
    """Every file below ``root``, sorted by name into a ``Scan``."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory")
    scan = Scan()
    seen_dirs: set[tuple[int, int]] = set()

    def walk(directory: Path, prefix: str) -> None:
        try:
            stat = directory.stat()
        except OSError:
            return
        key = (stat.st_dev, stat.st_ino)
        if key in seen_dirs:
            return
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                walk(Path(entry.path), f"{prefix}{entry.name}/")
            else:
                scan.add(prefix + entry.name)

    walk(root, "")
    scan.names.sort()
    scan.unsupported.sort()
    return scan


def discover_images(root: Path) -> list[str]:
    """All image names below ``root``, sorted."""
    return scan_folder(root).names


def find_images(root: Path, image_list: Path | None = None) -> Scan:
    """The images of ``image_list`` (see ``read_image_list``) if given, else of the folder
    ``root``; files of unsupported formats are set apart in both cases."""
    if image_list is None:
        return scan_folder(root)
    scan = Scan()
    for name in read_image_list(image_list, root):
        if name.lower().endswith(RAW_EXTENSIONS + OTHER_IMAGE_EXTENSIONS):
            scan.unsupported.append(name)
        else:
            scan.names.append(name)
    return scan


def read_image_list(list_file: Path, root: Path) -> list[str]:
    """Names from an image list (one relative path a line; blank lines and ``#`` skipped)."""
    try:
        lines = Path(list_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{list_file}: cannot read image list ({error})") from error
    names: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        name = name.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/"):
            raise ConfigError(f"{list_file}:{number}: '{name}' is not a path relative to {root}")
        name = posixpath.normpath(name)  # "./a.jpg", "sub//b.jpg": the name COLMAP records
        path = Path(root) / name
        if not path.exists():
            raise ConfigError(f"{list_file}:{number}: '{name}' not found in {root}")
        if path.is_dir():
            raise ConfigError(f"{list_file}:{number}: '{name}' is a folder in {root}, not an image")
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names
