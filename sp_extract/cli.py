"""Command-line interface (click). ``sp-extract IMAGES_DIR --out feats.h5`` runs ``extract``.

Heavy modules (torch, OpenCV, h5py) are imported inside the commands, so ``--help`` is fast.
Expected failures print one line ``sp-extract: error: ...`` and exit 2 (usage, configuration)
or 1 (some images failed); an interrupted run exits 130 (SIGINT) or 143 (SIGTERM); anything
unexpected prints one line and exits 3, its traceback in a log file (or shown with ``--debug``).
"""

from __future__ import annotations

import difflib
import functools
import os
import signal
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .errors import (
    EXIT_SIGINT,
    EXIT_SIGPIPE,
    EXIT_SOME_FAILED,
    EXIT_UNEXPECTED,
    ConfigError,
    SpExtractError,
    SpExtractWarning,
)
from .extraction.config import ExtractConfig
from .interrupt import ABORTED, signals_raise
from .sfm.config import (
    CAMERA_MODE_HELP,
    CAMERA_MODES,
    DEFAULT_CAMERA_MODE,
    DEFAULT_CAMERA_MODEL,
    MODEL_FORMATS,
)

EXTRACT = ExtractConfig()  # the detector's defaults, defined once in extraction/config.py

if TYPE_CHECKING:
    from .cluster.shards import Shard
    from .report import Summary


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
    """Turn expected failures into a one-line message and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with signals_raise():  # SIGTERM unwinds a command as Ctrl-C does (a run takes over)
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


def images_option(help: str) -> Callable[..., Any]:
    """The required ``--images DIR`` option (an image folder) with its help text."""
    return click.option(
        "--images", required=True, type=click.Path(file_okay=False, path_type=Path), help=help
    )


def check_report(path: Path, created: Path | None = None) -> None:
    """``--json-report``'s check, before any work: its folder exists, or is ``created`` (the folder
    the command makes with its parents before it writes the report: sfm's WORK_DIR), and the file
    can be written (where the folder is still to be made: its nearest existing parent)."""
    folder, hint = path.parent, "'--json-report'"
    if not folder.is_dir() and not (created is not None and folder.absolute() == created.absolute()):
        raise click.BadParameter(f"{path}: the folder {folder} does not exist", param_hint=hint)
    existing = path if path.exists() else folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise click.BadParameter(f"{path}: cannot be written (permission denied)", param_hint=hint)


def writable_report(_ctx: click.Context, _param: click.Parameter, path: Path | None) -> Path | None:
    """``--json-report``'s callback: :func:`check_report` on the path given."""
    if path is not None:
        check_report(path)
    return path


def report_option(checked: bool = True) -> Callable[..., Any]:
    """``--json-report FILE``; ``checked=False`` leaves its check to the command (sfm: the folder
    may be the WORK_DIR it creates, an argument the option's callback cannot rely on seeing)."""
    return click.option(
        "--json-report",
        type=click.Path(dir_okay=False, path_type=Path),
        callback=writable_report if checked else None,
        help="Write the run's summary as JSON to this file.",
    )


json_report_option = report_option()
run_options = stacked(  # every store-writing command has these
    click.option("--overwrite", is_flag=True, help="Start the store afresh instead of resuming."),
    click.option("--quiet", "-q", is_flag=True, help="No progress output; errors and the summary only."),
    json_report_option,
)


MODEL_FORMATS_HELP = (
    "gaussian-splatting: undistorted images/ and PINHOLE sparse/0 (3DGS; OpenMVS reads sparse/); "
    "nerfstudio: transforms.json, images/, sparse_pc.ply (nerfstudio, instant-ngp); "
    "ply: points.ply (coloured) and cameras.ply."
)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    sp-extract reconstruct --images DIR       COLMAP's incremental mapper -> sparse/N
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


cluster_options = stacked(  # extract and match-pairs on many machines (issue 12)
    click.option(
        "--shard",
        metavar="K/N|auto",
        help="Only shard K of N (1 <= K <= N; a stable hash of each image name, or pair) into "
        "OUT.shards/K-of-N.h5; 'sp-extract merge' joins the shards. auto: the task of a SLURM job "
        'array or Kubernetes Indexed Job (README "Running on a cluster").',
    ),
    click.option(
        "--shards",
        type=int,
        help="Number of shards: for --shard auto (required in a Kubernetes Indexed Job) or "
        "--scheduler [default there: one per worker, more for large runs].",
    ),
    click.option(
        "--scheduler",
        metavar="local[:WORKERS]|ADDRESS",
        help="Run as shards on a Dask cluster and merge them into --out: local (worker processes on "
        "this machine, one per GPU, or WORKERS), or a scheduler address or scheduler file (.json); "
        "shards go to OUT.shards/, which every worker must see. Needs the [dask] extra.",
    ),
)


