"""COLMAP's incremental or global mapper on a database (``sp-extract reconstruct``), run in a child
process (``child``) so that SIGINT and SIGTERM stop it; the models are built in a temporary folder beside
the target and renamed into place, and each is reported with its statistics (``ModelStats``),
flagged as likely wrong when its refined cameras are implausible or its poses contradict the
verified pairs it was built from (``consistency``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError
from ..report import Report, counted, listed, warn
from ..store.atomic import building_folder, recover_folder, swap_in
from .child import run_in_child
from .colmap import check_database, check_images_present
from .config import PLAUSIBLE_FOCAL_RATIO, WRONG_BELOW, ColmapRun, MapperOptions
from .environment import failures_reported, import_pycolmap
from .mappers import RankedModel, map_ranked


@dataclass
class ModelStats:
    """One reconstructed model, written to ``path`` in COLMAP's binary format."""

    path: str
    registered_images: int
    points3D: int
    observations: int
    mean_track_length: float
    mean_reprojection_error_px: float
    # registered images whose refined camera is implausible (``implausible_cameras``)
    implausible_cameras: list[str] = field(default_factory=list)
    # the median share of its verified pairs' inlier matches its poses explain (``consistency``);
    # None: too few pairs to tell
    pair_agreement: float | None = None
    seed: int | None = None  # of the mapping that made it (``mappers.map_ranked``)

    @property
    def inconsistent(self) -> bool:
        return self.pair_agreement is not None and self.pair_agreement < WRONG_BELOW


def implausible_cameras(model: Any) -> list[str]:
    """The registered images of ``model`` whose refined focal length is outside COLMAP's own
    bounds (``PLAUSIBLE_FOCAL_RATIO`` times the image's larger side). Such a model registered
    them all the same, but is likely wrong: per-image focal lengths of 361 px and 2.1e7 px on 9
    frames of one phone video gave a model whose poses were off by 50 degrees. (A strong radial
    distortion alone is not counted: Internet photos' cameras reach |k| > 1 in right models.)"""
    low, high = PLAUSIBLE_FOCAL_RATIO
    names = []
    for image_id in model.reg_image_ids():
        image = model.images[image_id]
        camera = model.cameras[image.camera_id]
        ratio = camera.mean_focal_length() / max(camera.width, camera.height)
        if not low <= ratio <= high:
            names.append(image.name)
    return sorted(names)


def inconsistent_warning(model: ModelStats) -> str:
    """The summary's line for a model that contradicts its verified pairs."""
    return (
        f"model {model.path} is likely wrong: its poses explain a median {model.pair_agreement:.0%} of "
        f"the inlier matches of the verified pairs between its images (under {WRONG_BELOW:.0%}); try "
        "--camera-mode single for photos of one camera, or more photos between these views"
    )


def judged_wrong(model: ModelStats, seed: int, notes: list[str]) -> bool:
    """Whether ``model``, the largest, is likely wrong (implausible cameras, or inconsistent with its
    verified pairs), warned; ``notes`` get a line when it was mapped with another seed than
    ``seed`` (``mappers.map_ranked``)."""
    if model.implausible_cameras:
        warn(implausible_warning(model))
    if model.inconsistent:
        warn(inconsistent_warning(model))
    if model.seed is not None and model.seed != seed:
        notes.append(
            f"{model.path}: mapped with seed {model.seed}: the mapping with seed {seed} contradicted the "
            "verified pairs (docs/accuracy.md 'Inconsistent models')"
        )
    return bool(model.implausible_cameras) or model.inconsistent


def implausible_warning(model: ModelStats) -> str:
    """The summary's line for a model with implausible cameras."""
    return (
        f"model {model.path} is likely wrong: {counted(len(model.implausible_cameras), 'registered image')} "
        f"ended with an implausible focal length (out of COLMAP's bounds), e.g. "
        f"{model.implausible_cameras[0]}; try --camera-mode single for photos of one camera, or more "
        "photos between these views"
    )


@dataclass
class ReconstructSummary(Report):
    """What ``reconstruct`` did; ``to_dict`` is the ``--json-report`` content."""

    command: str = field(default="reconstruct", kw_only=True)
    database: str
    output: str
    mapper: str = "incremental"
    images: int = 0
    models: list[ModelStats] = field(default_factory=list)
    unregistered_images: list[str] = field(default_factory=list)  # in no model

    def body(self) -> list[str]:
        lines = [
            f"reconstruct: {counted(len(self.models), 'model')} from {counted(self.images, 'image')} "
            f"in {self.database} ({self.mapper} mapper)"
        ]
        for model in self.models:
            lines.append(
                f"{model.path}: {counted(model.registered_images, 'image')} registered, "
                f"{model.points3D} 3D points, mean track length {model.mean_track_length:.2f}, "
                f"mean reprojection error {model.mean_reprojection_error_px:.3f} px"
            )
        if not self.models:
            lines.append(NO_MODEL)
        lines += unregistered_lines(self.unregistered_images, UNREGISTERED_SHOWN)
        lines.append(f"wall time {self.wall_time_s:.1f} s")
        return lines


