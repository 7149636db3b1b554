"""Hostile stores given as --out: each a clear one-line error, exit 2, the file untouched.

The command runs in this process (``invoke_cli``): what it does, not its process, is tested."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import invoke_cli, write_image
from support.reliability import one_line_error, read_entries


def text_file(path: Path, reference: Path) -> None:
    path.write_text("name,x,y\nimage.jpg,1,2\n")


def other_tools_hdf5(path: Path, reference: Path) -> None:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("table", data=np.arange(10))
        h5.attrs["creator"] = "another tool"


def hloc_features_without_our_attributes(path: Path, reference: Path) -> None:
    with h5py.File(path, "w") as h5:
        group = h5.create_group("a.png")
        group.create_dataset("keypoints", data=np.zeros((3, 2), np.float32))
        group.create_dataset("descriptors", data=np.zeros((256, 3), np.float16))


def truncated_store(path: Path, reference: Path) -> None:
    path.write_bytes(reference.read_bytes()[: reference.stat().st_size * 2 // 3])


def match_store(path: Path, reference: Path) -> None:
    shutil.copyfile(reference, path)
    with h5py.File(path, "r+") as h5:
        h5.attrs["sp_extract_kind"] = "matches"


CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "text": (text_file, "not an HDF5 file"),
    "other tool": (other_tools_hdf5, "not written by sp-extract"),
    "hloc layout, no settings": (hloc_features_without_our_attributes, "not written by sp-extract"),
    "truncated": (truncated_store, "truncated or corrupt"),
    "match store": (match_store, "matches store, not a features store"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, random_weights: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stores")
    for index in range(3):
        write_image(root / "images" / f"im{index}.png", seed=index)
    store = root / "feats.h5"
    result = invoke_cli(str(root / "images"), "--out", str(store), "--weights", str(random_weights))
    assert result.returncode == 0, result.stderr
    return root / "images", store


@pytest.mark.parametrize("case", CASES)
def test_unusable_out_is_refused_untouched(
    case: str, reference: tuple[Path, Path], random_weights: Path, tmp_path: Path
) -> None:
    images, store = reference
    make, cause = CASES[case]
    out = tmp_path / "out.h5"
    make(out, store)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()

    result = invoke_cli(str(images), "--out", str(out), "--weights", str(random_weights))

    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr)
    assert str(out) in line and cause in line, line
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]  # no lock, part or temporary left
    if case == "truncated":
        assert f"sp-extract repair {out}" in line


def test_out_in_a_missing_folder(reference: tuple[Path, Path], random_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "feats.h5"
    result = invoke_cli(str(reference[0]), "--out", str(out), "--weights", str(random_weights))
    assert result.returncode == 2
    assert "does not exist" in one_line_error(result.stderr)
    assert not out.parent.exists()


def test_out_as_a_symbolic_link_updates_its_target(
    reference: tuple[Path, Path], random_weights: Path, tmp_path: Path
) -> None:
    target = tmp_path / "real" / "feats.h5"
    target.parent.mkdir()
    link = tmp_path / "feats.h5"
    link.symlink_to(target)
    for _ in range(2):  # creates the target, then resumes it
        result = invoke_cli(str(reference[0]), "--out", str(link), "--weights", str(random_weights))
        assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == target
    assert read_entries(target).keys() == read_entries(reference[1]).keys()
