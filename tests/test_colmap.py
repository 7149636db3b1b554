"""COLMAP: the database read back with pycolmap, refusals and errors, and SfM on the real photos.

The synthetic scene is a cloud of 3D points seen by three cameras: keypoints are exact
projections (so geometric verification must keep the matches), descriptors are random unit
vectors shared by the projections of one point (so the expected matches are known without any
matcher), plus keypoints seen by one image only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import struct
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pycolmap
import pytest
from conftest import ROOT, CliExtraction, match_and_map, reconstruct_report, run_cli
from support.reliability import Run

from sp_extract.names import pair_key
from sp_extract.store.writer import StoreWriter

# name: (width, height, EXIF FocalLengthIn35mmFilm or None)
IMAGES = {"a.jpg": (400, 300, 50), "b.png": (400, 300, None), "sub/c.png": (360, 240, None)}
POINTS, EXTRA = 150, 40
SETTINGS = {"max_keypoints": -1, "weights_sha1": "synthetic"}


def jpeg_with_focal_35mm(image: np.ndarray, focal_35mm: int) -> bytes:
    """A JPEG with an EXIF block holding only FocalLengthIn35mmFilm (tag 0xA405)."""
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    exif_ifd_offset = 8 + 2 + 12 + 4  # TIFF header, IFD0 with one entry and its next-IFD link
    ifd0 = struct.pack("<HHHII", 1, 0x8769, 4, 1, exif_ifd_offset) + struct.pack("<I", 0)
    exif_ifd = struct.pack("<HHHIHH", 1, 0xA405, 3, 1, focal_35mm, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + exif_ifd
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = encoded.tobytes()
    return data[:2] + segment + data[2:]


def look_at(centre: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera rotation and translation of a camera at ``centre`` looking at ``target``."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    return rotation, -rotation @ centre


def project(
    points: np.ndarray, rotation: np.ndarray, translation: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Pinhole projection in COLMAP's pixel convention (focal 1.2 * max side, centred)."""
    focal = 1.2 * max(size)
    camera = points @ rotation.T + translation
    return focal * camera[:, :2] / camera[:, 2:] + np.asarray(size) / 2


