"""Exception types and the exit codes the CLI maps them to.

Expected failures raise one of these with a one-line message naming the file and the cause;
the CLI prints the message (never a traceback) and exits with ``exit_code``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_UNEXPECTED = 3  # an unexpected error (a bug, an unforeseen failure): one line, traceback logged
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGPIPE = 141  # the reader of the output went away (`| head`): quiet, as a shell reports it


class SpExtractError(Exception):
    """Base class: a failure the user can act on, reported as one line."""

    exit_code = EXIT_USAGE


class ConfigError(SpExtractError):
    """Bad option, no images found, inconsistent settings."""


class WeightsError(SpExtractError):
    """Weights missing, unreadable, of an unknown format or failing their checksum."""


class StoreError(SpExtractError):
    """The output store is unusable: not HDF5, another tool's file, other settings, locked."""


class SpExtractWarning(UserWarning):
    """A warning to a caller of the Python API (``extract``, ``match_pairs``, ``run_sfm`` ...):
    what ``report.warn`` raises when no command runs. Commands never raise it: ``warn`` shows
    their warnings as one line and records them in their report (summary, JSON report)."""


class DecodeError(Exception):
    """One image cannot be decoded; reported for that image while the run goes on."""
