"""Disk full and unwritable output, for real: a file-size limit (RLIMIT_FSIZE, the writes fail
with EFBIG), a tiny tmpfs (ENOSPC; also full before the lock file) and a read-only remount
(EROFS), a read-only folder. Each time: one clear line, exit 2, the previous store byte for
byte intact, and the finished results kept: the next run, with room, completes the store equal
to an uninterrupted run."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import invoke_cli, run_cli
from support.reliability import (
    assert_entries_equal,
    drop_root_file_override,
    make_workspace,
    one_line_error,
    part_paths,
    read_entries,
    run_limited,
)

from sp_extract.errors import StoreError
from sp_extract.store.writer import StoreWriter


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, random_weights: Path) -> dict:
    return make_workspace(tmp_path_factory.mktemp("diskfull"), random_weights, count=8)


def previous_store(workspace: dict, store: Path, count: int) -> str:
    """A store of the first ``count`` images; returns its SHA-256."""
    listing = store.with_suffix(".txt")
    listing.write_text("".join(f"im{index:02d}.png\n" for index in range(count)))
    result = invoke_cli(  # in this process: the run tested is the next one
        str(workspace["images"]), "--out", str(store), "--image-list", str(listing), *workspace["options"]
    )
    assert result.returncode == 0, result.stderr
    return hashlib.sha256(store.read_bytes()).hexdigest()


def file_size_limit(size: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return preexec


def assert_refused_and_intact(
    result: subprocess.CompletedProcess, store: Path, digest: str, cause: str
) -> None:
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr)
    assert cause in line and str(store) in line, line
    assert hashlib.sha256(store.read_bytes()).hexdigest() == digest


def complete_with_room(workspace: dict, store: Path) -> None:
    result = invoke_cli(str(workspace["images"]), "--out", str(store), *workspace["options"])
    assert result.returncode == 0, result.stderr
    expected = read_entries(workspace["reference"])
    assert read_entries(store).keys() == expected.keys()
    assert_entries_equal(read_entries(store), expected)


def test_no_room_for_a_part(workspace: dict, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    digest = previous_store(workspace, store, 4)
    limit = os.path.getsize(workspace["reference"]) // 8 // 4  # a quarter of one image's entry
    args = (str(workspace["images"]), "--out", str(store), *workspace["options"])

    result = run_limited(*args, preexec=file_size_limit(limit))

    assert_refused_and_intact(result, store, digest, "file too large")
    assert "cannot save results" in result.stderr
    complete_with_room(workspace, store)


def test_no_room_for_the_fold_keeps_the_parts(workspace: dict, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    digest = previous_store(workspace, store, 6)
    limit = os.path.getsize(store) * 3 // 4  # room for a part of the 2 new images, not for the store
    args = (str(workspace["images"]), "--out", str(store), *workspace["options"])

    result = run_limited(*args, preexec=file_size_limit(limit))

    assert_refused_and_intact(result, store, digest, "file too large")
    assert "cannot update the store" in result.stderr
    assert {name for part in part_paths(store) for name in read_entries(part)} == {"im06.png", "im07.png"}
    complete_with_room(workspace, store)


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Path:
    """A 2 MiB tmpfs, mounted for the test (the tests run as root, as CI does)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    assert os.geteuid() == 0, "mounting a tmpfs needs root"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_and_read_only_filesystems(workspace: dict, tmp_path: Path, tiny_filesystem: Path) -> None:
    scratch = tmp_path / "feats.h5"
    previous_store(workspace, scratch, 4)
    store = tiny_filesystem / "feats.h5"
    store.write_bytes(scratch.read_bytes())
    digest = hashlib.sha256(store.read_bytes()).hexdigest()
    args = (str(workspace["images"]), "--out", str(store), *workspace["options"])

    assert_refused_and_intact(run_cli(*args), store, digest, "disk full")

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_filesystem)], check=True)
    assert_refused_and_intact(run_cli(*args), store, digest, "read-only file system")


def test_read_only_folder(workspace: dict, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    store = folder / "feats.h5"
    digest = previous_store(workspace, store, 4)
    folder.chmod(0o555)
    try:
        args = (str(workspace["images"]), "--out", str(store), *workspace["options"])
        # as root, permission bits only bind once the DAC-override capabilities are dropped
        result = run_limited(*args, preexec=drop_root_file_override)
    finally:
        folder.chmod(0o755)

    assert_refused_and_intact(result, store, digest, "permission denied")
    complete_with_room(workspace, store)


def fill_up(folder: Path) -> None:
    """Write a file in ``folder`` until its file system has not one byte left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(size)):
                    pass
    finally:
        os.close(fd)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_disk_full_when_taking_the_lock(workspace: dict, tiny_filesystem: Path) -> None:
    """The pid written into STORE.lock is the first byte a run writes: one line, exit 2 (not a
    traceback and exit 1), no lock file left; through the Python API no descriptor leaks."""
    fill_up(tiny_filesystem)
    store = tiny_filesystem / "feats.h5"
    result = run_cli(str(workspace["images"]), "--out", str(store), *workspace["options"])
    assert result.returncode == 2, result.stderr
    line = one_line_error(result.stderr)
    assert f"cannot write the lock file {store}.lock (disk full)" in line, line
    assert sorted(os.listdir(tiny_filesystem)) == ["filler"]

    before = open_descriptors()
    for _ in range(3):
        with pytest.raises(StoreError, match="disk full"):
            StoreWriter(store, "features", {})
    assert open_descriptors() == before
    assert sorted(os.listdir(tiny_filesystem)) == ["filler"]