def make_scene(
    root: Path, spec: dict[str, tuple[int, int, int | None]] = IMAGES
) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Image files and a feature store of ``spec``; returns them, the keypoints and the point
    id of every keypoint (-1: seen by this image only)."""
    rng = np.random.default_rng(7)
    points = rng.uniform([-1.5, -1.0, -1.0], [1.5, 1.0, 1.0], size=(POINTS, 3))
    descriptors = rng.normal(size=(POINTS + len(spec) * EXTRA, 256))
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    images, features = root / "images", root / "feats.h5"
    keypoints, point_ids = {}, {}
    with StoreWriter(features, "features", SETTINGS) as writer:
        for index, (name, (width, height, focal_35mm)) in enumerate(spec.items()):
            path = images / name
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
            if focal_35mm:
                path.write_bytes(jpeg_with_focal_35mm(pixels, focal_35mm))
            else:
                assert cv2.imwrite(str(path), pixels)
            rotation, translation = look_at(np.array([-1.2 + 1.2 * index, 0.3 * index, -6.0]), np.zeros(3))
            projected = project(points, rotation, translation, (width, height)) - 0.5  # hloc convention
            extra = rng.uniform([5, 5], [width - 5, height - 5], size=(EXTRA, 2))
            own = descriptors[POINTS + index * EXTRA : POINTS + (index + 1) * EXTRA]
            order = rng.permutation(POINTS + EXTRA)
            keypoints[name] = np.concatenate([projected, extra])[order].astype(np.float32)
            point_ids[name] = np.concatenate([np.arange(POINTS), np.full(EXTRA, -1)])[order]
            datasets = {
                "keypoints": keypoints[name],
                "scores": np.ones(POINTS + EXTRA, np.float32),
                "descriptors": np.concatenate([descriptors[:POINTS], own])[order].T.astype(np.float16),
                "image_size": np.array([width, height], np.int64),
            }
            writer.add(name, datasets)
    return images, features, keypoints, point_ids


def expected_matches(ids0: np.ndarray, ids1: np.ndarray) -> set[tuple[int, int]]:
    where1 = {int(p): j for j, p in enumerate(ids1) if p >= 0}
    return {(i, where1[int(p)]) for i, p in enumerate(ids0) if p >= 0}


def match(root: Path, features: Path, out: Path | None = None) -> Path:
    out = out or root / "matches.h5"
    pairs = root / "pairs.txt"
    for args in (
        ("pairs", "exhaustive", "--features", str(features), "--out", str(pairs)),
        ("match-pairs", str(pairs), "--features", str(features), "--out", str(out), "--max-distance", "0.7"),
    ):
        result = run_cli(*args, "-q") if args[0] == "match-pairs" else run_cli(*args)
        assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def scene(tmp_path: Path) -> dict:
    images, features, keypoints, point_ids = make_scene(tmp_path)
    matches = match(tmp_path, features)
    return {
        "root": tmp_path,
        "images": images,
        "features": features,
        "matches": matches,
        "keypoints": keypoints,
        "point_ids": point_ids,
    }


def colmap(
    scene: dict, database: Path, *extra: str, features: Path | None = None, matches: Path | None = None
):
    return run_cli(
        "colmap",
        "--images",
        str(scene["images"]),
        "--features",
        str(features or scene["features"]),
        "--matches",
        str(matches or scene["matches"]),
        "--database",
        str(database),
        *extra,
    )


def test_database_read_back(scene: dict) -> None:
    database = scene["root"] / "db.db"
    report = scene["root"] / "report.json"
    result = colmap(scene, database, "--json-report", str(report))
    assert result.returncode == 0, result.stderr
    with pycolmap.Database.open(database) as db:
        images = {image.name: image for image in db.read_all_images()}
        cameras = {camera.camera_id: camera for camera in db.read_all_cameras()}
        assert sorted(images) == sorted(IMAGES)
        assert len(cameras) == len(IMAGES)
        for name, (width, height, focal_35mm) in IMAGES.items():
            image = images[name]
            camera = cameras[image.camera_id]
            assert camera.model_name == "SIMPLE_RADIAL"
            assert (camera.width, camera.height) == (width, height)
            if focal_35mm:  # 35 mm equivalent: the image diagonal is the full frame's, 43.27 mm
                expected = focal_35mm * math.hypot(width, height) / 43.27
                assert camera.has_prior_focal_length
            else:  # COLMAP's prior
                expected = 1.2 * max(width, height)
                assert not camera.has_prior_focal_length
            assert camera.focal_length == pytest.approx(expected, rel=1e-6)
            assert camera.principal_point_x == pytest.approx(width / 2)
            np.testing.assert_array_equal(db.read_keypoints(image.image_id), scene["keypoints"][name] + 0.5)
        names = list(IMAGES)
        verified = 0
        for i, name0 in enumerate(names):
            for name1 in names[i + 1 :]:
                id0, id1 = images[name0].image_id, images[name1].image_id
                expected = expected_matches(scene["point_ids"][name0], scene["point_ids"][name1])
                written = {tuple(m) for m in db.read_matches(id0, id1).tolist()}
                assert written == expected
                geometry = db.read_two_view_geometry(id0, id1)
                inliers = {tuple(m) for m in geometry.inlier_matches.tolist()}
                assert inliers <= expected and len(inliers) >= 0.95 * len(expected)
                assert geometry.config in (
                    pycolmap.TwoViewGeometryConfiguration.CALIBRATED,
                    pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED,
                )
                verified += 1
        assert db.num_verified_image_pairs() == verified == 3
        assert db.num_frames() == db.num_rigs() == len(IMAGES)
    data = json.loads(report.read_text())
    assert data["images"] == 3 and data["matched_pairs"] == 3 and data["verified_pairs"] == 3
    assert data["keypoints"] == sum(len(k) for k in scene["keypoints"].values())
    assert not data["updated"]


def test_update_single_camera_and_other_images(scene: dict) -> None:
    database = scene["root"] / "db.db"
    assert colmap(scene, database).returncode == 0
    with pycolmap.Database.open(database) as db:
        first_ids = {image.name: image.image_id for image in db.read_all_images()}
    result = colmap(scene, database, "--camera-model", "pinhole")
    assert result.returncode == 0, result.stderr
    assert "updated" in result.stderr
    with pycolmap.Database.open(database) as db:
        assert {image.name: image.image_id for image in db.read_all_images()} == first_ids
        assert {camera.model_name for camera in db.read_all_cameras()} == {"PINHOLE"}
        assert db.num_matched_image_pairs() == 3

    result = colmap(scene, database, "--single-camera")  # images of two sizes
    assert result.returncode == 2
    assert "--single-camera" in result.stderr and "sub/c.png" in result.stderr

    other = scene["root"] / "other.db"
    with pycolmap.Database.open(other) as db:
        camera = pycolmap.Camera.create_from_model_name(1, "SIMPLE_PINHOLE", 100.0, 200, 100)
        db.write_image(pycolmap.Image(name="elsewhere.jpg", camera_id=db.write_camera(camera)))
    before = other.read_bytes()
    result = colmap(scene, other)
    assert result.returncode == 2
    assert "elsewhere.jpg" in result.stderr and "--overwrite" in result.stderr
    assert other.read_bytes() == before
    result = colmap(scene, other, "--overwrite")
    assert result.returncode == 0, result.stderr
    with pycolmap.Database.open(other) as db:
        assert sorted(image.name for image in db.read_all_images()) == sorted(IMAGES)


def test_single_camera(tmp_path: Path) -> None:
    images, features, _, _ = make_scene(tmp_path, {name: (400, 300, None) for name in IMAGES})
    scene = {"images": images, "features": features, "matches": match(tmp_path, features)}
    result = colmap(scene, tmp_path / "db.db", "--single-camera")
    assert result.returncode == 0, result.stderr
    with pycolmap.Database.open(tmp_path / "db.db") as db:
        cameras = db.read_all_cameras()
        assert len(cameras) == 1
        assert {image.camera_id for image in db.read_all_images()} == {cameras[0].camera_id}


# two photos of one size without EXIF (frames of one video), one of that size with an EXIF focal
# length, one of another size, and a late one that joins the first group
GROUPED = {
    "v1.png": (400, 300, None),
    "v2.png": (400, 300, None),
    "exif.jpg": (400, 300, 50),
    "small.png": (360, 240, None),
    "v3.png": (400, 300, None),
}


def cameras_of(database: Path) -> list[list[str]]:
    """The images of each camera of ``database``."""
    with pycolmap.Database.open(database) as db:
        by_camera: dict[int, list[str]] = {}
        for image in db.read_all_images():
            by_camera.setdefault(image.camera_id, []).append(image.name)
    return sorted(sorted(names) for names in by_camera.values())


def test_camera_modes(tmp_path: Path) -> None:
    """auto: a camera per image size and EXIF focal length, also for images added later;
    per-image: one each; single: refused for several sizes; --single-camera is single."""
    images, features, _, _ = make_scene(tmp_path, GROUPED)
    scene = {"images": images, "features": features, "matches": match(tmp_path, features)}
    result = colmap(scene, tmp_path / "auto.db")  # the default
    assert result.returncode == 0, result.stderr
    auto = cameras_of(tmp_path / "auto.db")
    assert auto == [["exif.jpg"], ["small.png"], ["v1.png", "v2.png", "v3.png"]]
    result = colmap(scene, tmp_path / "each.db", "--camera-mode", "per-image")
    assert result.returncode == 0, result.stderr
    assert cameras_of(tmp_path / "each.db") == [[name] for name in sorted(GROUPED)]
    for args in (("--camera-mode", "single"), ("--single-camera",)):
        result = colmap(scene, tmp_path / "single.db", *args)
        assert result.returncode == 2 and "small.png" in result.stderr, result.stderr
    result = colmap(scene, tmp_path / "x.db", "--single-camera", "--camera-mode", "per-image")
    assert result.returncode == 2 and "contradicts" in result.stderr

    # images added to a database (sfm's growth) join the camera of their group
    from sp_extract.sfm.config import CameraOptions
    from sp_extract.sfm.grow import DatabaseInputs, add_to_database

    first = [name for name in GROUPED if name != "v3.png"]
    database = tmp_path / "grown.db"
    pairs = [(a, b) for i, a in enumerate(first) for b in first[i + 1 :]]
    inputs = DatabaseInputs(images, features, scene["matches"])
    camera = CameraOptions("SIMPLE_RADIAL", "auto")
    add_to_database(database, inputs, first, pairs, camera, True)
    pairs += [(name, "v3.png") for name in first]
    add_to_database(database, inputs, list(GROUPED), pairs, camera, False)
    assert cameras_of(database) == auto


def test_implausible_cameras_are_named() -> None:
    """A registered image whose refined focal length is out of COLMAP's bounds (0.1 to 10 times
    the longest side) is named; plausible ones are not, a strong distortion alone neither."""
    from sp_extract.sfm.mapping import implausible_cameras, model_stats

    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs, options.num_cameras_per_rig, options.num_frames_per_rig = 3, 1, 2
    model = pycolmap.synthesize_dataset(options)
    assert implausible_cameras(model) == [] and model_stats(model, Path("m")).implausible_cameras == []
    cameras = sorted(model.cameras)
    by_camera = {camera_id: sorted(i.name for i in model.images.values() if i.camera_id == camera_id)
                 for camera_id in cameras}  # fmt: skip
    far, near, distorted = (model.cameras[camera_id] for camera_id in cameras[:3])
    longest = max(far.width, far.height)
    far.focal_length = 10.5 * longest  # just past the bounds
    near.focal_length = 0.09 * max(near.width, near.height)
    params = distorted.params
    params[distorted.extra_params_idxs()[0]] = -2.6  # as an Internet photo's in a right model
    distorted.params = params
    assert implausible_cameras(model) == sorted(by_camera[cameras[0]] + by_camera[cameras[1]])
    far.focal_length = 9.5 * longest
    assert implausible_cameras(model) == by_camera[cameras[1]]


def test_models_are_written_largest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COLMAP numbers its models in the order it started them; a failed start of two images can
    come first (seen on the Sacre Coeur photos with some seeds): ``OUT/0`` is the largest all
    the same, for ``reconstruct`` and ``sfm`` alike (one ``map_ranked``)."""
    from sp_extract.sfm import mappers
    from sp_extract.sfm.config import ColmapRun, MapperOptions

    def synthetic(frames: int) -> pycolmap.Reconstruction:
        options = pycolmap.SyntheticDatasetOptions()
        options.num_rigs, options.num_cameras_per_rig, options.num_frames_per_rig = 1, 1, frames
        return pycolmap.synthesize_dataset(options)

    started = {0: synthetic(2), 1: synthetic(7), 2: synthetic(3)}
    monkeypatch.setattr(mappers, "run_mapper", lambda *args: started)
    database, building = tmp_path / "db.db", tmp_path / "building"
    with pycolmap.Database.open(database):
        pass  # no verified pairs: no agreement to judge, one mapping
    building.mkdir()
    ranked = mappers.map_ranked(database, tmp_path, building, "incremental", MapperOptions(), ColmapRun())
    assert [item.model.num_reg_images() for item in ranked] == [7, 3, 2]
    assert [item.agreement for item in ranked] == [None] * 3
    assert sorted(p.name for p in building.iterdir()) == ["0", "1", "2"]  # the mapper's own folder gone
    for rank, item in enumerate(ranked):
        assert pycolmap.Reconstruction(building / str(rank)).num_reg_images() == item.model.num_reg_images()


