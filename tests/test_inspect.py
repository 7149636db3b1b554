"""info, show and evaluate (issue 14): known answers on generated stores, images and pairs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import write_image

from sp_extract.cli import cli
from sp_extract.inspect.evaluate import random_homography
from sp_extract.inspect.metrics import evaluate_pair, warp_points
from sp_extract.store.format import KIND_ATTR, SETTINGS_ATTR, VERSION_ATTR, parts_dir


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def make_features_store(
    path: Path, entries: dict[str, np.ndarray], sizes: dict[str, tuple[int, int]]
) -> None:
    """A feature store in sp-extract's layout; scores rise along each entry's keypoints."""
    with h5py.File(path, "w") as h5:
        h5.attrs[KIND_ATTR] = "features"
        h5.attrs[VERSION_ATTR] = "0.1.0"
        h5.attrs[SETTINGS_ATTR] = json.dumps({"nms_radius": 4})
        h5.attrs["nms_radius"] = 4
        h5.attrs["weights"] = "superpoint_v1.pth"
        for name, keypoints in entries.items():
            group = h5.create_group(name)
            group["keypoints"] = keypoints.astype(np.float32)
            group["scores"] = np.linspace(0.1, 1.0, len(keypoints), dtype=np.float32)
            group["descriptors"] = np.zeros((8, len(keypoints)), np.float16)
            group["image_size"] = np.asarray(sizes.get(name, (64, 48)), np.int64)


# -- info ------------------------------------------------------------------------------------
def test_info_describes_many_entries_from_shapes_without_reading_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "feats.h5"
    counts = [i % 13 for i in range(1500)]
    make_features_store(store, {f"d{i % 7}/im{i}.jpg": np.zeros((c, 2)) for i, c in enumerate(counts)}, {})
    with h5py.File(store, "a") as h5:
        del h5["d0/im0.jpg/descriptors"]  # an incomplete entry
        del h5["d1/im1.jpg/descriptors"]
        h5["d1/im1.jpg/descriptors"] = np.zeros((8, 99), np.float16)  # shapes that disagree
    parts_dir(store).mkdir()
    (parts_dir(store) / "part-1.h5").write_bytes(b"")

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("info read dataset contents")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reading)
    monkeypatch.setattr(h5py.Dataset, "read_direct", no_reading)
    result = invoke("info", store, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    good = counts[2:]
    assert report["kind"] == "features" and report["version"] == "0.1.0"
    assert report["attributes"] == {"weights": "superpoint_v1.pth"} and report["settings"] == {
        "nms_radius": 4
    }
    assert report["entries"] == len(good) and report["descriptor_dtype"] == "float16"
    stats = report["keypoints_per_entry"]
    assert (stats["min"], stats["max"], stats["median"]) == (0, 12, float(np.median(good)))
    assert stats["mean"] == round(float(np.mean(good)), 1)
    assert sum(b["entries"] for b in report["histogram"]) == len(good)
    assert report["histogram"][0] == {"low": 0, "high": 1, "entries": sum(c <= 1 for c in good)}
    assert report["parts_pending"] == 1
    assert set(report["damaged"]) == {"d0/im0.jpg", "d1/im1.jpg"}
    assert "no descriptors" in report["damaged"]["d0/im0.jpg"]
    assert "inconsistent" in report["damaged"]["d1/im1.jpg"]

    text = invoke("info", store).output
    assert "entries: 1498" in text and "damaged: 2" in text and "sp-extract repair" in text
    names = invoke("info", store, "--names").output.split()
    assert len(names) == len(good) and names == sorted(names) and "d0/im7.jpg" in names


def test_info_counts_matches_and_refuses_foreign_files(tmp_path: Path) -> None:
    store = tmp_path / "matches.h5"
    with h5py.File(store, "w") as h5:
        h5.attrs[KIND_ATTR] = "matches"
        h5.attrs[VERSION_ATTR] = "0.1.0"
        h5.attrs[SETTINGS_ATTR] = json.dumps({"mutual": True})
        for key, matches0 in {"a.jpg/b.jpg": [1, -1, 0], "a.jpg/c.jpg": [-1, -1]}.items():
            h5[f"{key}/matches0"] = np.asarray(matches0, np.int32)
            h5[f"{key}/matching_scores0"] = np.ones(len(matches0), np.float16)
    report = json.loads(invoke("info", store, "--json").output)
    assert report["kind"] == "matches" and report["entries"] == 2
    assert report["matches_per_entry"] == {"min": 0, "median": 1.0, "mean": 1.0, "max": 2}
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as h5:
        h5["x"] = 1
    result = CliRunner().invoke(cli, ["info", str(foreign)])
    assert result.exit_code == 2 and "not written by sp-extract" in result.output


# -- show ------------------------------------------------------------------------------------
def white_images(tmp_path: Path, width: int, height: int) -> Path:
    """A folder with two white images, a.png and b.png."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(images / name), np.full((height, width), 255, np.uint8))
    return images


