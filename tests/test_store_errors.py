"""Store failures told apart (issue 17): a store in use by another program is not "corrupt", a
damaged store is refused or reported with the way out ('repair'), 'repair --check' verifies
every checksum, an unexpected error has its own exit code, and a match store knows its
feature store by identity, not by path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli, write_image
from support.reliability import one_line_error

from sp_extract import cli
from sp_extract.errors import StoreError
from sp_extract.matching.config import MatchConfig
from sp_extract.matching.run import match_pairs
from sp_extract.sfm.colmap import read_matches
from sp_extract.store.writer import StoreWriter

NAMES = [f"im{index}.jpg" for index in range(6)]
SETTINGS = {"weights_sha1": "test", "max_keypoints": 40}


def add_entries(writer: StoreWriter, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        descriptors = rng.normal(size=(256, 40))
        writer.add(
            name,
            {
                "keypoints": rng.uniform(0, 90, (40, 2)).astype(np.float32),
                "scores": rng.uniform(0, 1, 40).astype(np.float32),
                "descriptors": (descriptors / np.linalg.norm(descriptors, axis=0)).astype(np.float16),
                "image_size": np.array([96, 64], np.int64),
            },
        )


def make_features(path: Path, names: list[str] = NAMES, seed: int = 0) -> Path:
    with StoreWriter(path, "features", SETTINGS) as writer:
        add_entries(writer, names, seed)
    return path


def pairs_file(path: Path, names: list[str] = NAMES) -> Path:
    path.write_text("".join(f"{a} {b}\n" for i, a in enumerate(names) for b in names[i + 1 :]))
    return path


def match(pairs: Path, features: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("match-pairs", str(pairs), "--features", str(features), "--out", str(out), *extra)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- 5: a store held open for writing by another program (HDF5 file locking) ----------------------
def test_store_in_use_by_another_program_is_not_called_corrupt(tmp_path: Path, random_weights: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "a.png")
    features = make_features(tmp_path / "feats.h5")
    before = digest(features)
    hold = f"import h5py, sys; f = h5py.File({str(features)!r}, 'a'); print(1); sys.stdin.read()"
    holder = subprocess.Popen(  # a notebook's h5py.File(..., "a"), say: HDF5 locks the file
        [sys.executable, "-c", hold],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "1"
        for result in (
            run_cli(str(images), "--out", str(features), "--weights", str(random_weights)),
            match(pairs_file(tmp_path / "pairs.txt"), features, tmp_path / "m.h5"),
        ):
            assert result.returncode == 2, result.stderr
            line = one_line_error(result.stderr)
            assert f"{features}: in use by another program" in line, line
            assert "--overwrite" not in line and "corrupt" not in line, line
    finally:
        holder.communicate("", timeout=30)
    assert digest(features) == before and not (tmp_path / "m.h5").exists()
    assert match_pairs(tmp_path / "pairs.txt", features, tmp_path / "m.h5").done == 15  # closed: usable


# -- 10: damage found on resume, by a full check, and where data is read ----------------------------
def flip_bytes(store: Path, dataset: str) -> None:
    """Overwrite 4 bytes in the middle of the dataset's first chunk, as bit rot would."""
    with h5py.File(store, "r") as h5:
        chunk = h5[dataset].id.get_chunk_info(0)
    with open(store, "r+b") as file:
        file.seek(chunk.byte_offset + chunk.size // 2)
        file.write(b"\xde\xad\xbe\xef")


def test_resume_refuses_a_store_whose_entries_do_not_fit(tmp_path: Path) -> None:
    store = make_features(tmp_path / "feats.h5")
    with h5py.File(store, "r+") as h5:  # another program wrote a bad entry in place
        del h5["im2.jpg/scores"]
        h5["im2.jpg"].create_dataset("scores", data=np.zeros(7, np.float32))
    before = digest(store)

    with pytest.raises(StoreError, match=r"damaged store.*'im2.jpg': scores of shape \(7,\).*repair"):
        StoreWriter(store, "features", SETTINGS)

    with pytest.raises(StoreError, match=f"sp-extract repair {store}"):
        match_pairs(pairs_file(tmp_path / "pairs.txt"), store, tmp_path / "m.h5")
    assert digest(store) == before
    assert not (tmp_path / "feats.h5.lock").exists()  # the refused writer let its lock go


def test_repair_check_reads_every_checksum_and_writes_nothing(tmp_path: Path) -> None:
    store = make_features(tmp_path / "feats.h5")
    result = run_cli("repair", "--check", str(store))
    assert result.returncode == 0, result.stderr
    assert f"check: 6 features entries read in {store}, 0 damaged" in result.stderr

    flip_bytes(store, "im3.jpg/descriptors")
    with StoreWriter(store, "features", SETTINGS) as writer:  # the cheap resume check passes ...
        assert all(name in writer.done for name in NAMES) and "im6.jpg" not in writer.done
    listing = sorted(os.listdir(tmp_path))
    report = tmp_path / "check.json"
    result = run_cli("repair", "--check", str(store), "--json-report", str(report))  # ... this does not
    assert result.returncode == 1, result.stderr
    assert "damaged: im3.jpg: " in result.stderr and f"'sp-extract repair {store}'" in result.stderr
    assert [d["name"] for d in json.loads(report.read_text())["damaged"]] == ["im3.jpg"]
    assert sorted(os.listdir(tmp_path)) == sorted([*listing, "check.json"])  # wrote nothing else

    # matching reads the descriptors: the checksum fails there, named with the way out
    summary = match_pairs(pairs_file(tmp_path / "pairs.txt"), store, tmp_path / "m.h5")
    reasons = {failure["reason"] for failure in summary.failed}
    assert len(summary.failed) == 5 and len(reasons) == 1, summary.failed
    assert reasons.pop().startswith("im3.jpg: unreadable features")
    assert f"check the store: sp-extract repair --check {store}" in summary.failed[0]["reason"]


def test_colmap_names_repair_for_damaged_matches(tmp_path: Path) -> None:
    store = tmp_path / "m.h5"
    with StoreWriter(store, "matches", {}) as writer:
        writer.add("a.jpg/b.jpg", {"matches0": np.arange(4000, dtype=np.int32) % 50,
                                   "matching_scores0": np.ones(4000, np.float16)})  # fmt: skip
    flip_bytes(store, "a.jpg/b.jpg/matches0")
    with h5py.File(store, "r") as h5, pytest.raises(StoreError, match=f"damaged store.*repair {store}"):
        read_matches(h5, "a.jpg/b.jpg", (4000, 50), store)


# -- 6: unexpected errors --------------------------------------------------------------------------
@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_error_exits_3_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debug: bool
) -> None:
    store = make_features(tmp_path / "feats.h5")

    def broken(path: Path) -> None:
        raise RuntimeError("injected failure\nsecond line")

    monkeypatch.setattr("sp_extract.store.repair.check_store", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = CliRunner().invoke(cli.cli, [*(["--debug"] if debug else []), "repair", "--check", str(store)])

    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.startswith("sp-extract: error:")]
    assert len(lines) == 1 and "unexpected error in repair: RuntimeError: injected failure" in lines[0]
    logs = list(tmp_path.glob("sp-extract-error-*.log"))
    if debug:
        assert "Traceback" in result.stderr and not logs
    else:
        assert "Traceback" not in result.stderr and len(logs) == 1 and str(logs[0]) in lines[0]
        assert "RuntimeError: injected failure" in logs[0].read_text()