def write_features(path: Path, settings: dict, sizes: dict[str, tuple[int, int]], count: int) -> Path:
    rng = np.random.default_rng(3)
    with StoreWriter(path, "features", settings) as writer:
        for name, (width, height) in sizes.items():
            descriptors = rng.normal(size=(256, count))
            writer.add(
                name,
                {
                    "keypoints": rng.uniform(0, 200, size=(count, 2)).astype(np.float32),
                    "scores": np.ones(count, np.float32),
                    "descriptors": (descriptors / np.linalg.norm(descriptors, axis=0)).astype(np.float16),
                    "image_size": np.array([width, height], np.int64),
                },
            )
    return path


def test_stores_that_do_not_belong_together(scene: dict) -> None:
    root = scene["root"]
    sizes = {name: (w, h) for name, (w, h, _) in IMAGES.items()}
    database = root / "db.db"
    cases = {
        # extracted with other settings than the features the matches were made from
        "other settings": (write_features(root / "f1.h5", {**SETTINGS, "nms_radius": 3}, sizes, 60), None),
        # same settings, another extraction: the matches record the feature store's id
        "another extraction": (write_features(root / "f2.h5", SETTINGS, sizes, 20), None),
        # a match store from before store ids: the keypoint counts still give it away
        "does not fit": (root / "f2.h5", without_store_id(scene["matches"], root / "m2.h5")),
    }
    partial = write_features(root / "f3.h5", SETTINGS, {"a.jpg": sizes["a.jpg"], "b.png": sizes["b.png"]}, 60)
    full = write_features(root / "f4.h5", SETTINGS, sizes, 60)
    cases["has no features"] = (partial, without_store_id(match(root, full, root / "m4.h5"), root / "m5.h5"))
    for message, (features, matches) in cases.items():
        result = colmap(scene, database, features=features, matches=matches)
        assert result.returncode == 2, (message, result.stderr)
        assert message in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not database.exists()
        assert not list(root.glob(".db.db*"))
    assert "sub-c.png" in colmap(scene, database, features=partial, matches=root / "m5.h5").stderr


