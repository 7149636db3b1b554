"""``sp-extract repair``: stores truncated or corrupted here are salvaged entry by entry.

Every copied entry must equal the intact store's; every lost one must be reported; the repaired
store must be a valid store that extraction resumes, redoing only the lost images.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import invoke_cli, run_cli, write_image
from support.reliability import assert_entries_equal, one_line_error, read_entries

from sp_extract.report import counted
from sp_extract.store.writer import StoreWriter


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory, random_weights: Path) -> dict:
    root = tmp_path_factory.mktemp("repair")
    for index in range(10):
        write_image(root / "images" / f"im{index}.png", seed=index)
    store = root / "feats.h5"
    options = ["--weights", str(random_weights)]
    result = invoke_cli(str(root / "images"), "--out", str(store), *options)
    assert result.returncode == 0, result.stderr
    return {"images": root / "images", "store": store, "options": options, "entries": read_entries(store)}


def repair(store: Path) -> tuple[int, str, dict]:
    """Run ``sp-extract repair``; returns its exit code, stderr and the lost names with reasons."""
    result = run_cli("repair", str(store))
    assert "Traceback" not in result.stderr, result.stderr
    lost = dict(re.findall(r"^failed: (.+?): (.+)$", result.stderr, re.MULTILINE))
    return result.returncode, result.stderr, lost


@pytest.mark.parametrize("keep", [0.995, 0.98, 0.9, 0.3])
def test_truncated_store(intact: dict, tmp_path: Path, keep: float) -> None:
    store = tmp_path / "feats.h5"
    data = intact["store"].read_bytes()
    store.write_bytes(data[: int(len(data) * keep)])
    repaired = tmp_path / "feats.repaired.h5"

    code, stderr, lost = repair(store)

    if code == 2:  # cut before the file's index: nothing can be named any more
        assert "no complete entry could be read" in one_line_error(stderr)
        assert not repaired.exists() and keep < 0.99
        return
    assert code == 1, stderr
    copied = read_entries(repaired)
    assert copied and copied.keys() < intact["entries"].keys()
    assert_entries_equal(copied, intact["entries"])
    missing = intact["entries"].keys() - copied.keys()
    assert missing <= lost.keys() or "/" in lost, (missing, lost)
    # the repaired store is a store: extraction resumes it, redoing only the lost images
    result = invoke_cli(str(intact["images"]), "--out", str(repaired), *intact["options"])
    assert result.returncode == 0, result.stderr
    assert f"{counted(len(missing), 'image')} saved, {len(copied)} already in" in result.stderr
    assert_entries_equal(read_entries(repaired), intact["entries"])
    assert read_entries(repaired).keys() == intact["entries"].keys()


def test_corrupted_bytes_are_caught_by_the_checksums(intact: dict, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    shutil.copyfile(intact["store"], store)
    with h5py.File(store, "r") as h5:
        chunk = h5["im3.png/descriptors"].id.get_chunk_info(0)
    with open(store, "r+b") as file:  # flip a few bytes inside the descriptors of im3.png
        file.seek(chunk.byte_offset + chunk.size // 2)
        file.write(b"\xde\xad\xbe\xef")
    with h5py.File(store, "r") as h5, pytest.raises(OSError):
        h5["im3.png/descriptors"][()]  # plain h5py sees it too: Fletcher-32 checksums

    code, stderr, lost = repair(store)

    assert code == 1, stderr
    assert list(lost) == ["im3.png"], stderr
    copied = read_entries(tmp_path / "feats.repaired.h5")
    assert copied.keys() == intact["entries"].keys() - {"im3.png"}
    assert_entries_equal(copied, intact["entries"])


def test_healthy_store_and_pending_parts(intact: dict, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    shutil.copyfile(intact["store"], store)
    with h5py.File(store, "r") as h5:
        settings = json.loads(h5.attrs["sp_extract_settings"])
    extra = {k: v for k, (v, _) in intact["entries"]["im0.png"].items()}
    writer = StoreWriter(store, "features", settings)  # a run killed before its fold: a part stays
    writer.add("late.png", extra)
    writer.flush()
    writer.lock.release()

    code, stderr, lost = repair(store)

    assert code == 0 and not lost, stderr
    copied = read_entries(tmp_path / "feats.repaired.h5")
    assert copied.keys() == intact["entries"].keys() | {"late.png"}
    assert_entries_equal({k: v for k, v in copied.items() if k != "late.png"}, intact["entries"])
    for key, values in extra.items():
        np.testing.assert_array_equal(copied["late.png"][key][0], values)


@pytest.mark.parametrize("problem", ["missing", "not hdf5", "output exists"])
def test_refusals(intact: dict, tmp_path: Path, problem: str) -> None:
    store = tmp_path / "feats.h5"
    if problem == "not hdf5":
        store.write_text("not a store\n")
    elif problem == "output exists":
        shutil.copyfile(intact["store"], store)
        (tmp_path / "feats.repaired.h5").write_text("keep me\n")

    code, stderr, _ = repair(store)

    assert code == 2
    line = one_line_error(stderr)
    assert {"missing": "no such store", "not hdf5": "not an HDF5 file", "output exists": "exists"}[
        problem
    ] in line
    if problem == "output exists":
        assert (tmp_path / "feats.repaired.h5").read_text() == "keep me\n"
