"""What a floor on the verified inliers of a pair does to the mappers: copies of ``mapper.py``'s
databases with the two-view geometries under ``--floor`` inliers dropped, each mapper run on the
copy and on the database as verified (COLMAP's own floor, 15), the global mapper without a floor
of its own (``--global-min-inliers 1``: the copy decides). With ``--reweighted``, also the global
mapper on the database as verified with its rotation averaging weighting each pair by its
inliers (COLMAP's ``INLIER_MATCH_COUNT`` reweighting; uniform by default), the other remedy for
chance geometries.

Usage: python benchmarks/inlier_floor.py [--subset sacre,fox-9,fox-13,all-90] [--floor 40]
       [--mappers incremental,global] [--reweighted] [--rules] [--work DIR]

With ``--rules``, first the verified pairs of each collection's database by scene (same scene or
not: a ScanNet room, the Sacre Coeur or the fox photos) and how many of each a rule on the inliers
k and the matches n of a pair keeps: a fixed floor, or one that grows with the matches.

A JSON line per collection, floor and mapper: the verified pairs kept, the models' sizes (largest
first), the largest model's 3D points and reprojection error, pose AUC of its fox frames, map
seconds. The databases are ``mapper.py``'s (built by ``sp-extract sfm`` with its defaults, kept in
``--work``). The machine's other processes are not controlled: times from a loaded machine must
say so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
from pathlib import Path

import pycolmap
from mapper import FOX, databases_chosen, map_once  # benchmarks/: run as scripts, this folder first

from sp_extract.sfm import mappers
from sp_extract.sfm.config import MAPPERS, MapperOptions


def floored_copy(database: Path, floor: int, copy: Path) -> int:
    """``database`` copied to ``copy`` without the geometries of fewer than ``floor`` inliers;
    returns the verified pairs kept."""
    shutil.copy(database, copy)
    with sqlite3.connect(copy) as db:
        db.execute(
            "UPDATE two_view_geometries SET rows = 0, cols = 0, data = NULL, config = 1 WHERE rows < ?",
            (floor,),
        )
        return db.execute("SELECT COUNT(*) FROM two_view_geometries WHERE rows > 0").fetchone()[0]


UNIFORM_GLOBAL_OPTIONS = mappers.global_options


def reweighted_global_options(options: MapperOptions, run: object) -> object:
    """``mappers.global_options`` with the rotation averaging weighting pairs by their inliers."""
    pipeline = UNIFORM_GLOBAL_OPTIONS(options, run)
    pipeline.mapper.rotation_averaging.reweighting = pycolmap.RotationAveragingReweighting.INLIER_MATCH_COUNT
    return pipeline


def row_of(name: str, floor: int | str, kept: int, mapper: str, out: Path, row: dict) -> str:
    sizes = [pycolmap.Reconstruction(p).num_reg_images() for p in out.iterdir() if p.is_dir()]
    auc = row["auc"] and {k: round(v, 1) for k, v in row["auc"].items()}
    return json.dumps({"collection": name, "floor": floor, "pairs_kept": kept, "mapper": mapper,
                       "models": sorted(sizes, reverse=True), "points3D": row["points3D"],
                       "reprojection_error_px": row["reprojection_error_px"], "auc": auc,
                       "seconds": row["seconds"]})  # fmt: skip


RULES = {
    "k >= 15 (COLMAP's)": lambda k, n: k >= 15,
    "k >= 30": lambda k, n: k >= 30,
    "k >= 40": lambda k, n: k >= 40,
    "k >= 15 + 0.1 n": lambda k, n: k >= 15 + 0.1 * n,
    "k >= 40 or k / n >= 0.2": lambda k, n: k >= 40 or k >= 0.2 * n,
}


def scene_of(name: str) -> str:
    """The scene of a shared photo by its name: a ScanNet room, else its folder."""
    if name.startswith("scene"):
        return name.split("_frame")[0]
    return "fox" if (FOX / name).exists() else "sacre"


def rule_counts(database: Path) -> dict[str, dict[str, int]]:
    """Per rule, the verified pairs of one scene and of two that it keeps (COLMAP's pair_id is
    image_id1 * 2147483647 + image_id2)."""
    with sqlite3.connect(database) as db:
        names = dict(db.execute("SELECT image_id, name FROM images"))
        matches = dict(db.execute("SELECT pair_id, rows FROM matches"))
        pairs = db.execute("SELECT pair_id, rows FROM two_view_geometries WHERE rows > 0").fetchall()
    counts = {rule: {"same scene": 0, "two scenes": 0} for rule in RULES}
    for pair_id, inliers in pairs:
        first, second = divmod(pair_id, 2147483647)
        kind = "same scene" if scene_of(names[first]) == scene_of(names[second]) else "two scenes"
        for rule, keeps in RULES.items():
            counts[rule][kind] += keeps(inliers, matches[pair_id])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floor", type=int, default=40, help="Inliers a verified pair needs.")
    parser.add_argument("--mappers", default=",".join(MAPPERS), help="Mappers, comma-separated.")
    parser.add_argument(
        "--reweighted", action="store_true", help="Also the global mapper reweighted by inliers."
    )
    parser.add_argument("--rules", action="store_true", help="First the pairs each rule keeps, by scene.")
    args, chosen = databases_chosen(parser, "sacre,fox-9,fox-13,all-90")
    for name, database, images in chosen:
        if args.rules:
            print(json.dumps({"collection": name, "pairs kept": rule_counts(database)}), flush=True)
        kept_of = {}
        for floor in (0, args.floor):
            copy = args.work / f"{name}-floor-{floor}.db"
            kept = kept_of[floor] = floored_copy(database, floor, copy)
            for mapper in args.mappers.split(","):
                out = args.work / f"{name}-floor-{floor}-{mapper}"
                row = map_once(copy, images, mapper, out, MapperOptions(mapper=mapper, global_min_inliers=1))
                print(row_of(name, floor, kept, mapper, out, row), flush=True)
        if args.reweighted:
            mappers.global_options = reweighted_global_options
            out = args.work / f"{name}-reweighted-global"
            row = map_once(args.work / f"{name}-floor-0.db", images, "global", out,
                           MapperOptions(mapper="global", global_min_inliers=1))  # fmt: skip
            mappers.global_options = UNIFORM_GLOBAL_OPTIONS
            print(row_of(name, "reweighted", kept_of[0], "global", out, row), flush=True)


if __name__ == "__main__":
    main()