def without_store_id(matches: Path, out: Path) -> Path:
    """A copy of a match store as written before feature stores had an id (settings only)."""
    shutil.copyfile(matches, out)
    with h5py.File(out, "r+") as h5:
        settings = json.loads(h5.attrs["sp_extract_settings"])
        del settings["features_id"]
        h5.attrs["sp_extract_settings"] = json.dumps(settings, sort_keys=True)
    return out


def test_bad_database_and_images(scene: dict) -> None:
    root = scene["root"]
    database = root / "db.db"
    database.write_text("not a database\n")
    result = colmap(scene, database)
    assert result.returncode == 2 and "not a COLMAP database" in result.stderr
    assert database.read_text() == "not a database\n"
    result = run_cli("reconstruct", "--database", str(database), "--images", str(scene["images"]),
                     "--out", str(root / "sparse"))  # fmt: skip
    assert result.returncode == 2 and "not a COLMAP database" in result.stderr
    assert not (root / "sparse").exists()

    (scene["images"] / "b.png").unlink()
    result = colmap(scene, root / "new.db")
    assert result.returncode == 2 and "b.png: no such image" in result.stderr
    assert not (root / "new.db").exists()
    cv2.imwrite(str(scene["images"] / "b.png"), np.zeros((100, 100), np.uint8))
    result = colmap(scene, root / "new.db")
    assert result.returncode == 2 and "100 x 100" in result.stderr

    result = colmap(scene, root / "new.db", "--camera-model", "FISHY")
    assert result.returncode == 2 and "not a COLMAP camera model" in result.stderr


