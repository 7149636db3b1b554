"""One writer per store: a second real process stops at once naming the first; a killed holder
leaves no stale lock; other processes can read the store with h5py meanwhile and afterwards."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from conftest import invoke_cli
from support.reliability import (
    Run,
    assert_entries_equal,
    lock_held_by,
    make_workspace,
    one_line_error,
    read_entries,
)


def names_read_by_another_process(store: Path) -> list[str]:
    """Entry names as a separate Python process sees them with plain h5py (default file locking)."""
    script = "import sys, h5py\nwith h5py.File(sys.argv[1], 'r') as h5:\n    print('\\n'.join(sorted(h5)))\n"
    result = subprocess.run([sys.executable, "-c", script, str(store)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_second_writer_stops_and_a_killed_holder_leaves_no_stale_lock(
    tmp_path: Path, random_weights: Path
) -> None:
    space = make_workspace(tmp_path, random_weights, count=8)
    images, options = str(space["images"]), space["options"]
    store = tmp_path / "feats.h5"
    listing = tmp_path / "first-half.txt"
    listing.write_text("".join(f"im{index:02d}.png\n" for index in range(4)))
    assert invoke_cli(images, "--out", str(store), "--image-list", str(listing), *options).returncode == 0
    first_half = read_entries(store)

    holder = Run(images, "--out", str(store), *options)  # resumes: the 4 other images
    assert holder.wait_until(lambda: lock_held_by(store, holder.process.pid)), holder.text
    holder.process.send_signal(signal.SIGSTOP)  # frozen while holding the lock
    try:
        assert names_read_by_another_process(store) == sorted(first_half)  # readers are not blocked

        second = invoke_cli(images, "--out", str(store), *options)  # another process than the holder

        assert second.returncode == 2
        line = one_line_error(second.stderr)
        assert f"pid {holder.process.pid}" in line and str(store) in line, line
        assert read_entries(store).keys() == first_half.keys()
    finally:
        holder.signal_group(signal.SIGKILL)
        holder.finish()

    third = invoke_cli(images, "--out", str(store), *options)  # the kernel released the dead holder's lock

    assert third.returncode == 0, third.stderr
    assert names_read_by_another_process(store) == sorted(read_entries(space["reference"]))
    assert_entries_equal(read_entries(store), read_entries(space["reference"]))
    assert not store.with_name(store.name + ".lock").exists()
