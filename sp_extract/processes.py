"""Child processes that never inherit this process's native thread pools.

A forked child gets a copy of its parent's memory but only the thread that forked: the thread
pools that OpenMP (libgomp), ONNX Runtime, OpenCV or torch started in the parent look alive to
the child, and a lock one of their threads held is held for ever. The child's first parallel
call can then wait for ever (``sfm`` stopped at 0 % CPU in pycolmap's bundle adjustment this
way). ``threading.active_count()`` cannot tell: it counts Python threads only.

So sp-extract never forks itself. Every child (COLMAP's verification and mapping, the decoding
workers) comes from a fork server: a fresh interpreter, started by fork + exec (safe at any
moment), that imports the children's modules and forks each child from there. The server only
imports: none of its pools has ever run work when it forks. Each child watches the process that
asked for it (``die_with``) and ends with it; this process stops the server (and waits for it)
when it exits, so that no process of a finished or interrupted run is left behind.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import select
import signal
import threading
import time
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext

START_METHOD = "forkserver"


def child_context(*preload: str) -> BaseContext:
    """The context to start children with. ``preload``: modules (dotted names) the server imports
    before its first fork, if it is not running yet, so that children start in milliseconds."""
    context = multiprocessing.get_context(START_METHOD)
    _stop_at_exit()
    if preload:
        context.set_forkserver_preload(list(preload))
    _ensure_server()
    return context


def start_child_server(*preload: str) -> None:
    """Start the fork server now, importing ``preload``: its imports then overlap this process's
    own work instead of delaying the first child."""
    child_context(*preload)


def _ensure_server() -> None:
    """Start the fork server if it is not running, ignoring SIGINT from its first instruction.

    Ctrl-C reaches the whole process group, and CPython's server ignores SIGINT only once its
    preload imports are done: a Ctrl-C during them (seconds on a loaded machine) printed the
    server's KeyboardInterrupt traceback into an interrupted run's output. An ignored signal
    stays ignored through fork and exec, so this process ignores SIGINT for the moment it takes
    to start the server (from the main thread; elsewhere Python cannot change handlers).
    Children of the server ignore SIGINT anyway: this process decides when they stop."""
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, handler)


def stop_child_server() -> None:
    """Stop the fork server and its resource tracker, if this process started them, and wait for
    them to end: left to notice this process's end, they outlived it for a moment, and as
    orphans stayed zombies where nothing reaps them (some containers' first process)."""
    for server in (forkserver._forkserver, resource_tracker._resource_tracker):
        stop = getattr(server, "_stop", None)  # CPython's own shutdown of each
        if stop is not None:
            stop()


@functools.cache
def _stop_at_exit() -> None:
    atexit.register(stop_child_server)  # once: the cache makes later calls no-ops


def die_with(pid: int) -> None:
    """In a child: kill this process (SIGKILL) as soon as process ``pid`` ends. ``pid`` is the
    sp-extract process that asked for the child (the fork server is only its parent), so that
    no child outlives a killed run: a decoding worker would wait for ever for its next task, a
    COLMAP child go on writing. A thread waits on the process (a pidfd where Linux has them)."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:  # it ended before the child started
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here (not Linux, or an old kernel): poll
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _alive(pid):
                time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="sp-extract-watch-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True