def cluster_target(
    out: Path, shard: str | None, shards: int | None, scheduler: str | None
) -> tuple[Path, Shard | None]:
    """The store a command writes and the shard it keeps (``--shard``), checking the options."""
    if shard is not None and scheduler is not None:
        raise ConfigError("--shard and --scheduler exclude each other (--scheduler makes the shards itself)")
    if shard is None:
        if shards is not None and scheduler is None:
            raise ConfigError("--shards goes with --shard auto or --scheduler")
        return out, None
    from .cluster.shards import parse_shard, shard_output

    chosen = parse_shard(shard, shards)
    return shard_output(out, chosen), chosen


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
    "--max-keypoints",
    default=EXTRACT.max_keypoints,
    show_default=True,
    help="Keep the best N per image; -1 keeps all.",
)
@click.option("--threshold", default=EXTRACT.threshold, show_default=True, help="Detection score threshold.")
@click.option(
    "--nms-radius", default=EXTRACT.nms_radius, show_default=True, help="Non-maximum suppression radius (px)."
)
@click.option(
    "--border",
    default=EXTRACT.border,
    show_default=True,
    help="Drop keypoints this close to the border (px).",
)
@click.option(
    "--resize-max",
    default=EXTRACT.resize_max,
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
    "features): auto tiles images above about 2.7 Mpx, 0 never, SIZE in tiles of SIZE px (multiple of 8).",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Images of one size per network batch, halved when the GPU runs out of memory [default: "
    "1 on the CPU, where batching is no faster; 8 on a GPU].",
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
    help="What runs the network. auto: onnxruntime on the CPU at fp32 or int8, else torch; "
    "openvino needs the [openvino] extra.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
    default="fp32",
    show_default=True,
    help="Network arithmetic; fp16/bf16 are faster on GPUs, int8 (statically quantized, CPU "
    'backends only; README "int8") on CPUs, but they change the features slightly '
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
@cluster_options
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
    shard: str | None,
    shards: int | None,
    scheduler: str | None,
    overwrite: bool,
    quiet: bool,
    json_report: Path | None,
) -> None:
    """Extract SuperPoint features of every image below IMAGES_DIR into --out.

    Image names are paths relative to IMAGES_DIR, as COLMAP records them. Re-running extracts
    only the images not yet in the store; a store made with other settings is refused.
    """
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
    target, chosen = cluster_target(out, shard, shards, scheduler)
    options = dict(
        weights=weights,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        backend=backend,
        tile=tile,
    )
    if scheduler is not None:
        from .cluster.dask import extract_on_cluster

        summary = extract_on_cluster(
            scheduler, images_dir, out, config, shards, image_list, overwrite, quiet, **options
        )
    else:
        summary = run_extract(
            images_dir,
            target,
            config,
            image_list=image_list,
            overwrite=overwrite,
            quiet=quiet,
            shard=chosen,
            **options,
        )
    finish_run(summary, json_report)


# -- matching: pairs files and match stores (issue 3) ----------------------------------------
_FILE = click.Path(dir_okay=False, path_type=Path)
_pairs_out_option = click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("pairs.txt"),
    show_default=True,
    help="Pairs file to write: 'name0 name1' a line (hloc / COLMAP format).",
)
_source_options = stacked(
    file_option("--features", "feats.h5", "Take the image names from this feature store."),
    click.option(
        "--images",
        type=click.Path(file_okay=False, path_type=Path),
        help="Take the image names from this folder instead (as extraction names them).",
    ),
    _pairs_out_option,
)


