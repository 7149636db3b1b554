"""Helpers of the reliability tests (issue 6): real sp-extract processes and plain store reading.

Stores are read here with plain h5py, independently of ``sp_extract.store.writer``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from conftest import invoke_cli, write_image

Entries = dict[str, dict[str, tuple[np.ndarray, dict]]]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def make_workspace(root: Path, weights: Path, count: int = 48) -> dict:
    """``count`` 320 x 240 images (a few seconds of work) and their features from one
    uninterrupted run: ``{"root", "images", "reference", "options"}``."""
    for index in range(count):
        write_image(root / "images" / f"im{index:02d}.png", 320, 240, seed=index)
    reference = root / "reference.h5"
    options = ["--weights", str(weights), "--batch-size", "1", "--num-workers", "1", "--max-keypoints", "512"]
    result = invoke_cli(str(root / "images"), "--out", str(reference), *options)  # in-process: fewer imports
    assert result.returncode == 0, result.stderr
    return {"root": root, "images": root / "images", "reference": reference, "options": options}


def read_entries(path: Path) -> Entries:
    """Every group holding datasets: {group path: {dataset: (values, attributes)}}."""
    entries: Entries = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            group, _, key = name.rpartition("/")
            entries.setdefault(group, {})[key] = (obj[()], dict(obj.attrs))

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
    return entries


def part_paths(store: Path) -> list[Path]:
    """The store's renamed (complete) part files."""
    parts = store.with_name(store.name + ".parts")
    return sorted(parts.glob("part-*.h5")) if parts.is_dir() else []


def durable_names(store: Path) -> set[str]:
    """Entries in the store plus those in its part files."""
    names = set(read_entries(store)) if store.exists() else set()
    for part in part_paths(store):
        names |= set(read_entries(part))
    return names


def assert_entries_equal(found: Entries, expected: Entries) -> None:
    """Dataset by dataset, values and attributes, for the entries of ``found``."""
    for name, datasets in found.items():
        assert name in expected, name
        assert datasets.keys() == expected[name].keys(), name
        for key, (values, attrs) in datasets.items():
            reference, reference_attrs = expected[name][key]
            assert values.dtype == reference.dtype and values.shape == reference.shape, (name, key)
            np.testing.assert_array_equal(values, reference, err_msg=f"{name}/{key}")
            assert attrs == reference_attrs, (name, key)


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sp_extract", *args]


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "TERM": "xterm", **extra}


class Run:
    """``sp-extract`` in its own session with its output on a pseudo-terminal, as a user sees it
    (the rich progress bar), read as it comes so the process never blocks on it."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(
            cli_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            env=cli_env(),
            cwd=cwd,
            start_new_session=True,
        )
        os.close(slave)
        self.output = ""

    def drain(self, timeout: float = 0.0) -> None:
        while select.select([self.master], [], [], timeout)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the terminal closed: the process has exited
                return
            if not data:
                return
            self.output += data.decode(errors="replace")
            timeout = 0.0

    def wait_until(self, condition: Callable[[], bool], timeout: float = 120) -> bool:
        """Poll ``condition`` (and read output) until true; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None or time.monotonic() > deadline:
                return condition()
            self.drain(0.0005)
        return True

    def signal_group(self, signum: int) -> None:
        """Send a signal to the process and its decoding workers, as a terminal's Ctrl-C does."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def finish(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.drain(0.05)
        code = self.process.wait(timeout=5)
        self.drain(0.2)
        os.close(self.master)
        return code

    def kill(self) -> int:
        self.signal_group(signal.SIGKILL)
        return self.finish()

    @property
    def text(self) -> str:
        return ANSI.sub("", self.output.replace("\r", "\n"))

    def reported_saved(self) -> int:
        """The largest 'N/M' count the progress bar showed: images (or pairs) reported saved."""
        return max((int(done) for done, _ in re.findall(r"(\d+)/(\d+)", self.text)), default=0)


def lock_held_by(store: Path, pid: int) -> bool:
    """Whether ``store``'s lock file names ``pid`` (written right after the lock is taken)."""
    try:
        return store.with_name(store.name + ".lock").read_text().strip() == str(pid)
    except OSError:
        return False


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def drop_root_file_override() -> None:
    """``preexec_fn``: as root, give up the two capabilities that let root ignore file modes.

    Root bypasses permission bits, so chmod alone cannot make a file unreadable or a folder
    read-only to it. Dropped from the bounding set before exec, they are gone from the new
    program: permission bits then apply to it as to any user (uid 0 is the owner of the test
    files, so mode 000 / 555 really deny). Not needed (and not done) when not root.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_limited(*args: str, preexec: Callable[[], None], timeout: float = 300) -> subprocess.CompletedProcess:
    """``sp-extract`` as a subprocess with ``preexec`` run in the child before exec."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        env=cli_env(),
        preexec_fn=preexec,
        timeout=timeout,
    )


def one_line_error(stderr: str) -> str:
    """The single 'sp-extract: error: ...' line of a failed run (asserting there is exactly one)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("sp-extract: error:")]
    assert len(lines) == 1, stderr
    return lines[0]
