"""Stores that grow by what is added (issue 11): segments, name indexes, ``compact``.

Stores are written with ``SP_EXTRACT_FOLD_BELOW=0`` so that small stores take the path of large
ones (segments instead of a copy of the main file). Entries are deterministic functions of their
name, so every entry read back is compared with an independent recomputation; files are read
with plain h5py (``reliability.read_entries``), not with the code under test. The kill test
SIGKILLs real writer processes in each new state: a segment being written, a tier merge, a fold
of segments into the main file and ``sp-extract compact``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli
from support.hloc_reader import list_h5_names
from support.reliability import assert_entries_equal, read_entries
from support.segment_writer import SETTINGS, entry, write_entries

from sp_extract.errors import StoreError
from sp_extract.inspect.info import store_info
from sp_extract.matching.run import match_pairs
from sp_extract.store import catalog as store_catalog
from sp_extract.store import writer as store_writer
from sp_extract.store.catalog import read_store
from sp_extract.store.index import NameIndex, load_index, name_hashes
from sp_extract.store.reader import open_store
from sp_extract.store.repair import check_store
from sp_extract.store.writer import StoreWriter

TESTS = Path(__file__).parent


def expected(names: list[str]) -> dict:
    return {name: {key: (value, {}) for key, value in entry(name).items()} for name in names}


def store_files(store: Path) -> list[Path]:
    """Main file, segments and parts, listed plainly."""
    found = [store] if store.exists() else []
    for folder, pattern in ((".segments", "seg-*.h5"), (".parts", "part-*.h5")):
        found += sorted(store.with_name(store.name + folder).glob(pattern))
    return found


def all_entries(store: Path) -> dict:
    entries: dict = {}
    for file in store_files(store):
        entries.update(read_entries(file))
    return entries


def segments(store: Path) -> list[Path]:
    return sorted(store.with_name(store.name + ".segments").glob("seg-*.h5"))


@pytest.fixture(autouse=True)
def small_stores_take_the_large_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_writer, "FOLD_BELOW", 0)
    monkeypatch.setenv("SP_EXTRACT_FOLD_BELOW", "0")


def test_runs_add_segments_merge_fold_and_compact(tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    first = [f"a/im{i:02d}.jpg" for i in range(48)]
    write_entries(store, first)
    main_bytes = store.read_bytes()
    added: list[str] = []
    counts = []
    for run in range(5):  # one entry each: 5/48 < 1/8 of the main file in all
        added.append(f"b/new{run}.jpg")
        notes = write_entries(store, added)
        counts.append(len(segments(store)))
        assert notes == [  # the user learns that hloc needs a compaction
            f"{store} holds {counts[-1]} segment file(s) beside it; sp-extract reads them, hloc after "
            f"'sp-extract compact {store}'"
        ]
    assert store.read_bytes() == main_bytes  # the main file is not rewritten by small runs
    assert counts == [1, 2, 3, 1, 2]  # the 4th segment of one size class merges them
    names = sorted(first + added)

    with open_store(store) as reader:  # every command reads main file and segments as one
        assert reader.names() == names
        assert "b/new4.jpg" in reader and "b/new9.jpg" not in reader
        np.testing.assert_array_equal(reader["b/new3.jpg/keypoints"][()], entry("b/new3.jpg")["keypoints"])
    assert read_store(store, "features").names == names
    assert_entries_equal(all_entries(store), expected(names))
    assert sorted(list_h5_names(store)) == sorted(first)  # hloc sees the main file only ...
    info = store_info(store)
    assert (len(info.counts), info.segments, info.parts_pending) == (53, 2, 0)
    assert "segments: 2" in "\n".join(info.lines())

    result = run_cli("compact", str(store))
    assert result.returncode == 0, result.stderr
    assert sorted(list_h5_names(store)) == names  # ... until compacted
    assert_entries_equal(read_entries(store), expected(names))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.h5", "feats.h5.index"]
    again = run_cli("compact", str(store))
    assert again.returncode == 0 and "nothing to fold" in again.stderr
    (tmp_path / "notes.h5").write_text("not a store\n")
    refused = run_cli("compact", str(tmp_path / "notes.h5"))
    assert refused.returncode == 2 and "not an HDF5 file, nothing to compact" in refused.stderr
    (tmp_path / "notes.h5").unlink()

    more = [f"c/im{i:02d}.jpg" for i in range(7)]  # 7/53 of the store: past 1/8, folded at once
    assert write_entries(store, names + more) == []
    assert not segments(store) and sorted(list_h5_names(store)) == sorted(names + more)


def test_resume_uses_the_index_and_rebuilds_a_stale_one(tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    names = [f"im{i:02d}.jpg" for i in range(17)]
    write_entries(store, names[:16])
    write_entries(store, names)
    stored = np.sort(name_hashes(names[:16]))
    assert np.array_equal(load_index(store), stored)
    assert np.array_equal(load_index(segments(store)[0]), name_hashes(names[16:]))
    copy = tmp_path / "copy.h5"
    copy.write_bytes(store.read_bytes())
    os.replace(copy, store)  # same bytes, another file: its index no longer describes it
    assert load_index(store) is None
    with StoreWriter(store, "features", SETTINGS) as writer:
        assert [name in writer.done for name in [*names, "im17.jpg"]] == [True] * 17 + [False]
    assert np.array_equal(load_index(store), stored)  # walked once, indexed again


def test_empty_folders_a_kill_left_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """A run killed after making the parts (or segments) folder but before its first file is
    renamed in leaves the folder empty, or holding a temporary; the next run that opens the store
    removes both, even when it has nothing to add (seen once after a SIGKILLed merge)."""
    store = tmp_path / "feats.h5"
    write_entries(store, ["a.jpg"])
    parts, segments_dir = store.with_name("feats.h5.parts"), store.with_name("feats.h5.segments")
    parts.mkdir()
    (parts / f"part-{time.time_ns():020d}-1-000001.h5.tmp").write_bytes(b"half")
    segments_dir.mkdir()
    write_entries(store, ["a.jpg"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.h5", "feats.h5.index"]
    assert_entries_equal(read_entries(store), expected(["a.jpg"]))


def test_names_are_listed_from_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file with a valid index is not walked entry by entry: its names are found by going
    down the groups to the indexed names (nested image folders, pair keys). When that walk
    cannot find them all (a folder named like an image) or the index is stale, the file is
    walked and checked as before; the names are the same either way."""
    features, matches = tmp_path / "feats.h5", tmp_path / "matches.h5"
    images = ["a.jpg", "sub/b.png", "sub/deeper/c.png", "z.png"]
    write_entries(features, images)
    with StoreWriter(matches, "matches", SETTINGS) as writer:
        for key in ("a.jpg/sub-b.png", "a.jpg/z.png", "sub-deeper-c.png/a.jpg"):
            writer.add(key, {"matches0": np.zeros(3, np.int32), "matching_scores0": np.zeros(3, np.float16)})
    plain = {store: sorted(read_entries(store)) for store in (features, matches)}
    walks: list[Path] = []
    scan = store_catalog.scan_entries

    def counted_scan(h5: h5py.File, kind: str) -> list[str]:
        walks.append(Path(h5.filename))
        return scan(h5, kind)

    monkeypatch.setattr(store_catalog, "scan_entries", counted_scan)
    for store, kind in ((features, "features"), (matches, "matches")):
        assert read_store(store, kind).names == plain[store]
        with open_store(store) as reader:
            assert reader.names() == plain[store]
    assert walks == []
    write_entries(features, ["a.jpg/d.jpg"])  # a folder named like an image: walked, same names
    assert load_index(features) is not None
    assert read_store(features, "features").names == sorted(read_entries(features))
    assert walks == [features]
    shutil.copy(matches, tmp_path / "stale.h5")
    os.replace(tmp_path / "stale.h5", matches)  # another file: its index no longer describes it
    assert read_store(matches, "matches").names == plain[matches]
    assert walks == [features, matches]


