"""Command-line interface (click). ``sp-extract IMAGES_DIR --out feats.h5`` runs ``extract``.

Heavy modules (torch, OpenCV, h5py) are imported inside the commands, so ``--help`` is fast.
Expected failures print one line ``sp-extract: error: ...`` and exit 2 (usage, configuration)
or 1 (some images failed); an interrupted run exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import EXIT_SIGINT, SpExtractError


class DefaultCommandGroup(click.Group):
    """A group whose ``extract`` command runs when the first word is not a command name."""

    default_command = "extract"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into a one-line message and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpExtractError as error:
            click.echo(f"sp-extract: error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo(
                "sp-extract: aborted; finished results are kept and the next run picks them up", err=True
            )
            sys.exit(EXIT_SIGINT)

    return wrapper


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sp-extract")
def cli() -> None:
    """Batch SuperPoint features for Structure-from-Motion, in hloc/COLMAP-compatible HDF5.

    \b
    sp-extract IMAGES_DIR --out feats.h5      extract (same as 'sp-extract extract ...')
    Exit codes: 0 all done, 1 some images failed, 2 usage or configuration error,
    130/143 interrupted by SIGINT/SIGTERM (finished work is saved).
    """


@cli.command()
@click.argument("images_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="HDF5 feature store to create or extend (hloc layout).",
)
@click.option(
    "--max-keypoints", default=-1, show_default=True, help="Keep the best N per image; -1 keeps all."
)
@click.option("--threshold", default=0.005, show_default=True, help="Detection score threshold.")
@click.option("--nms-radius", default=4, show_default=True, help="Non-maximum suppression radius (px).")
@click.option("--border", default=4, show_default=True, help="Drop keypoints this close to the border (px).")
@click.option(
    "--resize-max",
    default=1024,
    show_default=True,
    help="Downscale so the longest side is at most this (px); 0 keeps the native size.",
)
@click.option("--resize-force", is_flag=True, help="Also upscale smaller images to --resize-max.")
@click.option("--fp32-descriptors", is_flag=True, help="Store descriptors as float32 (default float16).")
@click.option("--batch-size", default=4, show_default=True, help="Images per network batch.")
@click.option(
    "--num-workers", type=int, default=None, help="Decoding processes [default: cores - 1, at most 4]."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--weights",
    default=None,
    help="superpoint-v1 (default, non-commercial), superpoint-v6-mit, or a file "
    "(.pth, Hugging Face .safetensors/.bin). Env: SP_EXTRACT_WEIGHTS.",
)
@click.option(
    "--image-list",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Extract only these images: one path relative to IMAGES_DIR a line.",
)
@click.option("--overwrite", is_flag=True, help="Start the store afresh instead of resuming.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; errors and the summary only.")
@click.option(
    "--json-report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the run's summary as JSON to this file.",
)
@reports_errors
def extract(
    images_dir: Path,
    out: Path,
    max_keypoints: int,
    threshold: float,
    nms_radius: int,
    border: int,
    resize_max: int,
    resize_force: bool,
    fp32_descriptors: bool,
    batch_size: int,
    num_workers: int | None,
    device: str,
    weights: str | None,
    image_list: Path | None,
    overwrite: bool,
    quiet: bool,
    json_report: Path | None,
) -> None:
    """Extract SuperPoint features of every image below IMAGES_DIR into --out.

    Image names are paths relative to IMAGES_DIR, as COLMAP records them. Re-running extracts
    only the images not yet in the store; a store made with other settings is refused.
    """
    from .config import ExtractConfig
    from .extract import extract as run_extract

    config = ExtractConfig(
        max_keypoints=max_keypoints,
        threshold=threshold,
        nms_radius=nms_radius,
        border=border,
        resize_max=resize_max,
        resize_force=resize_force,
        fp32_descriptors=fp32_descriptors,
    )
    summary = run_extract(
        images_dir,
        out,
        config,
        weights=weights,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        image_list=image_list,
        overwrite=overwrite,
        quiet=quiet,
    )
    for line in summary.lines():
        click.echo(line, err=True)
    if json_report:
        summary.write_json(json_report)
    sys.exit(summary.exit_code)


def main() -> None:
    """Console-script entry point."""
    cli()
