"""How a command runs and ends: its warnings recorded (``report.recording``), expected failures as
one line and their exit code, unexpected ones as one line with the traceback in a log file, its
report printed (and written as JSON) with its exit code."""

from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import __version__
from ..errors import EXIT_SIGINT, EXIT_SIGPIPE, EXIT_UNEXPECTED, SpExtractError
from ..interrupt import ABORTED, signals_raise
from ..report import recording

if TYPE_CHECKING:
    from ..report import Report


def unexpected_error(command: str, error: Exception) -> str:
    """The one line for an unexpected exception; its traceback goes to stderr with ``--debug``,
    else to a log file that the line names."""
    context = click.get_current_context(silent=True)
    debug = bool(context and context.find_root().params.get("debug"))
    text = "".join(traceback.format_exception(error))
    where = "shown above"
    if debug:
        click.echo(text, err=True, nl=False)
    else:
        try:
            with tempfile.NamedTemporaryFile(
                "w", prefix="sp-extract-error-", suffix=".log", delete=False, encoding="utf-8"
            ) as log:
                log.write(f"sp-extract {__version__}: {' '.join(sys.argv)}\n{text}")
            where = f"in {log.name}"
        except OSError:
            where = "not saved (no room for a log file); run again with 'sp-extract --debug' to see it"
    cause = (str(error).strip().splitlines() or [""])[0]
    return (
        f"unexpected error in {command}: {type(error).__name__}{': ' + cause if cause else ''} "
        f"(traceback {where}); please report it. Finished results are kept"
    )


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command with its warnings recorded for its report; turn expected failures into a
    one-line message and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with recording(), signals_raise():  # SIGTERM unwinds a command as Ctrl-C does (a run takes over)
                return command(*args, **kwargs)
        except SystemExit:  # the command is over: Ctrl-C must not break its clean exit
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise
        except SpExtractError as error:
            click.echo(f"sp-extract: error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt as interrupt:  # Interrupted (SIGINT, SIGTERM) or Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # more Ctrl-C would only break the clean-up
            click.echo(ABORTED, err=True)
            sys.exit(getattr(interrupt, "exit_code", EXIT_SIGINT))
        except (click.ClickException, click.exceptions.Exit, click.Abort):  # click's own, as usual
            raise
        except BrokenPipeError:  # the output's reader closed it (``| head``): nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's flush
            sys.exit(EXIT_SIGPIPE)
        except Exception as error:  # a bug or an unforeseen failure: not "some items failed" (1)
            click.echo(f"sp-extract: error: {unexpected_error(command.__name__, error)}", err=True)
            sys.exit(EXIT_UNEXPECTED)

    return wrapper


def finish_run(report: Report, json_report: Path | None, to_stdout: bool = False) -> None:
    """Print a command's report (on stderr, or ``to_stdout`` where the lines are the command's
    output), write it as JSON if asked, and exit with its code."""
    for line in report.lines():
        click.echo(line, err=not to_stdout)
    if json_report:
        report.write_json(json_report)
    sys.exit(report.exit_code)
