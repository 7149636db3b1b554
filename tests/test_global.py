"""The global mapper (GLOMAP, issue 24): ``reconstruct --mapper global`` against the incremental
mapper on the real photos, ``sfm --mapper global`` and its growth (registered into the model,
or mapped again past ``GLOBAL_RESOLVE_SHARE``), an interrupted global mapping, option errors.
The models are read back with pycolmap."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pycolmap
import pytest
from conftest import ROOT, run_cli, shared_file
from support.reliability import Run, one_line_error

from sp_extract.sfm.config import GLOBAL_RESOLVE_SHARE, MapperOptions

FAST = ("--resize-max", "640")  # fewer pixels: the tests' time; COLMAP's threads as by default


def registered_names(sparse: Path) -> set[str]:
    """The images registered in any model of ``sparse`` (0, 1, ...), read with pycolmap."""
    names = set()
    for folder in sparse.iterdir():
        if folder.name.isdigit():
            model = pycolmap.Reconstruction(folder)
            names |= {model.images[i].name for i in model.reg_image_ids()}
    return names


@pytest.fixture
def sacre_database(sacre_coeur_database: Path, sacre_coeur: Path) -> tuple[Path, Path]:
    """The 10 real photos' database (conftest: exhaustive pairs, default matching), and the photos."""
    return sacre_coeur_database, sacre_coeur


def test_reconstruct_global_registers_what_incremental_registers(
    tmp_path: Path, sacre_database: tuple[Path, Path]
) -> None:
    database, photos = sacre_database
    found, reports = {}, {}
    for mapper in ("incremental", "global"):
        out, report = tmp_path / mapper, tmp_path / f"{mapper}.json"
        result = run_cli("reconstruct", "--database", str(database), "--images", str(photos), "--out",
                         str(out), "--mapper", mapper, "--json-report", str(report), timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"({mapper} mapper)" in result.stderr
        found[mapper], reports[mapper] = registered_names(out), json.loads(report.read_text())
        assert not list(tmp_path.glob(f".{mapper}.*"))  # no building folder left
    assert found["incremental"] == {path.name for path in photos.glob("*.jpg")}
    assert found["global"] >= found["incremental"]
    assert reports["global"]["mapper"] == "global" and reports["global"]["unregistered_images"] == []
    best = max(reports["global"]["models"], key=lambda model: model["registered_images"])
    # measured at the tests' 640 px: 466 points with the default floor of 40 inliers, 533 with 15
    assert best["points3D"] > 300 and best["mean_reprojection_error_px"] < 2.0


def strongest_pair_of_each_image(database: Path) -> dict[str, int]:
    """Each image's most inliers in one verified pair, read with sqlite3 (COLMAP's pair_id is
    image_id1 * 2147483647 + image_id2)."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        names = dict(db.execute("SELECT image_id, name FROM images"))
        strongest = dict.fromkeys(names.values(), 0)
        for pair_id, inliers in db.execute("SELECT pair_id, rows FROM two_view_geometries"):
            for image_id in divmod(pair_id, 2147483647):
                strongest[names[image_id]] = max(strongest[names[image_id]], inliers)
    return strongest


def test_global_min_inliers_keeps_weaker_pairs_out_of_the_view_graph(
    tmp_path: Path, sacre_database: tuple[Path, Path]
) -> None:
    """The photo whose strongest pair is the weakest of all: every photo registered at the
    default floor; with a floor one above that pair's inliers it has no pair left, so the global
    mapper cannot register it and says so."""
    database, photos = sacre_database
    strongest = strongest_pair_of_each_image(database)
    weakest = min(strongest, key=strongest.__getitem__)
    assert strongest[weakest] >= MapperOptions().global_min_inliers  # else the default drops it
    unregistered = []
    for floor in (MapperOptions().global_min_inliers, strongest[weakest] + 1):
        report = tmp_path / "report.json"
        result = run_cli("reconstruct", "--database", str(database), "--images", str(photos), "--out",
                         str(tmp_path / "out"), "--overwrite", "--mapper", "global", "--global-min-inliers",
                         str(floor), "--json-report", str(report), timeout=600)  # fmt: skip
        assert result.returncode in (0, 1), result.stderr
        unregistered.append(json.loads(report.read_text())["unregistered_images"])
    assert unregistered[0] == []
    assert weakest in unregistered[1]


def two_view_geometries(database: Path) -> list[tuple]:
    """The database's two-view geometries, read with sqlite3 (the view graph calibration would
    make the uncalibrated ones CALIBRATED, config 2, with an essential matrix)."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return db.execute(
            "SELECT pair_id, config, F, E, H FROM two_view_geometries ORDER BY pair_id"
        ).fetchall()


