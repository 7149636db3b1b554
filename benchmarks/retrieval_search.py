"""Retrieval search benchmark: the exact similarity search of ``pairs retrieval`` (low-precision
screening with a proven bound, exact re-scoring: ``sp_extract/pairs/search.py``) against the
plain float32 blockwise search it replaces (baseline, in this script), same vectors, same run.

Usage: python benchmarks/retrieval_search.py [--sizes 10000 100000] [-k 10]
       [--features feats.h5] [--baseline-queries 8192] [--queries N] [--device cpu] [--random]

Vectors: n unit vectors of 4096 dimensions, float16 as the index stores them, made VLAD-like
from the real VLAD vectors of ``--features`` (its ``.retrieval`` folder; without it the vectors
are random): scenes of about 10 images around a random mix of the real vectors, so that
unrelated images score about as spread out as real VLADs do, and images of one scene higher.
``--random``: plain random unit vectors instead (the screening's hardest case: every score
within a few hundredths of 0). Each search runs in its own process (peak memory: its
``VmHWM``, the memory-mapped vectors included); the baseline searches the first
``--baseline-queries`` queries only and its time is scaled to all of them (it scans the whole
database for every query block, so its time is linear in the queries); ``--queries`` does the
same for the new search (default: all n). The search is
self-excluded (each image its own query, as ``pairs retrieval``). The result of both is
checked equal (indices; where two float32 scores are within 1e-5, the order may differ).
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DIMENSION = 4096
SCENE = 10


def make_vectors(path: Path, count: int, bases: np.ndarray | None, seed: int = 0) -> None:
    """``count`` VLAD-like (or random) unit vectors, float16, in a .npy file, by chunks."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, "w+", np.float16, (count, DIMENSION))
    for start in range(0, count, 4096):
        rows = min(4096, count - start)
        if bases is None:
            vectors = rng.normal(size=(rows, DIMENSION))
        else:
            scenes = (start + np.arange(rows)) // SCENE
            centre = np.stack([_scene(bases, seed, s) for s in scenes])
            vectors = centre + _mix(bases, rng, rows, 1.2)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        out[start : start + rows] = vectors
    out.flush()


def _mix(bases: np.ndarray, rng: np.random.Generator, rows: int, noise: float) -> np.ndarray:
    """Random combinations of the real vectors plus isotropic noise, each of norm about 1."""
    mixed = rng.normal(size=(rows, len(bases))) @ bases
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    isotropic = rng.normal(size=(rows, DIMENSION)) / np.sqrt(DIMENSION)
    return mixed + noise * isotropic


def _scene(bases: np.ndarray, seed: int, scene: int) -> np.ndarray:
    return _mix(bases, np.random.default_rng((seed, scene)), 1, 1.0)[0]


def baseline_search(vectors: np.ndarray, queries: int, k: int) -> np.ndarray:
    """The plain search this replaces: float32 blocks of 4096 rows, scores block by block, a
    running top-k (concatenation of the block's scores and the best so far)."""
    rows = (64 << 20) // (4 * DIMENSION)
    found = np.empty((queries, k), np.int64)
    for q_start in range(0, queries, rows):
        query = torch.from_numpy(np.asarray(vectors[q_start : min(queries, q_start + rows)], np.float32))
        best_score = torch.full((len(query), k), -torch.inf)
        best_index = torch.full((len(query), k), -1, dtype=torch.int64)
        own = torch.arange(q_start, q_start + len(query))[:, None]
        for d_start in range(0, len(vectors), rows):
            block = torch.from_numpy(np.asarray(vectors[d_start : d_start + rows], np.float32))
            scores = query @ block.T
            columns = torch.arange(d_start, d_start + len(block))
            scores[own == columns[None]] = -torch.inf
            merged_score = torch.cat((best_score, scores), 1)
            merged_index = torch.cat((best_index, columns.expand(len(scores), -1)), 1)
            best_score, top = merged_score.topk(k, dim=1)
            best_index = merged_index.gather(1, top)
        found[q_start : q_start + len(query)] = best_index.numpy()
    return found


