"""Geometric verification guided by the closest matches (sp-extract's), against COLMAP's verification
of all matches with hloc's RANSAC settings (sp-extract's before), with COLMAP's own defaults and
with fewer trials: verification seconds, verified pairs and inliers, and the incremental mapper's
model on the result, on ``mapper.py``'s databases (built by ``sp-extract sfm``).

Usage: python benchmarks/verification.py [--subset sacre,fox-9,fox-13,fox-25,fox-50] [--seeds 0]
       [--settings guided,hloc,colmap,trials-5000] [--work DIR]

Each setting (``SETTINGS``) verifies a copy of the database with its two-view geometries removed
(RANSAC seeded by each of ``--seeds``, all threads, timed alone; guided: ``verify_database`` with
the default ``--guide-distance``, the others COLMAP's verification of all matches); then
``reconstruct``'s incremental mapper (seed 0): several seeds show the spread that RANSAC's random
samples alone cause. A JSON line per collection and setting: seconds, verified pairs, inlier
matches, registered images, 3D points, reprojection error, pose AUC of the fox frames. The
machine's other processes are not controlled: times from a loaded machine must say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import time
from pathlib import Path

import pycolmap
from mapper import databases_chosen, map_once  # benchmarks/: run as scripts, this folder first

from sp_extract.sfm.config import ColmapRun
from sp_extract.sfm.environment import VERIFY_MAX_TRIALS, VERIFY_MIN_INLIER_RATIO, colmap_logging
from sp_extract.sfm.verification import unverified_pairs, verify_database

# RANSAC's most trials, the inlier ratio it assumes (which lowers the most trials of each model) and
# the guide's descriptor distance (0: COLMAP's verification of all matches)
SETTINGS = {
    "guided": (VERIFY_MAX_TRIALS, VERIFY_MIN_INLIER_RATIO, ColmapRun.guide_distance),  # sp-extract's
    "hloc": (VERIFY_MAX_TRIALS, VERIFY_MIN_INLIER_RATIO, 0.0),  # all matches, sp-extract's before
    "colmap": (10_000, 0.25, 0.0),  # COLMAP's defaults
    "trials-5000": (5_000, VERIFY_MIN_INLIER_RATIO, 0.0),
}


def verified_copy(database: Path, copy: Path, setting: tuple[int, float, float], seed: int) -> dict:
    """``database`` verified again into ``copy`` with ``setting`` (``SETTINGS``): seconds, verified
    of matched pairs, inlier matches."""
    trials, inlier_ratio, guide_distance = setting
    shutil.copy(database, copy)
    with contextlib.closing(sqlite3.connect(copy)) as db:
        db.execute("DELETE FROM two_view_geometries")
        db.commit()
    pairs = unverified_pairs(copy)
    started = time.perf_counter()
    if guide_distance:
        features = database.with_name("feats.h5")
        verify_database(copy, features, pairs, ColmapRun(seed=seed, guide_distance=guide_distance))
    else:
        options = pycolmap.TwoViewGeometryOptions()
        options.ransac.max_num_trials, options.ransac.min_inlier_ratio = trials, inlier_ratio
        options.ransac.random_seed = seed
        pycolmap.set_random_seed(seed)
        with colmap_logging(False):
            pycolmap.geometric_verification(
                copy, verifier_options=pycolmap.GeometricVerifierOptions(), two_view_geometry_options=options
            )
    seconds = time.perf_counter() - started
    with contextlib.closing(sqlite3.connect(copy)) as db:
        verified, inliers = db.execute(
            "SELECT COUNT(*), SUM(rows) FROM two_view_geometries WHERE rows > 0"
        ).fetchone()
    return {"verify_s": round(seconds, 1), "verified": f"{verified}/{len(pairs)}", "inliers": inliers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="RANSAC seeds of the verification, comma-separated.")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="Settings, comma-separated.")
    args, chosen = databases_chosen(parser, "sacre,fox-9,fox-13,fox-25,fox-50")
    for name, database, images in chosen:
        for index, (setting, values) in enumerate(SETTINGS.items()):
            if setting not in args.settings.split(","):
                continue
            for seed in (int(seed) for seed in args.seeds.split(",")):
                copy = args.work / f"{name}-verification-{index}-{seed}.db"  # one each: pycolmap may hold it
                verified = verified_copy(database, copy, values, seed)
                row = map_once(copy, images, "incremental", args.work / f"{name}-verification-{index}")
                auc = row["auc"] and {k: round(v, 1) for k, v in row["auc"].items()}
                line = {"collection": name, "setting": setting, "seed": seed, **verified,
                        "registered": row["largest"], "points3D": row["points3D"],
                        "error_px": row["reprojection_error_px"], "auc": auc}  # fmt: skip
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