def test_missing_pycolmap_says_how_to_install(tmp_path: Path, scene: dict) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "pycolmap.py").write_text("raise ImportError('No module named pycolmap')\n")
    blocked = os.pathsep.join([str(blocker), str(ROOT)])  # this checkout's sp_extract, no pycolmap
    for args in (
        ("colmap", "--images", str(scene["images"]), "--database", str(tmp_path / "x.db")),
        ("reconstruct", "--images", str(scene["images"]), "--database", str(tmp_path / "x.db")),
    ):
        result = run_cli(*args, env={"PYTHONPATH": blocked}, cwd=tmp_path)
        assert result.returncode == 2
        assert "pip install pycolmap" in result.stderr  # what works outside a checkout
        assert "pip install 'sp-extract[colmap]'" in result.stderr
    help_text = run_cli("colmap", "--help", env={"PYTHONPATH": blocked}).stdout
    assert "sp-extract[colmap]" in help_text


def reconstruct_photos(root: Path, photos: Path, weights: Path, *extract_options: str) -> dict:
    """The five commands of the README on the real photos; returns the reconstruct report."""
    feats = root / "feats.h5"
    root.mkdir()
    result = run_cli(str(photos), "--out", str(feats), "--weights", str(weights), "-q", *extract_options,
                     timeout=600)  # fmt: skip
    assert result.returncode == 0, ("extract", result.stderr)
    return map_photos(root, photos, feats)


def map_photos(root: Path, photos: Path, feats: Path) -> dict:
    """The last four commands of the README (pairs exhaustive, match-pairs, colmap, reconstruct)
    on a feature store of the real photos, into ``root``; returns the reconstruct report."""
    pairs = root / "pairs.txt"
    root.mkdir(exist_ok=True)
    result = run_cli("pairs", "exhaustive", "--features", str(feats), "--out", str(pairs), timeout=600)
    assert result.returncode == 0, ("pairs", result.stderr)
    return models_checked(match_and_map(root, photos, feats, pairs))


def models_checked(data: dict) -> dict:
    """A reconstruct report whose binary models are there and agree with it."""
    for model in data["models"]:
        written = pycolmap.Reconstruction(model["path"])
        assert written.num_reg_images() == model["registered_images"]
        assert written.num_points3D() == model["points3D"]
    return data