def test_global_settings_reach_colmap(tmp_path: Path, sacre_database: tuple[Path, Path]) -> None:
    """--ba-rounds 0 skips the final bundle adjustment, whose rounds let many more points pass the
    reprojection filter (87 against 804 points measured); --view-graph-calibration works on a
    copy: the database's two-view geometries are unchanged, no copy is left."""
    database, photos = sacre_database
    before = two_view_geometries(database)
    points = []
    for extra in ((), ("--ba-rounds", "0"), ("--view-graph-calibration",)):
        report = tmp_path / "report.json"
        result = run_cli("reconstruct", "--database", str(database), "--images", str(photos), "--out",
                         str(tmp_path / "out"), "--overwrite", "--mapper", "global", "--json-report",
                         str(report), *extra, timeout=600)  # fmt: skip
        assert result.returncode in (0, 1), result.stderr
        models = json.loads(report.read_text())["models"]
        points.append(sum(model["points3D"] for model in models))
        assert not list((tmp_path / "out").rglob("*.db"))  # the calibrated copy is gone
    assert points[1] < points[0] / 2
    assert two_view_geometries(database) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--mapper", "auto"), "'auto' is not one of 'incremental', 'global'"),
        (("--ba-rounds", "-1"), "--ba-rounds -1: expected an integer >= 0"),
        (("--rotation-iterations", "0"), "--rotation-iterations 0: expected an integer >= 1"),
        (("--global-min-inliers", "0"), "--global-min-inliers 0: expected an integer >= 1"),
        (("--ba-iterations", "x"), "'x' is not a valid integer"),
    ],
)
def test_bad_mapper_options_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = run_cli("reconstruct", "--database", str(tmp_path / "db.db"), "--images", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in one_line_error(result.stderr)


def test_bad_sfm_mapper_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("sfm", str(tmp_path), str(tmp_path / "work"), "--mapper", "glomap")
    assert result.returncode == 2
    assert "'glomap' is not one of 'auto', 'incremental', 'global'" in one_line_error(result.stderr)


def sfm(images: Path, work: Path, weights: Path, *extra: str) -> dict:
    report = work.parent / f"{work.name}-report.json"
    result = run_cli("sfm", str(images), str(work), "--weights", str(weights), *FAST, "-q", "--json-report",
                     str(report), *extra, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    report.unlink()
    return data


def model_images(model: Path) -> dict[int, str]:
    reconstruction = pycolmap.Reconstruction(model)
    return {i: reconstruction.images[i].name for i in reconstruction.reg_image_ids()}


@pytest.fixture(scope="module")
def grown_globally(tmp_path_factory: pytest.TempPathFactory, real_weights: Path) -> dict:
    """10 fox frames (every 3rd of the video) mapped by sfm --mapper global; then the next frames
    within GLOBAL_RESOLVE_SHARE of them (registered into the model), then 3 more (past it: mapped
    again globally). (6 of the Sacre Coeur photos gave the global mapper a likely wrong model.)"""
    root, fox = tmp_path_factory.mktemp("sfm-global"), shared_file("data/fox")
    first, within = 10, math.floor(GLOBAL_RESOLVE_SHARE * 10)
    names = [path.name for path in sorted(fox.glob("*.jpg"))[::3]][: first + within + 3]
    assert within >= 1 and within + 3 > GLOBAL_RESOLVE_SHARE * first  # both growth paths are reached
    images, work, runs, models = root / "images", root / "work", [], []
    images.mkdir()
    for count in (first, first + within, len(names)):
        for name in names[:count]:
            if not (images / name).exists():
                shutil.copy2(fox / name, images / name)
        runs.append(sfm(images, work, real_weights, "--mapper", "global"))
        models.append(model_images(work / "sparse" / "0"))
        runs[-1]["record"] = json.loads((work / "sparse" / "sfm.json").read_text())
    return {"names": names, "runs": runs, "models": models, "work": work, "images": images, "within": within}


def test_sfm_global_end_to_end_and_growth(grown_globally: dict) -> None:
    runs, models, names = grown_globally["runs"], grown_globally["models"], grown_globally["names"]
    # 1: mapped globally from scratch
    assert (runs[0]["mode"], runs[0]["mapper"]) == ("new", "global")
    assert set(models[0].values()) == set(names[:10])
    assert runs[0]["record"]["mapper"] == "global" and runs[0]["record"]["solved_images"] == 10
    # 2: the new photos registered into the global model (ids kept), which stays the global one
    assert (runs[1]["mode"], runs[1]["mapper"]) == ("grow", "continued")
    assert set(models[1].values()) == set(names[: 10 + grown_globally["within"]])
    assert {i: models[1][i] for i in models[0]} == models[0]
    assert runs[1]["record"]["mapper"] == "global" and runs[1]["record"]["solved_images"] == 10
    assert runs[1]["mapped_again"] == ""
    # 3: past the share: mapped again globally, every photo registered
    assert (runs[2]["mode"], runs[2]["mapper"]) == ("grow", "global")
    assert "mapped again globally" in runs[2]["mapped_again"]
    assert set(models[2].values()) == set(names) and runs[2]["unregistered_images"] == []
    assert runs[2]["record"]["solved_images"] == len(names)
    assert not list(grown_globally["work"].glob("sparse.*"))


STAND_IN = (  # a global mapping that writes half a model, then takes its time
    "import pathlib, time\n"
    "import pycolmap\n"
    "def mapping(database, images, output, options):\n"
    "    (pathlib.Path(output) / '0').mkdir()\n"
    "    (pathlib.Path(output) / '0' / 'partial.bin').write_bytes(b'half a model')\n"
    "    time.sleep(120)\n"
    "pycolmap.global_mapping = mapping\n"
)


def model_files(sparse: Path) -> dict[Path, bytes]:
    return {path.relative_to(sparse): path.read_bytes() for path in sparse.rglob("*") if path.is_file()}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_global_mapping_leaves_the_previous_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grown_globally: dict, real_weights: Path, signum: int
) -> None:
    """sfm --rebuild --mapper global on a work folder with a model, the global mapping replaced by
    a stand-in (imported through ``sitecustomize`` into the real process and its COLMAP child)
    that writes half a model and sleeps: a signal ends the run at once with 130 / 143, the
    previous model is unchanged and nothing half-built is left."""
    work = tmp_path / "work"
    shutil.copytree(grown_globally["work"], work)
    before = model_files(work / "sparse")
    stand_in = tmp_path / "stand_in"
    stand_in.mkdir()
    (stand_in / "sitecustomize.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(stand_in), str(ROOT)]))
    run = Run("sfm", str(grown_globally["images"]), str(work), "--weights", str(real_weights), *FAST,
              "--rebuild", "--mapper", "global")  # fmt: skip
    partial = work / "sparse.new" / "mapper-0" / "0" / "partial.bin"
    assert run.wait_until(partial.exists, timeout=300), run.text
    if signum == signal.SIGINT:
        run.signal_group(signum)  # Ctrl-C in a terminal: the whole process group
    else:
        os.kill(run.process.pid, signum)  # kill PID: the main process only
    sent = time.monotonic()
    assert run.finish(timeout=60) == (130 if signum == signal.SIGINT else 143), run.text
    assert time.monotonic() - sent < 10 and "Traceback" not in run.text
    assert model_files(work / "sparse") == before
    assert not list(work.glob("sparse.*"))
