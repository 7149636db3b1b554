"""Store opening benchmark: how long every command that reads a store takes to learn its entry
names (``read_store``: match-pairs, pairs, colmap, merge, retrieval), on synthetic feature
stores made by copying real entries under new names (``scale.synthetic_store``).

Usage: python benchmarks/store_open.py [--sizes 1000 20000 100000] [--max-keypoints 64]

For each size: the names listed with the help of the store's sidecar name index (this version)
against the baseline of the same run, the same store with its index removed, which is walked
and checked entry by entry (what every such command did before). Each timing is the best of
--repeats runs in this process; the store is in the page cache (it was just written).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from scale import real_store, synthetic_store

from sp_extract.store.catalog import read_store
from sp_extract.store.index import index_path, load_index


def best_time(store: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read_store(store, "features")
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000, 100000])
    parser.add_argument("--max-keypoints", type=int, default=64, help="Of the real entries copied.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'entries':>9} {'with index (s)':>15} {'walked (s)':>11} {'ratio':>7}")
    with tempfile.TemporaryDirectory(prefix="sp-open-") as folder:
        work = Path(folder)
        real = real_store(work, args.max_keypoints)
        for size in args.sizes:
            store = synthetic_store(real, work / f"s{size}.h5", size)
            assert load_index(store) is not None
            indexed = best_time(store, args.repeats)
            index_path(store).rename(work / "kept.index")  # the baseline: no index, walked
            walked = best_time(store, args.repeats)
            store.unlink()
            print(f"{size:>9} {indexed:>15.3f} {walked:>11.2f} {walked / indexed:>7.0f}")


if __name__ == "__main__":
    main()
