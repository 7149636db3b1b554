"""The inspection commands: ``info`` (what a store holds), ``show`` (keypoints and matches drawn)
and the ``evaluate`` group (keypoint accuracy on known homographies, camera poses against a reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..extraction.config import TORCH_PRECISIONS, ExtractConfig
from .errors import finish_run, reports_errors
from .options import (
    DETECTOR,
    FILE,
    FOLDER,
    config_from,
    device_option,
    extract_options,
    images_option,
    json_report_option,
    precision_option,
    stacked,
    weights_option,
)


@click.command()
@click.argument("store", type=FILE)
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

    from ..inspect.info import store_info

    described = store_info(store)
    if names:
        for name in sorted(described.counts):
            click.echo(name)
    elif as_json:
        click.echo(json.dumps(described.to_dict(), indent=2))
    else:
        finish_run(described, None, to_stdout=True)


@click.command()
@click.argument("store", type=FILE)
@click.argument("names", nargs=-1, required=True)
@images_option("The image folder the features were extracted from.")
@click.option(
    "--features",
    type=FILE,
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
    from ..inspect.show import show as draw

    for path in draw(store, list(names), images, out, features, max_size):
        click.echo(f"wrote {path}", err=True)


_evaluate_options = stacked(  # the extraction options that change the features, and the report
    weights_option,
    extract_options(
        *DETECTOR,
        "resize_force",
        "subpixel",
        "reduced_decode",
        max_keypoints={
            "default": 1000,
            "help": "Keep the best N per image (the paper's protocol keeps 1000 at 480 x 640); -1 all.",
        },
    ),
    precision_option(TORCH_PRECISIONS, help="Network arithmetic, as for extract."),
    device_option(),
    click.option("--quiet", "-q", is_flag=True, help="No line per pair; the table only."),
    json_report_option,
)


def _run_evaluation(kind: str, source: Path, options: dict[str, Any], **extra: Any) -> None:
    from ..inspect.evaluate import run_evaluation

    json_report = options.pop("json_report")
    config = config_from(ExtractConfig, options)  # the rest: weights, device, quiet
    finish_run(run_evaluation(kind, source, config, **options, **extra), json_report, to_stdout=True)


@click.group()
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
@click.argument("images_dir", type=FOLDER)
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
@click.argument("hpatches_dir", type=FOLDER)
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
    type=FOLDER,
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
    from ..inspect.poses import evaluate_poses

    evaluation = evaluate_poses(model, reference, images)
    if evaluation.note:
        click.echo(evaluation.note, err=True)
    evaluation.per_image = per_image
    finish_run(evaluation, json_report, to_stdout=True)
