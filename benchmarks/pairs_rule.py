"""How ``sfm`` should pair images: ``--pairs exhaustive`` against ``retrieval:K`` on the same photos,
one ``sp-extract sfm`` run each (defaults otherwise: real weights, CPU, COLMAP's threads).

Usage: python benchmarks/pairs_rule.py [--subset fox-50,fox-13,sacre] [-k 5 10 20 30] [--json FILE]

A markdown row per collection and pairing: the pairs made, registered images, 3D points, mean
reprojection error and track length of the largest model, pose AUC against ``fox/transforms.json``
(fox collections; see ``accuracy.py``) and end-to-end seconds. Pairing decides what matching
costs (a pair is matched and verified) and which images can be registered; the multithreaded
mapper is not repeatable, so a difference of a few points or AUC tenths between rows is noise.
The machine's other processes are not controlled: report times from a loaded machine as such.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

from accuracy import COLLECTIONS, chosen_subset, linked_photos, markdown, measure, sp_extract_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", default="fox-50,fox-13,sacre", help="Collections, comma-separated.")
    parser.add_argument("-k", type=int, nargs="+", default=[5, 10, 20, 30], help="Retrieval K values.")
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON to this file.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen_subset(parser, args.subset, COLLECTIONS):
            images = linked_photos(name, Path(tmp))
            for pairs in ["exhaustive", *(f"retrieval:{k}" for k in args.k)]:
                work = images.parent / pairs.replace(":", "-")
                run = functools.partial(sp_extract_pipeline, images, work, ["--pairs", pairs])
                row = measure(name, f"sp-extract --pairs {pairs}", run, images)
                row["pairs"] = len((work / "pairs.txt").read_text().splitlines())
                rows.append(row)
                print(markdown([row]).splitlines()[2], f"{row['pairs']} pairs", file=sys.stderr, flush=True)
    print(markdown(rows))
    print(
        "pairs made: " + ", ".join(f"{row['collection']} {row['pipeline']}: {row['pairs']}" for row in rows)
    )
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
