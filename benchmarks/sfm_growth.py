"""``sp-extract sfm``: the cost of a nightly run that adds photos, against a full run, per stage.

Usage: python benchmarks/sfm_growth.py [--sizes 40 120] [--new 4 16] [--skip-photos] [--json FILE]

- photos: the 10 shared photos (../shared/data/sacre_coeur): a full run on all 10 against a
  run on 8 followed by a run that adds the other 2 (the second run's stages timed);
- scale simulation: collections of --sizes images rendered from a made-up street (``render``):
  a wall of photo panels and pillars in front of it (the shared photos as textures), seen by
  cameras at random places along it, so views have real parallax. Each size is mapped in full
  (pairs retrieval:10), then copies of that work folder grow by each of --new views, timed per
  stage.

What the simulation shows is cost, not reconstruction quality: textured planes are not a real
collection (registration counts are printed, not judged). The machine's other processes
are not controlled: figures from a loaded machine say so in README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from sp_extract.sfm.pipeline import STAGES, SfmOptions, run_sfm

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "superpoint_v1.pth"
PHOTOS = SHARED / "data" / "sacre_coeur"


def timed_run(images: Path, work: Path, **options: object) -> dict:
    """One ``run_sfm``: its stage times, wall time, and what it registered."""
    started = time.perf_counter()
    summary = run_sfm(images, work, SfmOptions(weights=str(WEIGHTS), device="cpu", **options))
    return {
        "wall_s": round(time.perf_counter() - started, 2),
        "stages_s": summary.stage_times_s,
        "mode": summary.mode,
        "new_images": summary.new_images,
        "new_pairs": summary.new_pairs,
        "registered": summary.registered,
        "database_images": summary.database_images,
        "exit_code": summary.exit_code,
    }


def photos_benchmark(root: Path) -> dict:
    names = sorted(path.name for path in PHOTOS.glob("*.jpg"))
    full_images, grow_images = root / "all", root / "grow"
    for folder, chosen in ((full_images, names), (grow_images, names[:8])):
        folder.mkdir()
        for name in chosen:
            shutil.copy2(PHOTOS / name, folder / name)
    full = timed_run(full_images, root / "work-full")
    first = timed_run(grow_images, root / "work-grow")
    for name in names[8:]:
        shutil.copy2(PHOTOS / name, grow_images / name)
    grown = timed_run(grow_images, root / "work-grow")
    return {"full_10": full, "first_8": first, "grow_8_to_10": grown}


def textures() -> list[np.ndarray]:
    """The shared photos (sacre_coeur, then scannet_sample), as the scene's textures."""
    paths = sorted(PHOTOS.glob("*.jpg")) + sorted((SHARED / "data" / "scannet_sample").glob("*.jpg"))
    return [cv2.imread(str(path)) for path in paths]


def scene_planes(images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """A street: a wall of 10 photo panels (4 x 5 m) at z = 8 m and 8 pillars (1.2 x 5 m,
    other photos) at z = 4 m; each plane as (corner, width vector, height vector, texture)."""
    planes = []
    for i in range(10):
        planes.append(
            (np.array([4.0 * i, -2.5, 8.0]), np.array([4.0, 0, 0]), np.array([0, 5.0, 0]), images[i])
        )
    for i in range(8):
        texture = images[10 + 3 * i]
        planes.append(
            (np.array([2.5 + 5.0 * i, -2.5, 4.0]), np.array([1.2, 0, 0]), np.array([0, 5.0, 0]), texture)
        )
    return planes


def render(planes: list, centre: np.ndarray, yaw: float, size: tuple[int, int] = (480, 360)) -> np.ndarray:
    """The view of a pinhole camera (focal 400 px) at ``centre`` turned by ``yaw`` (radians)
    about the vertical: each plane warped by its homography, far to near."""
    width, height = size
    intrinsics = np.array([[400.0, 0, width / 2], [0, 400.0, height / 2], [0, 0, 1]])
    c, s = np.cos(yaw), np.sin(yaw)
    rotation = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])  # world to camera
    view = np.full((height, width, 3), 128, np.uint8)
    order = sorted(planes, key=lambda plane: -np.linalg.norm(plane[0] + plane[1] / 2 - centre))
    for corner, along, down, texture in order:
        th, tw = texture.shape[:2]
        columns = np.stack([rotation @ along / tw, rotation @ down / th, rotation @ (corner - centre)], 1)
        corners = [corner + a * along + b * down - centre for a in (0, 1) for b in (0, 1)]
        if min((rotation @ point)[2] for point in corners) < 0.5:  # behind or at the camera
            continue
        homography = intrinsics @ columns
        warped = cv2.warpPerspective(texture, homography, size, flags=cv2.INTER_AREA)
        mask = cv2.warpPerspective(np.full((th, tw), 255, np.uint8), homography, size)
        view[mask > 127] = warped[mask > 127]
    return view


