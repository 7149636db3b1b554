"""Where a ``match-pairs`` run on a pairs file can start reading it again.

After each chunk of the pairs file is saved (its pairs durable in the match store), the run
records in ``OUT.resume`` (JSON, written to a temporary file and renamed) how far into the file
every pair is in the store: the byte offset and line after the chunk, and how many pairs come
before it. The next run on the same file, store and shard seeks there instead of reading, checking
and looking up every done pair again (at 10^7 pairs, minutes). The point only moves while every
pair before it is in the store: after a pair that failed (unreadable features) it stays, so the
next run tries that pair again.

It is used only when it certainly describes this file and this store: the pairs file's real path
and identity (inode, size, modification time: an edited, replaced or appended file starts over
from the first line, as does a copy), the shard, and the match store's id (a store replaced with
``--overwrite`` or rebuilt by ``repair`` has another; a store only ever gains entries otherwise).
An unreadable or foreign file is ignored: the run reads the whole file, which is always correct.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from ..pairs.core import FilePosition
from ..store.atomic import atomic_write

FORMAT = 1


def resume_path(out: Path) -> Path:
    """The resume point beside the match store ``out``."""
    return out.with_name(out.name + ".resume")


def _describe(pairs_file: Path, shard: str | None, store_id: str) -> dict[str, Any]:
    info = os.stat(pairs_file)
    return {
        "format": FORMAT,
        "pairs_file": os.path.realpath(pairs_file),
        "pairs_identity": [info.st_ino, info.st_size, info.st_mtime_ns],
        "shard": shard,
        "store_id": store_id,
    }


def load_resume_point(
    out: Path, pairs_file: Path, shard: str | None, store_id: str | None
) -> tuple[FilePosition, int]:
    """Where to start reading ``pairs_file`` and how many pairs come before that place; the
    file's start when no valid point describes this file, shard and store."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved = json.loads(resume_path(out).read_text(encoding="utf-8"))
        if store_id is not None and all(
            saved[k] == v for k, v in _describe(pairs_file, shard, store_id).items()
        ):
            return FilePosition(int(saved["offset"]), int(saved["line"])), int(saved["pairs"])
    return FilePosition(), 0


def save_resume_point(
    out: Path, pairs_file: Path, shard: str | None, store_id: str, position: FilePosition, pairs: int
) -> None:
    """Record that every pair of ``pairs_file`` before ``position`` (``pairs`` of them) is in the
    store. Not fsynced: a point lost in a crash only makes the next run read more."""
    point = {**_describe(pairs_file, shard, store_id), "offset": position.offset, "line": position.line}
    target = resume_path(out)
    temporary = target.with_name(f".{target.name}.tmp")  # one writer holds the store; a killed
    # run's leftover is deleted by the next writer (``StoreWriter._remove_stale_temporaries``)
    # only an optimisation: a full disk or read-only folder must not stop the run
    with contextlib.suppress(OSError), atomic_write(target, temporary, durable=False) as temporary:
        temporary.write_text(json.dumps({**point, "pairs": pairs}), encoding="utf-8")
