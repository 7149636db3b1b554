"""COLMAP's long steps in a child process, so that SIGINT and SIGTERM stop them at once.

pycolmap's geometric verification and incremental mapping run for minutes in C++ and swallow
a Ctrl-C (the run went on and exited 0). Run in a child, they are killed the moment the parent
is interrupted (``KeyboardInterrupt``, or ``Interrupted`` from the CLI's signal handlers) or dies
(``die_with``), and the parent then removes the temporary files they were writing.
The child comes from the fork server (``processes``), never forked from this process: after
extraction and matching this process holds OpenMP, ONNX Runtime and torch thread pools, and a
child forked with them waited for ever in pycolmap's bundle adjustment.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from ..processes import child_context, die_with

T = TypeVar("T")


def _child(sender: Connection, parent: int, function: Callable[..., Any], args: tuple) -> None:
    die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        result: tuple[str, Any] = ("ok", function(*args))
    except Exception as error:  # handed to the parent, which raises it
        try:
            pickle.dumps(error)
        except Exception:  # an exception type that cannot travel: its text does
            error = RuntimeError(f"{type(error).__name__}: {error}")
        result = ("error", error)
    sender.send(result)


def run_in_child(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a child process: its result, or its exception raised here.

    ``function`` and its arguments and result must be picklable (module-level function, plain
    data). The fork server imports ``function``'s module before its first child, if it has not
    started yet (``start_child_server`` starts it early). Whatever stops the wait here (an
    interruption, an error) kills the child first.
    """
    context = child_context(function.__module__)
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, os.getpid(), function, args), daemon=True)
    process.start()
    sender.close()
    status = None
    try:
        try:
            status, value = receiver.recv()
        except EOFError:
            process.join()
            raise RuntimeError(f"the COLMAP process died (exit code {process.exitcode})") from None
    finally:
        if status is None and process.is_alive():  # interrupted or failed: stop it now
            process.kill()
        process.join()
        receiver.close()
    if status == "error":
        raise value
    return value