def _pairable(names: list[str]) -> list[str]:
    """``names`` without those a pairs file cannot hold (white space), with a warning naming them."""
    from .extraction.discover import unpairable
    from .report import counted, listed

    spaced = unpairable(names)
    if spaced:
        click.echo(
            f"warning: {counted(len(spaced), 'image')} left out, white space in the name (pairs files "
            f"separate names by white space): {listed(spaced)}; rename them and extract them again",
            err=True,
        )
    left_out = set(spaced)
    return [name for name in names if name not in left_out]


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
    from .pairs.core import merge_pairs, sequential_pairs, source_names

    pairs = sequential_pairs(_pairable(source_names(features, images)), window, loop)
    if loop_closure is not None:
        from .pairs.retrieval import retrieval_pairs

        if images is not None:
            raise ConfigError("--loop-closure needs the descriptors of --features, not --images")
        pairs = merge_pairs(pairs, retrieval_pairs(features, loop_closure, connect=False))
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
    from .pairs.core import source_names
    from .pairs.spatial import spatial_pairs

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
    from .pairs.core import exhaustive_pairs, read_name_list, source_names

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
    "--query-list", type=_FILE, help="Only these images (one name a line) get neighbours (default: all)."
)
@click.option(
    "--db-list", type=_FILE, help="Neighbours only among these images (one name a line; default: all)."
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
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Device for the similarity search and --rerank: auto, cpu, cuda[:N], mps.",
)
@file_option("--features", "feats.h5", "Feature store whose descriptors describe the images.")
@_pairs_out_option
@reports_errors
def retrieval(
    num_matched: int,
    rerank_top: int | None,
    query_list: Path | None,
    db_list: Path | None,
    exclude_self: bool,
    connect: bool,
    clusters: int,
    dims: int,
    device: str,
    features: Path,
    out: Path,
) -> None:
    """Each image with its K most similar images by a VLAD global descriptor of its SuperPoint
    descriptors (no other network). The descriptors are kept in FEATURES.retrieval/ and only
    new images are described on the next run; --rerank M verifies the M best by matching."""
    from .matching.rerank import rerank
    from .pairs.retrieval import RetrievalConfig, retrieval_pairs

    config = RetrievalConfig(clusters=clusters, dims=dims)
    pairs = retrieval_pairs(
        features,
        num_matched,
        config,
        query_list,
        db_list,
        exclude_self,
        rerank_top,
        connect,
        device,
        rerank=rerank,
    )
    _write_pairs(pairs, out)


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
@click.option(
    "--matcher",
    type=click.Choice(["nn", "superglue", "lightglue"]),
    default="nn",
    show_default=True,
    help="nn: nearest neighbours; superglue, lightglue: the learned matchers (see README).",
)
@click.option(
    "--matcher-weights",
    metavar="NAME|PATH",
    help="superglue-outdoor (default), superglue-indoor, lightglue-superpoint (default), or a .pth / "
    "transformers checkpoint (.safetensors, .bin) of either project.",
)
@click.option(
    "--sinkhorn-iterations", type=int, help="SuperGlue: Sinkhorn iterations [default: 100; hloc uses 50]."
)
@click.option("--match-threshold", type=float, help="SuperGlue: smallest match score kept [default: 0.2].")
@click.option(
    "--depth-confidence",
    type=float,
    help="LightGlue: stop a pair early when this share of keypoints is confident, -1 off [default: 0.95].",
)
@click.option(
    "--width-confidence",
    type=float,
    help="LightGlue: prune keypoints unlikely to match (adaptive width), -1 off [default: 0.99].",
)
@click.option("--filter-threshold", type=float, help="LightGlue: smallest match score kept [default: 0.1].")
@click.option("--batch-size", default=32, show_default=True, help="Pairs per matching batch.")
@click.option(
    "--cache-mb", default=1024, show_default=True, help="Memory for descriptors kept between pairs (MiB)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@cluster_options
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
    matcher: str,
    matcher_weights: str | None,
    sinkhorn_iterations: int | None,
    match_threshold: float | None,
    depth_confidence: float | None,
    width_confidence: float | None,
    filter_threshold: float | None,
    batch_size: int,
    cache_mb: int,
    device: str,
    shard: str | None,
    shards: int | None,
    scheduler: str | None,
    overwrite: bool,
    quiet: bool,
    json_report: Path | None,
) -> None:
    """Match the features of every pair in PAIRS ('name0 name1' a line) into --out.

    Nearest neighbours with the mutual check, ratio test and distance threshold of hloc's NN
    matchers, or SuperGlue or LightGlue (--matcher), which also use the keypoints, their scores
    and the image sizes. The pairs file is streamed in checked chunks (any size starts at once).
    Re-running matches only the pairs not yet in the store; a store made with other settings,
    weights or features is refused.
    """
    from .matching.config import MatchConfig
    from .matching.run import match_pairs as run_match_pairs

    config = MatchConfig(
        mutual=mutual,
        ratio=ratio,
        max_distance=max_distance,
        verify=verify,
        verify_threshold=verify_threshold,
        matcher=matcher,
        matcher_weights=matcher_weights,
        sinkhorn_iterations=sinkhorn_iterations,
        match_threshold=match_threshold,
        depth_confidence=depth_confidence,
        width_confidence=width_confidence,
        filter_threshold=filter_threshold,
    )
    target, chosen = cluster_target(out, shard, shards, scheduler)
    options = dict(device=device, batch_size=batch_size, cache_mb=cache_mb)
    if scheduler is not None:
        from .cluster.dask import match_on_cluster

        summary = match_on_cluster(
            scheduler, pairs_file, features, out, config, shards, overwrite, quiet, **options
        )
    else:
        summary = run_match_pairs(
            pairs_file, features, target, config, overwrite=overwrite, quiet=quiet, shard=chosen, **options
        )
    finish_run(summary, json_report)


