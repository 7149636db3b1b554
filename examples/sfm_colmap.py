"""From a folder of photos to a sparse COLMAP model through sp-extract's Python API.

    python examples/sfm_colmap.py IMAGES_DIR [WORK_DIR] [--subpixel] [--weights W]

The same five steps as examples/sfm_colmap.sh. Needs the COLMAP extra:
pip install 'sp-extract[colmap]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sp_extract import ExtractConfig, ExtractRun, extract
from sp_extract.errors import SpExtractError
from sp_extract.extraction.discover import unpairable
from sp_extract.matching.run import match_pairs
from sp_extract.pairs.core import exhaustive_pairs, source_names, write_pairs
from sp_extract.sfm.colmap import write_database
from sp_extract.sfm.mapping import reconstruct


def run() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", type=Path)
    parser.add_argument("work", type=Path, nargs="?", default=Path("sfm"))
    parser.add_argument("--subpixel", action="store_true", help="sub-pixel keypoint refinement")
    parser.add_argument(
        "--weights", default=None, help="superpoint-v1 (default), superpoint-v6-mit or a file"
    )
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    feats, pairs, matches = work / "feats.h5", work / "pairs.txt", work / "matches.h5"
    database, sparse = work / "database.db", work / "sparse"

    config, run = ExtractConfig(subpixel=args.subpixel), ExtractRun(weights=args.weights)
    summary = extract(args.images, feats, config, run)
    print(*summary.lines(), sep="\n")
    names = source_names(feats, None)
    left_out = set(unpairable(names))  # white space in the name (the summary above warned)
    write_pairs(exhaustive_pairs([name for name in names if name not in left_out]), pairs)
    print(*match_pairs(pairs, feats, matches).lines(), sep="\n")
    print(*write_database(args.images, feats, matches, database).lines(), sep="\n")
    result = reconstruct(database, args.images, sparse, overwrite=True)
    for model in result.models:  # the statistics are also fields, e.g. for a nightly check
        print(
            f"{model.path}: {model.registered_images} images, {model.points3D} points, "
            f"{model.mean_reprojection_error_px:.3f} px"
        )


def main() -> None:
    """``run``, with sp-extract's expected failures (weights not found, no images, a store of
    other settings, pycolmap missing ...) as one line and their exit code, as the CLI does."""
    try:
        run()
    except SpExtractError as error:
        print(f"sfm_colmap.py: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
