"""Command-line interface (click). ``sp-extract IMAGES_DIR --out feats.h5`` runs ``extract``.

Heavy modules (torch, OpenCV, h5py) are imported inside the commands, so ``--help`` is fast.
Expected failures print one line ``sp-extract: error: ...`` and exit 2 (usage, configuration)
or 1 (some images failed); an interrupted run exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .errors import EXIT_SIGINT, SpExtractError
from .interrupt import ABORTED

if TYPE_CHECKING:
    from .report import Summary


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
        except SystemExit:  # the command is over: Ctrl-C must not break its clean exit
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise
        except SpExtractError as error:
            click.echo(f"sp-extract: error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # more Ctrl-C would only break the clean-up
            click.echo(ABORTED, err=True)
            sys.exit(EXIT_SIGINT)

    return wrapper


def finish_run(summary: Summary, json_report: Path | None) -> None:
    """Print a run's summary on stderr, write it as JSON if asked, and exit with its code."""
    for line in summary.lines():
        click.echo(line, err=True)
    if json_report:
        summary.write_json(json_report)
    sys.exit(summary.exit_code)


def stacked(*options: Callable[..., Any]) -> Callable[..., Any]:
    """One decorator applying click options as if stacked in the order listed."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def file_option(name: str, default: str, help: str) -> Callable[..., Any]:
    """A ``NAME FILE`` option defaulting to the path ``default`` (shown in --help)."""
    return click.option(
        name,
        type=click.Path(dir_okay=False, path_type=Path),
        default=Path(default),
        show_default=True,
        help=help,
    )


json_report_option = click.option(
    "--json-report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the run's summary as JSON to this file.",
)
run_options = stacked(  # every store-writing command has these
    click.option("--overwrite", is_flag=True, help="Start the store afresh instead of resuming."),
    click.option("--quiet", "-q", is_flag=True, help="No progress output; errors and the summary only."),
    json_report_option,
)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sp-extract")
def cli() -> None:
    """Batch SuperPoint features for Structure-from-Motion, in hloc/COLMAP-compatible HDF5.

    \b
    sp-extract IMAGES_DIR --out feats.h5      extract (same as 'sp-extract extract ...')
    sp-extract pairs exhaustive               pairs of the images in feats.h5 -> pairs.txt
    sp-extract match-pairs pairs.txt          match them -> matches.h5 (hloc layout)
    sp-extract colmap --images DIR            COLMAP database of them -> database.db
    sp-extract reconstruct --images DIR       COLMAP's incremental mapper -> sparse/N
    Exit codes: 0 all done, 1 some images (pairs) failed, 2 usage or configuration error,
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
@click.option(
    "--subpixel",
    is_flag=True,
    help="Move keypoints to sub-pixel score peaks (quadratic fit); lowers SfM reprojection error.",
)
@click.option(
    "--reduced-decode",
    is_flag=True,
    help="Decode JPEGs at 1/2, 1/4 or 1/8 scale when the working size allows (faster on large "
    "photos; pixels differ slightly from a full decode). Always on above 100 Mpx.",
)
@click.option(
    "--orientation",
    type=click.Choice(["exif", "ignore"]),
    default="exif",
    show_default=True,
    help="exif: the network sees each photo as a viewer shows it (EXIF orientation of JPEG, TIFF, "
    "PNG, WebP); keypoints and image_size stay in the stored pixel frame, the one COLMAP reads. "
    "ignore: the stored pixels as they are (a setting of the store).",
)
@click.option(
    "--masks",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="COLMAP-style masks: DIR/NAME.png for image NAME, the stored image's size; no keypoints "
    "on zero pixels. An image without a mask uses the whole image (a setting of the store).",
)
@click.option(
    "--tile",
    default="auto",
    metavar="auto|0|SIZE",
    show_default=True,
    help="Run the network tile by tile (bounded memory for huge images at --resize-max 0; same "
    "features): auto tiles images above about 5 Mpx, 0 never, SIZE in tiles of SIZE px (multiple of 8).",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Images of one size per network batch [default: 1 on the CPU, where batching is no "
    "faster; 8 on a GPU].",
)
@click.option(
    "--num-workers",
    type=int,
    default=None,
    help="Decoding processes, 0 to decode in the main process [default: 0 when the network runs on a "
    "CPU of at most 2 cores, else cores - 1, at most 4].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]),
    default="auto",
    show_default=True,
    help="What runs the network. auto: onnxruntime on the CPU at fp32, else torch; "
    "openvino needs the [openvino] extra.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Network arithmetic; fp16/bf16 are faster on GPUs but change the features slightly "
    "(a setting of the store).",
)
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
@run_options
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
    subpixel: bool,
    reduced_decode: bool,
    orientation: str,
    masks: Path | None,
    tile: str,
    batch_size: int | None,
    num_workers: int | None,
    device: str,
    backend: str,
    precision: str,
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
    from .extraction.config import ExtractConfig
    from .extraction.pipeline import extract as run_extract

    config = ExtractConfig(
        max_keypoints=max_keypoints,
        threshold=threshold,
        nms_radius=nms_radius,
        border=border,
        resize_max=resize_max,
        resize_force=resize_force,
        fp32_descriptors=fp32_descriptors,
        subpixel=subpixel,
        reduced_decode=reduced_decode,
        precision=precision,
        orientation=orientation,
        masks=str(masks) if masks else "",
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
        backend=backend,
        tile=tile,
    )
    finish_run(summary, json_report)


# -- matching: pairs files and match stores (issue 3) ----------------------------------------
_source_options = stacked(
    file_option("--features", "feats.h5", "Take the image names from this feature store."),
    click.option(
        "--images",
        type=click.Path(file_okay=False, path_type=Path),
        help="Take the image names from this folder instead (as extraction names them).",
    ),
    click.option(
        "--out",
        "-o",
        type=click.Path(dir_okay=False, path_type=Path),
        default=Path("pairs.txt"),
        show_default=True,
        help="Pairs file to write: 'name0 name1' a line (hloc / COLMAP format).",
    ),
)


def _write_pairs(pairs: list[tuple[str, str]], out: Path) -> None:
    from .pairs.core import write_pairs

    write_pairs(pairs, out)
    click.echo(f"{len(pairs)} pairs written to {out}", err=True)


@cli.group()
def pairs() -> None:
    """Write a pairs file (for match-pairs, hloc or COLMAP) from the names of a store or folder."""


@pairs.command()
@_source_options
@reports_errors
def exhaustive(features: Path, images: Path | None, out: Path) -> None:
    """Every unordered pair of images once: n (n - 1) / 2 pairs."""
    from .pairs.core import exhaustive_pairs, source_names

    _write_pairs(exhaustive_pairs(source_names(features, images)), out)


@pairs.command()
@click.option("--window", "-k", default=10, show_default=True, help="Pair each image with its next K.")
@click.option("--loop", is_flag=True, help="Also pair the last images with the first (closed sequences).")
@_source_options
@reports_errors
def sequential(window: int, loop: bool, features: Path, images: Path | None, out: Path) -> None:
    """Each image with the next --window images in name order (video, drone strips)."""
    from .pairs.core import sequential_pairs, source_names

    _write_pairs(sequential_pairs(source_names(features, images), window, loop), out)


@pairs.command("from-list")
@click.argument("image_list", type=click.Path(dir_okay=False, path_type=Path))
@_source_options
@reports_errors
def from_list(image_list: Path, features: Path, images: Path | None, out: Path) -> None:
    """Every unordered pair of the images named in IMAGE_LIST (one name a line)."""
    from .pairs.core import exhaustive_pairs, read_name_list, source_names

    _write_pairs(exhaustive_pairs(read_name_list(image_list, source_names(features, images))), out)


@cli.command("match-pairs")
@click.argument("pairs_file", metavar="PAIRS", type=click.Path(dir_okay=False, path_type=Path))
@file_option("--features", "feats.h5", "Feature store to match.")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("matches.h5"),
    show_default=True,
    help="HDF5 match store to create or extend (hloc layout).",
)
@click.option(
    "--mutual/--no-mutual", default=True, show_default=True, help="Keep only mutual nearest neighbours."
)
@click.option("--ratio", type=float, help="Lowe's ratio test on descriptor distances (hloc NN-ratio: 0.8).")
@click.option(
    "--max-distance", type=float, help="Largest L2 distance of unit descriptors (hloc NN-superpoint: 0.7)."
)
@click.option(
    "--verify",
    type=click.Choice(["fundamental", "homography"]),
    help="Keep only inliers of a fundamental matrix or homography (OpenCV USAC MAGSAC).",
)
@click.option(
    "--verify-threshold", default=4.0, show_default=True, help="Largest inlier error for --verify (px)."
)
@click.option("--batch-size", default=32, show_default=True, help="Pairs per matching batch.")
@click.option(
    "--cache-mb", default=1024, show_default=True, help="Memory for descriptors kept between pairs (MiB)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@run_options
@reports_errors
def match_pairs(
    pairs_file: Path,
    features: Path,
    out: Path,
    mutual: bool,
    ratio: float | None,
    max_distance: float | None,
    verify: str | None,
    verify_threshold: float,
    batch_size: int,
    cache_mb: int,
    device: str,
    overwrite: bool,
    quiet: bool,
    json_report: Path | None,
) -> None:
    """Match the descriptors of every pair in PAIRS ('name0 name1' a line) into --out.

    Nearest neighbours with the mutual check, ratio test and distance threshold of hloc's NN
    matchers. The pairs file is checked completely before matching. Re-running matches only the
    pairs not yet in the store; a store made with other settings or features is refused.
    """
    from .matching.config import MatchConfig
    from .matching.run import match_pairs as run_match_pairs

    config = MatchConfig(
        mutual=mutual,
        ratio=ratio,
        max_distance=max_distance,
        verify=verify,
        verify_threshold=verify_threshold,
    )
    summary = run_match_pairs(
        pairs_file,
        features,
        out,
        config,
        device=device,
        batch_size=batch_size,
        cache_mb=cache_mb,
        overwrite=overwrite,
        quiet=quiet,
    )
    finish_run(summary, json_report)


# -- reliability: salvaging damaged stores (issue 6) ------------------------------------------
@cli.command()
@click.argument("store", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Repaired store to create (must not exist) [default: STORE.repaired.h5 beside STORE].",
)
@click.option(
    "--json-report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write what was copied and lost as JSON to this file.",
)
@reports_errors
def repair(store: Path, out: Path | None, json_report: Path | None) -> None:
    """Copy every readable, complete entry of a damaged STORE into a new store.

    For a store truncated or corrupted by a crash of some other program: entries whose
    datasets are all readable (checksums verified where present) are copied, with the store's
    settings, into --out, which appears atomically; each lost entry is reported. Results a
    killed sp-extract run left in STORE.parts/ are included. STORE itself is not changed.
    Exit 0: nothing lost, 1: some entries lost, 2: nothing could be read.
    """
    from .store.repair import repair_store

    finish_run(repair_store(store, out), json_report)


# -- deployment: exporting the network (issue 5) ------------------------------------------------
@cli.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "openvino"]),
    default="onnx",
    show_default=True,
    help="onnx: one .onnx file; openvino: OUT (.xml) and its .bin (needs the [openvino] extra).",
)
@click.option(
    "--weights",
    default=None,
    help="As for extract: superpoint-v1 (default), superpoint-v6-mit or a file. Env: SP_EXTRACT_WEIGHTS.",
)
@reports_errors
def export(out: Path, fmt: str, weights: str | None) -> None:
    """Write the SuperPoint network to OUT for deployment (ONNX or OpenVINO IR, float32).

    \b
    input   image        float32 [batch, 1, height, width], grayscale in [0, 1]
    output  scores       float32 [batch, 8*(height//8), 8*(width//8)], keypoint probability per pixel
    output  descriptors  float32 [batch, 256, height//8, width//8], unit-norm descriptor per 8x8 cell
    Batch, height and width are dynamic. Keypoint selection (NMS, border, threshold, top-k,
    descriptor sampling) is not in the graph; README "Export" describes it. The weights'
    licence applies to the exported model.
    """
    from .extraction.backends import export_model

    for path in export_model(out, fmt, weights):
        click.echo(f"wrote {path}", err=True)


