"""``sp-extract sfm``: the one command on the real photos, its nightly growth, an interrupted
run finished by the same command, changed and deleted photos; pair planning and photo
fingerprints on small inputs. The models are read back with pycolmap, the matches with h5py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest
from conftest import invoke_cli, run_cli, write_image
from support.reliability import Run

from sp_extract.errors import ConfigError
from sp_extract.names import pair_key
from sp_extract.sfm.config import EXHAUSTIVE_UP_TO, RETRIEVAL_K
from sp_extract.sfm.photos import PhotoManifest
from sp_extract.sfm.pipeline import parse_pairs, plan_pairs

FAST = ("--resize-max", "640", "--num-threads", "1")  # fewer pixels: the tests' time, not the product's


def sfm(images: Path, work: Path, weights: Path, *extra: str, process: bool = True) -> tuple[int, dict, str]:
    """``sp-extract sfm`` as a process, or (``process=False``) in this one: fewer imports."""
    report = work.parent / f"{work.name}-report.json"
    args = ("sfm", str(images), str(work), "--weights", str(weights), *FAST, "-q",
            "--json-report", str(report), *extra)  # fmt: skip
    result = run_cli(*args, timeout=600) if process else invoke_cli(*args)
    data = json.loads(report.read_text()) if report.exists() else {}
    report.unlink(missing_ok=True)
    return result.returncode, data, result.stderr


def registered(model: Path) -> dict[int, str]:
    reconstruction = pycolmap.Reconstruction(model)
    return {i: reconstruction.images[i].name for i in reconstruction.reg_image_ids()}


def copy_photos(source: Path, target: Path, names: list[str]) -> Path:
    target.mkdir(exist_ok=True)
    for name in names:
        shutil.copy2(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory, sacre_coeur: Path, real_weights: Path) -> dict:
    """8 of the photos mapped, then the other 2 added and the same command run again."""
    root = tmp_path_factory.mktemp("sfm-grown")
    names = sorted(p.name for p in sacre_coeur.glob("*.jpg"))
    images, work = copy_photos(sacre_coeur, root / "images", names[:8]), root / "work"
    code, first, stderr = sfm(images, work, real_weights)
    assert code == 0, stderr
    before = registered(work / "sparse" / "0")
    copy_photos(sacre_coeur, images, names[8:])
    code, second, stderr = sfm(images, work, real_weights)
    assert code == 0, stderr
    return {
        "images": images,
        "work": work,
        "first": first,
        "second": second,
        "before": before,
        "names": names,
    }


def test_grow_registers_the_new_photos_into_the_existing_model(grown: dict) -> None:
    first, second = grown["first"], grown["second"]
    assert (first["mode"], first["new_images"], first["new_pairs"]) == ("new", 8, 28)
    assert first["registered"] == 8
    # only the new photos' work: 2 extracted, their 2 * 8 + 1 pairs matched and verified
    assert (second["mode"], second["new_images"], second["extracted"]) == ("grow", 2, 2)
    assert second["new_pairs"] == second["matched_pairs"] == second["verified_pairs"] == 17
    assert second["pairs"] == 45 and second["registered"] == second["database_images"] == 10
    after = registered(grown["work"] / "sparse" / "0")
    assert len(after) == 10
    assert {i: after[i] for i in grown["before"]} == grown["before"]  # old image ids unchanged
    assert set(after.values()) == set(grown["names"])
    assert second["points3D"] > first["points3D"] and second["mean_reprojection_error_px"] < 1.5
    assert not list(grown["work"].glob("sparse.*"))  # nothing left beside the model
    assert set(second["stage_times_s"]) == {"extract", "pairs", "match", "database", "map", "report"}


def test_interrupted_run_is_finished_by_the_same_command(
    tmp_path: Path, grown: dict, sacre_coeur: Path, real_weights: Path
) -> None:
    """SIGINT while matching: exit 130; the same command then registers all 10 photos with
    the same matches as the run that grew 8 to 10."""
    work = tmp_path / "work"
    args = ("sfm", str(sacre_coeur), str(work), "--weights", str(real_weights), *FAST)
    run = Run(*args)
    assert run.wait_until(lambda: "sfm [3/5] match" in run.text, timeout=300), run.text
    run.signal_group(signal.SIGINT)
    assert run.finish() == 130, run.text
    assert "Traceback" not in run.text and not (work / "database.db").exists(), run.text

    code, data, stderr = sfm(sacre_coeur, work, real_weights)
    assert code == 0, stderr
    assert data["mode"] == "new" and data["extracted"] == 0 and data["registered"] == 10
    with h5py.File(work / "matches.h5") as resumed, h5py.File(grown["work"] / "matches.h5") as grown_h5:
        names = grown["names"]
        keys = [pair_key(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        for key in keys:
            np.testing.assert_array_equal(resumed[key]["matches0"][()], grown_h5[key]["matches0"][()])


def test_changed_and_deleted_photos_are_reported(tmp_path: Path, grown: dict, real_weights: Path) -> None:
    images = shutil.copytree(grown["images"], tmp_path / "images")
    work = shutil.copytree(grown["work"], tmp_path / "work")
    names = grown["names"]
    os.remove(images / names[0])
    os.utime(images / names[1], ns=(1, 1))  # touched, same content: not changed
    code, data, stderr = sfm(images, work, real_weights, process=False)
    assert code == 0, stderr
    assert data["mode"] == "up to date" and data["deleted_images"] == [names[0]]
    assert any(names[0] in warning and "--rebuild" in warning for warning in data["warnings"])

    photo = images / names[2]
    photo.write_bytes(photo.read_bytes()[:-64] + bytes(64))
    code, _, stderr = sfm(images, work, real_weights, process=False)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        f"sp-extract: error: {photo}: changed since its features were extracted; its features, "
        "matches and place in the model describe the old photo: run again with --rebuild"
    )


def test_a_database_grows_only_with_the_settings_it_was_made_with(
    tmp_path: Path, grown: dict, real_weights: Path
) -> None:
    """Another verification floor or camera mode on a grown work folder is a one-line error
    naming the database, the option and both values; --rebuild makes the database again with the
    new floor, which the next runs must then keep."""
    images = shutil.copytree(grown["images"], tmp_path / "images")
    work = shutil.copytree(grown["work"], tmp_path / "work")
    database = work / "database.db"
    assert json.loads((work / "database.json").read_text())["min_inliers"] == 15
    for extra, message in (
        (("--min-inliers", "40"), "made with --min-inliers 15, this run has 40"),
        (("--camera-mode", "single"), "made with --camera-mode auto, this run has single"),
    ):
        code, _, stderr = sfm(images, work, real_weights, *extra, process=False)
        assert code == 2
        assert stderr.strip().splitlines()[-1] == (
            f"sp-extract: error: {database}: {message}: run with --rebuild (makes the database again, "
            "verifying every pair) or use another work folder"
        )
    code, data, stderr = sfm(images, work, real_weights, "--min-inliers", "40", "--rebuild", process=False)
    assert code == 0, stderr
    assert data["mode"] == "rebuild" and data["registered"] == 10
    assert json.loads((work / "database.json").read_text())["min_inliers"] == 40
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("SELECT MIN(rows) FROM two_view_geometries WHERE rows > 0").fetchone()[0] >= 40
    code, _, stderr = sfm(images, work, real_weights, process=False)
    assert code == 2 and "made with --min-inliers 40, this run has 15" in stderr


# -- small inputs ---------------------------------------------------------------------------------
def test_pairs_of_a_growing_collection(tmp_path: Path) -> None:
    names = [f"{i:02d}.jpg" for i in range(8)]
    new = names[6:]
    known = {*names, "gone.jpg"}  # gone.jpg: in the feature store, its photo deleted

    def plan(spec: str) -> tuple[str, list[tuple[str, str]]]:
        return plan_pairs(spec, tmp_path / "feats.h5", names, new, tmp_path, known, "cpu")

    label, pairs = plan("exhaustive")
    assert label == "exhaustive" and {frozenset(p) for p in pairs} == {
        frozenset((a, b)) for a in names for b in new if a != b
    }
    assert len(pairs) == 6 * 2 + 1
    label, pairs = plan("sequential:3")  # the window at the end of the name order
    assert label == "sequential:3"
    assert pairs == [("03.jpg", "06.jpg"), ("04.jpg", "06.jpg"), ("04.jpg", "07.jpg"), ("05.jpg", "06.jpg"),
                     ("05.jpg", "07.jpg"), ("06.jpg", "07.jpg")]  # fmt: skip
    listing = tmp_path / "pairs.txt"
    listing.write_text("00.jpg 01.jpg\n00.jpg 07.jpg\n06.jpg gone.jpg\n")
    assert plan(str(listing)) == ("file", [("00.jpg", "07.jpg")])
    assert plan_pairs("auto", tmp_path, names, [], tmp_path, set(names), "cpu") == ("exhaustive", [])
    assert parse_pairs("retrieval:5") == ("retrieval", 5)
    for bad in ("retrieval:0", "sequential:x", "nonsense"):
        with pytest.raises(ConfigError, match="--pairs"):
            parse_pairs(bad)


def test_photo_fingerprints(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(name.encode() * 1000)
    manifest = PhotoManifest(tmp_path)
    assert manifest.check(images, ["a.jpg", "b.jpg", "c.jpg"]).new == ["a.jpg", "b.jpg", "c.jpg"]
    manifest.record(images, ["a.jpg", "b.jpg", "c.jpg"])
    manifest.save()
    os.utime(images / "a.jpg", ns=(5, 5))  # touched only
    (images / "b.jpg").write_bytes(b"x" * 5000)  # same size, other content
    (images / "c.jpg").unlink()
    (images / "d.jpg").write_bytes(b"d")
    check = PhotoManifest(tmp_path).check(images, ["a.jpg", "b.jpg", "d.jpg"])
    assert (check.changed, check.deleted, check.new) == (["b.jpg"], ["c.jpg"], ["d.jpg"])


def test_stage_options_pass_through(
    small_images: Path, random_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--orientation, --tile and --backend reach extract, --ratio and --max-distance the match
    stage (it is stopped there: what it was given is what this test checks); a bad --tile is
    refused before any stage runs."""
    from click.testing import CliRunner

    import sp_extract.matching.run as match_run
    from sp_extract.cli import cli
    from sp_extract.extraction import pipeline as extraction

    given: dict = {}
    real_extract = extraction.extract

    def extract(images, out, config, run):
        given["extract"] = (config, run)
        return real_extract(images, out, config, run)

    def match_pairs(pairs, features, out, config, run):
        given["match"] = config
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(extraction, "extract", extract)
    monkeypatch.setattr(match_run, "match_pairs", match_pairs)
    work = tmp_path / "work"
    options = ["--weights", str(random_weights), "--orientation", "ignore", "--tile", "64", "--backend",
               "torch", "--ratio", "0.9", "--max-distance", "0.8", "--device", "cpu", "-q"]  # fmt: skip
    result = CliRunner().invoke(cli, ["sfm", str(small_images), str(work), *options])
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    config, run = given["extract"]
    assert config.orientation == "ignore" and (run.tile, run.backend) == ("64", "torch")
    assert (given["match"].ratio, given["match"].max_distance) == (0.9, 0.8)
    result = CliRunner().invoke(cli, ["sfm", str(small_images), str(tmp_path / "w2"), "--tile", "7"])
    assert result.exit_code == 2 and "--tile must be auto, 0" in result.output
    assert not (tmp_path / "w2").exists()