def test_name_index_agrees_with_a_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NameIndex, "RECENT", 100)  # this run's names become hash arrays, merged
    rng = random.Random(1)
    stored = [f"q{rng.randrange(10**9)}/db{i}.jpg" for i in range(3000)]
    index = NameIndex()
    index.add_hashes(np.sort(name_hashes(stored[:1000])))
    index.add_hashes(np.sort(name_hashes(stored[1000:2000])))
    for start in range(2000, 3000, 64):  # as a run's flushes add them
        index.update(stored[start : start + 64])
    asked = stored[::7] + [f"other{i}" for i in range(2000)]
    assert index.contains(asked).tolist() == [name in set(stored) for name in asked]


def test_overwrite_drops_the_old_segments_and_check_reads_them(tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    write_entries(store, [f"im{i}.jpg" for i in range(16)])
    write_entries(store, ["im16.jpg"])
    segment = segments(store)[0]
    with h5py.File(segment, "r") as h5:
        chunk = h5["im16.jpg/descriptors"].id.get_chunk_info(0)
    with open(segment, "r+b") as file:  # bit rot in a segment
        file.seek(chunk.byte_offset + chunk.size // 2)
        file.write(b"\xde\xad\xbe\xef")
    report = check_store(store)
    assert [d["name"] for d in report.damaged] == [f"{segment.name}: im16.jpg"] and report.segments == 1
    repaired = run_cli("repair", str(store))
    assert repaired.returncode == 1 and "failed: im16.jpg" in repaired.stderr, repaired.stderr

    write_entries(store, ["x.jpg"], overwrite=True)
    with open_store(store) as reader:
        assert reader.names() == ["x.jpg"]
    assert not segments(store)


def test_match_pairs_reads_features_from_segments_and_writes_its_own(tmp_path: Path) -> None:
    features = tmp_path / "feats.h5"
    write_entries(features, [f"im{i:02d}.jpg" for i in range(24)])
    write_entries(features, ["im00.jpg", "new0.jpg"])
    write_entries(features, ["new0.jpg", "new1.jpg"])
    assert len(segments(features)) == 2
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("im00.jpg new0.jpg\nnew0.jpg new1.jpg\n")
    matches = tmp_path / "matches.h5"
    assert match_pairs(pairs, features, matches).done == 2
    pairs.write_text("im00.jpg new0.jpg\nnew0.jpg new1.jpg\nim01.jpg new1.jpg\n")
    assert match_pairs(pairs, features, matches).done == 1  # resumed

    compacted = tmp_path / "compacted" / "feats.h5"  # the same features in one file
    shutil.copytree(features.with_name("feats.h5.segments"), compacted.with_name("feats.h5.segments"))
    shutil.copy(features, compacted)
    assert run_cli("compact", str(compacted)).returncode == 0 and not segments(compacted)
    reference = tmp_path / "compacted" / "matches.h5"
    match_pairs(pairs, compacted, reference)
    with open_store(matches) as reader:
        assert reader.names() == ["im00.jpg/new0.jpg", "im01.jpg/new1.jpg", "new0.jpg/new1.jpg"]
    assert_entries_equal(all_entries(matches), read_entries(reference))


def test_a_truncated_segment_is_refused_naming_repair(tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    names = [f"im{i:02d}.jpg" for i in range(26)]
    write_entries(store, names[:24])
    write_entries(store, names[:25])
    write_entries(store, names)
    segment = segments(store)[0]
    segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])

    with pytest.raises(StoreError, match=rf"{store}: damaged store.*segment {segment.name}.*repair {store}"):
        StoreWriter(store, "features", SETTINGS)
    assert list(store_info(store).damaged) == [f"(segment {segment.name})"]  # info lists it
    result = run_cli("repair", str(store))
    assert result.returncode == 1, result.stderr
    repaired = read_entries(tmp_path / "feats.repaired.h5")
    assert len(repaired) == 25 and set(repaired) < set(names)  # the entry of the cut half is lost
    assert_entries_equal(repaired, expected(names))


# -- kill -9 in the new states ---------------------------------------------------------------
def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SP_EXTRACT_FOLD_BELOW": "0"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(command: list[str], condition: Callable[[], bool]) -> bool:
    """Run ``command``, SIGKILL it the moment ``condition`` holds; False if it finished first."""
    process = start(command)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if condition():
            process.kill()
            process.wait()
            return True
        time.sleep(0.0002)
    assert process.wait() == 0, process.stderr.read().decode() if process.stderr else ""
    return False


def test_kill_in_consolidation_merge_fold_and_compact(tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    first = [f"im{i:02d}.jpg" for i in range(36)]  # runs of one: 4 segments, the 5th run folds
    write_entries(store, first)
    folder = store.with_name(store.name + ".segments")
    fold_copy = re.compile(rf"\.{re.escape(store.name)}\.\d+\.tmp")

    def writing_segment(at_least: int = 0) -> Callable[[], bool]:
        def condition() -> bool:
            names = os.listdir(folder) if folder.is_dir() else []
            done = sum(1 for n in names if n.endswith(".h5"))
            return done >= at_least and any(n.endswith(".h5.tmp") for n in names)

        return condition

    def folding() -> bool:
        return any(fold_copy.fullmatch(name) for name in os.listdir(tmp_path))

    names = list(first)
    hits = []
    plan = [(1, writing_segment()), (2, None), (3, None), (4, writing_segment(4)), (5, folding), (6, None)]
    for run, condition in plan:
        names.append(f"new{run}.jpg")
        command = [sys.executable, str(TESTS / "support" / "segment_writer.py"), str(store), *names]
        if condition is not None:
            durable = set(all_entries(store))
            hits.append(kill_when(command, condition))
            found = all_entries(store)  # old or new files: every durable entry, each intact
            assert durable <= set(found) and set(found) <= set(names)
            assert_entries_equal(found, expected(names))
            assert not check_store(store).damaged
        assert kill_when(command, lambda: False) is False  # the same command resumes and finishes
        with open_store(store) as reader:
            assert reader.names() == sorted(names)
    assert hits == [True, True, True], hits  # killed writing a segment, merging, folding
    assert segments(store)
    compact = [sys.executable, "-m", "sp_extract", "compact", str(store)]
    assert kill_when(compact, folding)
    with open_store(store) as reader:
        assert reader.names() == sorted(names)
    assert not check_store(store).damaged
    assert kill_when(compact, lambda: False) is False
    assert sorted(list_h5_names(store)) == sorted(names)
    assert_entries_equal(read_entries(store), expected(names))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.h5", "feats.h5.index"]
