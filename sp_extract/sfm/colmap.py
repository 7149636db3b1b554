"""COLMAP database: a feature store and a match store into a COLMAP database (pycolmap).

``write_database`` writes cameras (EXIF focal length or COLMAP's prior), trivial rigs and frames,
images named as in the feature store, keypoints shifted by +0.5 into COLMAP's pixel convention
and the raw matches, then runs pycolmap's geometric verification, so COLMAP's mapper
(``mapping``) can run on the database directly. It writes into a temporary file beside the
target and renames it into place: a failed or interrupted run leaves the previous database
untouched. The verification runs in a child process (``child``), so SIGINT and SIGTERM stop it.
pycolmap itself, imported on use, is set up by ``environment``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import EXIT_SOME_FAILED, ConfigError, StoreError
from ..names import flat_name
from ..report import Report, counted, warn
from ..store.atomic import atomic_write
from ..store.catalog import StoreInfo, read_store, read_store_info
from ..store.failures import damaged_error, describe_error
from ..store.reader import open_store
from .child import run_in_child
from .config import CameraOptions, ColmapRun, check_camera_mode
from .environment import COLMAP_OFFSET, colmap_logging, failures_reported, import_pycolmap
from .verification import unverified_pairs, verify_database

_DATABASE_TABLES = {"cameras", "images", "keypoints", "matches", "two_view_geometries"}


def temporary_beside(path: Path, suffix: str = "tmp") -> Path:
    """A temporary path beside ``path`` (hidden, with the process id), renamed into place when done."""
    return path.with_name(f".{path.name}.{os.getpid()}.{suffix}")


def check_images_present(images: Path, names: list[str], source: Path, has_it: str, way_out: str) -> None:
    """Refuse (``ConfigError``) to go on when images named in ``source`` are not in ``images``.

    None there: the wrong folder. Some missing: deleted or moved since ``source`` was written
    (``has_it``: what ``source`` holds of an image); ``way_out`` says how to go on without them.
    """
    missing = [name for name in names if not (images / name).is_file()]
    if not missing:
        return
    if len(missing) == len(names):
        raise ConfigError(
            f"{images}: holds none of the {counted(len(names), 'image')} of {source} (e.g. '{names[0]}'); "
            "--images must be the folder the features were extracted from"
        )
    more = f" (and {counted(len(missing) - 1, 'other image')})" if len(missing) > 1 else ""
    raise ConfigError(
        f"{images / missing[0]}: no such image{more}, though {source} {has_it}: deleted or moved "
        f"since; put it back, or {way_out}"
    )


# -- reading the stores --------------------------------------------------------------------------
def resolve_pairs(
    pair_keys: list[str], names: list[str], features: Path, matches: Path
) -> list[tuple[str, str, str]]:
    """(key, name0, name1) for every pair group of the match store, each unordered pair once.

    A key is ``flat_name(name0) + "/" + flat_name(name1)``; names are looked up among the feature
    store's. Raises ``StoreError`` for a pair naming an image the feature store lacks, and for two
    feature-store names that a pair key cannot tell apart.
    """
    by_flat: dict[str, str] = {}
    for name in names:
        other = by_flat.setdefault(flat_name(name), name)
        if other != name:
            raise StoreError(
                f"{features}: images '{other}' and '{name}' have the same pair key in match stores; "
                "rename one of them"
            )
    resolved, seen = [], set()
    for key in pair_keys:
        flat0, _, flat1 = key.partition("/")
        for flat in (flat0, flat1):
            if flat not in by_flat:
                raise StoreError(
                    f"{matches}: pair '{key}' names image '{flat}', which has no features in {features}; "
                    "match with the features of these images"
                )
        name0, name1 = by_flat[flat0], by_flat[flat1]
        if frozenset((name0, name1)) in seen or name0 == name1:
            continue
        seen.add(frozenset((name0, name1)))
        resolved.append((key, name0, name1))
    return resolved


def check_same_features(
    features: Path, feature_store: StoreInfo, matches: Path, match_settings: dict[str, Any]
) -> None:
    """Refuse a match store made from another feature store (its settings and store id, as
    ``match-pairs`` records them; a match store that predates store ids has settings only)."""
    if match_settings.get("features_settings") != feature_store.settings:
        raise StoreError(
            f"{matches}: made from features extracted with other settings than {features}; match "
            f"the features of {features} first (sp-extract match-pairs)"
        )
    if match_settings.get("features_id", feature_store.store_id) != feature_store.store_id:
        raise StoreError(
            f"{matches}: made from another extraction than {features} (its store id differs: "
            f"re-extracted with --overwrite since); match again (sp-extract match-pairs --overwrite)"
        )


def read_matches(h5: h5py.File, key: str, counts: tuple[int, int], matches: Path) -> np.ndarray:
    """(M, 2) uint32 keypoint indices of one pair, checked against the keypoint counts."""
    try:
        matches0 = np.asarray(h5[key]["matches0"])
    except (OSError, KeyError, ValueError) as error:
        raise damaged_error(matches, f"pair '{key}' unreadable: {describe_error(error)}") from error
    if matches0.ndim != 1 or len(matches0) != counts[0] or matches0.max(initial=-1) >= counts[1]:
        raise StoreError(
            f"{matches}: pair '{key}' does not fit the keypoints of the feature store "
            f"({matches0.shape[0] if matches0.ndim else 0} matches0 entries for {counts[0]} and "
            f"{counts[1]} keypoints); the matches were made from another feature store"
        )
    index = np.flatnonzero(matches0 >= 0)
    return np.stack([index, matches0[index]], axis=1).astype(np.uint32)


# -- cameras -------------------------------------------------------------------------------------
def camera_for_image(path: Path, camera_model: str, size: tuple[int, int]) -> Any:
    """A pycolmap camera for one image: COLMAP's EXIF focal length, else its 1.2 * max(w, h) prior.

    ``size`` is the (width, height) recorded in the feature store; a file of another size was
    not the one the features came from (``StoreError``).
    """
    pycolmap = import_pycolmap()
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such image; --images must be the folder the features were extracted from"
        )
    options = pycolmap.ImageReaderOptions()
    options.camera_model = camera_model
    try:
        camera = pycolmap.infer_camera_from_image(path, options)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"{path}: COLMAP cannot read this image ({error})") from error
    if (camera.width, camera.height) != tuple(size):
        raise StoreError(
            f"{path}: {camera.width} x {camera.height} pixels, but its features were extracted from a "
            f"{size[0]} x {size[1]} image; re-extract the features of these images"
        )
    return camera


Cameras = dict[Hashable, tuple[Any, int, str]]  # group -> camera, its rig id, its first image


def camera_group(camera: Any, name: str, camera_mode: str) -> Hashable:
    """The images whose camera ``camera`` (image ``name``'s, as ``camera_for_image`` makes it)
    shares: ``auto`` one camera per image size and EXIF focal length (photos without one: per
    size), as frames of one video or photos of one camera at one zoom are; ``single`` one for
    all; ``per-image`` none shared (COLMAP's default)."""
    if camera_mode == "single":
        return camera_mode
    if camera_mode == "per-image":
        return name
    focal = round(float(camera.mean_focal_length()), 2)
    return camera.width, camera.height, camera.has_prior_focal_length, focal


def check_camera_model(camera_model: str) -> str:
    """The COLMAP camera model name, upper-cased, or a ``ConfigError`` listing the valid ones."""
    pycolmap = import_pycolmap()
    models = [m for m in pycolmap.CameraModelId.__members__ if m != "INVALID"]
    if camera_model.upper() not in models:
        raise ConfigError(f"--camera-model {camera_model}: not a COLMAP camera model ({', '.join(models)})")
    return camera_model.upper()


# -- the database --------------------------------------------------------------------------------
def check_database(path: Path) -> list[str]:
    """Image names of an existing COLMAP database, read without modifying it (``StoreError``)."""
    try:
        with path.open("rb") as file:
            header = file.read(16)
        if header != b"SQLite format 3\x00":
            raise StoreError(f"{path}: not a COLMAP database (not an SQLite file)")
        # immutable: a read-only connection to COLMAP's WAL-mode database would leave -wal and
        # -shm files behind; without a -wal file there is nothing else to read
        wal = path.with_name(path.name + "-wal").exists()
        uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = _DATABASE_TABLES - tables
            if missing:
                raise StoreError(f"{path}: not a COLMAP database (no {', '.join(sorted(missing))} table)")
            return [row[0] for row in db.execute("SELECT name FROM images")]
    except (OSError, sqlite3.Error) as error:
        raise StoreError(f"{path}: unreadable COLMAP database ({error})") from error


@dataclass
class DatabaseSummary(Report):
    """What ``write_database`` wrote; ``to_dict`` is the ``--json-report`` content."""

    command: str = field(default="colmap", kw_only=True)
    database: str
    images: int = 0
    cameras: int = 0
    keypoints: int = 0
    matched_pairs: int = 0
    matches: int = 0
    verified_pairs: int = 0
    inlier_matches: int = 0
    refined_keypoints: int = 0  # keypoints moved by --refine-keypoints
    updated: bool = False

    def body(self) -> list[str]:
        verb = "updated" if self.updated else "written"
        return [
            f"colmap: {self.database} {verb}: {counted(self.images, 'image')}, "
            f"{counted(self.cameras, 'camera')}, {counted(self.keypoints, 'keypoint')}"
            + (f" ({self.refined_keypoints} refined)" if self.refined_keypoints else ""),
            f"{counted(self.matched_pairs, 'matched pair')} ({counted(self.matches, 'match', 'matches')}), "
            f"{counted(self.verified_pairs, 'verified pair')} "
            f"({counted(self.inlier_matches, 'inlier match', 'inlier matches')})",
            f"wall time {self.wall_time_s:.1f} s",
        ]


def _write_images(
    db: Any,
    h5: h5py.File,
    images: Path,
    names: list[str],
    old_ids: dict[str, int],
    camera_options: CameraOptions,
    summary: DatabaseSummary,
    cameras: Cameras | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Cameras, trivial rigs, images, frames and keypoints; returns image ids and keypoint counts.

    Images share cameras by ``camera_group``; ``cameras``: the database's cameras by group
    (images added to a database that has them), extended by the ones written here.
    """
    pycolmap = import_pycolmap()
    camera_model, camera_mode = camera_options.camera_model, camera_options.camera_mode
    cameras = {} if cameras is None else cameras
    ids: dict[str, int] = {}
    counts: dict[str, int] = {}
    for name in names:
        try:
            group = h5[name]
            keypoints = np.asarray(group["keypoints"], dtype=np.float32)
            size = tuple(int(v) for v in np.asarray(group["image_size"]))
        except (OSError, KeyError, ValueError, TypeError) as error:
            cause = f"features of '{name}' unreadable: {describe_error(error)}"
            raise damaged_error(Path(h5.filename), cause) from error
        if camera_mode == "single" and cameras:  # one camera: read the first image's only
            camera, rig_id, first = next(iter(cameras.values()))
            if (camera.width, camera.height) != size:
                raise ConfigError(
                    f"--camera-mode single (--single-camera): {name} is {size[0]} x {size[1]} pixels but "
                    f"{first} is {camera.width} x {camera.height}; use --camera-mode auto for images of "
                    "several sizes"
                )
        else:
            camera = camera_for_image(images / name, camera_model, size)
            group = camera_group(camera, name, camera_mode)
            if group in cameras:
                camera, rig_id, _ = cameras[group]
            else:
                camera.camera_id = db.write_camera(camera)
                rig = pycolmap.Rig()
                rig.add_ref_sensor(camera.sensor_id)
                rig_id = db.write_rig(rig)
                cameras[group] = (camera, rig_id, name)
                summary.cameras += 1
        image = pycolmap.Image(name=name, camera_id=camera.camera_id)
        if name in old_ids:
            image.image_id = old_ids[name]
        image.image_id = db.write_image(image, use_image_id=name in old_ids)
        frame = pycolmap.Frame()
        frame.rig_id = rig_id
        frame.add_data_id(image.data_id)
        db.write_frame(frame)
        db.write_keypoints(image.image_id, keypoints + np.float32(COLMAP_OFFSET))
        ids[name], counts[name] = image.image_id, len(keypoints)
        summary.keypoints += len(keypoints)
    summary.images = len(ids)
    return ids, counts


def write_database(
    images: Path | str,
    features: Path | str,
    matches: Path | str,
    database: Path | str,
    camera: CameraOptions | None = None,
    run: ColmapRun | None = None,
    overwrite: bool = False,
    refine_keypoints: bool = False,
) -> DatabaseSummary:
    """Write a COLMAP database from a feature store and a match store, with verified pairs.

    Every image of the feature store gets a camera (``camera``: its model, and which images
    share one), its keypoints and the matches of its pairs. An existing database holding only
    images of the feature store is updated (image ids kept, everything else rewritten); one
    holding other images is refused unless ``overwrite``. The database is written to a temporary
    file and renamed into place at the end. ``run.seed`` fixes the RANSAC of the verification
    (with ``run.num_threads=1`` the run is repeatable). ``refine_keypoints`` then moves the
    keypoints with ``adjust.adjust_database_keypoints`` on the verified matches' image patches and
    verifies again.
    """
    pycolmap = import_pycolmap()
    adjust_keypoints = _keypoint_adjuster() if refine_keypoints else None
    started = time.monotonic()
    images, features, matches, database = Path(images), Path(features), Path(matches), Path(database)
    camera, run = camera or CameraOptions(), run or ColmapRun()
    camera_model = check_camera_model(camera.camera_model)
    camera = CameraOptions(camera_model, check_camera_mode(camera.camera_mode))
    _check_inputs(images, features, matches, database)
    feature_store = read_store(features, "features", "--features")
    names = feature_store.names
    match_settings, pair_keys = read_store_info(matches, "matches", "--matches")
    check_same_features(features, feature_store, matches, match_settings)
    pairs = resolve_pairs(pair_keys, names, features, matches)
    check_images_present(
        images,
        names,
        features,
        "holds its features",
        "extract the folder as it is now into a new feature store and match again",
    )
    summary = DatabaseSummary(str(database))
    summary.updated = not overwrite and _holds_images(database, names, features)
    temporary = temporary_beside(database)
    temporary.unlink(missing_ok=True)
    try:
        with failures_reported(database, "write the database"), atomic_write(database, temporary):
            if summary.updated:
                shutil.copyfile(database, temporary)
            with colmap_logging(run.verbose):
                db = pycolmap.Database.open(temporary)
                try:
                    old_ids = {}
                    if summary.updated:
                        old_ids = {image.name: image.image_id for image in db.read_all_images()}
                        db.clear_all_tables()
                    with open_store(features) as fh5, open_store(matches) as mh5:
                        ids, counts = _write_images(db, fh5, images, names, old_ids, camera, summary)
                        for key, name0, name1 in pairs:
                            found = read_matches(mh5, key, (counts[name0], counts[name1]), matches)
                            db.write_matches(ids[name0], ids[name1], found)
                            summary.matched_pairs += 1
                            summary.matches += len(found)
                finally:
                    db.close()
            run_in_child(verify_database, temporary, features, unverified_pairs(temporary), run)
            if adjust_keypoints:  # adjust on the verified matches, then verify the adjusted keypoints
                summary.refined_keypoints = adjust_keypoints(temporary, images)
                with colmap_logging(run.verbose), pycolmap.Database.open(temporary) as db:
                    db.clear_two_view_geometries()
                run_in_child(verify_database, temporary, features, unverified_pairs(temporary), run)
            with contextlib.closing(sqlite3.connect(temporary)) as db:  # pairs with inliers only
                found = db.execute("SELECT COUNT(*), SUM(rows) FROM two_view_geometries WHERE rows > 0")
                summary.verified_pairs, inliers = found.fetchone()
                summary.inlier_matches = inliers or 0
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):  # SQLite's files beside the database
            temporary.with_name(temporary.name + suffix).unlink(missing_ok=True)
    if not summary.inlier_matches:
        summary.exit_code = EXIT_SOME_FAILED
        warn(
            "no pair passed COLMAP's geometric verification "
            f"({counted(summary.matched_pairs, 'matched pair')}, 0 inlier matches), so reconstruct has "
            f"nothing to build on; check that --camera-model {camera_model} fits the photos and that the "
            "matches are right"
        )
    summary.wall_time_s = time.monotonic() - started
    return summary


def _keypoint_adjuster() -> Callable[[Path, Path], int]:
    """``adjust.adjust_database_keypoints`` (``--refine-keypoints``), or a ``ConfigError`` when
    scipy, which it needs, is missing."""
    try:
        from .adjust import adjust_database_keypoints
    except ImportError as error:  # scipy, part of the colmap extra
        raise ConfigError(
            f"--refine-keypoints needs scipy ({error}); install it with: pip install scipy "
            "(or the COLMAP extra: pip install 'sp-extract[colmap]')"
        ) from error
    return adjust_database_keypoints


def _check_inputs(images: Path, features: Path, matches: Path, database: Path) -> None:
    """Refuse (``ConfigError``) missing stores, image folder or database folder."""
    for path, what in ((features, "feature store"), (matches, "match store")):
        if not path.is_file():
            raise ConfigError(f"{path}: no such {what}")
    if not images.is_dir():
        raise ConfigError(f"{images}: no such image folder")
    if not database.parent.is_dir():
        raise ConfigError(f"{database}: the folder {database.parent} does not exist")


def _holds_images(database: Path, names: list[str], features: Path) -> bool:
    """Whether ``database`` exists and holds images, all of them among ``names`` (the feature
    store's); a ``StoreError`` when it holds others (``--overwrite`` replaces it)."""
    if not database.exists():
        return False
    old_names = check_database(database)
    others = sorted(set(old_names) - set(names))
    if others:
        raise StoreError(
            f"{database}: holds {len(others)} images that are not in {features} (e.g. '{others[0]}'); "
            "choose another --database or pass --overwrite to replace it"
        )
    return bool(old_names)
