"""Huge images at native size: peak memory (max RSS) and throughput, tiled against untiled.

Usage: python benchmarks/huge_images.py [--sizes 12,50,100] [--untiled 12] [--json results.json]

For each size (Mpx) a 4:3 JPEG is made from a shared photo (mirrored and repeated, so it has
real texture everywhere), then ``sp-extract IMAGE_DIR --resize-max 0`` runs on it in its own
process under ``/usr/bin/time -v`` on the CPU: with the default ``--tile auto`` and, for the sizes
in --untiled (where the whole-image forward fits in memory), with ``--tile 0``. Reported: the
process's maximum resident set size, the run's wall time (model loading included) and Mpx/s
(image pixels / wall time of the run's extraction, from its JSON report). The 2 cores of a shared
machine make times noisy: the untiled baseline runs right after the tiled run of its size.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def make_photo(path: Path, megapixels: float) -> tuple[int, int]:
    """A 4:3 JPEG of about ``megapixels`` Mpx made of a real photo, mirrored and repeated."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5) // 8 * 8
    height = width * 3 // 4 // 8 * 8
    photo = cv2.imread(str(sorted((SHARED / "data" / "sacre_coeur").glob("*.jpg"))[0]))
    block = np.concatenate([photo, photo[:, ::-1]], axis=1)
    block = np.concatenate([block, block[::-1]], axis=0)
    reps = (-(-height // block.shape[0]), -(-width // block.shape[1]), 1)
    image = np.tile(block, reps)[:height, :width]
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return width, height


def run(folder: Path, out: Path, tile: str) -> dict:
    """One extraction in its own process; its max RSS, wall time and Mpx/s."""
    report = out.with_suffix(".json")
    command = [
        "/usr/bin/time", "-v", sys.executable, "-m", "sp_extract", str(folder), "--out", str(out),
        "--resize-max", "0", "--device", "cpu", "--tile", tile, "-q", "--overwrite",
        "--weights", str(SHARED / "weights" / "superpoint_v1.pth"), "--json-report", str(report),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1]}
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    elapsed = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    hours, minutes, seconds = (float(v) if v else 0.0 for v in elapsed.groups())
    data = json.loads(report.read_text())
    return {
        "max_rss_gib": round(rss_kb / 2**20, 2),
        "process_s": round(3600 * hours + 60 * minutes + seconds, 1),
        "extract_s": round(data["wall_time_s"], 1),
        "keypoints": data["keypoints_per_image"]["max"],
        "tiled": data.get("tiled", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="12,50,100", help="image sizes in Mpx")
    parser.add_argument("--untiled", default="12", help="sizes also run with --tile 0")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (float(s) for s in args.sizes.split(",")):
            folder = Path(tmp) / f"{size:g}mpx"
            width, height = make_photo(folder / "photo.jpg", size)
            tiles = ["auto"] + (["0"] if f"{size:g}" in args.untiled.split(",") else [])
            for tile in tiles:
                result = run(folder, Path(tmp) / f"{size:g}-{tile}.h5", tile)
                megapixels = width * height / 1e6
                if "extract_s" in result:
                    result["mpx_per_s"] = round(megapixels / result["extract_s"], 3)
                row = {"mpx": round(megapixels, 1), "size": f"{width}x{height}", "tile": tile}
                rows.append({**row, **result})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'image':>18} {'tile':>5} {'max RSS GiB':>12} {'extract s':>10} {'Mpx/s':>7} {'tiled':>6}")
    for row in rows:
        if "error" in row:
            print(f"{row['size']:>18} {row['tile']:>5}  failed: {row['error']}")
            continue
        print(
            f"{row['size']:>18} {row['tile']:>5} {row['max_rss_gib']:>12.2f} {row['extract_s']:>10.1f} "
            f"{row['mpx_per_s']:>7.3f} {row['tiled']:>6}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
