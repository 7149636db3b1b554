"""COLMAP's incremental mapper against its global mapper (GLOMAP) on the same databases: the map
stage alone, and the growth of a globally mapped model.

Usage: python benchmarks/mapper.py [--subset sacre,fox-9,...] [--work DIR] [--no-growth] [--json FILE]

Collections (folders of symbolic links to ../shared/data): sacre (the 10 Sacre Coeur photos),
fox-9 / fox-13 / fox-25 / fox-50 (every 6th, 4th, 2nd, every fox frame), all-90 (Sacre Coeur,
ScanNet and every fox frame together: one scene of 50 frames, one of 10 photos, 15 rooms of 2).
Each database is built once by ``sp-extract sfm`` (defaults, CPU, real weights) in ``--work``,
which a later run reuses; each mapper then runs on it in this process through
``sp_extract.sfm.mappers.run_mapper`` (what ``reconstruct`` and ``sfm`` run in their child),
with COLMAP's default options, all threads, seed 0, and only that call is timed. Per collection
and mapper: map seconds, images registered in any model (and the largest model's), its 3D points
and mean reprojection error, pose AUC at 1/2/5 degrees of the fox frames against
``fox/transforms.json`` (``evaluate poses``: pairs with an unregistered frame count as failures),
and the images incremental registered that global did not.

Growth (on fox-50's database, limited to frames by the mappers' ``image_names``): the first 25
frames mapped globally, then the next K registered into that model by the incremental mapper with
its final bundle adjustment (``input_path``, what ``sfm`` does on growing), against the global
mapper solving the 25 + K frames afresh: map seconds and AUC of the 25 + K frames, K in 3, 5,
10, 15, 25 (``GLOBAL_RESOLVE_SHARE`` in ``sp_extract/sfm/config.py`` comes from it).

The machine's other processes are not controlled: times from a loaded machine must say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pycolmap
from accuracy import chosen_subset  # benchmarks/: run as scripts, this folder first on the path

from sp_extract.inspect.poses import evaluate_poses
from sp_extract.sfm.config import MAPPERS, ColmapRun, MapperOptions
from sp_extract.sfm.environment import colmap_logging
from sp_extract.sfm.mappers import global_options, run_mapper

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = ROOT.parent / "shared" / "weights" / "superpoint_v1.pth"
FOX, SACRE, SCANNET = SHARED / "fox", SHARED / "sacre_coeur", SHARED / "scannet_sample"
REFERENCE = FOX / "transforms.json"
AUC = ("1", "2", "5")


def photos(folder: Path, step: int = 1) -> list[Path]:
    return sorted(folder.glob("*.jpg"))[::step]


COLLECTIONS = {
    "sacre": lambda: photos(SACRE),
    "fox-9": lambda: photos(FOX, 6),
    "fox-13": lambda: photos(FOX, 4),
    "fox-25": lambda: photos(FOX, 2),
    "fox-50": lambda: photos(FOX),
    "all-90": lambda: photos(SACRE) + photos(SCANNET) + photos(FOX),
}
GROWTH_FIRST, GROWTH_ADDED = 25, (3, 5, 10, 15, 25)


def linked(folder: Path, paths: list[Path]) -> Path:
    """``folder`` holding symbolic links to ``paths`` (made once, kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        link = folder / path.name
        if not link.is_symlink():
            link.symlink_to(path)
    return folder


def sfm(images: Path, work: Path, *extra: str) -> None:
    """``sp-extract sfm`` on the CPU with the real weights; resumes what ``work`` holds."""
    command = [sys.executable, "-m", "sp_extract", "sfm", str(images), str(work), "--weights", str(WEIGHTS)]
    result = subprocess.run(
        [*command, "--device", "cpu", "-q", "--no-report", *extra], capture_output=True, text=True
    )
    if result.returncode not in (0, 1):  # 1: some image unregistered, which the table shows
        raise RuntimeError(f"sp-extract sfm {images} failed ({result.returncode}): {result.stderr.strip()}")


def fox_auc(model: Path, images: Path) -> dict[str, float] | None:
    """Pose AUC of the fox frames among ``images`` in ``model``, None without fox frames."""
    if not any(path.name in {p.name for p in photos(FOX)} for path in images.iterdir()):
        return None
    return evaluate_poses(model, REFERENCE, images).auc


def map_once(
    database: Path, images: Path, mapper: str, out: Path, options: MapperOptions | None = None
) -> dict:
    """One mapper on ``database`` (with its defaults unless ``options``), timed alone; the row of
    the table."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    models = run_mapper(database, images, out, mapper, options or MapperOptions(mapper=mapper), ColmapRun())
    seconds = time.perf_counter() - started
    registered = {m.images[i].name for m in models.values() for i in m.reg_image_ids()}
    row = {"mapper": mapper, "seconds": round(seconds, 2), "registered": sorted(registered)}
    if not models:
        return {**row, "largest": 0, "points3D": 0, "reprojection_error_px": None, "auc": None}
    index, largest = max(models.items(), key=lambda item: item[1].num_reg_images())  # in out/INDEX
    return {
        **row,
        "largest": largest.num_reg_images(),
        "points3D": largest.num_points3D(),
        "reprojection_error_px": round(largest.compute_mean_reprojection_error(), 3),
        "auc": fox_auc(out / str(index), images),
    }


def database_of(name: str, work: Path) -> tuple[Path, Path, int]:
    """A collection's database (built by ``sp-extract sfm`` unless ``work`` holds it), its photos'
    folder and their number."""
    paths = COLLECTIONS[name]()
    images = linked(work / name / "images", paths)
    database = work / name / "sfm" / "database.db"
    if not database.exists():
        sfm(images, work / name / "sfm", "--mapper", "incremental")
    return database, images, len(paths)


def databases_chosen(parser: argparse.ArgumentParser, subset: str) -> tuple[argparse.Namespace, list]:
    """``--subset`` and ``--work`` added to ``parser`` (the benchmarks that reuse this script's
    databases), the arguments parsed; and each chosen collection's name, database and photos."""
    parser.add_argument("--subset", default=subset, help="Collections, comma-separated.")
    parser.add_argument("--work", type=Path, default=Path("mapper-work"), help="mapper.py's databases.")
    args = parser.parse_args()
    chosen = chosen_subset(parser, args.subset, COLLECTIONS)
    return args, [(name, *database_of(name, args.work)[:2]) for name in chosen]


def collection_rows(name: str, work: Path) -> list[dict]:
    database, images, count = database_of(name, work)
    rows = [
        {"collection": name, "photos": count, **map_once(database, images, m, work / name / m)}
        for m in MAPPERS
    ]
    missed = set(rows[0]["registered"]) - set(rows[1]["registered"])
    rows[1]["missed"] = sorted(missed)
    return rows


def limited_map(database: Path, images: Path, out: Path, names: list[str], previous: str = "") -> tuple:
    """The largest model's folder in ``out`` and the seconds of the global mapper (or, continuing
    ``previous``, the incremental mapper) on the images ``names`` of ``database``."""
    out.mkdir(parents=True)
    started = time.perf_counter()
    if previous:
        options = pycolmap.IncrementalPipelineOptions()
        options.image_names, options.random_seed = names, 0
        models = pycolmap.incremental_mapping(database, images, out, options, input_path=previous)
    else:
        options = global_options(MapperOptions(mapper="global"), ColmapRun())
        options.image_names = names
        models = pycolmap.global_mapping(database, images, out, options)
    seconds = time.perf_counter() - started
    index = max(models, key=lambda i: models[i].num_reg_images())
    models[index].write(linked(out / str(index), []))  # continuing writes no folder of its own
    return out / str(index), seconds


def growth_rows(work: Path) -> list[dict]:
    """The growth measurement (module doc), after fox-50's database is built."""
    database, rows = database_of("fox-50", work)[0], []
    frames = [path.name for path in photos(FOX)]
    root = work / "growth"
    shutil.rmtree(root, ignore_errors=True)
    with colmap_logging(verbose=False):
        first, _ = limited_map(database, FOX, root / "first", frames[:GROWTH_FIRST])
        for added in GROWTH_ADDED:
            names = frames[: GROWTH_FIRST + added]
            images = linked(root / f"images-{added}", [FOX / name for name in names])
            continued = limited_map(database, FOX, root / f"continued-{added}", names, str(first))
            fresh = limited_map(database, FOX, root / f"fresh-{added}", names)
            rows.append({
                "first": GROWTH_FIRST,
                "added": added,
                "continued_auc": evaluate_poses(continued[0], REFERENCE, images).auc,
                "continued_seconds": round(continued[1], 2),
                "fresh_auc": evaluate_poses(fresh[0], REFERENCE, images).auc,
                "fresh_seconds": round(fresh[1], 2),
            })  # fmt: skip
    return rows


def auc_cells(auc: dict[str, float] | None) -> list[str]:
    return [f"{auc[t]:.1f}" if auc else "-" for t in AUC]


def markdown(rows: list[dict], growth: list[dict]) -> str:
    head = ["collection", "mapper", "map s", "registered (largest)", "3D points", "reproj. px"]
    head += [f"AUC@{t}" for t in AUC] + ["missed by global"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row["collection"], row["mapper"], f"{row['seconds']:.2f}"]
        cells += [f"{len(row['registered'])}/{row['photos']} ({row['largest']})", str(row["points3D"])]
        cells += [str(row["reprojection_error_px"]), *auc_cells(row["auc"])]
        cells.append(", ".join(row.get("missed", [])) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    if growth:
        head = ["fox frames", "continued AUC@1/2/5", "map s", "global afresh AUC@1/2/5", "map s"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for row in growth:
            cells = [f"{row['first']} + {row['added']}", " / ".join(auc_cells(row["continued_auc"]))]
            cells += [f"{row['continued_seconds']:.2f}", " / ".join(auc_cells(row["fresh_auc"]))]
            cells.append(f"{row['fresh_seconds']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", default=",".join(COLLECTIONS), help="Collections, comma-separated.")
    parser.add_argument("--work", type=Path, help="Folder for the databases, kept for later runs.")
    parser.add_argument("--no-growth", action="store_true", help="Skip the growth measurement.")
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON to this file.")
    args = parser.parse_args()
    names = chosen_subset(parser, args.subset, COLLECTIONS)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = []
        for name in names:
            rows += collection_rows(name, work)
            print(markdown(rows[-2:], []), file=sys.stderr, flush=True)
        growth = [] if args.no_growth else growth_rows(work)
    print(markdown(rows, growth))
    if args.json:
        report = {"cpus": os.cpu_count(), "rows": rows, "growth": growth}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