UNREGISTERED_SHOWN = 20  # names listed in the printed summary; the JSON report has them all
NO_MODEL = "no model could be reconstructed (too few verified matches between the images?)"


def unregistered_lines(names: list[str], shown: int) -> list[str]:
    """The summary line naming the images no model registered (the first ``shown``), if any."""
    if not names:
        return []
    return [f"not registered in any model: {counted(len(names), 'image')}: {listed(names, shown)}"]


def reconstruct(
    database: Path | str,
    images: Path | str,
    out: Path | str,
    overwrite: bool = False,
    run: ColmapRun | None = None,
    mapper: MapperOptions | None = None,
) -> ReconstructSummary:
    """Run pycolmap's incremental or global mapper (``mapper``, incremental by default; ``auto``
    chooses by the number of images) on ``database``; models go to ``out/0``, ``out/1``, ...

    Every image the database names must be in ``images`` (``ConfigError`` otherwise). Models are
    built in a temporary folder beside ``out`` and moved into place at the end. A non-empty
    ``out`` is refused unless ``overwrite`` (which replaces it). ``run``'s seed fixes COLMAP's
    random choices (with one thread the run is repeatable). The summary lists the images that
    no model registered.
    """
    run, mapper = run or ColmapRun(), mapper or MapperOptions(mapper="incremental")
    import_pycolmap()
    started = time.monotonic()
    database, images, out = Path(database), Path(images), Path(out)
    if not database.is_file():
        raise ConfigError(f"{database}: no such database (write it with sp-extract colmap)")
    if not images.is_dir():
        raise ConfigError(f"{images}: no such image folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    names = check_database(database)
    check_images_present(
        images,
        names,
        database,
        "names it",
        "rebuild the database from the folder as it is now (extract, match, colmap)",
    )
    summary = ReconstructSummary(str(database), str(out), mapper.chosen(len(names)), images=len(names))
    building = building_folder(out)
    try:
        with failures_reported(out, "write the models"):
            recover_folder(out)  # what a run killed while swapping its models in left
            building.mkdir(parents=True)
            models, registered = run_in_child(
                map_images, database, images, building, out, summary.mapper, mapper, run
            )
            swap_in(building, out)  # the old models moved aside, not deleted, until the new are in place
    finally:
        shutil.rmtree(building, ignore_errors=True)
    summary.models = models
    summary.unregistered_images = [name for name in names if name not in registered]
    for model in summary.models:
        if model.implausible_cameras:
            warn(implausible_warning(model))
    largest = max(summary.models, key=lambda model: model.registered_images, default=None)
    wrong = largest is None or judged_wrong(largest, run.seed, summary.notes)
    summary.exit_code = EXIT_SOME_FAILED if wrong else EXIT_OK
    summary.wall_time_s = time.monotonic() - started
    return summary


def map_images(
    database: Path,
    images: Path,
    building: Path,
    out: Path,
    chosen: str,
    mapper: MapperOptions,
    run: ColmapRun,
) -> tuple[list[ModelStats], set[str]]:
    """pycolmap's ``chosen`` mapper ("incremental" or "global", with ``mapper``'s settings),
    writing the models into ``building``, largest first (run in a child process by ``reconstruct``):
    each model's statistics, with its path once moved to ``out``, and the names of the images some
    model registered."""
    stats, registered = [], set()
    for rank, item in enumerate(map_ranked(database, images, building, chosen, mapper, run)):
        found, names = describe_model(item, out / str(rank))
        stats.append(found)
        registered |= set(names.values())
    return stats, registered


def describe_model(item: RankedModel, folder: Path) -> tuple[ModelStats, dict[int, str]]:
    """A mapped model's statistics (as it will be at ``folder``) and registered images (id: name)."""
    model = item.model
    registered = {image_id: model.images[image_id].name for image_id in model.reg_image_ids()}
    return model_stats(model, folder, item.agreement, item.seed), registered


def model_stats(
    model: Any, path: Path, agreement: float | None = None, seed: int | None = None
) -> ModelStats:
    """The statistics of a pycolmap ``Reconstruction`` that is (or will be) at ``path``, with its
    pair agreement and the seed that made it (``mappers.RankedModel``)."""
    return ModelStats(
        path=str(path),
        registered_images=model.num_reg_images(),
        points3D=model.num_points3D(),
        observations=model.compute_num_observations(),
        mean_track_length=round(model.compute_mean_track_length(), 4),
        mean_reprojection_error_px=round(model.compute_mean_reprojection_error(), 4),
        implausible_cameras=implausible_cameras(model),
        pair_agreement=None if agreement is None else round(agreement, 4),
        seed=seed,
    )
