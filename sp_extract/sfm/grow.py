"""A COLMAP database and model that grow: new images and pairs added, the model continued.

``add_to_database`` gives a database the images and matched pairs it lacks, keeping the ids of
those it has (cameras, rigs, frames, images), in one SQLite transaction (a killed run leaves the
database as it was), then verifies the pairs that have no two-view geometry yet: every pair of
a new database, the new pairs of a grown one, and whatever a run killed during verification
left. A new database is written to a temporary file renamed into place; it carries a random
identity (SQLite's ``application_id``, which COLMAP leaves alone) that its models record.
``database.json`` beside it records the settings its cameras and verified pairs were made with
(camera model and mode, the verification's floor of inliers); a run growing it with others is
refused (``check_growth_settings``), so that one database never mixes them.

``map_database`` runs pycolmap's incremental or global mapper from scratch, or continues the
largest previous model with the incremental mapper (``input_path``: registered images keep
their ids and start from their poses, the new ones are registered, then COLMAP's final global
bundle adjustment runs), as ``plan_mapping`` decides: a globally mapped model is solved again
once the images added since exceed a share of it. The model's record (``sfm.json``) says which
mapper solved it. The models
are written, largest first, to ``sparse.new`` beside ``sparse`` and swapped in by two renames
(``sparse`` -> ``sparse.old``, ``sparse.new`` -> ``sparse``: ``swap_in``); ``recover_folder`` undoes
what a run killed between them left, so there is always a complete model. Both run pycolmap's long
steps in a child process (``child``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from ..interrupt import graceful_stop
from ..names import pair_key
from ..pairs.core import Pair
from ..report import counted
from ..store.atomic import atomic_write, building_folder, swap_in
from ..store.failures import damaged_error, describe_error
from ..store.reader import StoreReader, open_store
from .child import run_in_child
from .colmap import Cameras, DatabaseSummary, _write_images, camera_for_image, camera_group, read_matches
from .config import GLOBAL_RESOLVE_SHARE, CameraOptions, ColmapRun, MapperOptions
from .consistency import pair_agreements
from .environment import VERIFY_MAX_ERROR, colmap_logging, failures_reported, import_pycolmap
from .mappers import RankedModel, map_ranked
from .mapping import ModelStats, describe_model
from .verification import unverified_pairs, verify_database

MODEL_RECORD = "sfm.json"  # in sparse/: the database a model was mapped from
# beside the database: the settings its cameras and verified pairs were made with, which a run
# growing it must share (the option of each)
SETTINGS_RECORD = "database.json"
GROWTH_SETTINGS = {
    "camera_model": "--camera-model",
    "camera_mode": "--camera-mode",
    "min_inliers": "--min-inliers",
}


@dataclass(frozen=True)
class DatabaseInputs:
    """What a database's images and pairs are read from: the photos' folder (sizes, EXIF focal
    lengths), the feature store and the match store."""

    images: Path
    features: Path
    matches: Path


@dataclass
class DatabaseState:
    """A database's identity and size: what its models record, to tell when to map again."""

    identity: int
    images: int
    verified_pairs: int  # pairs with a two-view geometry (inliers or none)

    def record(self) -> dict[str, int]:
        """What a model records of the database it was mapped from (``sparse/sfm.json``)."""
        return {"database_id": self.identity, "images": self.images, "verified_pairs": self.verified_pairs}

    def mapped_in(self, record: dict[str, Any] | None) -> bool:
        """Whether the model ``record`` (``model_record``) was mapped from the database as it is."""
        return record is not None and all(record.get(key) == value for key, value in self.record().items())


@dataclass
class DatabaseUpdate:
    """What ``add_to_database`` did."""

    created: bool
    images_added: int
    pairs_added: int
    pairs_verified: int
    pairs_unmatched: int  # pairs of the plan that the match store lacks (their matching failed)
    state: DatabaseState


