"""Pairs generation and pairs-file parsing: counts, duplicates, window edges, malformed files."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from sp_extract.errors import ConfigError
from sp_extract.names import pair_key
from sp_extract.pairs.core import (
    exhaustive_pairs,
    read_name_list,
    read_pair_chunks,
    read_pairs,
    sequential_pairs,
    write_pairs,
)
from sp_extract.store.writer import StoreWriter


def names_of(count: int) -> list[str]:
    return [f"img{i:02d}.jpg" for i in range(count)]


def unordered(pairs: list[tuple[str, str]]) -> set[frozenset[str]]:
    return {frozenset(p) for p in pairs}


def write_feature_store(path: Path, names: list[str]) -> Path:
    """A small features store with the given image names (content irrelevant here)."""
    with StoreWriter(path, "features", {"test": True}) as writer:
        for name in names:
            writer.add(name, {"keypoints": np.zeros((1, 2), np.float32)})
    return path


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7])
def test_exhaustive_is_every_unordered_pair_once(count: int) -> None:
    names = names_of(count)
    pairs = exhaustive_pairs(names)
    assert len(pairs) == count * (count - 1) // 2
    assert len(unordered(pairs)) == len(pairs)
    assert unordered(pairs) == {frozenset(c) for c in itertools.combinations(names, 2)}
    assert all(a != b for a, b in pairs)


@pytest.mark.parametrize("count", [1, 2, 5, 8])
@pytest.mark.parametrize("window", [1, 2, 3, 4, 7, 20])
@pytest.mark.parametrize("loop", [False, True])
def test_sequential_matches_its_definition(count: int, window: int, loop: bool) -> None:
    names = names_of(count)
    pairs = sequential_pairs(names, window, loop)
    expected = set()
    for i, j in itertools.combinations(range(count), 2):
        gap = j - i
        if gap <= window or (loop and count - gap <= window):
            expected.add(frozenset((names[i], names[j])))
    assert len(unordered(pairs)) == len(pairs), "duplicate pair"
    assert unordered(pairs) == expected


def test_sequential_window_edges() -> None:
    names = names_of(6)
    pairs = sequential_pairs(names, 2)
    assert pairs == [
        ("img00.jpg", "img01.jpg"), ("img00.jpg", "img02.jpg"), ("img01.jpg", "img02.jpg"),
        ("img01.jpg", "img03.jpg"), ("img02.jpg", "img03.jpg"), ("img02.jpg", "img04.jpg"),
        ("img03.jpg", "img04.jpg"), ("img03.jpg", "img05.jpg"), ("img04.jpg", "img05.jpg"),
    ]  # fmt: skip
    looped = sequential_pairs(names, 2, loop=True)
    assert looped[len(pairs) :] == [
        ("img04.jpg", "img00.jpg"),
        ("img05.jpg", "img00.jpg"),
        ("img05.jpg", "img01.jpg"),
    ]
    assert len(looped) == 6 * 2
    with pytest.raises(ConfigError, match="--window"):
        sequential_pairs(names, 0)


def test_pair_key_is_hloc_names_to_pair() -> None:
    assert pair_key("a/b/c.jpg", "d.png") == "a-b-c.jpg/d.png"
    assert pair_key("x.jpg", "y.jpg") == "x.jpg/y.jpg"


def test_read_pairs_hygiene(tmp_path: Path) -> None:
    known = {"a.jpg", "b.jpg", "c.jpg", "sub/d.jpg"}
    path = tmp_path / "pairs.txt"
    path.write_text(
        "# header\n\na.jpg b.jpg\n  b.jpg a.jpg  \nb.jpg\tsub/d.jpg\n# a c\nc.jpg a.jpg\na.jpg b.jpg\n"
    )
    assert read_pairs(path, known) == [("a.jpg", "b.jpg"), ("b.jpg", "sub/d.jpg"), ("c.jpg", "a.jpg")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.jpg b.jpg\nc.jpg\n", r"pairs.txt:2: expected 'name0 name1', got 1 field"),
        ("a.jpg b.jpg c.jpg\n", r"pairs.txt:1: expected 'name0 name1', got 3 field"),
        ("# c\n\na.jpg b.jpg\na.jpg a.jpg\n", r"pairs.txt:4: an image paired with itself \('a.jpg'\)"),
        ("a.jpg b.jpg\na.jpg nope.jpg\n", r"pairs.txt:2: 'nope.jpg' is not in the feature store"),
        ("a.jpg x\nb.jpg y\n", r"pairs.txt:1: 'x' .*\(and 1 more bad line\(s\)\)"),
        (
            "sub/d.jpg a.jpg\nsub-d.jpg a.jpg\n",
            r"pairs.txt:2: .* same store group 'sub-d.jpg/a.jpg' as line 1",
        ),
        ("# only comments\n\n", r"pairs.txt: no pairs"),
    ],
)
def test_read_pairs_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_pairs(path, {"a.jpg", "b.jpg", "c.jpg", "sub/d.jpg", "sub-d.jpg"})


def test_pair_chunks_start_small_and_double(tmp_path: Path) -> None:
    """The first chunk is FIRST_CHUNK lines (matching starts at once), each next one twice the
    last up to the largest; every line is read once, in order."""
    names = [f"i{n}.jpg" for n in range(40)]
    path = tmp_path / "pairs.txt"
    path.write_text("".join(f"{a} {b}\n" for a, b in zip(names, names[1:])))  # 39 pairs
    expected = list(zip(names, names[1:]))
    chunks = list(read_pair_chunks(path, set(names), chunk=8))
    assert [len(c) for c in chunks] == [8, 8, 8, 8, 7]
    assert [p for c in chunks for p in c] == expected
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sp_extract.pairs.core.FIRST_CHUNK", 2)
        chunks = list(read_pair_chunks(path, set(names), chunk=8))
    assert [len(c) for c in chunks] == [2, 4, 8, 8, 8, 8, 1]
    assert [p for c in chunks for p in c] == expected


def test_read_name_list(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("c.jpg\n# x\n\na.jpg\nc.jpg\n")
    assert read_name_list(path, {"a.jpg", "b.jpg", "c.jpg"}) == ["c.jpg", "a.jpg"]
    path.write_text("a.jpg\nzz.jpg\n")
    with pytest.raises(ConfigError, match=r"list.txt:2: 'zz.jpg' is not one of the 3 known images"):
        read_name_list(path, {"a.jpg", "b.jpg", "c.jpg"})


def read_pair_lines(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in path.read_text().splitlines()]


def test_cli_pairs_from_store_folder_and_list(tmp_path: Path, small_images: Path) -> None:
    names = ["a.png", "b.jpg", "sub/c.png", "sub/e.png", "z.png"]
    feats = write_feature_store(tmp_path / "feats.h5", names)
    out = tmp_path / "pairs.txt"

    result = run_cli("pairs", "exhaustive", "--features", str(feats), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "10 pairs written" in result.stderr
    assert unordered(read_pair_lines(out)) == {frozenset(c) for c in itertools.combinations(names, 2)}

    result = run_cli(
        "pairs", "sequential", "--window", "1", "--loop", "--features", str(feats), "-o", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert read_pair_lines(out) == [*zip(names, names[1:]), ("z.png", "a.png")]

    result = run_cli("pairs", "exhaustive", "--images", str(small_images), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert read_pair_lines(out) == [("a.png", "b.jpg"), ("a.png", "sub/c.png"), ("b.jpg", "sub/c.png")]

    listed = tmp_path / "list.txt"
    listed.write_text("z.png\nsub/c.png\na.png\n")
    result = run_cli("pairs", "from-list", str(listed), "--features", str(feats), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert read_pair_lines(out) == [("z.png", "sub/c.png"), ("z.png", "a.png"), ("sub/c.png", "a.png")]


def test_cli_pairs_errors(tmp_path: Path) -> None:
    out = tmp_path / "pairs.txt"
    result = run_cli("pairs", "exhaustive", "--features", str(tmp_path / "none.h5"), "-o", str(out))
    assert result.returncode == 2
    assert "none.h5: no such feature store" in result.stderr
    feats = write_feature_store(tmp_path / "feats.h5", ["a.png", "b.png"])
    result = run_cli("pairs", "sequential", "--window", "0", "--features", str(feats), "-o", str(out))
    assert result.returncode == 2
    assert "--window must be >= 1" in result.stderr
    assert not out.exists()


def test_write_pairs_refuses_names_with_white_space(tmp_path: Path) -> None:
    out = tmp_path / "pairs.txt"
    write_pairs([("a.jpg", "sub/b.jpg")], out)
    assert out.read_text() == "a.jpg sub/b.jpg\n"
    with pytest.raises(ConfigError, match="pairs.txt: image name 'my photo.jpg' contains white space"):
        write_pairs([("a.jpg", "my photo.jpg")], out)
    assert out.read_text() == "a.jpg sub/b.jpg\n"
