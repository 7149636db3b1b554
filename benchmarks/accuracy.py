"""COLMAP's own SIFT pipeline against ``sp-extract sfm`` on the same photos: one run of each.

Usage: python benchmarks/accuracy.py [--subset fox-50,fox-13,fox-9,sacre] [--sfm-args "..."] [--json FILE]

- SIFT: pycolmap's ``extract_features``, ``match_exhaustive`` and ``incremental_mapping`` on the
  CPU with COLMAP's default options (its camera mode ``AUTO``, all threads);
- sp-extract: ``sp-extract sfm`` with its defaults (real weights, CPU), plus ``--sfm-args``.

Collections (folders of symbolic links to ../shared/data): fox-50 (all 50 fox frames), fox-13
(every 4th), fox-9 (every 6th), sacre (the 10 Sacre Coeur photos, which have no reference poses:
registered, points and errors only). A markdown table row per collection and pipeline: registered
images, 3D points, mean reprojection error, mean track length of the largest model, pose AUC at
1/2/5/10 degrees against ``fox/transforms.json`` (``evaluate poses``, the collection's frames only)
and end-to-end seconds. The fox reference poses were made by COLMAP with SIFT (from all 67 frames):
a reference, not ground truth, and close to the SIFT pipeline by construction. The machine's other
processes are not controlled: report times from a loaded machine as such.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pycolmap

from sp_extract.inspect.poses import AUC_THRESHOLDS, evaluate_poses
from sp_extract.sfm.environment import colmap_logging

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "superpoint_v1.pth"
FOX = SHARED / "data" / "fox"
REFERENCE = FOX / "transforms.json"
COLLECTIONS: dict[str, tuple[Path, int, bool]] = {  # folder, every k-th photo, has reference poses
    "fox-50": (FOX, 1, True),
    "fox-13": (FOX, 4, True),
    "fox-9": (FOX, 6, True),
    "sacre": (SHARED / "data" / "sacre_coeur", 1, False),
}
COLUMNS = ["collection", "pipeline", "registered", "3D points", "reproj. error (px)", "track length"]
COLUMNS += [f"AUC@{t:g}" for t in AUC_THRESHOLDS] + ["seconds"]


def linked_photos(name: str, root: Path) -> Path:
    """A folder of symbolic links to every k-th photo of a collection."""
    source, step, _ = COLLECTIONS[name]
    folder = root / name / "images"
    folder.mkdir(parents=True)
    for path in sorted(source.glob("*.jpg"))[::step]:
        (folder / path.name).symlink_to(path)
    return folder


def sift_pipeline(images: Path, work: Path) -> Path:
    """COLMAP's SIFT pipeline with default options, CPU; the folder of its largest model."""
    database, sparse = work / "database.db", work / "sparse"
    sparse.mkdir(parents=True)
    with colmap_logging(verbose=False):
        pycolmap.extract_features(database, images, device=pycolmap.Device.cpu)
        pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
        models = pycolmap.incremental_mapping(database, images, sparse)
    if not models:
        raise RuntimeError(f"{images}: COLMAP built no model")
    largest = max(models, key=lambda index: models[index].num_reg_images())
    return sparse / str(largest)


def sp_extract_pipeline(images: Path, work: Path, extra: list[str]) -> Path:
    """``sp-extract sfm`` (defaults, CPU, real weights, plus ``extra``); its largest model."""
    command = [sys.executable, "-m", "sp_extract", "sfm", str(images), str(work), "--weights", str(WEIGHTS)]
    result = subprocess.run([*command, "--device", "cpu", "-q", *extra], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sp-extract sfm failed ({result.returncode}): {result.stderr.strip()}")
    return work / "sparse" / "0"


def measure(name: str, pipeline: str, run: Callable[[], Path], images: Path) -> dict:
    """One pipeline's run on one collection: the model's statistics, pose AUC and wall time."""
    started = time.perf_counter()
    folder = run()
    seconds = time.perf_counter() - started
    model = pycolmap.Reconstruction(folder)
    row = {
        "collection": name,
        "pipeline": pipeline,
        "photos": len(list(images.iterdir())),
        "registered": model.num_reg_images(),
        "points3D": model.num_points3D(),
        "reprojection_error_px": model.compute_mean_reprojection_error(),
        "track_length": model.compute_mean_track_length(),
        "auc": None,
        "seconds": round(seconds, 1),
    }
    if COLLECTIONS[name][2]:
        row["auc"] = evaluate_poses(folder, REFERENCE, images).auc
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        auc = [f"{row['auc'][f'{t:g}']:.1f}" if row["auc"] else "-" for t in AUC_THRESHOLDS]
        cells = [
            row["collection"],
            row["pipeline"],
            f"{row['registered']}/{row['photos']}",
            str(row["points3D"]),
        ]
        cells += [
            f"{row['reprojection_error_px']:.3f}",
            f"{row['track_length']:.2f}",
            *auc,
            f"{row['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chosen_subset(parser: argparse.ArgumentParser, subset: str, known: dict) -> list[str]:
    """The comma-separated collection names of ``--subset``; an unknown one is a usage error."""
    names = subset.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"--subset: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", default=",".join(COLLECTIONS), help="Collections, comma-separated.")
    parser.add_argument("--sfm-args", default="", help="Extra arguments of 'sp-extract sfm', one string.")
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON to this file.")
    args = parser.parse_args()
    names = chosen_subset(parser, args.subset, COLLECTIONS)
    extra = shlex.split(args.sfm_args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            images = linked_photos(name, Path(tmp))
            work = images.parent
            sift = functools.partial(sift_pipeline, images, work / "sift")
            rows.append(measure(name, "COLMAP SIFT", sift, images))
            ours = functools.partial(sp_extract_pipeline, images, work / "sp", extra)
            rows.append(measure(name, "sp-extract", ours, images))
            print("\n".join(markdown(rows[-2:]).splitlines()[2:]), file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"sfm_args": extra, "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