def test_debug_before_the_default_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.cli, ["--debug", str(tmp_path / "no-such-folder"), "--out", "x.h5"])
    assert result.exit_code == 2 and "no-such-folder" in one_line_error(result.stderr)


# -- 12: a match store knows its feature store by identity (Python API: the CLI path is above) -------
def test_match_store_follows_its_features_when_copied_moved_or_grown(tmp_path: Path) -> None:
    features = make_features(tmp_path / "feats.h5", NAMES[:4])
    out = tmp_path / "m.h5"
    assert match_pairs(pairs_file(tmp_path / "p4.txt", NAMES[:4]), features, out).done == 6

    moved = tmp_path / "elsewhere" / "copy.h5"  # another node's path, a moved project
    moved.parent.mkdir()
    shutil.copyfile(features, moved)
    features.unlink()
    summary = match_pairs(tmp_path / "p4.txt", moved, out)
    assert (summary.done, summary.skipped) == (0, 6)

    with StoreWriter(moved, "features", SETTINGS) as writer:  # a later extraction adds images
        add_entries(writer, NAMES[4:], seed=1)
    summary = match_pairs(pairs_file(tmp_path / "p6.txt"), moved, out)
    assert (summary.done, summary.skipped) == (9, 6)

    with StoreWriter(moved, "features", SETTINGS, overwrite=True) as writer:  # extracted again
        add_entries(writer, NAMES, seed=2)
    with pytest.raises(StoreError, match="made with other settings.*features_id: "):
        match_pairs(tmp_path / "p6.txt", moved, out)


def test_match_store_that_records_a_path(tmp_path: Path) -> None:
    """Match stores written before store ids name their feature store by absolute path: they
    resume with that very file and are refused, with the way out, for any other."""
    features = make_features(tmp_path / "feats.h5")
    pairs = pairs_file(tmp_path / "pairs.txt")
    out = tmp_path / "m.h5"
    config = MatchConfig(max_distance=0.9)
    assert match_pairs(pairs, features, out, config).done == 15
    with h5py.File(out, "r+") as h5:
        settings = json.loads(h5.attrs["sp_extract_settings"])
        del settings["features_id"]
        settings["features"] = str(features.resolve())
        h5.attrs["sp_extract_settings"] = json.dumps(settings, sort_keys=True)
    before = digest(out)

    summary = match_pairs(pairs, features, out, config)
    assert (summary.done, summary.skipped) == (0, 15)

    copy = shutil.copyfile(features, tmp_path / "copy.h5")
    with pytest.raises(StoreError, match="names its feature store by path .*--overwrite"):
        match_pairs(pairs, copy, out, config)
    assert digest(out) == before
