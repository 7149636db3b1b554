"""Stage 1, discover: find the images to extract and name them as COLMAP does.

An image's name is its path relative to the images folder, with forward slashes. Folders are
walked recursively, symbolic links followed, each real folder visited once (no link loops).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from ..errors import ConfigError
from .config import IMAGE_EXTENSIONS


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


def discover_images(root: Path) -> list[str]:
    """All image names below ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory")
    names: list[str] = []
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
            elif is_image_name(entry.name):
                names.append(prefix + entry.name)

    walk(root, "")
    return sorted(names)


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
