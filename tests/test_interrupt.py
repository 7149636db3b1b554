"""Graceful interrupt of a real extraction: Ctrl-C (SIGINT to the process group, workers
included, as a terminal sends it) or SIGTERM saves what is finished, prints the summary and
exits 130 / 143; a second Ctrl-C aborts at once. Either way the store stays readable and
the next run completes it, equal to an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import invoke_cli, run_cli
from support.reliability import (
    Run,
    assert_entries_equal,
    durable_names,
    make_workspace,
    part_paths,
    read_entries,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, random_weights: Path) -> dict:
    return make_workspace(tmp_path_factory.mktemp("interrupt"), random_weights)


def start_and_wait_for_a_part(workspace: dict, store: Path) -> Run:
    run = Run(str(workspace["images"]), "--out", str(store), *workspace["options"])
    assert run.wait_until(lambda: bool(part_paths(store))), run.text
    return run


def resume_to_completion(workspace: dict, store: Path) -> None:
    """The next run (in this process: what it does, not its process) completes the store."""
    result = invoke_cli(str(workspace["images"]), "--out", str(store), *workspace["options"])
    assert result.returncode == 0, result.stderr
    expected = read_entries(workspace["reference"])
    assert read_entries(store).keys() == expected.keys()
    assert_entries_equal(read_entries(store), expected)


@pytest.mark.parametrize(
    ("signum", "to_group", "code"), [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)]
)
def test_signal_saves_finished_work_and_prints_the_summary(
    workspace: dict, tmp_path: Path, signum: int, to_group: bool, code: int
) -> None:
    store = tmp_path / "feats.h5"
    run = start_and_wait_for_a_part(workspace, store)
    if to_group:
        run.signal_group(signum)
    else:
        run.process.send_signal(signum)

    assert run.finish() == code, run.text
    assert "Traceback" not in run.text and "exited unexpectedly" not in run.text, run.text
    summary = [line for line in run.text.splitlines() if line.startswith("extract: ")]
    assert len(summary) == 1 and summary[0].endswith("(interrupted)"), run.text
    saved = int(summary[0].split()[1])
    stored = read_entries(store)  # folded in: the store itself holds the finished images
    assert 0 < saved == len(stored) < 48 and not part_paths(store), run.text
    assert_entries_equal(stored, read_entries(workspace["reference"]))
    resume_to_completion(workspace, store)


def test_second_ctrl_c_aborts_at_once_without_corruption(workspace: dict, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    run = start_and_wait_for_a_part(workspace, store)
    while run.process.poll() is None and "aborted" not in run.text:  # Ctrl-C again, 20 ms apart
        run.signal_group(signal.SIGINT)
        run.drain(0.02)

    assert run.finish(timeout=30) == 130, run.text
    assert "Traceback" not in run.text, run.text
    assert "sp-extract: aborted; finished results are kept" in run.text, run.text
    assert durable_names(store), run.text  # the finished part is kept for the next run
    assert group_ends(run.process.pid), "decoding workers outlived the aborted run"
    resume_to_completion(workspace, store)


def group_ends(group: int, timeout: float = 15) -> bool:
    """Whether every process of ``group`` (the run and its decoding workers) ends in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(group, signal.SIGKILL)  # leave nothing behind, then fail
    return False


def test_sigkill_of_the_main_process_takes_its_workers_along(workspace: dict, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    run = start_and_wait_for_a_part(workspace, store)
    run.process.kill()  # the main process only, as the OOM killer does
    run.finish(timeout=30)
    assert group_ends(run.process.pid), "decoding workers outlived their killed parent"
    resume_to_completion(workspace, store)


def test_interrupted_overwrite_keeps_the_old_store_and_the_same_command_finishes_it(
    workspace: dict, tmp_path: Path
) -> None:
    """--overwrite replaces the store only once the new one is complete, whether the run is
    stopped by Ctrl-C or killed; the same command run again resumes the new run's results."""
    store = tmp_path / "feats.h5"
    listing = tmp_path / "four.txt"
    listing.write_text("".join(f"im{index:02d}.png\n" for index in range(4)))
    old_options = [*workspace["options"][:-1], "256"]  # the old store: other settings (max keypoints)
    images = str(workspace["images"])
    result = invoke_cli(images, "--out", str(store), "--image-list", str(listing), *old_options)
    assert result.returncode == 0, result.stderr
    old = hashlib.sha256(store.read_bytes()).hexdigest()
    command = [images, "--out", str(store), *workspace["options"], "--overwrite"]

    def new_parts() -> set[str]:
        return {name for part in part_paths(store) for name in read_entries(part)}

    run = Run(*command)  # Ctrl-C
    assert run.wait_until(lambda: bool(part_paths(store))), run.text
    run.signal_group(signal.SIGINT)
    assert run.finish() == 130, run.text
    assert f"{store} is unchanged: the new store replaces it once complete" in run.text, run.text
    assert hashlib.sha256(store.read_bytes()).hexdigest() == old  # untouched
    first = new_parts()
    assert first, run.text  # the new run's finished images wait in parts

    run = Run(*command)  # the same command resumes them; SIGKILL it
    assert run.wait_until(lambda: len(part_paths(store)) > 1 and new_parts() > first), run.text
    run.kill()
    assert hashlib.sha256(store.read_bytes()).hexdigest() == old
    durable = new_parts()
    assert durable > first

    result = run_cli(images, "--out", str(store), *workspace["options"])  # a plain run must not mix
    assert result.returncode == 2 and "unfinished results of an --overwrite run" in result.stderr
    assert hashlib.sha256(store.read_bytes()).hexdigest() == old

    result = run_cli(*command)
    assert result.returncode == 0, result.stderr
    saved, already = map(int, re.search(r"(\d+) images saved, (\d+) already in", result.stderr).groups())
    assert already == len(durable) and saved + already == 48, result.stderr  # resumed
    expected = read_entries(workspace["reference"])
    assert read_entries(store).keys() == expected.keys() and not part_paths(store)
    assert_entries_equal(read_entries(store), expected)
