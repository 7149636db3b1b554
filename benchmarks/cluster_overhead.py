"""Per-shard overhead of sharded runs (issue 12): what a shard costs besides its images.

Usage: python benchmarks/cluster_overhead.py [--photos ../shared/data/sacre_coeur]
       [--weights ../shared/weights/superpoint_v1.pth] [--copies 20] [--repeats 3]

Measured on the CPU, medians over --repeats, in one run:

- baseline: extracting the photos at the default settings (seconds per image, warm process);
- start-up of an array task: a fresh ``sp-extract extract --shard K/N`` process on a shard
  holding no image (Python, imports, weights, network backend, lock, store), minus nothing;
- start-up of a Dask task: the same in a warm process (the worker's imports are paid once);
- merge: ``merge`` of a store of --copies x the photos' entries (real keypoint counts), per
  entry, through the store writer (read and verify, copy into parts, fold); beside it, as the
  baseline, the way merge wrote before (each entry decoded and written again through
  ``StoreWriter.add``, parts of 64 entries), alternated with it --repeats times.

The README's shard size follows: a shard of n images costs ``n / rate`` on a GPU worker plus
the start-up; the merge is paid per image, on one machine, whatever the shard size.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

from sp_extract.extraction.config import ExtractRun
from sp_extract.extraction.pipeline import extract
from sp_extract.shards import Shard
from sp_extract.store.catalog import read_store
from sp_extract.store.merge import merge_stores, read_entry
from sp_extract.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[1]


def empty_shard(photos: Path, count: int = 1000) -> Shard:
    """A shard of ``count`` holding none of the photos (start-up alone)."""
    names = [p.name for p in photos.iterdir()]
    return next(
        s for k in range(1, count + 1) if not any((s := Shard(k, count)).holds_image(n) for n in names)
    )


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def decoded_merge(source: Path, out: Path, prefixes: tuple[str, ...] = ("",)) -> None:
    """``source``'s entries (once per prefix of their names) written into ``out`` as ``merge``
    wrote them before it copied them as HDF5 objects: each read into numpy and added again
    through ``StoreWriter.add``, at the writer's default part size. The merge baseline."""
    info = read_store(source, "features")
    with h5py.File(source, "r") as h5, StoreWriter(out, "features", info.settings) as writer:
        for prefix in prefixes:
            for name in info.names:
                writer.add(prefix + name, *read_entry(h5[name]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "sacre_coeur")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "superpoint_v1.pth"))
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sp-cluster-bench-"))
    count = len(list(args.photos.iterdir()))
    shard = empty_shard(args.photos)
    runs = iter(range(10**6))

    per_image = timed(
        lambda: extract(args.photos, work / f"base{next(runs)}.h5", run=ExtractRun(args.weights)),
        args.repeats,
    )
    per_image /= count
    warm = timed(
        lambda: extract(
            args.photos, work / f"warm{next(runs)}.h5", run=ExtractRun(args.weights, shard=shard)
        ),
        args.repeats,
    )
    command = [sys.executable, "-m", "sp_extract", str(args.photos), "--weights", args.weights, "-q"]
    cold = timed(
        lambda: subprocess.run(
            [*command, "--out", str(work / f"cold{next(runs)}.h5"), "--shard", str(shard)],
            check=True,
            capture_output=True,
        ),
        args.repeats,
    )
    source = work / "base0.h5"
    copies = work / "copies.h5"
    decoded_merge(source, copies, tuple(f"copy{copy}/" for copy in range(args.copies)))
    entries = len(read_store(copies, "features").names)
    decoded, merge = [], []
    for _ in range(args.repeats):  # alternated, so that both see the same load
        decoded.append(timed(lambda: decoded_merge(copies, work / f"decoded{next(runs)}.h5"), 1) / entries)
        merge.append(timed(lambda: merge_stores(work / f"merged{next(runs)}.h5", [copies]), 1) / entries)
    decoded, merge = statistics.median(decoded), statistics.median(merge)

    print(f"{'what':44} {'seconds':>9}")
    print(f"{'baseline: extract, per image (CPU)':44} {per_image:9.3f}")
    print(f"{'start-up, array task (fresh process)':44} {cold:9.3f}")
    print(f"{'start-up, Dask task (warm process)':44} {warm:9.3f}")
    print(f"{'merge, per entry, decoded (before)':44} {decoded:9.5f}")
    print(f"{'merge, per entry':44} {merge:9.5f}")
    print(f"{'merge speed-up':44} {decoded / merge:8.2f}x")
    for rate in (100, 200, 400):
        for startup, label in ((cold, "array task"), (warm, "Dask task")):
            # start-up share of a shard of n images: startup / (n / rate) <= 5%
            print(
                f"GPU at {rate} images/s, {label}: shards of >= {20 * startup * rate:,.0f} images for <= 5%"
            )
        # the merge is paid per image, once, on one machine, after the shards: it grows with the
        # workers whose output it merges, not with the shard size
        print(f"GPU at {rate} images/s: merge time / extraction time = {merge * rate:.2f} x workers")


if __name__ == "__main__":
    main()