def database_state(path: Path) -> DatabaseState:
    """Identity, image count and verified pair count of a database (read only)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            identity = db.execute("PRAGMA application_id").fetchone()[0]
            images = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            verified = db.execute("SELECT COUNT(*) FROM two_view_geometries").fetchone()[0]
    except sqlite3.Error as error:
        raise StoreError(f"{path}: unreadable COLMAP database ({error}); run with --rebuild") from error
    return DatabaseState(identity, images, verified)


def _verify_missing(database: Path, run: ColmapRun, features: Path) -> int:
    """Verify the pairs that have matches but no two-view geometry (``verification``, in a child
    process); returns how many."""
    pairs = unverified_pairs(database)
    if pairs:
        run_in_child(verify_database, database, features, pairs, run)
    return len(pairs)


def _stored_pair(h5: StoreReader, name0: str, name1: str) -> tuple[str, str, str] | None:
    """The match store's group of a pair and its names in the group's order, or None."""
    for a, b in ((name0, name1), (name1, name0)):
        if pair_key(a, b) in h5:
            return pair_key(a, b), a, b
    return None


def _cameras(db: Any, camera_mode: str) -> Cameras:
    """The database's cameras by ``camera_group`` (with their rig id and an image of theirs), which
    the images added to it join."""
    first = {}
    for image in db.read_all_images():
        first.setdefault(image.camera_id, image.name)
    cameras: Cameras = {}
    for camera in db.read_all_cameras():
        if camera.camera_id in first:
            name = first[camera.camera_id]
            rig = db.read_rig_with_sensor(camera.sensor_id)
            cameras.setdefault(camera_group(camera, name, camera_mode), (camera, rig.rig_id, name))
    return cameras


def _read_new(fh5: StoreReader, images: Path, names: list[str], camera: CameraOptions) -> dict[str, int]:
    """Keypoint counts of the images ``names``, once everything ``_write_images`` reads of them
    (features, sizes, the image files' EXIF) was read without error: the transaction that
    writes them then fails on nothing but the database itself."""
    counts, sizes = {}, {}
    for name in names:
        try:
            counts[name] = fh5[name]["keypoints"].shape[0]
            sizes[name] = tuple(int(v) for v in np.asarray(fh5[name]["image_size"]))
        except (OSError, KeyError, ValueError, TypeError) as error:
            cause = f"features of '{name}' unreadable: {describe_error(error)}"
            raise damaged_error(Path(fh5.filename), cause) from error
        camera_for_image(images / name, camera.camera_model, sizes[name])
    if camera.camera_mode == "single" and len(set(sizes.values())) > 1:
        raise ConfigError(
            "--camera-mode single (--single-camera): the new photos have several sizes "
            f"({', '.join(sorted({f'{w} x {h}' for w, h in sizes.values()}))}); use --camera-mode auto"
        )
    return counts


def _add(
    path: Path,
    inputs: DatabaseInputs,
    names: list[str],
    pairs: list[Pair],
    camera: CameraOptions,
    verbose: bool,
) -> tuple[int, int, int]:
    """Add the images of ``names`` and the ``pairs`` that ``path`` lacks, in one transaction,
    during which a SIGINT or SIGTERM waits (pycolmap's transaction commits on any exit)."""
    pycolmap = import_pycolmap()
    summary = DatabaseSummary(str(path))
    with colmap_logging(verbose):
        db = pycolmap.Database.open(path)
        try:
            ids = {image.name: image.image_id for image in db.read_all_images()}
            new = [name for name in names if name not in ids]
            cameras = _cameras(db, camera.camera_mode)
            found: list[tuple[str, str, np.ndarray]] = []
            unmatched = 0
            with open_store(inputs.features) as fh5, open_store(inputs.matches) as mh5:
                counts = _read_new(fh5, inputs.images, new, camera)
                for name0, name1 in pairs:
                    stored = _stored_pair(mh5, name0, name1)
                    if stored is None:
                        unmatched += 1
                        continue
                    key, a, b = stored
                    for name in (a, b):
                        if name not in counts:
                            counts[name] = db.num_keypoints_for_image(ids[name])
                    found.append((a, b, read_matches(mh5, key, (counts[a], counts[b]), inputs.matches)))
                with graceful_stop(redeliver=True), pycolmap.DatabaseTransaction(db):
                    written = _write_images(db, fh5, inputs.images, new, {}, camera, summary, cameras)
                    ids.update(written[0])
                    added = 0
                    for a, b, pair_matches in found:
                        if not db.exists_matches(ids[a], ids[b]):  # added by a run that stopped later
                            db.write_matches(ids[a], ids[b], pair_matches)
                            added += 1
        finally:
            db.close()
    return len(new), added, unmatched


def _addition_marker(database: Path) -> Path:
    return database.with_name(database.name + ".adding")


def addition_failed(database: Path) -> bool:
    """Whether a run failed while adding images to ``database`` (which may hold part of them)."""
    return _addition_marker(database).exists()


def database_settings(camera: CameraOptions, run: ColmapRun) -> dict[str, Any]:
    """What ``SETTINGS_RECORD`` holds: the settings of a database's cameras and verified pairs."""
    return {
        "camera_model": camera.camera_model,
        "camera_mode": camera.camera_mode,
        "min_inliers": run.min_inliers,
    }


def check_growth_settings(database: Path, camera: CameraOptions, run: ColmapRun) -> None:
    """Refuse (``ConfigError``) to grow ``database`` with other settings than its record's (a
    database without a record, from an earlier version, is not checked)."""
    try:
        recorded = json.loads(database.with_name(SETTINGS_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(recorded, dict):
        return
    wanted = database_settings(camera, run)
    for key, option in GROWTH_SETTINGS.items():
        if recorded.get(key, wanted[key]) != wanted[key]:
            raise ConfigError(
                f"{database}: made with {option} {recorded[key]}, this run has {wanted[key]}: run with "
                "--rebuild (makes the database again, verifying every pair) or use another work folder"
            )


def add_to_database(
    database: Path,
    inputs: DatabaseInputs,
    names: list[str],
    pairs: list[Pair],
    camera: CameraOptions,
    fresh: bool,
    run: ColmapRun | None = None,
) -> DatabaseUpdate:
    """Bring ``database`` to the images ``names`` and the ``pairs`` (module doc), read from
    ``inputs``, with the cameras ``camera`` (its model checked by the caller); ``fresh``
    starts a new database (renamed over the old one once verified). While images are added to
    an existing database, a marker file beside it (``addition_failed``) tells the next run, if
    this one fails (a write error commits part of pycolmap's transaction), to start it over."""
    run = run or ColmapRun()
    create = fresh or not database.exists()
    target = database.with_name(f".{database.name}.{os.getpid()}.tmp") if create else database
    marker = _addition_marker(database)
    try:
        with failures_reported(database, "write the database"):
            with atomic_write(database, target) if create else contextlib.nullcontext():
                if create:
                    target.unlink(missing_ok=True)
                else:
                    marker.touch()
                added = _add(target, inputs, names, pairs, camera, run.verbose)
                if not create:
                    marker.unlink()
                if create:
                    with contextlib.closing(sqlite3.connect(target)) as db:
                        db.execute(f"PRAGMA application_id = {secrets.randbelow(1 << 31) + 1}")
                        db.commit()
                verified = _verify_missing(target, run, inputs.features)
            if create:  # after the rename: the new database needs no marker
                marker.unlink(missing_ok=True)
            with atomic_write(database.with_name(SETTINGS_RECORD)) as record:
                record.write_text(json.dumps(database_settings(camera, run)), encoding="utf-8")
    finally:
        if create:
            for suffix in ("", "-journal", "-wal", "-shm"):
                target.with_name(target.name + suffix).unlink(missing_ok=True)
    return DatabaseUpdate(create, added[0], added[1], verified, added[2], database_state(database))


# -- the model -----------------------------------------------------------------------------------
def model_record(sparse: Path) -> dict[str, Any] | None:
    """What ``sparse/sfm.json`` says of the database its models come from, None if nothing."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((sparse / MODEL_RECORD).read_text(encoding="utf-8"))
    return None


def _map(
    database: Path, images: Path, building: Path, plan: MapPlan, options: MapperOptions, run: ColmapRun
) -> list[tuple[ModelStats, dict[int, str]]]:
    """pycolmap's mapper as ``plan`` says (in a child process); the models written to
    ``building/0`` (largest), ``building/1``, ...; each with its statistics and registered images
    (id: name)."""
    ranked = map_ranked(database, images, building, plan.mapper, options, run, plan.previous)
    return [describe_model(item, building / str(rank)) for rank, item in enumerate(ranked)]


def read_models(sparse: Path, database: Path) -> list[tuple[ModelStats, dict[int, str]]]:
    """``describe_model`` of each model in ``sparse`` (0, 1, ...), mapped from ``database``."""
    pycolmap = import_pycolmap()
    folders = sorted((p for p in sparse.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    models = [pycolmap.Reconstruction(folder) for folder in folders]
    agreements = pair_agreements(models, database, VERIFY_MAX_ERROR)
    return [
        describe_model(RankedModel(model, agreement, None), folder)
        for model, agreement, folder in zip(models, agreements, folders, strict=True)
    ]


@dataclass(frozen=True)
class MapPlan:
    """How a model is mapped: by ``mapper`` from scratch, or (``previous``, a model folder) the new
    images registered into the previous model by the incremental mapper, then bundle adjusted;
    ``made_by`` and ``solved_images``: what the model records of the mapper that solved it."""

    mapper: str
    previous: str = ""
    made_by: str = ""
    solved_images: int = 0
    reason: str = ""  # why a grown model was solved again

    def record(self, state: DatabaseState) -> dict[str, Any]:
        """The model's record (``sparse/sfm.json``): the database's state and who solved it."""
        return {**state.record(), "mapper": self.made_by, "solved_images": self.solved_images}


def plan_mapping(sparse: Path, state: DatabaseState, grow: bool, options: MapperOptions) -> MapPlan:
    """The mapping of ``state``'s database into ``sparse`` (``grow``: continuing ``sparse/0``):
    the mapper ``options`` choose for its size from scratch, but a grown model is continued
    unless that mapper is global and the images added since the model was solved exceed
    ``GLOBAL_RESOLVE_SHARE`` of those it was solved with (a model from before issue 24 counts as
    solved incrementally with the images it records)."""
    chosen = options.chosen(state.images)
    record = model_record(sparse) or {}
    if not grow:
        return MapPlan(chosen, made_by=chosen, solved_images=state.images)
    made_by = record.get("mapper", "incremental")
    solved = int(record.get("solved_images", record.get("images", 0)))
    added = state.images - solved
    if chosen == "global" and added > GLOBAL_RESOLVE_SHARE * solved:
        reason = (
            f"{counted(added, 'image')} added since the model was solved with {solved}: over "
            f"{GLOBAL_RESOLVE_SHARE:.0%}, mapped again globally"
        )
        return MapPlan("global", made_by="global", solved_images=state.images, reason=reason)
    return MapPlan("incremental", str(sparse / "0"), made_by, solved)


def map_database(
    database: Path,
    images: Path,
    sparse: Path,
    state: DatabaseState,
    plan: MapPlan,
    options: MapperOptions | None = None,
    run: ColmapRun | None = None,
) -> list[tuple[ModelStats, dict[int, str]]]:
    """Map ``database`` into ``sparse`` as ``plan`` says (module doc), with the global mapper's
    settings of ``options``."""
    options, run = options or MapperOptions(), run or ColmapRun()
    building = building_folder(sparse)
    try:
        with failures_reported(sparse, "write the models"):
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir()
            found = run_in_child(_map, database, images, building, plan, options, run)
            if plan.previous and not found:  # the previous model is worth more than none
                raise StoreError(
                    f"{sparse}: COLMAP returned no model when continuing {plan.previous}; the models are "
                    "unchanged; run with --rebuild to map from scratch"
                )
            (building / MODEL_RECORD).write_text(json.dumps(plan.record(state)) + "\n", encoding="utf-8")
            swap_in(building, sparse)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for stats, _ in found:
        stats.path = str(sparse / Path(stats.path).name)
    return found
