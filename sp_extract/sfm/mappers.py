"""COLMAP's two mappers behind one call, run in a child process by ``mapping`` and ``grow``: the
incremental mapper (from scratch, or continuing a model: its images keep their ids and poses,
the new ones are registered, then COLMAP's final global bundle adjustment runs) and the global
mapper (GLOMAP: rotation averaging, then global positioning of cameras and points, then bundle
adjustment), optionally after estimating the cameras' focal lengths from the verified pairs. A
model mapped from scratch that contradicts its verified pairs (``consistency``) is mapped again
with the next seeds.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MAPPING_ATTEMPTS, REMAP_BELOW, REMAP_UP_TO, ColmapRun, MapperOptions
from .consistency import pair_agreements
from .environment import VERIFY_MAX_ERROR, colmap_logging, import_pycolmap

CALIBRATED_DATABASE = "calibrated.db"  # the copy of the database the view graph calibration changes


@dataclass
class RankedModel:
    """A mapped model, its agreement with the database's verified pairs (``pair_agreements``; None:
    too few pairs to tell) and the seed of the mapping that made it."""

    model: Any
    agreement: float | None
    seed: int | None  # None: read from disk

    @property
    def consistent(self) -> bool:
        return self.agreement is None or self.agreement >= REMAP_BELOW


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
) -> list[RankedModel]:
    """``run_mapper``'s models, largest (most registered images) first, each written to
    ``building/0``, ``building/1``, ...: COLMAP numbers them in the order it started them, and a
    failed start (two images, a few dozen points) can come before the model of every photo. A
    mapping from scratch whose largest model is inconsistent (``consistency``: under
    ``REMAP_BELOW``) is done again with the next seeds, up to ``MAPPING_ATTEMPTS`` in all, unless
    it registered more than ``REMAP_UP_TO`` images; the first consistent mapping is kept, else the
    most consistent."""
    attempts = []
    for attempt in range(1 if previous else MAPPING_ATTEMPTS):
        raw = building / f"mapper-{attempt}"
        raw.mkdir()
        seeded = dataclasses.replace(run, seed=run.seed + attempt)
        models = run_mapper(database, images, raw, mapper, options, seeded, previous)
        shutil.rmtree(raw)
        ranked = sorted(models.values(), key=lambda model: model.num_reg_images(), reverse=True)
        agreements = pair_agreements(ranked, database, VERIFY_MAX_ERROR)
        found = [RankedModel(*item, seeded.seed) for item in zip(ranked, agreements, strict=True)]
        attempts.append(found)
        if not found or found[0].consistent or found[0].model.num_reg_images() > REMAP_UP_TO:
            break
    chosen = max(attempts, key=_agreement)  # the first of equals
    for rank, item in enumerate(chosen):
        folder = building / str(rank)
        folder.mkdir()
        item.model.write(folder)
    return chosen


def _agreement(found: list[RankedModel]) -> float:
    """How far a mapping's largest model agrees with its pairs (1: nothing to judge)."""
    if not found or found[0].agreement is None:
        return 1.0
    return found[0].agreement


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
