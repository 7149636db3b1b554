"""COLMAP's geometric verification with hloc's RANSAC settings (sp-extract's) against COLMAP's own
defaults and fewer trials: verification seconds, verified pairs, and the incremental mapper's
model on the result, on ``mapper.py``'s databases (built by ``sp-extract sfm`` with its defaults).

Usage: python benchmarks/verification.py [--subset sacre,fox-9,fox-13,fox-25,fox-50] [--seeds 0]
       [--work DIR]

Each setting verifies a copy of the database with its two-view geometries removed (RANSAC seeded
by each of ``--seeds``, all threads, timed alone); then ``reconstruct``'s incremental mapper
(seed 0): several seeds show the spread that RANSAC's random samples alone cause. A JSON line per
collection and setting: seconds, verified pairs, registered images, 3D points, reprojection
error, pose AUC of the fox frames. The machine's other processes are not controlled: times from
a loaded machine must say so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import time
from pathlib import Path

import pycolmap
from mapper import databases_chosen, map_once  # benchmarks/: run as scripts, this folder first

from sp_extract.sfm.environment import VERIFY_MAX_TRIALS, VERIFY_MIN_INLIER_RATIO, colmap_logging

# RANSAC's most trials and the inlier ratio it assumes (which lowers the most trials of each model)
SETTINGS = {
    "hloc (sp-extract)": (VERIFY_MAX_TRIALS, VERIFY_MIN_INLIER_RATIO),
    "COLMAP's defaults": (10_000, 0.25),
    "5,000 trials": (5_000, VERIFY_MIN_INLIER_RATIO),
}


def verified_copy(
    database: Path, copy: Path, trials: int, inlier_ratio: float, seed: int
) -> tuple[float, int, int]:
    """``database`` verified again into ``copy``: seconds, verified pairs, matched pairs."""
    shutil.copy(database, copy)
    with sqlite3.connect(copy) as db:
        db.execute("DELETE FROM two_view_geometries")
    options = pycolmap.TwoViewGeometryOptions()
    options.ransac.max_num_trials, options.ransac.min_inlier_ratio = trials, inlier_ratio
    options.ransac.random_seed = seed
    pycolmap.set_random_seed(seed)
    started = time.perf_counter()
    with colmap_logging(False):
        pycolmap.geometric_verification(
            copy, verifier_options=pycolmap.GeometricVerifierOptions(), two_view_geometry_options=options
        )
    seconds = time.perf_counter() - started
    with sqlite3.connect(copy) as db:
        verified = db.execute("SELECT COUNT(*) FROM two_view_geometries WHERE rows > 0").fetchone()[0]
        matched = db.execute("SELECT COUNT(*) FROM matches WHERE rows > 0").fetchone()[0]
    return seconds, verified, matched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="RANSAC seeds of the verification, comma-separated.")
    args, chosen = databases_chosen(parser, "sacre,fox-9,fox-13,fox-25,fox-50")
    for name, database, images in chosen:
        for index, (setting, (trials, ratio)) in enumerate(SETTINGS.items()):
            for seed in (int(seed) for seed in args.seeds.split(",")):
                copy = args.work / f"{name}-verification-{index}-{seed}.db"  # one each: pycolmap may hold it
                seconds, verified, matched = verified_copy(database, copy, trials, ratio, seed)
                row = map_once(copy, images, "incremental", args.work / f"{name}-verification-{index}")
                auc = row["auc"] and {k: round(v, 1) for k, v in row["auc"].items()}
                line = {"collection": name, "setting": setting, "seed": seed, "verify_s": round(seconds, 1),
                        "verified": f"{verified}/{matched}", "registered": row["largest"],
                        "points3D": row["points3D"], "error_px": row["reprojection_error_px"],
                        "auc": auc}  # fmt: skip
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