@cli.command()
@click.argument("out", type=_FILE)
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--image-list",
    type=_FILE,
    help="Feature stores: report the images listed (one a line) that no STORE holds.",
)
@click.option("--pairs", type=_FILE, help="Match stores: report the pairs of this pairs file no STORE holds.")
@run_options
@reports_errors
def merge(
    out: Path,
    stores: tuple[Path, ...],
    image_list: Path | None,
    pairs: Path | None,
    overwrite: bool,
    quiet: bool,
    json_report: Path | None,
) -> None:
    """Merge the feature or match STOREs of one run (the shards of --shard, or folders of them
    such as OUT.shards/) into OUT, which is created or extended.

    The STOREs must have the same settings (the difference is named); an entry in several of them
    is kept once if equal, else refused. Exit 1 when a name of --image-list / --pairs, or a shard
    K-of-N of the series, is in none of them (the rest is merged). Crash-safe and resumable as
    every store; each STORE is locked while it is read.
    """
    from .store.merge import merge_stores

    if image_list is not None and pairs is not None:
        raise ConfigError("--image-list (feature stores) and --pairs (match stores) exclude each other")
    summary = merge_stores(out, list(stores), image_list or pairs, overwrite=overwrite, quiet=quiet)
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
    "--check",
    is_flag=True,
    help="Only check: read every dataset of STORE and its parts (every checksum), list the damaged "
    "entries; writes nothing.",
)
@click.option(
    "--json-report",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=writable_report,
    help="Write what was copied and lost (with --check: what was found) as JSON to this file.",
)
@reports_errors
def repair(store: Path, out: Path | None, check: bool, json_report: Path | None) -> None:
    """Copy every readable, complete entry of a damaged STORE into a new store.

    For a store truncated or corrupted by a crash of some other program: entries whose
    datasets are all readable (checksums verified where present) are copied, with the store's
    settings, into --out, which appears atomically; each lost entry is reported. Results a
    killed sp-extract run left in STORE.parts/ are included. STORE itself is not changed.
    Exit 0: nothing lost, 1: some entries lost, 2: nothing could be read.
    With --check: exit 0 if every entry is intact, 1 if some are damaged (listed).
    """
    from .errors import ConfigError
    from .store.repair import check_store, repair_store

    if check and out is not None:
        raise ConfigError("--check writes nothing: drop --out, or drop --check to repair")
    finish_run(check_store(store) if check else repair_store(store, out), json_report)


# -- scale: folding a store's segments into its main file (issue 11) ---------------------------
@cli.command()
@click.argument("store", type=click.Path(dir_okay=False, path_type=Path))
@reports_errors
def compact(store: Path) -> None:
    """Fold STORE's segments (and a killed run's parts) into its main file.

    Runs that add to a large store write their entries to immutable segment files in
    STORE.segments/ instead of copying the whole store; every sp-extract command reads them.
    hloc and other HDF5 readers see only STORE itself: run this first. Crash-safe (a new copy of
    STORE replaces it atomically); on a store without segments or parts it does nothing.
    """
    from .store.compact import compact_store

    segments, parts = compact_store(store)
    folded = (
        f"{segments} segment(s) and {parts} part file(s) folded into"
        if segments or parts
        else "nothing to fold:"
    )
    click.echo(f"compact: {folded} {store}", err=True)


# -- deployment: exporting the network (issue 5) ------------------------------------------------
@cli.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "openvino"]),
    default=None,
    help="onnx: one .onnx file; openvino: OUT (.xml) and its .bin (needs the [openvino] extra) "
    "[default: from OUT's extension, .onnx or .xml].",
)
@click.option(
    "--weights",
    default=None,
    help="As for extract: superpoint-v1 (default), superpoint-v6-mit or a file. Env: SP_EXTRACT_WEIGHTS.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="int8: the network statically quantized (QDQ), as extract --precision int8 runs it on this "
    "CPU (u8s8, or u8u8 on x86 without VNNI; Env: SP_EXTRACT_INT8_VARIANT=u8s8|u8u8 picks one).",
)
@click.option(
    "--calibrate",
    type=click.Path(path_type=Path),
    help="With --precision int8: calibrate the quantization on up to 64 images of this folder "
    "[default: the built-in generated set].",
)
@reports_errors
def export(out: Path, fmt: str | None, weights: str | None, precision: str, calibrate: Path | None) -> None:
    """Write the SuperPoint network to OUT for deployment (ONNX or OpenVINO IR, float32 or int8).

    \b
    input   image        float32 [batch, 1, height, width], grayscale in [0, 1]
    output  scores       float32 [batch, 8*(height//8), 8*(width//8)], keypoint probability per pixel
    output  descriptors  float32 [batch, 256, height//8, width//8], unit-norm descriptor per 8x8 cell
    Batch, height and width are dynamic. Keypoint selection (NMS, border, threshold, top-k,
    descriptor sampling) is not in the graph; docs/export.md describes it. The weights'
    licence applies to the exported model.
    """
    from .extraction.backends import export_model

    for path in export_model(out, fmt, weights, precision, calibrate):
        click.echo(f"wrote {path}", err=True)


# -- COLMAP: database and reconstruction (issue 4) ----------------------------------------------
_colmap_options = stacked(  # --seed, --num-threads and --verbose of colmap, reconstruct and sfm
    click.option("--seed", default=0, show_default=True, help="Seed of COLMAP's random choices."),
    click.option(
        "--num-threads", default=-1, show_default=True, help="Threads for COLMAP; -1 all, 1 repeatable."
    ),
    click.option("--verbose", "-v", is_flag=True, help="Show COLMAP's own log."),
)


