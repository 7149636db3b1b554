"""How much `colmap` + `reconstruct` vary between identical runs, and which stage varies.

README's five-command pipeline on the shared Sacre Coeur photos: extraction, pairs and matching
once, then `colmap` (database + geometric verification) and `reconstruct` (incremental mapping)
``--runs`` times with the same inputs and options, default threads (optionally with
``--threads 1``), with ``--load`` busy processes beside them. For each run it records a digest of
the verified two-view geometries (pair, inlier matches, configuration), the verified pair count
and inliers, and the model's registered images, 3D points and reprojection error. Equal digests
with different models: mapping varies; different digests: verification varies.

    python benchmarks/repeatability.py --runs 10 --load 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SPIN = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass\n"


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sp_extract", *args], check=True, capture_output=True)


def verified(database: Path) -> tuple[str, int, int]:
    """Digest of the verified geometries, verified pairs (config > 1 with inliers), inliers."""
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT pair_id, rows, config, data FROM two_view_geometries ORDER BY pair_id"
        ).fetchall()
    digest = hashlib.sha1()
    pairs = inliers = 0
    for pair_id, count, config, data in rows:
        digest.update(f"{pair_id}:{count}:{config}:".encode() + (data or b""))
        if count:
            pairs, inliers = pairs + 1, inliers + count
    return digest.hexdigest()[:10], pairs, inliers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "sacre_coeur")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "superpoint_v1.pth"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the runs")
    parser.add_argument("--threads", type=int, default=None, help="--num-threads (default: the command's)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sp-repeat-"))
    feats, pairs, matches = work / "feats.h5", work / "pairs.txt", work / "matches.h5"
    cli("extract", str(args.images), "--out", str(feats), "--weights", args.weights, "-q")
    cli("pairs", "exhaustive", "--features", str(feats), "--out", str(pairs))
    cli("match-pairs", str(pairs), "--features", str(feats), "--out", str(matches), "-q")
    threads = ["--num-threads", str(args.threads)] if args.threads else []
    load = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.load)]
    rows = []
    try:
        for run in range(args.runs):
            database, sparse, report = work / f"db{run}.db", work / f"sparse{run}", work / f"r{run}.json"
            started = time.monotonic()
            cli("colmap", "--images", str(args.images), "--features", str(feats), "--matches", str(matches),
                "--database", str(database), *threads)  # fmt: skip
            cli("reconstruct", "--database", str(database), "--images", str(args.images),
                "--out", str(sparse), "--json-report", str(report), *threads)  # fmt: skip
            took = time.monotonic() - started
            model = max(json.loads(report.read_text())["models"], key=lambda m: m["registered_images"])
            rows.append((run, *verified(database), model["registered_images"], model["points3D"],
                         model["mean_reprojection_error_px"], took))  # fmt: skip
            print(*rows[-1], file=sys.stderr)
    finally:
        for process in load:
            process.kill()
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.load} busy processes beside the runs, threads: {args.threads or 'default'}\n")  # fmt: skip
    print("| run | verification | verified pairs | inliers | registered | 3D points | error px | time s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run, digest, count, inliers, registered, points, error, took in rows:
        print(
            f"| {run} | {digest} | {count} | {inliers} | {registered} | {points} | {error:.3f} | {took:.1f} |"
        )
    points = [row[5] for row in rows]
    print(f"\n{len({row[1] for row in rows})} distinct verification results in {len(rows)} runs; "
          f"3D points {min(points)}-{max(points)} (median {statistics.median(points):.0f})")  # fmt: skip


if __name__ == "__main__":
    main()
