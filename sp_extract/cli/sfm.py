"""The COLMAP commands: ``colmap`` (database), ``reconstruct`` (mapper), ``sfm`` (all stages, a
growing model), ``export-model`` (for dense and neural methods) and ``report`` (an sfm run's page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..extraction.config import ExtractConfig
from ..matching.config import MatchConfig
from ..sfm.config import (
    EXHAUSTIVE_UP_TO,
    MODEL_FORMATS,
    MODEL_FORMATS_HELP,
    RETRIEVAL_K,
    SEQUENTIAL_K,
    CameraOptions,
    ColmapRun,
    MapperOptions,
)
from .errors import finish_run, reports_errors
from .options import (
    FOLDER,
    backend_option,
    camera_mode_of,
    camera_options,
    check_report,
    colmap_options,
    config_from,
    device_option,
    extract_options,
    file_option,
    images_option,
    json_report_option,
    mapper_options,
    masks_option,
    match_options,
    out_option,
    precision_option,
    quiet_option,
    report_option,
    tile_option,
    verbose_option,
    verify_options,
    weights_option,
)


@click.command()
@images_option("The image folder the features were extracted from (for sizes and EXIF focal lengths).")
@file_option("--features", "feats.h5", "Feature store.")
@file_option("--matches", "matches.h5", "Match store made from --features by match-pairs.")
@file_option("--database", "database.db", "COLMAP database to write or update.")
@camera_options
@click.option("--overwrite", is_flag=True, help="Replace a database that holds other images.")
@click.option(
    "--refine-keypoints",
    is_flag=True,
    help="Move every matched keypoint (at most 1 px per axis) so that the image patches at the two ends "
    "of its verified matches agree, all images jointly, then verify again (README 'COLMAP reconstruction').",
)
@colmap_options
@verify_options
@json_report_option
@reports_errors
def colmap(
    images: Path, features: Path, matches: Path, database: Path, json_report: Path | None, **options: Any
) -> None:
    """Write a COLMAP database from a feature store and a match store (needs pycolmap).

    Cameras shared as --camera-mode says (focal length from EXIF, else COLMAP's 1.2 * max(width,
    height) prior), keypoints shifted by +0.5 into COLMAP's convention, the raw matches, then
    COLMAP's geometric verification, guided by each pair's closest matches (--guide-distance), so
    'sp-extract reconstruct' or COLMAP's mapper can run on it. A database with the same images is
    updated (image ids kept); one with other images is refused unless --overwrite. Exit 1 when no
    pair passes the verification (the database is written).
    Install pycolmap with: pip install pycolmap (or pip install 'sp-extract[colmap]').
    """
    from ..sfm.colmap import write_database

    camera, run = camera_from(options), config_from(ColmapRun, options)
    summary = write_database(images, features, matches, database, camera, run, **options)  # --overwrite, ...
    finish_run(summary, json_report)


@click.command()
@file_option("--database", "database.db", "COLMAP database written by 'sp-extract colmap'.")
@images_option("The image folder (COLMAP reads the colours of the 3D points from it).")
@out_option("sparse", "Folder for the models: OUT/0 (largest), OUT/1, ... in COLMAP's binary format.", FOLDER)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@mapper_options(auto=False)
@colmap_options
@json_report_option
@reports_errors
def reconstruct(
    database: Path, images: Path, out: Path, overwrite: bool, json_report: Path | None, **options: Any
) -> None:
    """Run COLMAP's incremental or global mapper (pycolmap) on a database; write the models to --out.

    Every image the database names must be in --images. Prints, per model, the registered
    images, 3D points, mean track length and mean reprojection error, and the images no model
    registered. A model whose poses contradict the verified pairs it was built from is mapped
    again with the next seeds (two more at most; the summary notes it). Exit 0: at least one
    model, 1: none could be built, or the largest is likely wrong (a registered image's focal
    length out of COLMAP's bounds, or its poses still contradict its pairs; the summary says which).
    Install pycolmap with: pip install pycolmap (or pip install 'sp-extract[colmap]').
    """
    from ..sfm.mapping import reconstruct as run_reconstruct

    run, mapper = config_from(ColmapRun, options), config_from(MapperOptions, options)
    summary = run_reconstruct(database, images, out, overwrite=overwrite, run=run, mapper=mapper)
    finish_run(summary, json_report)


# -- one command: photos to a growing COLMAP model (issue 15) ----------------------------------
@click.command()
@click.argument("images_dir", type=FOLDER)
@click.argument("work_dir", type=FOLDER)
@click.option(
    "--pairs",
    "pairs_spec",
    default="auto",
    show_default=True,
    metavar="auto|exhaustive|sequential[:K]|retrieval[:K]|FILE",
    help=f"How images are paired. auto: exhaustive up to {EXHAUSTIVE_UP_TO} images, else "
    f"retrieval:{RETRIEVAL_K}; sequential: each with its next K in name order [{SEQUENTIAL_K}]; "
    f"retrieval: its K most similar [{RETRIEVAL_K}]; FILE: the pairs of a pairs file.",
)
@click.option("--rebuild", is_flag=True, help="Map the model from scratch (needed after a photo changed).")
@extract_options("max_keypoints", "threshold", "nms_radius", "resize_max", "subpixel")
@masks_option
@extract_options("orientation")
@tile_option
@precision_option()
@backend_option
@weights_option
@match_options("matcher", "matcher_weights", "ratio", "max_distance")
@camera_options
@mapper_options(auto=True)
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
@device_option()
@quiet_option
@colmap_options
@verify_options
@report_option(checked=False)
@reports_errors
def sfm(
    images_dir: Path,
    work_dir: Path,
    pairs_spec: str,
    export_formats: tuple[str, ...],
    no_report: bool,
    json_report: Path | None,
    **options: Any,
) -> None:
    """Photos of IMAGES_DIR to a COLMAP model in WORK_DIR, grown by later runs (needs pycolmap).

    \b
    Runs extract, pairs, match-pairs, colmap and reconstruct into
    WORK_DIR/{feats.h5, pairs.txt, matches.h5, database.db, sparse/0}. Every stage resumes: the
    same command finishes an interrupted run. Run again after new photos arrived (nightly, say):
    only they are extracted, paired (with all images), matched, added to the database and
    registered into the existing model (image ids kept), then bundle adjusted; the model is
    replaced atomically. A changed photo stops the run (use --rebuild), as do another
    --camera-model, --camera-mode or --min-inliers than the database was made with
    (WORK_DIR/database.json); deleted ones are reported.
    --mapper chooses the incremental or the global mapper (auto: by the number of photos); a
    globally mapped model grows the same way until the new photos pass a share of it, then is
    solved again globally (see --mapper).
    A model that contradicts its verified pairs is mapped again with the next seeds (as reconstruct).
    Exit 0: a model, 1: no model, a likely wrong one (implausible focal length, or poses that
    contradict its pairs) or some images (pairs) failed, 2: usage, 130/143: interrupted.
    """
    if json_report is not None:
        check_report(json_report, created=work_dir)
    from ..sfm.pipeline import SfmOptions, run_sfm

    sfm_options = SfmOptions(
        pairs=pairs_spec,
        extract=config_from(ExtractConfig, options),
        match=config_from(MatchConfig, options),
        camera=camera_from(options),
        colmap=config_from(ColmapRun, options),
        mapper=config_from(MapperOptions, options),
        export=export_formats,
        report=not no_report,
        **options,  # the rest by name: weights, tile, backend, rebuild, device, quiet
    )
    finish_run(run_sfm(images_dir, work_dir, sfm_options), json_report)


def camera_from(options: dict[str, Any]) -> CameraOptions:
    """``CameraOptions`` of --camera-model and --camera-mode (or --single-camera), which are taken
    out of ``options``."""
    options["camera_mode"] = camera_mode_of(options.pop("camera_mode"), options.pop("single_camera"))
    return config_from(CameraOptions, options)


# -- the model handed to dense and neural methods (issue 26) ------------------------------------
@click.command("export-model")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(MODEL_FORMATS), help="Required. " + MODEL_FORMATS_HELP)
@images_option("The photos' folder (gaussian-splatting, nerfstudio).", required=False)
@click.option(
    "--num-threads", default=-1, show_default=True, help="Threads for COLMAP's undistortion; -1 all."
)
@verbose_option
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
    from ..sfm.handoff import export_model as run_export

    if fmt is None:  # click's own message for a missing option spans lines
        raise ConfigError(f"--format is required: {', '.join(MODEL_FORMATS)}")
    finish_run(run_export(model_dir, out, fmt, images, num_threads=num_threads, verbose=verbose), None)


@click.command()
@click.argument("work_dir", type=FOLDER)
@images_option("The photos' folder [default: the one the last sfm run in WORK_DIR recorded].", required=False)
@out_option(None, "The page to write [default: WORK_DIR/report.html].")
@reports_errors
def report(work_dir: Path, images: Path | None, out: Path | None) -> None:
    """Write the page of an sfm work folder: one self-contained HTML file (no network) with the
    last run's summary and stage times, every photo (thumbnail, keypoints, verified matches,
    3D points, reprojection error), track-length and error histograms, keypoint and match
    pictures of a sample, and the points and cameras in 3D (drag, shift-drag, wheel).
    'sfm' writes it after each run (--no-report: not)."""
    from ..sfm.page import write_report

    click.echo(f"wrote {write_report(work_dir, images, out)}", err=True)