_camera_options = stacked(  # the cameras of colmap and sfm
    click.option(
        "--camera-model",
        default=DEFAULT_CAMERA_MODEL,
        show_default=True,
        help="COLMAP camera model: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, ...",
    ),
    click.option(
        "--camera-mode",
        type=click.Choice(CAMERA_MODES),
        default=DEFAULT_CAMERA_MODE,
        show_default=True,
        help=CAMERA_MODE_HELP,
    ),
    click.option("--single-camera", is_flag=True, help="The same as --camera-mode single."),
)


def camera_mode_of(camera_mode: str, single_camera: bool) -> str:
    """``--camera-mode``, or ``single`` for ``--single-camera`` (which contradicts no other mode)."""
    if single_camera and camera_mode not in ("single", DEFAULT_CAMERA_MODE):
        raise click.UsageError(f"--single-camera contradicts --camera-mode {camera_mode}")
    return "single" if single_camera else camera_mode


@cli.command()
@images_option("The image folder the features were extracted from (for sizes and EXIF focal lengths).")
@file_option("--features", "feats.h5", "Feature store.")
@file_option("--matches", "matches.h5", "Match store made from --features by match-pairs.")
@file_option("--database", "database.db", "COLMAP database to write or update.")
@_camera_options
@click.option("--overwrite", is_flag=True, help="Replace a database that holds other images.")
@click.option(
    "--refine-keypoints",
    is_flag=True,
    help="Move every matched keypoint (at most 1 px per axis) so that the image patches at the two ends "
    "of its verified matches agree, all images jointly, then verify again (README 'COLMAP reconstruction').",
)
@_colmap_options
@json_report_option
@reports_errors
def colmap(
    images: Path,
    features: Path,
    matches: Path,
    database: Path,
    camera_model: str,
    camera_mode: str,
    single_camera: bool,
    overwrite: bool,
    refine_keypoints: bool,
    seed: int,
    num_threads: int,
    verbose: bool,
    json_report: Path | None,
) -> None:
    """Write a COLMAP database from a feature store and a match store (needs pycolmap).

    Cameras shared as --camera-mode says (focal length from EXIF, else COLMAP's 1.2 * max(width,
    height) prior), keypoints shifted by +0.5 into COLMAP's convention, the raw matches, then
    COLMAP's geometric verification, so 'sp-extract reconstruct' or COLMAP's mapper can run on
    it. A database with the same images is updated (image ids kept); one with other images is refused unless
    --overwrite. Exit 1 when no pair passes the verification (the database is written).
    Install pycolmap with: pip install pycolmap (or pip install 'sp-extract[colmap]').
    """
    from .sfm.colmap import write_database

    summary = write_database(
        images,
        features,
        matches,
        database,
        camera_model=camera_model,
        camera_mode=camera_mode_of(camera_mode, single_camera),
        overwrite=overwrite,
        seed=seed,
        num_threads=num_threads,
        verbose=verbose,
        refine_keypoints=refine_keypoints,
    )
    finish_run(summary, json_report)