def make_views(folder: Path, start: int, count: int, seed: int) -> None:
    """``count`` views ``view-NNNNN.jpg`` from ``start`` on, of cameras at random places along
    the street (x 2-38 m, height and distance jittered, yaw within 8 degrees)."""
    rng = np.random.default_rng(seed)
    planes = scene_planes(textures())
    folder.mkdir(exist_ok=True)
    for index in range(start, start + count):
        centre = np.array([rng.uniform(2, 38), rng.uniform(-0.3, 0.3), rng.uniform(-1.0, 1.0)])
        view = render(planes, centre, np.radians(rng.uniform(-8, 8)))
        cv2.imwrite(str(folder / f"view-{index:05d}.jpg"), view, [cv2.IMWRITE_JPEG_QUALITY, 92])


def scale_benchmark(root: Path, sizes: list[int], new_counts: list[int]) -> list[dict]:
    options = {"pairs": "retrieval:10"}
    rows = []
    for size in sizes:
        images, work = root / f"views-{size}", root / f"work-{size}"
        make_views(images, 0, size, seed=size)
        full = timed_run(images, work, **options)
        rows.append({"size": size, "new": size, "run": "full", **full})
        print(f"{size} images, full run: {full}", flush=True)
        for count in new_counts:
            grown_images, grown_work = root / f"views-{size}+{count}", root / f"work-{size}+{count}"
            shutil.copytree(images, grown_images)
            shutil.copytree(work, grown_work)
            make_views(grown_images, size, count, seed=10_000 + size + count)
            grown = timed_run(grown_images, grown_work, **options)
            rows.append({"size": size, "new": count, "run": "grow", **grown})
            print(f"{size} images + {count}: {grown}", flush=True)
            shutil.rmtree(grown_images)
            shutil.rmtree(grown_work)
    return rows


def stage_cells(result: dict) -> str:
    return " | ".join(f"{result['stages_s'].get(stage, 0.0):.1f}" for stage in STAGES)


def print_tables(photos: dict | None, rows: list[dict]) -> None:
    header = "| run | " + " | ".join(f"{stage} (s)" for stage in STAGES) + " | total (s) | registered |"
    rule = "|" + "---|" * (len(STAGES) + 3)
    if photos:
        print("\nShared photos (10):\n" + header + "\n" + rule)
        for label, key in (("full run on 10", "full_10"), ("first run on 8", "first_8"),
                           ("grow run 8 -> 10", "grow_8_to_10")):  # fmt: skip
            result = photos[key]
            print(f"| {label} | {stage_cells(result)} | {result['wall_s']:.1f} | "
                  f"{result['registered']}/{result['database_images']} |")  # fmt: skip
    if rows:
        print("\nScale simulation (rendered street views, pairs retrieval:10):\n" + header + "\n" + rule)
        for row in rows:
            label = (
                f"{row['size']} images, full" if row["run"] == "full" else f"{row['size']} + {row['new']} new"
            )
            print(f"| {label} | {stage_cells(row)} | {row['wall_s']:.1f} | "
                  f"{row['registered']}/{row['database_images']} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[40, 120])
    parser.add_argument("--new", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--skip-photos", action="store_true", help="Only the scale simulation.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sfm-growth-") as folder:
        root = Path(folder)
        photos = None if args.skip_photos else photos_benchmark(root)
        rows = scale_benchmark(root, args.sizes, args.new)
    print_tables(photos, rows)
    if args.json:
        args.json.write_text(json.dumps({"photos": photos, "scale": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
