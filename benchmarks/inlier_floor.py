"""What a floor on the verified inliers of a pair does to the mappers: copies of ``mapper.py``'s
databases with the two-view geometries under ``--floor`` inliers dropped, each mapper run on the
copy and on the database as verified (COLMAP's own floor, 15).

Usage: python benchmarks/inlier_floor.py [--subset sacre,fox-9,fox-13,all-90] [--floor 40] [--work DIR]

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
from accuracy import chosen_subset  # benchmarks/: run as scripts, this folder first on the path
from mapper import COLLECTIONS, database_of, map_once


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", default="sacre,fox-9,fox-13,all-90", help="Collections, comma-separated.")
    parser.add_argument("--floor", type=int, default=40, help="Inliers a verified pair needs.")
    parser.add_argument("--work", type=Path, default=Path("mapper-work"), help="mapper.py's databases.")
    args = parser.parse_args()
    for name in chosen_subset(parser, args.subset, COLLECTIONS):
        database, images, _ = database_of(name, args.work)
        for floor in (0, args.floor):
            kept = floored_copy(database, floor, args.work / f"{name}-floor-{floor}.db")
            for mapper in ("incremental", "global"):
                out = args.work / f"{name}-floor-{floor}-{mapper}"
                row = map_once(args.work / f"{name}-floor-{floor}.db", images, mapper, out)
                sizes = [pycolmap.Reconstruction(p).num_reg_images() for p in out.iterdir() if p.is_dir()]
                auc = row["auc"] and {k: round(v, 1) for k, v in row["auc"].items()}
                print(json.dumps({"collection": name, "floor": floor, "pairs_kept": kept, "mapper": mapper,
                                  "models": sorted(sizes, reverse=True), "points3D": row["points3D"],
                                  "reprojection_error_px": row["reprojection_error_px"], "auc": auc,
                                  "seconds": row["seconds"]}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