def test_sacre_coeur_reconstruction(
    tmp_path: Path, sacre_coeur: Path, real_weights: Path, sacre_coeur_database: Path
) -> None:
    # plain: the session's default extraction and its database (conftest, read only)
    plain = models_checked(reconstruct_report(tmp_path, sacre_coeur, sacre_coeur_database))
    refined = reconstruct_photos(tmp_path / "subpixel", sacre_coeur, real_weights, "--subpixel")
    errors = []
    for data in (plain, refined):
        best = max(data["models"], key=lambda m: m["registered_images"])
        assert best["registered_images"] == 10
        assert best["points3D"] >= 1000
        assert best["mean_reprojection_error_px"] < 1.0
        assert best["mean_track_length"] > 2.0
        errors.append(best["mean_reprojection_error_px"])
    print(f"mean reprojection error: {errors[0]:.4f} px, with --subpixel {errors[1]:.4f} px")
    assert errors[1] < errors[0]
    # colmap --refine-keypoints on the --subpixel stores (docs/accuracy.md: 0.693 px, 1,163 points)
    root, report = tmp_path / "subpixel", tmp_path / "subpixel" / "refined.json"
    for step in (
        ("colmap", "--images", str(sacre_coeur), "--features", str(root / "feats.h5"), "--matches",
         str(root / "matches.h5"), "--database", str(root / "refined.db"), "--num-threads", "1",
         "--refine-keypoints"),
        ("reconstruct", "--database", str(root / "refined.db"), "--images", str(sacre_coeur), "--out",
         str(root / "refined"), "--num-threads", "1", "--json-report", str(report)),
    ):  # fmt: skip
        result = run_cli(*step, timeout=600)
        assert result.returncode == 0, (step[0], result.stderr)
    best = max(json.loads(report.read_text())["models"], key=lambda m: m["registered_images"])
    print(f"with --subpixel and colmap --refine-keypoints {best['mean_reprojection_error_px']:.4f} px")
    assert best["registered_images"] == 10
    assert best["mean_reprojection_error_px"] < errors[1]
    assert best["points3D"] >= max(plain["models"], key=lambda m: m["registered_images"])["points3D"]