def test_show_draws_keypoints_at_their_pixels_and_a_contact_sheet(tmp_path: Path) -> None:
    images = white_images(tmp_path, 200, 100)
    points = np.array([[20.0, 30.0], [150.0, 70.0]])
    store = tmp_path / "feats.h5"
    make_features_store(
        store, {"a.png": points, "b.png": points[:1]}, {"a.png": (200, 100), "b.png": (200, 100)}
    )

    result = invoke("show", store, "a.png", "--images", images, "--out", tmp_path / "kp.png", "--max-size", 0)
    assert result.exit_code == 0, result.output
    picture = cv2.imread(str(tmp_path / "kp.png"))
    banner = picture.shape[0] - 100
    assert picture.shape[1] == 200 and banner > 0
    for (x, y), colour in zip(
        points.astype(int), cv2.applyColorMap(np.uint8([[0], [255]]), cv2.COLORMAP_TURBO)
    ):
        assert np.abs(picture[banner + y, x].astype(int) - colour[0]).max() < 40  # low score blue, high red
    assert (picture[banner + 50, 100] == 255).all()  # nothing drawn elsewhere

    half = invoke(
        "show", store, "a.png", "--images", images, "--out", tmp_path / "half.png", "--max-size", 100
    )
    assert half.exit_code == 0 and cv2.imread(str(tmp_path / "half.png")).shape[1] == 100

    folder = tmp_path / "sheet"
    assert invoke("show", store, "a.png", "b.png", "--images", images, "--out", folder).exit_code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["a.png.png", "b.png.png", "index.html"]
    assert 'src="a.png.png"' in (folder / "index.html").read_text()

    missing = CliRunner().invoke(
        cli, ["show", str(store), "zz.png", "--images", str(images), "--out", "x.png"]
    )
    assert missing.exit_code == 2 and "no image named 'zz.png'" in missing.output


def test_show_draws_matches_side_by_side_in_either_pair_order(tmp_path: Path) -> None:
    images = white_images(tmp_path, 60, 50)
    features = tmp_path / "feats.h5"
    sizes = {"a.png": (60, 50), "b.png": (60, 50)}
    make_features_store(
        features, {"a.png": np.array([[10.0, 10], [40, 40]]), "b.png": np.array([[30.0, 25]])}, sizes
    )
    matches = tmp_path / "matches.h5"
    with h5py.File(matches, "w") as h5:
        h5.attrs[KIND_ATTR] = "matches"
        h5.attrs[SETTINGS_ATTR] = json.dumps({"verify": None})
        h5["a.png/b.png/matches0"] = np.asarray([-1, 0], np.int32)  # a's keypoint 1 -> b's keypoint 0
        h5["a.png/b.png/matching_scores0"] = np.asarray([0, 0.9], np.float16)
    for order in (("a.png", "b.png"), ("b.png", "a.png")):
        out = tmp_path / f"{order[0]}.png"
        result = invoke("show", matches, *order, "--features", features, "--images", images, "--out", out)
        assert result.exit_code == 0, result.output
        picture = cv2.imread(str(out))
        top = picture.shape[0] - 50
        first, second = ((40, 40), (30, 25)) if order[0] == "a.png" else ((30, 25), (40, 40))
        start = np.array([first[0], top + first[1]])
        end = np.array([60 + 10 + second[0], top + second[1]])
        for t in (0.0, 0.5, 1.0):  # both ends and the middle of the line are drawn
            x, y = np.round(start + t * (end - start)).astype(int)
            assert (picture[y, x] != 255).any()
        assert (picture[top + 10, 10] == 255).all()  # the unmatched keypoint is not drawn


