"""Graceful interruption: the first SIGINT/SIGTERM asks a run to stop after what is in hand.

The run saves what is finished, prints its summary and exits 130 (SIGINT) or 143 (SIGTERM).
A second signal aborts at once: the process exits on the spot (an exception could be swallowed
by a destructor, or be interrupted itself on the way out); stores stay intact either way, since
nothing is modified in place and whatever is half-written is a temporary file the next run
deletes. ``graceful_stop`` nests: an inner one (the store's fold)
shares the flag of the outer one (the run), or, alone, can deliver the signal again on exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import EXIT_SIGINT, EXIT_SIGTERM

ABORTED = "sp-extract: aborted; finished results are kept and the next run picks them up"


class StopFlag:
    """Set by the first signal; ``exit_code`` tells which one."""

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.exit_code is not None


_active: StopFlag | None = None
_received = 0  # stop signals caught by graceful_stop in this process


def stop_requests() -> int:
    """How many stop signals ``graceful_stop`` caught so far in this process (compare two
    readings to learn whether a run was asked to stop in between)."""
    return _received


@contextmanager
def graceful_stop(redeliver: bool = False) -> Iterator[StopFlag]:
    """Install the two-stage SIGINT/SIGTERM handlers for the duration of a run.

    Inside another ``graceful_stop`` it yields that one's flag and installs nothing. With
    ``redeliver``, a signal caught here is raised again once the previous handlers are back.
    """
    global _active
    if _active is not None:
        yield _active
        return
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum: int, _frame: object) -> None:
        global _received
        _received += 1
        if flag:  # the second signal: stop now
            show_cursor = "\x1b[?25h" if sys.stderr.isatty() else ""  # a progress bar hid it
            os.write(2, f"{show_cursor}\n{ABORTED}\n".encode())
            os._exit(EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)
        flag.signum = signum
        flag.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _active = flag
    try:
        yield flag
    finally:
        _active = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if redeliver and flag.signum is not None:
        signal.raise_signal(flag.signum)


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM stopped a command that is not a resumable run; ``exit_code`` says which.

    A ``KeyboardInterrupt``, so ``finally`` blocks and context managers undo what was half
    done (temporary files, child processes) as they do for Ctrl-C.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread for the duration of the block.

    For the commands whose work is one step (pairs, colmap, reconstruct): the exception
    unwinds it, removing what was half-written. A ``graceful_stop`` inside the block takes over
    the signals for its run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
