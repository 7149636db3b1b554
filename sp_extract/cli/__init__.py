"""Command-line interface (click): the ``sp-extract`` group, its commands and ``main``.
``sp-extract IMAGES_DIR --out feats.h5`` runs ``extract``.

Options are declared once in ``options`` (from the config dataclasses), the commands one module
per area (extract, pairs, match, store, sfm, inspect), how they end in ``errors``.
Heavy modules (torch, OpenCV, h5py) are imported inside the commands, so ``--help`` is fast.
Expected failures print one line ``sp-extract: error: ...`` and exit 2 (usage, configuration)
or 1 (some images failed); an interrupted run exits 130 (SIGINT) or 143 (SIGTERM); anything
unexpected prints one line and exits 3, its traceback in a log file (or shown with ``--debug``).
"""

from __future__ import annotations

import difflib
import os
import sys

import click

from .. import __version__
from ..errors import EXIT_SIGINT
from . import extract, inspect, match, pairs, sfm, store


class DefaultCommandGroup(click.Group):
    """A group whose ``extract`` command runs when the first word is not a command name.

    ``help [COMMAND]`` shows the help. A first word that is no existing path but close to a
    command name (``match_pairs``, ``reconstrcut``) is a mistyped command, not a folder.
    """

    default_command = "extract"
    global_flags = ("--debug",)  # options of the group itself, given before the command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((i for i, arg in enumerate(args) if arg not in self.global_flags), len(args))
        head, rest = args[:first], args[first:]
        word = rest[0] if rest else None
        if word == "help" and not os.path.lexists(word):
            rest = [rest[1], "--help"] if rest[1:] and rest[1] in self.commands else ["--help"]
        elif word is not None and word not in self.commands and not word.startswith("-"):
            typo = word.replace("_", "-").lower()
            close = difflib.get_close_matches(typo, list(self.commands), n=1, cutoff=0.6)
            if close and not os.path.lexists(word):
                raise click.UsageError(f"no command or folder '{word}' (did you mean '{close[0]}'?)", ctx)
        if rest and rest[0] not in self.commands and rest[0] not in ("--help", "-h", "--version", "-V"):
            rest = [self.default_command, *rest]
        return super().parse_args(ctx, [*head, *rest])


COMMANDS = (
    *(extract.extract, extract.export, pairs.pairs, match.match_pairs),
    *(store.merge, store.repair, store.compact),
    *(sfm.colmap, sfm.reconstruct, sfm.sfm, sfm.export_model, sfm.report),
    *(inspect.info, inspect.show, inspect.evaluate),
)


@click.group(
    cls=DefaultCommandGroup, commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, "-V", "--version", prog_name="sp-extract")
@click.option(
    "--debug",
    is_flag=True,
    envvar="SP_EXTRACT_DEBUG",
    help="Print the traceback of an unexpected error (exit 3) instead of saving it to a log file. "
    "Env: SP_EXTRACT_DEBUG=1.",
)
def cli(debug: bool) -> None:
    """Batch SuperPoint features for Structure-from-Motion, in hloc/COLMAP-compatible HDF5.

    \b
    sp-extract IMAGES_DIR --out feats.h5      extract (same as 'sp-extract extract ...')
    sp-extract pairs exhaustive               pairs of the images in feats.h5 -> pairs.txt
    sp-extract match-pairs pairs.txt          match them -> matches.h5 (hloc layout)
    sp-extract colmap --images DIR            COLMAP database of them -> database.db
    sp-extract reconstruct --images DIR       COLMAP's mapper (incremental, global) -> sparse/N
    sp-extract merge feats.h5 feats.h5.shards/  shard stores (--shard K/N) -> one store
    sp-extract sfm IMAGES_DIR WORK_DIR        all five in one, growing the model on re-runs
    sp-extract export-model MODEL OUT --format F  for 3DGS, nerfstudio, instant-ngp, OpenMVS, PLY
    sp-extract report WORK_DIR                the page of an sfm run (sfm writes it too)
    sp-extract info feats.h5                  what a store holds; 'show' draws it
    sp-extract compact feats.h5               fold a grown store into one file, for hloc
    sp-extract evaluate homography DIR        keypoint accuracy on synthetic pairs
    sp-extract evaluate poses MODEL REF       camera poses against reference poses (pose AUC)
    Exit codes: 0 all done, 1 some images (pairs) failed, 2 usage or configuration error,
    3 unexpected error (one line; the traceback in a log file, or shown with 'sp-extract --debug'),
    130/143 interrupted by SIGINT/SIGTERM (finished work is saved), 141 output closed by its reader.
    """


def main() -> None:
    """Console-script entry point; usage errors print one line, as every other error does."""
    try:
        code = cli.main(standalone_mode=False)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as error:  # click >= 8.2
        error.show()  # the help text, as click prints it
        sys.exit(error.exit_code)
    except click.ClickException as error:
        hint = f"; see '{error.ctx.command_path} --help'" if getattr(error, "ctx", None) else ""
        click.echo(f"sp-extract: error: {error.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("sp-extract: aborted", err=True)
        sys.exit(EXIT_SIGINT)
    sys.exit(code if isinstance(code, int) else 0)