def worker(method: str, path: str, queries: int, k: int, device: str, out: str) -> None:
    from sp_extract.pairs import search

    vectors = np.load(path, mmap_mode="r")
    count = len(vectors)
    widths: list[int] = []
    screen = search._screen

    def counting_screen(query, database, kept, *rest):
        widths.append(len(query) * kept)
        return screen(query, database, kept, *rest)

    search._screen = counting_screen
    start = time.perf_counter()
    if method == "baseline":
        found = baseline_search(vectors, queries, k)
    else:
        found, _ = search.exact_search(
            search.VectorSet(lambda rows: vectors[rows], queries, np.arange(queries)),
            search.VectorSet(lambda rows: vectors[rows], count, np.arange(count)), k, device,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    np.save(out + ".npy", found)
    screened = sum(widths) / max(1, queries)
    Path(out + ".json").write_text(
        json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "kept": screened})
    )


def run(method: str, path: Path, queries: int, k: int, device: str, folder: Path) -> dict:
    out = str(folder / f"{method}-{queries}")
    command = [sys.executable, __file__, "--worker", method, str(path), str(queries), str(k), device, out]
    subprocess.run(command, check=True)
    result = json.loads(Path(out + ".json").read_text())
    result["found"] = np.load(out + ".npy")
    return result


def _row(n: int, name: str, timed: int, seconds: float, scale: float, peak: float, kept: str) -> str:
    scaled = " (scaled)" if scale > 1 else ""
    return f"| {n:,} | {name} | {timed:,} | {seconds:,.1f}{scaled} | {peak:,.0f} | {kept} |"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, path, queries, k, device, out = sys.argv[2:8]
        worker(method, path, int(queries), int(k), device, out)
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument(
        "--features", type=Path, help="a store whose .retrieval vectors seed the VLAD-like ones"
    )
    parser.add_argument("--random", action="store_true", help="random unit vectors instead")
    parser.add_argument("--baseline-queries", type=int, default=8192)
    parser.add_argument("--queries", type=int, help="time the new search on these first queries only")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    bases = None
    if args.features and not args.random:
        segments = sorted(glob.glob(str(args.features) + ".retrieval/segment-*.npy"))
        bases = np.concatenate([np.load(s) for s in segments]).astype(np.float64)
        bases -= bases.mean(0)  # the shared part of the real vectors is added by the mixing
    kind = "random" if bases is None else f"VLAD-like ({len(bases)} real vectors)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {kind}")
    print("| n | search | queries timed | seconds (all n queries) | peak MiB | candidates kept per query |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for n in args.sizes:
            path = folder / f"vectors-{n}.npy"
            make_vectors(path, n, bases)
            timed = min(n, args.baseline_queries)
            old = run("baseline", path, timed, args.k, args.device, folder)
            searched = min(n, args.queries or n)
            new = run("exact", path, searched, args.k, args.device, folder)
            scale, new_scale = n / timed, n / searched
            old_seconds, new_seconds = old["seconds"] * scale, new["seconds"] * new_scale
            print(_row(n, "plain float32 (before)", timed, old_seconds, scale, old["peak_mib"], f"{n:,}"))
            kept = f"{new['kept']:.1f}"
            print(_row(n, "screened + exact (now)", searched, new_seconds, new_scale, new["peak_mib"], kept))
            vectors = np.load(path, mmap_mode="r")
            compared = min(timed, searched)
            same = (old["found"][:compared] == new["found"][:compared]).all(1)
            for row in np.flatnonzero(~same):  # differ only where float32 cannot tell
                query = np.asarray(vectors[row], np.float32)
                scores = np.asarray(vectors[old["found"][row]], np.float32) @ query
                exact = np.asarray(vectors[new["found"][row]], np.float64) @ query.astype(np.float64)
                assert np.allclose(np.sort(scores), np.sort(exact), atol=1e-5), row
            print(f"|   | speed-up {old_seconds / new_seconds:.2f}x, {same.sum():,} / "
                  f"{compared:,} rows identical, the others within float32's rounding | | | | |")  # fmt: skip


if __name__ == "__main__":
    main()