def test_json_report_into_the_work_dir_it_creates(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    """README's ``sfm photos/ work/ --json-report work/last-run.json`` on a first run: the report's
    folder is the WORK_DIR that sfm creates, so the early check takes it; a folder below it that
    nothing creates is still refused before any work."""
    work = tmp_path / "new" / "work"
    deeper = invoke_cli("sfm", str(small_images), str(work), "--json-report", str(work / "sub" / "r.json"))
    assert deeper.returncode == 2 and f"the folder {work / 'sub'} does not exist" in deeper.stderr
    assert not work.parent.exists()
    report = work / "last-run.json"
    result = invoke_cli("sfm", str(small_images), str(work), "--weights", str(random_weights), *FAST, "-q",
                        "--json-report", str(report))  # fmt: skip
    assert result.returncode in (0, 1) and "--json-report" not in result.stderr, result.stderr
    assert json.loads(report.read_text())["work"] == str(work)


def test_every_option_is_in_the_readme_section() -> None:
    from click.testing import CliRunner

    from sp_extract.cli import cli

    result = CliRunner().invoke(cli, ["sfm", "--help"], terminal_width=200)
    assert result.exit_code == 0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("## One command")
    section = readme[start : readme.index("\n## ", start + 1)]
    options = set(re.findall(r"^\s+(?:-[a-z], )?(--[a-z0-9-]+)", result.output, re.MULTILINE)) - {"--help"}
    assert len(options) >= 20
    assert [option for option in sorted(options) if f"`{option}" not in section] == []


def test_retrieval_pairs_of_new_images_against_all(tmp_path: Path) -> None:
    from test_retrieval import random_images, write_store

    names = [f"{i:02d}.jpg" for i in range(12)]
    features = write_store(tmp_path / "feats.h5", random_images(names, seed=3, count=80))
    label, first = plan_pairs("retrieval:3", features, names[:10], names[:10], tmp_path, set(names), "cpu")
    assert label == "retrieval:3" and {n for pair in first for n in pair} == set(names[:10])
    _, grown = plan_pairs("retrieval:3", features, names, names[10:], tmp_path, set(names), "cpu")
    assert all(set(pair) & {"10.jpg", "11.jpg"} and pair[0] != pair[1] for pair in grown)
    for new in ("10.jpg", "11.jpg"):  # each new image with its 3 nearest among all, itself excluded
        assert len({other for pair in grown if new in pair for other in pair if other != new}) >= 3
    assert not list(tmp_path.glob(".*images*"))  # the query and database lists are removed


def test_auto_pairs_exhaustively_up_to_the_limit_then_by_retrieval(tmp_path: Path) -> None:
    """``--pairs auto`` (docs/sfm.md "Which pairs"): every pair of EXHAUSTIVE_UP_TO images, and
    above that each image with its RETRIEVAL_K most similar (fewer pairs than exhaustive)."""
    from test_retrieval import random_images, write_store

    names = [f"{i:03d}.jpg" for i in range(EXHAUSTIVE_UP_TO + 1)]
    features = write_store(tmp_path / "feats.h5", random_images(names, seed=5, count=60))
    label, pairs = plan_pairs("auto", features, names[:-1], names[:-1], tmp_path, set(names), "cpu")
    assert label == "exhaustive" and len(pairs) == EXHAUSTIVE_UP_TO * (EXHAUSTIVE_UP_TO - 1) // 2
    label, pairs = plan_pairs("auto", features, names, names, tmp_path, set(names), "cpu")
    assert label == f"retrieval:{RETRIEVAL_K}"
    assert len({frozenset(pair) for pair in pairs}) < len(names) * (len(names) - 1) // 2
    for name in names:  # each image with at least its K most similar
        partners = {other for pair in pairs if name in pair for other in pair if other != name}
        assert len(partners) >= RETRIEVAL_K


def test_warnings_of_every_stage_are_shown_once_and_in_the_json_reports(
    random_weights: Path, tmp_path: Path
) -> None:
    """extract's warning (a name with white space) raised inside sfm is shown once, listed in
    sfm's summary and JSON report; colmap and reconstruct's reports have the shared entries."""
    photos = tmp_path / "photos"
    for seed, name in enumerate(("my photo.png", "b.png", "c.png", "d.png")):
        write_image(photos / name, seed=seed)
    work = tmp_path / "work"
    code, data, stderr = sfm(photos, work, random_weights, process=False)
    spaced = "1 image name with white space can never be paired"
    assert code in (0, 1) and stderr.count(f"sp-extract: warning: {spaced}") == 1, stderr
    assert stderr.count(f"\nwarning: {spaced}") == 1, stderr  # the summary's list
    assert sum(warning.startswith(spaced) for warning in data["warnings"]) == 1, data["warnings"]
    assert data["exit_code"] == code and data["wall_time_s"] > 0 and data["command"] == "sfm"
    report = tmp_path / "colmap.json"
    result = invoke_cli("colmap", "--images", str(photos), "--features", str(work / "feats.h5"),
                        "--matches", str(work / "matches.h5"), "--database", str(tmp_path / "db.db"),
                        "--json-report", str(report))  # fmt: skip
    colmap = json.loads(report.read_text())
    assert (
        colmap.keys() >= {"exit_code", "wall_time_s", "warnings"} and colmap["exit_code"] == result.returncode
    )
    report = tmp_path / "reconstruct.json"
    result = invoke_cli("reconstruct", "--database", str(tmp_path / "db.db"), "--images", str(photos),
                        "--out", str(tmp_path / "sparse"), "--json-report", str(report))  # fmt: skip
    mapped = json.loads(report.read_text())
    assert (
        mapped.keys() >= {"exit_code", "wall_time_s", "warnings"} and mapped["exit_code"] == result.returncode
    )
