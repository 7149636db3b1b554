"""Image pairs: generating pairs files and reading them back.

A pairs file is the format shared by hloc and COLMAP's custom matching: one pair ``name0 name1``
a line, names as in the feature store. Generators: every unordered pair once (exhaustive), each
image with its next K in name order (sequential, optionally closing the loop), and exhaustive
pairs of a listed subset. ``read_pairs`` validates a whole file; ``read_pair_chunks`` streams it in
validated chunks (``match-pairs``). Retrieval and spatial pairs live in their own modules.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..extraction.discover import discover_images, unpairable
from ..names import pair_key
from ..store.atomic import atomic_write
from ..store.catalog import read_store_info
from ..store.index import NameIndex

Pair = tuple[str, str]


def source_names(features: Path | None, images: Path | None) -> list[str]:
    """Image names of a feature store, or of an image folder (as extraction names them), sorted."""
    if images is not None:
        return discover_images(images)
    if features is None or not features.is_file():
        raise ConfigError(f"{features}: no such feature store; pass --features FILE or --images DIR")
    _, names = read_store_info(features, "features", "--features")
    return names


def exhaustive_pairs(names: list[str]) -> list[Pair]:
    """Every unordered pair of distinct names once, ``(names[i], names[j])`` with ``i < j``."""
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]


def sequential_pairs(names: list[str], window: int, loop: bool = False) -> list[Pair]:
    """Each name with its next ``window`` names; ``loop`` also pairs the last ones with the first."""
    if window < 1:
        raise ConfigError(f"--window must be >= 1, got {window}")
    count = len(names)
    pairs: list[Pair] = []
    seen: set[frozenset[int]] = set()
    for i in range(count):
        for step in range(1, window + 1):
            j = i + step
            if j >= count:
                if not loop:
                    break
                j %= count
            if j == i or frozenset((i, j)) in seen:
                continue
            seen.add(frozenset((i, j)))
            pairs.append((names[i], names[j]))
    return pairs


def merge_pairs(*lists: list[Pair]) -> list[Pair]:
    """The pairs of all lists in order, each unordered pair once (the first kept)."""
    seen: set[frozenset[str]] = set()
    merged: list[Pair] = []
    for pair in itertools.chain(*lists):
        if frozenset(pair) not in seen:
            seen.add(frozenset(pair))
            merged.append(pair)
    return merged


@dataclass(frozen=True)
class FilePosition:
    """A place in a text file: its byte offset and the number of lines before it."""

    offset: int = 0
    line: int = 0


class PairChunk(list[Pair]):
    """A chunk of checked pairs (``read_pair_chunks``) and where in the file it ends."""

    def __init__(self, pairs: Iterable[Pair] = (), end: FilePosition = FilePosition()) -> None:
        super().__init__(pairs)
        self.end = end


def _positioned_lines(path: Path, what: str, start: FilePosition) -> Iterator[tuple[int, str, int]]:
    """From ``start`` on, the lines of a text file, numbered, stripped, without blank lines and
    ``#`` comments, each with the byte offset after it; read as they come (a file of millions
    of lines is never held whole)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start.offset)
            offset, number = start.offset, start.line
            for raw in handle:
                offset, number = offset + len(raw), number + 1
                text = raw.decode("utf-8").strip()
                if text and not text.startswith("#"):
                    yield number, text, offset
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read {what} ({error})") from error


def _content_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """``_positioned_lines`` of the whole file, without the offsets."""
    return ((number, text) for number, text, _ in _positioned_lines(path, what, FilePosition()))


def read_name_list(path: Path, known: Collection[str]) -> list[str]:
    """Names listed in ``path`` (one a line, file order, duplicates dropped), each in ``known``."""
    names: dict[str, None] = {}
    for number, text in _content_lines(path, "image list"):
        if text not in known:
            raise ConfigError(f"{path}:{number}: '{text}' is not one of the {len(known)} known images")
        names[text] = None
    if not names:
        raise ConfigError(f"{path}: lists no images")
    return list(names)


PAIRS_CHUNK = 1 << 16  # the most pairs validated and handed on at a time by ``read_pair_chunks``
FIRST_CHUNK = 1 << 10  # the first chunk's lines (later chunks double up to PAIRS_CHUNK)