@cli.command()
@file_option("--database", "database.db", "COLMAP database written by 'sp-extract colmap'.")
@images_option("The image folder (COLMAP reads the colours of the 3D points from it).")
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
@json_report_option
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

    Every image the database names must be in --images. Prints, per model, the registered
    images, 3D points, mean track length and mean reprojection error, and the images no model
    registered. Exit 0: at least one model, 1: none could be built, or the largest is likely wrong
    (a registered image's focal length out of COLMAP's bounds; the summary says which).
    Install pycolmap with: pip install pycolmap (or pip install 'sp-extract[colmap]').
    """
    from .sfm.mapping import reconstruct as run_reconstruct

    summary = run_reconstruct(
        database, images, out, overwrite=overwrite, seed=seed, num_threads=num_threads, verbose=verbose
    )
    finish_run(summary, json_report)


# -- one command: photos to a growing COLMAP model (issue 15) ----------------------------------
@cli.command()
@click.argument("images_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("work_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--pairs",
    "pairs_spec",
    default="auto",
    show_default=True,
    metavar="auto|exhaustive|sequential[:K]|retrieval[:K]|FILE",
    help="How images are paired. auto: exhaustive up to 300 images, else retrieval:30; "
    "sequential: each with its next K in name order [10]; retrieval: its K most similar [30]; "
    "FILE: the pairs of a pairs file.",
)
@click.option("--rebuild", is_flag=True, help="Map the model from scratch (needed after a photo changed).")
@click.option(
    "--max-keypoints",
    default=EXTRACT.max_keypoints,
    show_default=True,
    help="As for extract: keep the best N; -1 all.",
)
@click.option(
    "--threshold", default=EXTRACT.threshold, show_default=True, help="As for extract: detection threshold."
)
@click.option("--nms-radius", default=EXTRACT.nms_radius, show_default=True, help="As for extract (px).")
@click.option(
    "--resize-max", default=EXTRACT.resize_max, show_default=True, help="As for extract (px); 0: native size."
)
@click.option("--subpixel", is_flag=True, help="As for extract: sub-pixel keypoints.")
@click.option(
    "--masks",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="As for extract: COLMAP-style masks DIR/NAME.png.",
)
@click.option(
    "--orientation",
    type=click.Choice(["exif", "ignore"]),
    default="exif",
    show_default=True,
    help="As for extract: what the network sees of EXIF-rotated photos.",
)
@click.option("--tile", default="auto", metavar="auto|0|SIZE", show_default=True, help="As for extract.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
    default="fp32",
    show_default=True,
    help="As for extract: network arithmetic.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]),
    default="auto",
    show_default=True,
    help="As for extract: what runs the network.",
)
@click.option("--weights", default=None, help="As for extract. Env: SP_EXTRACT_WEIGHTS.")
@click.option(
    "--matcher",
    type=click.Choice(["nn", "superglue", "lightglue"]),
    default="nn",
    show_default=True,
    help="As for match-pairs.",
)
@click.option("--matcher-weights", metavar="NAME|PATH", help="As for match-pairs.")
@click.option("--ratio", type=float, help="As for match-pairs (nn): Lowe's ratio test.")
@click.option("--max-distance", type=float, help="As for match-pairs (nn): largest descriptor distance.")
@_camera_options
@click.option(
    "--export",
    "export_formats",
    multiple=True,
    type=click.Choice(MODEL_FORMATS),
    help="Also write the model as this format (repeatable) into WORK_DIR/export/FORMAT, as "
    "export-model does; replaced atomically when the model grows. " + MODEL_FORMATS_HELP,
)
@click.option(
    "--no-report",
    is_flag=True,
    help="Do not write WORK_DIR/report.html (the page of the run: 'sp-extract report').",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; errors and the summary only.")
@_colmap_options
@report_option(checked=False)
@reports_errors
def sfm(
    images_dir: Path,
    work_dir: Path,
    pairs_spec: str,
    rebuild: bool,
    max_keypoints: int,
    threshold: float,
    nms_radius: int,
    resize_max: int,
    subpixel: bool,
    masks: Path | None,
    orientation: str,
    tile: str,
    precision: str,
    backend: str,
    weights: str | None,
    matcher: str,
    matcher_weights: str | None,
    ratio: float | None,
    max_distance: float | None,
    camera_model: str,
    camera_mode: str,
    single_camera: bool,
    export_formats: tuple[str, ...],
    no_report: bool,
    device: str,
    quiet: bool,
    seed: int,
    num_threads: int,
    verbose: bool,
    json_report: Path | None,
) -> None:
    """Photos of IMAGES_DIR to a COLMAP model in WORK_DIR, grown by later runs (needs pycolmap).

    \b
    Runs extract, pairs, match-pairs, colmap and reconstruct into
    WORK_DIR/{feats.h5, pairs.txt, matches.h5, database.db, sparse/0}. Every stage resumes: the
    same command finishes an interrupted run. Run again after new photos arrived (nightly, say):
    only they are extracted, paired (with all images), matched, added to the database and
    registered into the existing model (image ids kept), then bundle adjusted; the model is
    replaced atomically. A changed photo stops the run (use --rebuild); deleted ones are reported.
    Exit 0: a model, 1: no model, a likely wrong one (implausible focal length) or some images
    (pairs) failed, 2: usage, 130/143: interrupted.
    """
    if json_report is not None:
        check_report(json_report, created=work_dir)
    from .matching.config import MatchConfig
    from .sfm.pipeline import SfmOptions, run_sfm

    options = SfmOptions(
        pairs=pairs_spec,
        extract=ExtractConfig(
            max_keypoints=max_keypoints,
            threshold=threshold,
            nms_radius=nms_radius,
            resize_max=resize_max,
            subpixel=subpixel,
            precision=precision,
            orientation=orientation,
            masks=str(masks) if masks else "",
        ),
        weights=weights,
        tile=tile,
        backend=backend,
        match=MatchConfig(
            matcher=matcher, matcher_weights=matcher_weights, ratio=ratio, max_distance=max_distance
        ),
        camera_model=camera_model,
        camera_mode=camera_mode_of(camera_mode, single_camera),
        rebuild=rebuild,
        export=export_formats,
        report=not no_report,
        device=device,
        seed=seed,
        num_threads=num_threads,
        verbose=verbose,
        quiet=quiet,
    )
    finish_run(run_sfm(images_dir, work_dir, options), json_report)


# -- the model handed to dense and neural methods (issue 26) ------------------------------------
@cli.command("export-model")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(MODEL_FORMATS), help="Required. " + MODEL_FORMATS_HELP)
@click.option(
    "--images",
    type=click.Path(file_okay=False, path_type=Path),
    help="The photos' folder (gaussian-splatting, nerfstudio).",
)
@click.option(
    "--num-threads", default=-1, show_default=True, help="Threads for COLMAP's undistortion; -1 all."
)
@click.option("--verbose", "-v", is_flag=True, help="Show COLMAP's own log.")
@reports_errors
def export_model(
    model_dir: Path, out: Path, fmt: str | None, images: Path | None, num_threads: int, verbose: bool
) -> None:
    """Write the COLMAP model MODEL_DIR (e.g. WORK/sparse/0) for a dense or neural method into
    the folder OUT (replaced atomically when it holds an earlier export).

    \b
    sp-extract export-model work/sparse/0 splat/ --format gaussian-splatting --images photos/
    sp-extract export-model work/sparse/0 ns/ --format nerfstudio --images photos/
    sp-extract export-model work/sparse/0 cloud/ --format ply
    """
    from .sfm.handoff import export_model as run_export

    if fmt is None:  # click's own message for a missing option spans lines
        raise ConfigError(f"--format is required: {', '.join(MODEL_FORMATS)}")
    summary = run_export(model_dir, out, fmt, images, num_threads=num_threads, verbose=verbose)
    click.echo(summary.line(), err=True)


@cli.command()
@click.argument("work_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--images",
    type=click.Path(file_okay=False, path_type=Path),
    help="The photos' folder [default: the one the last sfm run in WORK_DIR recorded].",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The page to write [default: WORK_DIR/report.html].",
)
@reports_errors
def report(work_dir: Path, images: Path | None, out: Path | None) -> None:
    """Write the page of an sfm work folder: one self-contained HTML file (no network) with the
    last run's summary and stage times, every photo (thumbnail, keypoints, verified matches,
    3D points, reprojection error), track-length and error histograms, keypoint and match
    pictures of a sample, and the points and cameras in 3D (drag, shift-drag, wheel).
    'sfm' writes it after each run (--no-report: not)."""
    from .sfm.page import write_report

    click.echo(f"wrote {write_report(work_dir, images, out)}", err=True)


# -- inspection: info, show, evaluate (issue 14) -------------------------------------------------
@cli.command()
@click.argument("store", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON (for scripts).")
@click.option("--names", is_flag=True, help="List the entries (image names or pair keys), one a line.")
@reports_errors
def info(store: Path, as_json: bool, names: bool) -> None:
    """Describe a feature or match STORE: settings, entries, counts, damage.

    Reads attributes and dataset shapes, not the data (a match store's matches0 vectors are
    read to count matches), so it is fast on 10^5 entries. Damage visible that way is listed;
    checksums are verified only by 'sp-extract repair --check'.
    """
    import json

    from .inspect.info import store_info

    described = store_info(store)
    if names:
        for name in sorted(described.counts):
            click.echo(name)
    elif as_json:
        click.echo(json.dumps(described.to_dict(), indent=2))
    else:
        for line in described.lines():
            click.echo(line)


@cli.command()
@click.argument("store", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("names", nargs=-1, required=True)
@images_option("The image folder the features were extracted from.")
@click.option(
    "--features",
    type=click.Path(dir_okay=False, path_type=Path),
    help="For a match store: the feature store the matches were made from.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="A .png file for one picture, else a folder: one PNG per picture and an index.html.",
)
@click.option(
    "--max-size", default=1600, show_default=True, help="Downscale pictures to this longest side (px); 0: no."
)
@reports_errors
def show(
    store: Path, names: tuple[str, ...], images: Path, features: Path | None, out: Path, max_size: int
) -> None:
    """Draw keypoints (feature STORE, NAMES are images) or matches (match STORE, NAMES are pairs
    NAME0 NAME1 ...) on the images, coloured by score.

    \b
    sp-extract show feats.h5 a.jpg --images DIR --out kp.png
    sp-extract show matches.h5 a.jpg b.jpg --features feats.h5 --images DIR --out m.png
    sp-extract show feats.h5 a.jpg b.jpg c.jpg --images DIR --out pictures/   (+ index.html)
    """
    from .inspect.show import show as draw

    for path in draw(store, list(names), images, out, features, max_size):
        click.echo(f"wrote {path}", err=True)


_evaluate_options = stacked(  # the extraction options that change the features, and the report
    click.option("--weights", default=None, help="As for extract. Env: SP_EXTRACT_WEIGHTS."),
    click.option(
        "--max-keypoints",
        default=1000,
        show_default=True,
        help="Keep the best N per image (the paper's protocol keeps 1000 at 480 x 640); -1 all.",
    ),
    click.option(
        "--threshold", default=EXTRACT.threshold, show_default=True, help="Detection score threshold."
    ),
    click.option(
        "--nms-radius",
        default=EXTRACT.nms_radius,
        show_default=True,
        help="Non-maximum suppression radius (px).",
    ),
    click.option(
        "--border", default=EXTRACT.border, show_default=True, help="Border without keypoints (px)."
    ),
    click.option(
        "--resize-max", default=EXTRACT.resize_max, show_default=True, help="As for extract (px); 0: native."
    ),
    click.option("--resize-force", is_flag=True, help="As for extract: also upscale smaller images."),
    click.option("--subpixel", is_flag=True, help="As for extract: sub-pixel keypoints."),
    click.option("--reduced-decode", is_flag=True, help="As for extract: reduced-scale JPEG decoding."),
    click.option(
        "--precision",
        type=click.Choice(["fp32", "fp16", "bf16"]),
        default="fp32",
        show_default=True,
        help="Network arithmetic, as for extract.",
    ),  # fmt: skip
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
    click.option("--quiet", "-q", is_flag=True, help="No line per pair; the table only."),
    json_report_option,
)


def _run_evaluation(kind: str, source: Path, options: dict[str, Any], **extra: Any) -> None:
    from .inspect.evaluate import run_evaluation

    json_report = options.pop("json_report")
    run = {key: options.pop(key) for key in ("weights", "device", "quiet")}
    evaluation = run_evaluation(kind, source, ExtractConfig(**options), **run, **extra)
    for line in evaluation.lines():
        click.echo(line)
    if json_report:
        evaluation.write_json(json_report)
    sys.exit(evaluation.exit_code)


@cli.group()
def evaluate() -> None:
    """Measure keypoint and descriptor accuracy on image pairs with known homographies
    (homography, hpatches), or a model's camera poses against reference poses (poses).

    \b
    homography, hpatches: the SuperPoint paper's protocol: repeatability and localization error
    (3 px), matching score, mean matching accuracy (MMA, 3 px; --json-report has 1..10 px) of mutual
    nearest neighbours, homography accuracy at 1, 3 and 5 px (OpenCV RANSAC). Takes extract's
    options, so the figures show what an option costs. Exit 1 if some images could not be read.
    """


@evaluate.command()
@click.argument("images_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--pairs-per-image", default=3, show_default=True, help="Synthetic pairs of each kind a photo.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random homographies and lighting.")
@_evaluate_options
@reports_errors
def homography(images_dir: Path, pairs_per_image: int, seed: int, **options: Any) -> None:
    """Synthetic pairs from any photos in IMAGES_DIR: each photo (at the working size) against
    random homographic warps of itself (viewpoint) and random gamma, gain, offset and noise
    (illumination). Errors are in working-size pixels."""
    _run_evaluation("homography", images_dir, options, pairs_per_image=pairs_per_image, seed=seed)


@evaluate.command()
@click.argument("hpatches_dir", type=click.Path(file_okay=False, path_type=Path))
@_evaluate_options
@reports_errors
def hpatches(hpatches_dir: Path, **options: Any) -> None:
    """The HPatches sequences in HPATCHES_DIR (i_* illumination, v_* viewpoint folders of
    1.ppm .. 6.ppm and H_1_2 .. H_1_6): image 1 against each other. Errors are in the files'
    pixels."""
    _run_evaluation("hpatches", hpatches_dir, options)


@evaluate.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("reference", type=click.Path(path_type=Path))
@click.option(
    "--images",
    type=click.Path(file_okay=False, path_type=Path),
    help="The photos the model was built from: only the reference images among them count "
    "[default: every reference image].",
)
@click.option("--per-image", is_flag=True, help="Also a line per reference image: registered, its errors.")
@json_report_option
@reports_errors
def poses(
    model: Path, reference: Path, images: Path | None, per_image: bool, json_report: Path | None
) -> None:
    """The camera poses of the COLMAP MODEL folder against REFERENCE poses: a COLMAP model folder or
    a transforms.json (instant-ngp, nerfstudio). Images are matched by file name. A folder of models
    (sparse/ holding 0, 1, ...) gives its largest.

    \b
    registered share of the reference images, relative-pose AUC at 1/2/5/10 degrees over all pairs
    of reference images (unregistered: failed), median rotation and translation-direction errors,
    median camera-centre error after a similarity alignment (share of the scene size).
    """
    from .inspect.poses import evaluate_poses

    evaluation = evaluate_poses(model, reference, images)
    if evaluation.note:
        click.echo(evaluation.note, err=True)
    for line in evaluation.lines(per_image):
        click.echo(line)
    if json_report:
        evaluation.write_json(json_report)


def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Print sp-extract's own warnings as one line, as its errors; others as Python does."""
    if issubclass(category, SpExtractWarning):
        click.echo(f"sp-extract: warning: {message}", err=True)
    else:
        _python_show_warning(message, category, *args, **kwargs)


_python_show_warning = warnings.showwarning


def main() -> None:
    """Console-script entry point; usage errors print one line, as every other error does."""
    warnings.showwarning = show_warning
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