# -- COLMAP: database and reconstruction (issue 4) ----------------------------------------------
_colmap_options = stacked(  # --seed, --num-threads, --verbose and --json-report of both commands
    click.option("--seed", default=0, show_default=True, help="Seed of COLMAP's random choices."),
    click.option(
        "--num-threads", default=-1, show_default=True, help="Threads for COLMAP; -1 all, 1 repeatable."
    ),
    click.option("--verbose", "-v", is_flag=True, help="Show COLMAP's own log."),
    json_report_option,
)


@cli.command()
@click.option(
    "--images",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The image folder the features were extracted from (for sizes and EXIF focal lengths).",
)
@file_option("--features", "feats.h5", "Feature store.")
@file_option("--matches", "matches.h5", "Match store made from --features by match-pairs.")
@file_option("--database", "database.db", "COLMAP database to write or update.")
@click.option(
    "--camera-model",
    default="SIMPLE_RADIAL",
    show_default=True,
    help="COLMAP camera model: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, ...",
)
@click.option("--single-camera", is_flag=True, help="One camera shared by all images (same size required).")
@click.option("--overwrite", is_flag=True, help="Replace a database that holds other images.")
@_colmap_options
@reports_errors
def colmap(
    images: Path,
    features: Path,
    matches: Path,
    database: Path,
    camera_model: str,
    single_camera: bool,
    overwrite: bool,
    seed: int,
    num_threads: int,
    verbose: bool,
    json_report: Path | None,
) -> None:
    """Write a COLMAP database from a feature store and a match store (needs pycolmap).

    One camera per image (focal length from EXIF, else COLMAP's 1.2 * max(width, height) prior),
    keypoints shifted by +0.5 into COLMAP's convention, the raw matches, then COLMAP's geometric
    verification, so 'sp-extract reconstruct' or COLMAP's mapper can run on it. A database with
    the same images is updated (image ids kept); one with other images is refused unless
    --overwrite. Install pycolmap with: pip install 'sp-extract[colmap]'.
    """
    from .sfm.colmap import write_database

    summary = write_database(
        images,
        features,
        matches,
        database,
        camera_model=camera_model,
        single_camera=single_camera,
        overwrite=overwrite,
        seed=seed,
        num_threads=num_threads,
        verbose=verbose,
    )
    finish_run(summary, json_report)


@cli.command()
@file_option("--database", "database.db", "COLMAP database written by 'sp-extract colmap'.")
@click.option(
    "--images",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The image folder (COLMAP reads the colours of the 3D points from it).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("sparse"),
    show_default=True,
    help="Folder for the models: OUT/0, OUT/1, ... in COLMAP's binary format.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@_colmap_options
@reports_errors
def reconstruct(
    database: Path,
    images: Path,
    out: Path,
    overwrite: bool,
    seed: int,
    num_threads: int,
    verbose: bool,
    json_report: Path | None,
) -> None:
    """Run COLMAP's incremental mapper (pycolmap) on a database; write the models to --out.

    Prints, per model, the registered images, 3D points, mean track length and mean
    reprojection error. Exit 0: at least one model, 1: none could be built.
    Install pycolmap with: pip install 'sp-extract[colmap]'.
    """
    from .sfm.colmap import reconstruct as run_reconstruct

    summary = run_reconstruct(
        database, images, out, overwrite=overwrite, seed=seed, num_threads=num_threads, verbose=verbose
    )
    finish_run(summary, json_report)


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