def read_pairs(path: Path, known: Collection[str]) -> list[Pair]:
    """The distinct pairs of a pairs file, checked against the ``known`` image names.

    ``a b`` and ``b a`` count once (the first kept). Blank lines and ``#`` comments are skipped.
    A malformed line, a self pair, a name not in ``known`` or two pairs whose store groups
    collide (hloc turns ``/`` into ``-``) raise ``ConfigError`` naming the line; the message also
    counts the further bad lines, so one run reports the scale of the problem.
    """
    pairs = _checked_pairs(path, _content_lines(path, "pairs file"), known)
    if not pairs:
        raise ConfigError(f"{path}: no pairs in the file")
    return pairs


def read_pair_chunks(
    path: Path, known: Collection[str], chunk: int | None = None, start: FilePosition = FilePosition()
) -> Iterator[PairChunk]:
    """The pairs of a pairs file from ``start`` on, in chunks of at most ``chunk`` lines, each
    chunk checked as ``read_pairs`` checks a file (its bad lines counted, its repeated pairs
    dropped) and knowing where it ends: memory does not grow with the file. The first chunk is
    small (``FIRST_CHUNK`` lines, a few milliseconds to check) and each next one twice the
    last, so matching starts at once whatever the file's size. A pair repeated in a later
    chunk is left to the caller (``match-pairs`` finds it already in the store)."""
    lines = _positioned_lines(path, "pairs file", start)
    largest = chunk or PAIRS_CHUNK
    size = min(FIRST_CHUNK, largest)
    found = False
    while block := list(itertools.islice(lines, size)):
        checked = _checked_pairs(path, ((number, text) for number, text, _ in block), known)
        pairs = PairChunk(checked, FilePosition(block[-1][2], block[-1][0]))
        found = found or bool(pairs)
        yield pairs
        size = min(2 * size, largest)
    if not found and start == FilePosition():
        raise ConfigError(f"{path}: no pairs in the file")


def _checked_pairs(path: Path, lines: Iterable[tuple[int, str]], known: Collection[str]) -> list[Pair]:
    pairs: list[Pair] = []
    keys: dict[str, tuple[int, Pair]] = {}  # store group (either order) -> line, pair
    problems: list[str] = []
    for number, text in lines:
        fields = text.split()
        if len(fields) != 2:
            problems.append(f"{path}:{number}: expected 'name0 name1', got {len(fields)} field(s)")
            continue
        a, b = fields
        missing = [n for n in (a, b) if n not in known]
        if missing:
            problems.append(f"{path}:{number}: '{missing[0]}' is not in the feature store")
            continue
        if a == b:
            problems.append(f"{path}:{number}: an image paired with itself ('{a}')")
            continue
        key = pair_key(a, b)
        if key in keys:
            first_line, first = keys[key]
            if {a, b} != set(first):
                problems.append(
                    f"{path}:{number}: pair '{a} {b}' has the same store group '{key}' as line "
                    f"{first_line} '{first[0]} {first[1]}' (names differing only in '/' vs '-')"
                )
            continue
        keys[key] = keys[pair_key(b, a)] = (number, (a, b))
        pairs.append((a, b))
    if problems:
        more = f" (and {len(problems) - 1} more bad line(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    return pairs


def stored_pairs(index: NameIndex, pairs: list[Pair]) -> np.ndarray:
    """Which ``pairs`` a match store's ``index`` holds, in either order (the reversed order is
    asked only for a pair not found as written)."""
    done = index.contains([pair_key(a, b) for a, b in pairs])
    rest = np.flatnonzero(~done)
    done[rest] = index.contains([pair_key(pairs[i][1], pairs[i][0]) for i in rest])
    return done


def write_pairs(pairs: list[Pair], path: Path) -> None:
    """Write a pairs file atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    spaced = unpairable({n for pair in pairs for n in pair})
    if spaced:
        raise ConfigError(
            f"{path}: image name '{spaced[0]}' contains white space, which pairs files cannot hold"
        )
    try:  # also when interrupted: no half-written temporary left behind
        with atomic_write(path, durable=False) as temporary:
            temporary.write_text("".join(f"{a} {b}\n" for a, b in pairs), encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot write pairs ({error.strerror or error})") from error
