"""The run of extract and match-pairs into their store: the store's writer, the progress, the
graceful stop, saving what is finished when the run fails, and the summary it ends with."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .interrupt import StopFlag, graceful_stop
from .report import Progress, Summary
from .store.writer import StoreWriter


class StoreRun:
    """One resumable run into a store, told in its ``summary`` (``quiet``: no progress output).

    ``writing`` opens the store; ``running`` shows the progress and turns the first stop signal
    into a request to stop, which the work checks between steps with ``stopped``; ``finish``
    closes the summary, counting what the progress saw saved::

        run = StoreRun(summary, quiet)
        with run.writing(out, "features", settings, overwrite, info) as writer:
            with run.running(len(todo), salvage=save_finished):
                for step in steps:
                    ...  # run.fail(name, reason), run.progress.advance(saved)
                    if run.stopped():
                        break
        return run.finish()
    """

    def __init__(self, summary: Summary, quiet: bool) -> None:
        self.summary = summary
        self.quiet = quiet
        self.started = time.monotonic()
        self.progress = Progress(0, summary.unit, quiet=True)  # nothing to show before ``running``
        self._stop = StopFlag()
        summary.failures_shown = not quiet

    @contextlib.contextmanager
    def writing(
        self, out: Path, kind: str, settings: dict[str, Any], overwrite: bool, info: dict[str, str]
    ) -> Iterator[StoreWriter]:
        """The store's writer for the block (``StoreWriter``: closed at its end, which makes what was
        added durable; only unlocked after an error); the store's notes go to the summary."""
        with StoreWriter(out, kind, settings, overwrite=overwrite, info=info) as writer:
            yield writer
        self.summary.notes += writer.notes

    @contextlib.contextmanager
    def running(self, total: int, salvage: Callable[[], None] | None = None) -> Iterator[None]:
        """Run the block with the progress of ``total`` items and the graceful stop (``interrupt``);
        if the block raises, ``salvage`` (given) saves what is finished before the error goes on."""
        self.progress = Progress(total, self.summary.unit, quiet=self.quiet)
        try:
            with graceful_stop() as self._stop:
                yield
        except Exception:
            if salvage is not None:
                salvage()
            raise
        finally:
            self.progress.close()

    def stopped(self) -> bool:
        """Whether a stop signal came; the summary then records the interruption and its exit code."""
        if self._stop:
            self.summary.interrupted, self.summary.exit_code = True, self._stop.exit_code
        return bool(self._stop)

    def fail(self, name: str, reason: str) -> None:
        """Record a failed item (an image, a pair) and show it; the run goes on."""
        self.summary.failed.append({"name": name, "reason": reason})
        self.progress.message(f"failed: {name}: {reason}")

    def finish(self) -> Summary:
        """The summary, closed: what the progress saw saved, the wall time since the run began."""
        return self.summary.finish(self.progress.completed, self.started)
