"""COLMAP's two mappers behind one call, run in a child process by ``mapping`` and ``grow``: the
incremental mapper (from scratch, or continuing a model: its images keep their ids and poses,
the new ones are registered, then COLMAP's final global bundle adjustment runs) and the global
mapper (GLOMAP: rotation averaging, then global positioning of cameras and points, then bundle
adjustment), optionally after estimating the cameras' focal lengths from the verified pairs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .config import ColmapRun, MapperOptions
from .environment import colmap_logging, import_pycolmap

CALIBRATED_DATABASE = "calibrated.db"  # the copy of the database the view graph calibration changes


def run_mapper(
    database: Path,
    images: Path,
    output: Path,
    mapper: str,
    options: MapperOptions,
    run: ColmapRun,
    previous: str = "",
) -> dict[int, Any]:
    """The models (pycolmap ``Reconstruction`` by index) of the ``mapper`` ("incremental" or
    "global") on ``database``, written by COLMAP into ``output/N``; the incremental mapper
    continues the model in the folder ``previous`` ("" for none)."""
    pycolmap = import_pycolmap()
    pycolmap.set_random_seed(run.seed)
    with colmap_logging(run.verbose):
        if mapper == "incremental":
            incremental = pycolmap.IncrementalPipelineOptions()
            incremental.random_seed, incremental.num_threads = run.seed, run.num_threads
            return pycolmap.incremental_mapping(database, images, output, incremental, input_path=previous)
        if options.view_graph_calibration:  # on a copy: the database keeps its two-view geometries
            calibrated = output / CALIBRATED_DATABASE
            shutil.copyfile(database, calibrated)
            calibration = pycolmap.ViewGraphCalibrationOptions()
            calibration.random_seed = run.seed
            pycolmap.calibrate_view_graph(calibrated, calibration)
            database = calibrated
        models = pycolmap.global_mapping(database, images, output, global_options(options, run))
        (output / CALIBRATED_DATABASE).unlink(missing_ok=True)
        return models


def map_ranked(
    database: Path,
    images: Path,
    building: Path,
    mapper: str,
    options: MapperOptions,
    run: ColmapRun,
    previous: str = "",
) -> list[Any]:
    """``run_mapper``'s models, largest (most registered images) first, each written to
    ``building/0``, ``building/1``, ...: COLMAP numbers them in the order it started them, and a
    failed start (two images, a few dozen points) can come before the model of every photo."""
    raw = building / "mapper"
    raw.mkdir()
    models = run_mapper(database, images, raw, mapper, options, run, previous)
    ranked = sorted(models.values(), key=lambda model: model.num_reg_images(), reverse=True)
    for rank, model in enumerate(ranked):
        folder = building / str(rank)
        folder.mkdir()
        model.write(folder)
    shutil.rmtree(raw)
    return ranked


def global_options(options: MapperOptions, run: ColmapRun) -> Any:
    """pycolmap's ``GlobalPipelineOptions`` with ``options``' settings and ``run``'s seed and threads."""
    pycolmap = import_pycolmap()
    pipeline = pycolmap.GlobalPipelineOptions()
    pipeline.random_seed, pipeline.num_threads = run.seed, run.num_threads
    pipeline.min_num_matches = options.global_min_inliers  # of the verified pairs: their inliers
    mapper = pipeline.mapper
    mapper.rotation_averaging.max_num_irls_iterations = options.rotation_iterations
    mapper.ba_num_iterations = max(options.ba_rounds, 1)
    mapper.skip_bundle_adjustment = options.ba_rounds == 0
    mapper.bundle_adjustment.ceres.solver_options.max_num_iterations = options.ba_iterations
    return pipeline
