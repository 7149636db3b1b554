"""Consecutive default `sp-extract sfm` runs under CPU load: none may hang or take far longer.

Each run builds the model of the shared Sacre Coeur photos from scratch in a new work folder,
exactly as README writes the command (default threads, size and options), while ``--load``
busy processes keep the cores occupied. A run over ``--limit`` seconds is killed and counted as
a hang (the old forked COLMAP child waited for ever in 3 of 11 runs).

    python benchmarks/sfm_soak.py --runs 20 --load 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repeatability import SHARED, SPIN


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "sacre_coeur")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "superpoint_v1.pth"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the runs")
    parser.add_argument("--limit", type=float, default=900, help="seconds before a run counts as hung")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sp-soak-"))
    environment = {**os.environ, "SP_EXTRACT_WEIGHTS": args.weights}
    load = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.load)]
    rows = []
    try:
        for run in range(args.runs):
            work, report = root / f"work{run}", root / f"report{run}.json"
            command = ["sp-extract", "sfm", str(args.images), str(work), "--json-report", str(report), "-q"]
            started = time.monotonic()
            try:
                code = subprocess.run(
                    command, env=environment, capture_output=True, timeout=args.limit
                ).returncode
            except subprocess.TimeoutExpired:
                code = "hung"
            took = time.monotonic() - started
            models = json.loads(report.read_text())["models"] if report.exists() else []
            registered = max((model["registered_images"] for model in models), default=0)
            rows.append((run, code, registered, took))
            print(*rows[-1], file=sys.stderr)
    finally:
        for process in load:
            process.kill()
    times = [took for *_, took in rows]
    median = statistics.median(times)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.load} busy processes beside the runs\n")  # fmt: skip
    print("| run | exit | registered | time s | / median |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for run, code, registered, took in rows:
        print(f"| {run} | {code} | {registered} | {took:.1f} | {took / median:.2f} |")
    hung = sum(code == "hung" for _, code, _, _ in rows)
    longest = max(times) / median
    print(f"\n{len(rows)} runs, {hung} hung; median {median:.1f} s, longest {longest:.2f}x the median")


if __name__ == "__main__":
    main()
