"""Children are never forked from a process holding native thread pools (sp_extract.processes).

A child forked after OpenMP, ONNX Runtime, OpenCV or torch ran threads here could wait for ever
(``sfm`` hung in pycolmap's bundle adjustment, 3 runs in 11). These tests hold such pools in
this process, forbid ``os.fork`` here, and check where the children really come from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch
from conftest import invoke_cli

from sp_extract.extraction.config import ExtractConfig
from sp_extract.extraction.loader import decode_all
from sp_extract.sfm.child import run_in_child


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def parent_of_this_child() -> tuple[int, str]:
    """Run in a child: its parent's pid and command line."""
    parent = os.getppid()
    return parent, Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def map_in_child(folder: str) -> int:
    """Run in a child: COLMAP's incremental mapping, multi-threaded (OpenMP and Ceres threads,
    where the hang was), of a small synthetic scene; the number of registered images."""
    root = Path(folder)
    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs, options.num_cameras_per_rig, options.num_frames_per_rig = 1, 1, 8
    options.num_points3D = 400
    database = pycolmap.Database.open(str(root / "db.db"))
    pycolmap.synthesize_dataset(options, database)
    database.close()
    (root / "out").mkdir()
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.num_threads = -1
    models = pycolmap.incremental_mapping(str(root / "db.db"), str(root), str(root / "out"), options=mapping)
    return max(model.num_reg_images() for model in models.values())


@pytest.fixture
def pools_running_here() -> Iterator[None]:
    """This process with torch's OpenMP pool and OpenCV's pool hot, as after an extraction."""
    import cv2

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    torch.ones(512, 512) @ torch.ones(512, 512)
    cv2.resize(np.ones((2000, 3000), np.float32), (1000, 700), interpolation=cv2.INTER_AREA)
    assert thread_count(os.getpid()) > 1
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_fork_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.fork`` in this process fails the test (fork + exec of a new program stays allowed)."""

    def forbidden() -> int:
        raise AssertionError("os.fork() called in a process that holds native thread pools")

    monkeypatch.setattr(os, "fork", forbidden)


def test_colmap_children_come_from_the_fork_server(
    pools_running_here: None, no_fork_here: None, tmp_path: Path
) -> None:
    parent, command = run_in_child(parent_of_this_child)
    assert parent != os.getpid()
    assert "forkserver" in command
    # the work that hung: multi-threaded mapping in a child, again and again
    folders = [tmp_path / str(k) for k in range(3)]
    for folder in folders:
        folder.mkdir()
    assert [run_in_child(map_in_child, str(folder)) for folder in folders] == [8] * 3


def test_decoding_workers_come_from_the_fork_server(
    pools_running_here: None, no_fork_here: None, small_images: Path
) -> None:
    names = sorted(str(p.relative_to(small_images)) for p in small_images.rglob("*.*"))
    decoded = list(decode_all(small_images, names, ExtractConfig(), 2))
    assert [item.name for item in decoded] == names
    assert all(item.image is not None for item in decoded)


def test_sfm_with_default_threads_under_load_never_forks(
    pools_running_here: None,
    no_fork_here: None,
    sacre_coeur: Path,
    real_weights: Path,
    tmp_path: Path,
) -> None:
    """`sfm` exactly as a user runs it (default threads and size) while a core is busy:
    it finishes, registers every photo, and forks nothing from this process."""
    spin = "import time\nend = time.time() + 900\nwhile time.time() < end: pass\n"
    load = [subprocess.Popen([sys.executable, "-c", spin])]  # one core busy
    try:
        started = time.monotonic()
        report = tmp_path / "report.json"
        result = invoke_cli(
            "sfm", str(sacre_coeur), str(tmp_path / "work"), "--weights", str(real_weights),
            "-q", "--json-report", str(report),
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        for process in load:
            process.kill()
            process.wait()
    assert result.returncode == 0, result.stderr
    summary = json.loads(report.read_text())
    best = max(summary["models"], key=lambda model: model["registered_images"])
    assert best["registered_images"] == 10, (summary, took)


SERVER_SIGINT = """
import signal, sys, time
from multiprocessing import forkserver
from sp_extract.processes import start_child_server
start_child_server("torch")  # seconds of imports: the moment a Ctrl-C used to break the server
pid = forkserver._forkserver._forkserver_pid
ignored = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigIgn:"))
mine = signal.getsignal(signal.SIGINT) is signal.default_int_handler
print(int(ignored.split()[1], 16) >> (signal.SIGINT - 1) & 1, mine)
"""


def test_fork_server_ignores_ctrl_c_while_it_imports() -> None:
    """Ctrl-C reaches the whole process group: the fork server ignores it from its first
    instruction (not only after its preload imports, as CPython's does), and this process gets
    its own SIGINT handler back."""
    command = [sys.executable, "-c", SERVER_SIGINT]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"], result.stdout