# -- evaluate ---------------------------------------------------------------------------------
def test_metrics_known_answers() -> None:
    rng = np.random.default_rng(0)
    points = np.stack(np.meshgrid(np.arange(10, 91, 10), np.arange(10, 91, 10)), -1).reshape(-1, 2) + 0.3
    descriptors = rng.normal(size=(len(points), 16)).astype(np.float32)
    same = evaluate_pair(points, descriptors, points, descriptors, np.eye(3), (100, 100), (100, 100))
    assert same.repeatability == 1.0 and same.localization_error_px == 0.0
    assert same.matching_score == 1.0 and all(v == 1.0 for v in same.mma.values())
    assert same.corner_error_px is not None and same.corner_error_px < 1e-6

    shift = np.array([[1, 0, 2.5], [0, 1, 0], [0, 0, 1]])  # image 1 is image 0 moved 2.5 px right
    moved = points + [2.5, 0]
    found = evaluate_pair(points, descriptors, moved + [0.5, 0], descriptors, shift, (100, 100), (100, 100))
    assert found.repeatability == 1.0 and found.localization_error_px == pytest.approx(0.5)
    assert found.mma[1] == 1.0 and found.keypoints == len(points) == 81
    far = evaluate_pair(points, descriptors, moved + [5.0, 0], descriptors, shift, (100, 100), (100, 100))
    assert far.repeatability == 0.0 and far.localization_error_px is None and far.mma[3] == 0.0


def test_random_homographies_leave_no_empty_border() -> None:
    rng = np.random.default_rng(1)
    for size in ((120, 80), (80, 160)):
        homography = random_homography(rng, size)
        warped = cv2.warpPerspective(np.ones(size[::-1], np.float32), homography, size)
        assert warped.min() > 0.99  # every pixel of the warp comes from the image
        frame = np.array([[0, 0], [size[0] - 1, size[1] - 1]], float)
        assert np.allclose(warp_points(warp_points(frame, homography), np.linalg.inv(homography)), frame)


def test_evaluate_hpatches_layout_known_homographies(real_weights: Path, tmp_path: Path) -> None:
    """Illumination: the same image (repeatability 1, error 0); viewpoint: the same scene cropped
    8 px (one network cell) further right, which SuperPoint's features follow away from the borders."""
    scene = cv2.imread(str(write_image(tmp_path / "scene.png", 176, 128, seed=5)), cv2.IMREAD_GRAYSCALE)
    scene = cv2.cvtColor(cv2.GaussianBlur(scene, (3, 3), 0), cv2.COLOR_GRAY2BGR)  # PPM is colour
    root = tmp_path / "hpatches"
    shift = np.array([[1, 0, -8], [0, 1, 0], [0, 0, 1]], float)
    for sequence, homography, target in (
        ("i_same", np.eye(3), scene[:, :168]),
        ("v_shift", shift, scene[:, 8:]),
    ):
        folder = root / sequence
        folder.mkdir(parents=True)
        cv2.imwrite(str(folder / "1.ppm"), scene[:, :168])
        for k in range(2, 7):
            cv2.imwrite(str(folder / f"{k}.ppm"), target)
            np.savetxt(folder / f"H_1_{k}", homography)
    report_path = tmp_path / "report.json"
    result = invoke(
        "evaluate",
        "hpatches",
        root,
        "--weights",
        real_weights,
        "--device",
        "cpu",
        "-q",
        "--json-report",
        report_path,
    )
    assert result.exit_code == 0, result.output
    assert "illumination" in result.output and "H@3" in result.output
    report = json.loads(report_path.read_text())
    for key in ("repeatability", "localization_error_px", "matching_score", "mma", "homography_accuracy"):
        assert key in report
    assert set(report["homography_accuracy"]) == {"1", "3", "5"}
    same, shifted = report["subsets"]["illumination"], report["subsets"]["viewpoint"]
    assert same["pairs"] == shifted["pairs"] == 5
    assert same["repeatability"] == 1.0 and same["localization_error_px"] == 0.0 and same["mma"] == 1.0
    assert same["homography_accuracy"] == {"1": 1.0, "3": 1.0, "5": 1.0}
    assert shifted["repeatability"] > 0.85 and shifted["localization_error_px"] < 0.3  # borders differ
    assert shifted["mma"] > 0.9 and shifted["homography_accuracy"]["1"] == 1.0


def test_evaluate_homography_runs_and_reports_bad_input(small_images: Path, random_weights: Path) -> None:
    (small_images / "broken.jpg").write_bytes(b"not a jpeg")
    result = invoke(
        "evaluate", "homography", small_images, "--weights", random_weights, "--pairs-per-image", 1,
        "--device", "cpu", "-q", "--max-keypoints", 50,
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # one photo could not be read; the others are evaluated
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["illumination"][1] == rows["viewpoint"][1] == "3" and rows["all"][1] == "6"
    assert lines[5].startswith("failed: broken.jpg: ")
    empty = CliRunner().invoke(cli, ["evaluate", "hpatches", str(small_images)])
    assert empty.exit_code == 2 and "no HPatches sequences" in empty.output
