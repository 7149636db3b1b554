"""The ``pairs`` group: pairs files (for match-pairs, hloc or COLMAP) from the names of a store or
folder, exhaustive, sequential, spatial, from a list or by retrieval."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import EXIT_SOME_FAILED, ConfigError
from .errors import reports_errors
from .options import FILE, config_from, device_option, file_option, images_option, out_option, stacked

_pairs_out_option = out_option(
    "pairs.txt", "Pairs file to write: 'name0 name1' a line (hloc / COLMAP format)."
)
_source_options = stacked(
    file_option("--features", "feats.h5", "Take the image names from this feature store."),
    images_option(
        "Take the image names from this folder instead (as extraction names them).", required=False
    ),
    _pairs_out_option,
)


def _pairable(names: list[str]) -> list[str]:
    """``names`` without those a pairs file cannot hold (white space), with a warning naming them."""
    from ..extraction.discover import unpairable
    from ..report import counted, listed, warn

    spaced = unpairable(names)
    if spaced:
        warn(
            f"{counted(len(spaced), 'image')} left out, white space in the name (pairs files "
            f"separate names by white space): {listed(spaced)}; rename them and extract them again"
        )
    left_out = set(spaced)
    return [name for name in names if name not in left_out]


def _write_pairs(pairs: list[tuple[str, str]], out: Path) -> None:
    from ..pairs.core import write_pairs

    write_pairs(pairs, out)
    click.echo(f"{len(pairs)} pairs written to {out}", err=True)


@click.group()
def pairs() -> None:
    """Write a pairs file (for match-pairs, hloc or COLMAP) from the names of a store or folder."""


@pairs.command()
@_source_options
@reports_errors
def exhaustive(features: Path, images: Path | None, out: Path) -> None:
    """Every unordered pair of images once: n (n - 1) / 2 pairs."""
    from ..pairs.core import exhaustive_pairs, source_names

    _write_pairs(exhaustive_pairs(_pairable(source_names(features, images))), out)


@pairs.command()
@click.option("--window", "-k", default=10, show_default=True, help="Pair each image with its next K.")
@click.option("--loop", is_flag=True, help="Also pair the last images with the first (closed sequences).")
@click.option(
    "--loop-closure",
    type=int,
    help="Also pair each image with its K most similar images ('pairs retrieval'; needs --features).",
)
@_source_options
@reports_errors
def sequential(
    window: int, loop: bool, loop_closure: int | None, features: Path, images: Path | None, out: Path
) -> None:
    """Each image with the next --window images in name order (video, drone strips); with
    --loop-closure K also with its K most similar images, so revisited places are matched."""
    from ..pairs.core import merge_pairs, sequential_pairs, source_names

    pairs = sequential_pairs(_pairable(source_names(features, images)), window, loop)
    if loop_closure is not None:
        from ..pairs.retrieval import RetrievalOptions, retrieval_pairs

        if images is not None:
            raise ConfigError("--loop-closure needs the descriptors of --features, not --images")
        pairs = merge_pairs(pairs, retrieval_pairs(features, RetrievalOptions(loop_closure, connect=False)))
    _write_pairs(pairs, out)


@pairs.command()
@images_option("The image folder (positions are read from the EXIF GPS tags of its images).")
@click.option(
    "--max-distance", default=100.0, show_default=True, help="Pair only images this close (metres)."
)
@click.option(
    "--num-matched", "-k", default=20, show_default=True, help="Pair each image with its K nearest."
)
@click.option(
    "--use-altitude", is_flag=True, help="Include the GPS altitude in distances (default: ignore it)."
)
@_pairs_out_option
@reports_errors
def spatial(images: Path, max_distance: float, num_matched: int, use_altitude: bool, out: Path) -> None:
    """Each image with its K nearest images within --max-distance by EXIF GPS position (drone and
    phone surveys). Images without a position are listed and not paired (exit code 1)."""
    from ..pairs.core import source_names
    from ..pairs.spatial import spatial_pairs

    pairs, missing = spatial_pairs(
        images, _pairable(source_names(None, images)), max_distance, num_matched, use_altitude
    )
    _write_pairs(pairs, out)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        click.echo(f"{len(missing)} image(s) without an EXIF GPS position, not paired: {shown}", err=True)
        sys.exit(EXIT_SOME_FAILED)


@pairs.command("from-list")
@click.argument("image_list", type=click.Path(dir_okay=False, path_type=Path))
@_source_options
@reports_errors
def from_list(image_list: Path, features: Path, images: Path | None, out: Path) -> None:
    """Every unordered pair of the images named in IMAGE_LIST (one name a line)."""
    from ..pairs.core import exhaustive_pairs, read_name_list, source_names

    names = read_name_list(image_list, source_names(features, images))
    _write_pairs(exhaustive_pairs(_pairable(names)), out)


@pairs.command()
@click.option(
    "--num-matched", "-k", default=10, show_default=True, help="Pair each image with its K most similar."
)
@click.option(
    "--rerank",
    "rerank_top",
    type=int,
    help="Re-rank each image's M most similar by NN matching: those whose matches fit a fundamental "
    "matrix significantly better than chance first, the others in similarity order; keep K.",
)
@click.option(
    "--query-list", type=FILE, help="Only these images (one name a line) get neighbours (default: all)."
)
@click.option(
    "--db-list", type=FILE, help="Neighbours only among these images (one name a line; default: all)."
)
@click.option(
    "--exclude-self/--include-self",
    default=True,
    show_default=True,
    help="An image is never its own neighbour (hloc); --include-self lets it take one of its K slots.",
)
@click.option(
    "--connect/--no-connect",
    default=True,
    show_default=True,
    help="Add the most similar pairs joining separate groups of images (a connected graph for SfM).",
)
@click.option("--clusters", default=64, show_default=True, help="VLAD codebook size (k-means centroids).")
@click.option("--dims", default=64, show_default=True, help="PCA dimensions of the local descriptors.")
@device_option("Device for the similarity search and --rerank: ")
@file_option("--features", "feats.h5", "Feature store whose descriptors describe the images.")
@_pairs_out_option
@reports_errors
def retrieval(device: str, features: Path, out: Path, **options: Any) -> None:
    """Each image with its K most similar images by a VLAD global descriptor of its SuperPoint
    descriptors (no other network). The descriptors are kept in FEATURES.retrieval/ and only
    new images are described on the next run; --rerank M verifies the M best by matching."""
    from ..matching.rerank import rerank
    from ..pairs.retrieval import RetrievalConfig, RetrievalOptions, retrieval_pairs

    config = config_from(RetrievalConfig, options)  # --clusters, --dims
    pairs = retrieval_pairs(features, config_from(RetrievalOptions, options), config, device, rerank=rerank)
    _write_pairs(pairs, out)