def verified_pairs(database: Path) -> dict[int, int]:
    """The database's verified pairs (pair id: inliers), read with sqlite3."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return dict(db.execute("SELECT pair_id, rows FROM two_view_geometries WHERE rows > 0").fetchall())


def test_min_inliers_is_what_a_verified_pair_needs(
    tmp_path: Path, sacre_coeur_features: CliExtraction, sacre_coeur_database: Path
) -> None:
    """colmap --min-inliers 40 (docs/sfm.md "Which mapper") on the session's Sacre Coeur matches, one
    thread and the same seed as the session's database (COLMAP's 15): exactly the pairs that had
    40 inliers or more pass; 0 is a one-line error."""
    features, images = sacre_coeur_features.store, sacre_coeur_features.images
    args = ["colmap", "--images", str(images), "--features", str(features), "--matches",
            str(sacre_coeur_database.parent / "matches.h5"), "--num-threads", "1"]  # fmt: skip
    result = run_cli(*args, "--database", str(tmp_path / "db.db"), "--min-inliers", "40", timeout=600)
    assert result.returncode == 0, result.stderr
    before, after = verified_pairs(sacre_coeur_database), verified_pairs(tmp_path / "db.db")
    assert min(after.values()) >= 40
    assert set(after) == {pair for pair, rows in before.items() if rows >= 40} != set(before)
    result = run_cli(*args, "--database", str(tmp_path / "bad.db"), "--min-inliers", "0")
    assert result.returncode == 2 and "--min-inliers 0: expected an integer >= 1" in result.stderr
    assert not (tmp_path / "bad.db").exists()


def test_reconstruct_synthetic_scene(scene: dict) -> None:
    root = scene["root"]
    database, sparse, report = root / "db.db", root / "sparse", root / "report.json"
    assert colmap(scene, database).returncode == 0

    def reconstruct(*extra: str):
        return run_cli("reconstruct", "--database", str(database), "--images", str(scene["images"]),
                       "--out", str(sparse), "--json-report", str(report), *extra)  # fmt: skip

    result = reconstruct()
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(report.read_text())["models"]
    assert model["path"] == str(sparse / "0")
    assert model["registered_images"] == len(IMAGES) and model["points3D"] == POINTS  # exact projections
    assert model["mean_track_length"] == pytest.approx(len(IMAGES))
    assert model["mean_reprojection_error_px"] < 0.01
    assert sorted(p.name for p in (sparse / "0").iterdir()) == sorted(
        ["cameras.bin", "frames.bin", "images.bin", "points3D.bin", "rigs.bin"]
    )
    result = reconstruct()
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert reconstruct("--overwrite").returncode == 0
    assert not [p for p in root.iterdir() if p.name.startswith(".sparse")]

    with pycolmap.Database.open(database) as db:  # without verified pairs nothing can be built
        db.clear_two_view_geometries()
    result = reconstruct("--overwrite")
    assert result.returncode == 1 and "no model" in result.stderr
    assert json.loads(report.read_text())["models"] == []


def test_unwritable_json_report_is_a_config_error(tmp_path: Path) -> None:
    from sp_extract.errors import ConfigError
    from sp_extract.sfm.colmap import DatabaseSummary
    from sp_extract.sfm.mapping import ReconstructSummary

    target = tmp_path / "missing-folder" / "report.json"
    for summary in (DatabaseSummary(str(tmp_path / "db.db")), ReconstructSummary("db.db", str(tmp_path))):
        with pytest.raises(ConfigError, match="cannot write the JSON report"):
            summary.write_json(target)


GLOG_LINE = re.compile(r"^[IWEF]\d{8} ", re.MULTILINE)  # COLMAP's own log: E20261201 11:19:09.89 ...


def test_images_missing_from_images_are_named_with_their_cause(scene: dict) -> None:
    root, images = scene["root"], scene["images"]
    database = root / "db.db"
    assert colmap(scene, database).returncode == 0
    empty = root / "empty"
    empty.mkdir()

    def reconstruct(folder: Path):
        return run_cli("reconstruct", "--database", str(database), "--images", str(folder),
                       "--out", str(root / "sparse"))  # fmt: skip

    result = reconstruct(empty)  # the wrong folder: refused, not a model built without colours
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{empty}: holds none of the 3 images of {database}" in result.stderr
    (images / "b.png").rename(root / "b.png")  # deleted or moved since extraction
    result = reconstruct(images)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{images / 'b.png'}: no such image, though {database} names it: deleted or moved since" in (
        result.stderr
    )
    assert "put it back, or rebuild the database" in result.stderr
    assert not (root / "sparse").exists()
    result = colmap(scene, root / "new.db")
    assert (
        result.returncode == 2
        and "deleted or moved since; put it back, or extract the folder" in result.stderr
    )
    assert f"though {scene['features']} holds its features" in result.stderr
    assert not (root / "new.db").exists()


def test_camera_model_that_verifies_nothing_warns_and_colmap_log_needs_verbose(scene: dict) -> None:
    root = scene["root"]
    database = root / "fisheye.db"
    result = colmap(scene, database, "--camera-model", "FISHEYE")  # pinhole scene: RANSAC finds nothing
    assert result.returncode == 1, result.stderr
    assert "3 matched pairs (450 matches), 0 verified pairs (0 inlier matches)" in result.stderr
    assert "warning: no pair passed COLMAP's geometric verification" in result.stderr
    assert "--camera-model FISHEYE" in result.stderr and database.exists()
    report = root / "report.json"
    args = ["reconstruct", "--database", str(database), "--images", str(scene["images"]),
            "--out", str(root / "sparse"), "--json-report", str(report)]  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 1 and "reconstruct: 0 models from 3 images" in result.stderr
    assert "not registered in any model: 3 images: 'a.jpg', 'b.png', 'sub/c.png'" in result.stderr
    assert json.loads(report.read_text())["unregistered_images"] == ["a.jpg", "b.png", "sub/c.png"]
    assert not GLOG_LINE.search(result.stderr), result.stderr  # "Failed to create any sparse model"
    assert GLOG_LINE.search(run_cli(*args, "--overwrite", "--verbose").stderr)


def test_reconstruct_lists_the_images_it_could_not_register(tmp_path: Path) -> None:
    spec = {**IMAGES, "lonely.png": (320, 240, None)}  # its features match nothing listed
    images, features, _, _ = make_scene(tmp_path, spec)
    listed = tmp_path / "list.txt"
    listed.write_text("a.jpg\nb.png\nsub/c.png\n")
    pairs, matches = tmp_path / "pairs.txt", tmp_path / "matches.h5"
    steps = [
        ("pairs", "from-list", str(listed), "--features", str(features), "--out", str(pairs)),
        ("match-pairs", str(pairs), "--features", str(features), "--out", str(matches), "-q"),
        ("colmap", "--images", str(images), "--features", str(features), "--matches", str(matches),
         "--database", str(tmp_path / "db.db")),
        ("reconstruct", "--database", str(tmp_path / "db.db"), "--images", str(images),
         "--out", str(tmp_path / "sparse"), "--json-report", str(tmp_path / "report.json")),
    ]  # fmt: skip
    for step in steps:
        result = run_cli(*step)
        assert result.returncode == 0, (step[0], result.stderr)
    assert "reconstruct: 1 model from 4 images" in result.stderr
    assert "not registered in any model: 1 image: 'lonely.png'" in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["unregistered_images"] == ["lonely.png"] and report["models"][0]["registered_images"] == 3


def slow_colmap_job(root: Path, count: int = 10, keypoints: int = 600) -> dict:
    """Stores whose verification takes many seconds: random keypoints, every pair matched at
    random, so that RANSAC runs its 20,000 trials on every pair."""
    rng = np.random.default_rng(0)
    names = [f"im{index:02d}.png" for index in range(count)]
    images = root / "images"
    images.mkdir(parents=True)
    with StoreWriter(root / "feats.h5", "features", SETTINGS) as writer:
        for name in names:
            assert cv2.imwrite(str(images / name), np.zeros((240, 320), np.uint8))
            writer.add(name, {
                "keypoints": rng.uniform([0, 0], [320, 240], (keypoints, 2)).astype(np.float32),
                "scores": np.ones(keypoints, np.float32),
                "descriptors": np.zeros((256, keypoints), np.float16),
                "image_size": np.array([320, 240], np.int64),
            })  # fmt: skip
    with StoreWriter(root / "matches.h5", "matches", {"features_settings": SETTINGS}) as writer:
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                matches0 = rng.permutation(keypoints).astype(np.int32)
                scores = np.ones(keypoints, np.float16)
                writer.add(pair_key(a, b), {"matches0": matches0, "matching_scores0": scores})
    return {"images": images, "features": root / "feats.h5", "matches": root / "matches.h5"}


def children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def descendants_of(pid: int) -> list[int]:
    return [d for c in children_of(pid) for d in (c, *descendants_of(c))]


def lasting_descendants(run: Run, timeout: float = 120) -> list[int]:
    """The processes under ``run`` that last more than a second (start-up helpers come and go),
    once one of them is a grandchild: COLMAP's child comes from the fork server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.process.poll() is None:
        found = descendants_of(run.process.pid)
        run.drain(1.0)
        lasting = [pid for pid in found if pid in descendants_of(run.process.pid)]
        if set(lasting) - set(children_of(run.process.pid)):
            return lasting
    pytest.fail(f"no lasting child process: {run.text}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_colmap_stops_at_once_on_a_signal_and_leaves_nothing(tmp_path: Path, signum: int) -> None:
    job = slow_colmap_job(tmp_path)
    database = tmp_path / "db.db"
    stores = ("--features", str(job["features"]), "--matches", str(job["matches"]))
    run = Run(
        "colmap", "--images", str(job["images"]), *stores, "--database", str(database), "--num-threads", "1"
    )
    children = lasting_descendants(run)  # the fork server, its resource tracker, COLMAP's child
    if signum == signal.SIGINT:
        run.signal_group(signum)  # Ctrl-C in a terminal: the whole process group
    else:
        os.kill(run.process.pid, signum)  # kill PID: the main process only
    sent = time.monotonic()
    code = run.finish(timeout=60)
    assert code == (130 if signum == signal.SIGINT else 143), run.text
    assert time.monotonic() - sent < 10  # the 45 pairs would take far longer
    assert "aborted" in run.text and "Traceback" not in run.text and "SIGTERM" not in run.text
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []  # not even a zombie
    stores = ["feats.h5", "feats.h5.index", "matches.h5", "matches.h5.index"]  # with their name indexes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*stores, "images"])


def test_reconstruct_stops_at_once_on_ctrl_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for a long incremental mapping (imported through ``sitecustomize`` into the real
    ``sp-extract`` process) writes a partial model and sleeps; Ctrl-C must end the run at once
    and leave neither the partial model nor an ``--out`` folder."""
    database, images, sparse = tmp_path / "db.db", tmp_path / "images", tmp_path / "sparse"
    images.mkdir()
    with pycolmap.Database.open(database):
        pass  # an empty COLMAP database: nothing to check against --images
    stand_in = tmp_path / "stand_in"
    stand_in.mkdir()
    (stand_in / "sitecustomize.py").write_text(
        "import pathlib, time\n"
        "import pycolmap\n"
        "def mapping(database, images, output, options, input_path=''):\n"
        "    (pathlib.Path(output) / '0').mkdir()\n"
        "    (pathlib.Path(output) / '0' / 'partial.bin').write_bytes(b'half a model')\n"
        "    time.sleep(120)\n"
        "pycolmap.incremental_mapping = mapping\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(stand_in), str(ROOT)]))
    run = Run("reconstruct", "--database", str(database), "--images", str(images), "--out", str(sparse))
    partial = tmp_path / "sparse.new" / "mapper-0" / "0" / "partial.bin"  # built beside --out
    assert run.wait_until(partial.exists, timeout=120), run.text
    run.signal_group(signal.SIGINT)
    sent = time.monotonic()
    assert run.finish(timeout=60) == 130, run.text
    assert time.monotonic() - sent < 10 and "Traceback" not in run.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.db", "images", "stand_in"]
