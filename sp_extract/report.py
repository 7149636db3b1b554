"""Feedback: progress on stderr while a run goes, its warnings, and its report (printed and as JSON).

On a terminal a rich progress bar (images/s, ETA); otherwise plain periodic lines, for cron
logs. ``Report`` is every command's summary (a subclass adds the command's own fields);
``warn`` is the one channel of warnings: shown live and recorded in the running command's
report. The summary counts only what is durable in the store.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import KW_ONLY, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from .errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError, SpExtractWarning


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """``count`` with its noun: ``1 model``, ``2 models``, ``1 match`` (``plural`` given)."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def listed(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, quoted, and how many more."""
    text = ", ".join(f"'{name}'" for name in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def count_statistics(counts: Sequence[int]) -> dict[str, float] | None:
    """min, mean (0.1), median and max of per-item counts (keypoints, matches); None for none."""
    if not len(counts):
        return None
    return {
        "min": int(min(counts)),
        "mean": round(statistics.fmean(counts), 1),
        "median": float(statistics.median(counts)),
        "max": int(max(counts)),
    }


# -- the warning channel ------------------------------------------------------------------------
@dataclass
class _Run:
    """The command running now: its warnings, whether they are shown, the bar they go above."""

    warnings: list[str] = field(default_factory=list)
    live: bool = True  # shown on stderr as they happen (not in a Dask worker: its driver shows them)
    bar: Progress | None = None


_running: ContextVar[_Run | None] = ContextVar("sp_extract_run", default=None)


@contextlib.contextmanager
def recording(live: bool = True) -> Iterator[list[str]]:
    """Run a command: ``warn`` records its warnings in the list yielded, which every ``Report``
    made meanwhile holds as its ``warnings``, and (``live``) shows each at once on stderr."""
    token = _running.set(_Run(live=live))
    try:
        yield _running.get().warnings  # type: ignore[union-attr]
    finally:
        _running.reset(token)


def warn(message: str) -> None:
    """Something the user should know or change, although the run goes on. While a command runs
    (``recording``): shown once as ``sp-extract: warning: MESSAGE`` on stderr (above the progress
    bar if one is up) and recorded in its report, so that the summary and the JSON report list
    it. Otherwise (the Python API): a ``SpExtractWarning``, attributed to the caller's line."""
    run = _running.get()
    if run is None:
        warnings.warn(message, SpExtractWarning, stacklevel=3)
    elif message not in run.warnings:
        run.warnings.append(message)
        line = f"sp-extract: warning: {message}"
        if run.live and run.bar is not None:
            run.bar.message(line)
        elif run.live:
            print(line, file=sys.stderr, flush=True)


def _run_warnings() -> list[str]:
    """A new report's warnings: the running command's, else its own."""
    run = _running.get()
    return run.warnings if run is not None else []


# -- the report ---------------------------------------------------------------------------------
@dataclass
class Report:
    """What one command did: every command's summary is a ``Report``. A subclass adds its own
    fields, its printed lines (``body``) and, where its JSON differs from its fields,
    ``to_dict``; the shared fields, warnings, notes and JSON writing are these."""

    _: KW_ONLY
    command: str = ""
    exit_code: int = EXIT_OK
    wall_time_s: float = 0.0
    warnings: list[str] = field(default_factory=_run_warnings)  # while a command runs: its list (warn)
    notes: list[str] = field(default_factory=list)  # printed last, e.g. about the output store

    def body(self) -> list[str]:
        """The command's own lines of the printed summary."""
        return []

    def lines(self) -> list[str]:
        """The printed summary: the command's lines, its warnings, its notes."""
        return [*self.body(), *(f"warning: {warning}" for warning in self.warnings), *self.notes]

    def shared(self) -> dict[str, Any]:
        """The entries every JSON report has: command, exit code, wall time, warnings, notes."""
        return {f.name: copy.copy(getattr(self, f.name)) for f in fields(Report)}

    def to_dict(self) -> dict[str, Any]:
        """The ``--json-report`` content: every field."""
        return asdict(self)

    def write_json(self, path: Path) -> None:
        try:
            Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{path}: cannot write the JSON report ({error.strerror or error})") from error


@dataclass
class Summary(Report):
    """What one run over items (images, pairs, store entries) did."""

    output: str
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # per item: keypoints, or matches
    interrupted: bool = False
    unit: str = "images"
    count_label: str = "keypoints per image"
    device: str = ""  # what ran the work, e.g. "cuda:0" and "torch 2.13.0 (cuda, fp16)"
    backend: str = ""
    failures_shown: bool = False  # each failure was printed as it happened: not listed again

    def finish(self, completed: int, started: float) -> Summary:
        """Close the run: ``completed`` items durable, wall time since ``started`` (monotonic)."""
        self.done = completed
        if not self.interrupted:
            self.exit_code = EXIT_SOME_FAILED if self.failed else EXIT_OK
        self.wall_time_s = time.monotonic() - started
        return self

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        del data["counts"], data["failures_shown"]
        data["failed_count"] = len(self.failed)
        data["throughput_per_s"] = round(self.done / self.wall_time_s, 3) if self.wall_time_s else 0.0
        data[self.count_label.replace(" ", "_")] = self.count_stats()
        return data

    def count_stats(self) -> dict[str, float | None]:
        # nothing processed: no statistics (null in JSON)
        return count_statistics(self.counts) or dict.fromkeys(("min", "mean", "median", "max"))

    def body(self) -> list[str]:
        stats = self.count_stats()
        rate = self.done / self.wall_time_s if self.wall_time_s else 0.0
        lines = [
            f"{self.command}: {counted(self.done, self.unit[:-1], self.unit)} saved, {self.skipped} already "
            f"in {self.output}, {len(self.failed)} failed"
            + (" (listed above)" if self.failed and self.failures_shown else "")
            + (" (interrupted)" if self.interrupted else "")
        ]
        if self.counts:
            lines += [
                f"{self.count_label}: min {stats['min']}, mean {stats['mean']}, median {stats['median']}, "
                f"max {stats['max']}",
                f"wall time {self.wall_time_s:.1f} s, {rate:.2f} {self.unit}/s",
            ]
        else:  # statistics of nothing would only be zeros
            lines.append(f"no {self.unit} saved in this run; wall time {self.wall_time_s:.1f} s")
        if self.device:
            lines.append(f"device {self.device}" + (f", backend {self.backend}" if self.backend else ""))
        if not self.failures_shown:
            lines += [f"failed: {f['name']}: {f['reason']}" for f in self.failed]
        return lines


class Progress:
    """Progress of ``total`` items: a rich bar on a terminal, else a line every ``interval`` s."""

    def __init__(
        self, total: int, unit: str, quiet: bool = False, stream: TextIO | None = None, interval: float = 10.0
    ) -> None:
        self.total = total
        self.unit = unit
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interval = interval
        self.completed = 0
        self.start = time.monotonic()
        self._last_line = self.start
        self._bar = None
        if not quiet and total and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._bar.add_task(
                "extracting" if unit == "images" else "matching", total=total, rate=""
            )
            self._bar.start()
            if (run := _running.get()) is not None:
                run.bar = self  # warnings go above it

    def advance(self, count: int) -> None:
        """Mark ``count`` more items as durable."""
        if count <= 0:
            return
        self.completed += count
        elapsed = time.monotonic() - self.start
        rate = self.completed / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(self._task, advance=count, rate=f"{rate:.1f} {self.unit}/s")
        elif not self.quiet and time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            remaining = (self.total - self.completed) / rate if rate else float("nan")
            print(
                f"{self.completed}/{self.total} {self.unit} saved, {rate:.2f} {self.unit}/s, "
                f"ETA {remaining:.0f} s",
                file=self.stream,
                flush=True,
            )

    def message(self, text: str) -> None:
        """A line for the user (a failed image, say), above the bar if there is one.

        Silent when quiet: the summary repeats what these lines report.
        """
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        elif not self.quiet:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            if (run := _running.get()) is not None and run.bar is self:
                run.bar = None


@dataclass
class ExtractSummary(Summary):
    """An extraction's summary: ``Summary`` plus what real photo collections need reported:
    files not read (``unsupported``: image formats it cannot read, listed; ``other_files``: other
    files, counted by extension), images turned by their EXIF orientation, masks, tiled images."""

    unsupported: list[str] = field(default_factory=list)
    other_files: dict[str, int] = field(default_factory=dict)
    orientation_applied: int = 0
    masks_used: bool = False
    masks_missing: int = 0
    masked_shares: list[float] = field(default_factory=list)  # per masked image: its zero pixels' share
    tiled: int = 0

    def note_image(self, orientation: int, masked_share: float | None) -> None:
        """Record one extracted image: its EXIF orientation applied, its mask's masked share."""
        self.orientation_applied += orientation != 1
        if masked_share is not None:
            self.masked_shares.append(masked_share)
        elif self.masks_used:
            self.masks_missing += 1

    def masked_share_mean(self) -> float:
        return round(statistics.fmean(self.masked_shares), 4) if self.masked_shares else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        del data["masked_shares"]
        data["unsupported_count"] = len(self.unsupported)
        data["masked_images"] = len(self.masked_shares)
        data["masked_share_mean"] = self.masked_share_mean()
        return data

    def body(self) -> list[str]:
        lines = super().body()
        notes = (
            [f"EXIF orientation applied to {self.orientation_applied}"] if self.orientation_applied else []
        )
        if self.masks_used:
            notes.append(
                f"masked {len(self.masked_shares)} (mean {100 * self.masked_share_mean():.1f}% of pixels), "
                f"{self.masks_missing} without a mask (whole image used)"
            )
        if self.tiled:
            notes.append(f"tiled network on {self.tiled}")
        if notes:
            lines.insert(2, "images: " + "; ".join(notes))
        if self.other_files:
            kinds = ", ".join(
                f"{count} {ext or '(no extension)'}" for ext, count in sorted(self.other_files.items())
            )
            lines.append(f"not images, not read: {sum(self.other_files.values())} files ({kinds})")
        lines += [f"unsupported format: {name}" for name in self.unsupported]
        return lines
