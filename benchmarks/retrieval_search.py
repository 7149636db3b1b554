"""Retrieval search benchmark: the searches of ``pairs retrieval`` on the same vectors in the same
run, each in its own process: the exact search of today (bfloat16/float32 screening with a proven
bound, exact re-scoring: ``sp_extract/pairs/search.py``, the baseline), faiss's exact
``IndexFlatIP`` (float32 products) and the approximate index (``sp_extract/store/ann.py``: faiss
HNSW over a 256-dimension projection, candidates scored exactly) with its recall@K against exact.

Usage: python benchmarks/retrieval_search.py [--sizes 10000 100000 1000000] [-k 10]
       [--features feats.h5] [--exact-queries 1024] [--queries 4096] [--flat-up-to 100000]
       [--device cpu] [--random] [--work DIR]

Vectors: n unit vectors of 4096 dimensions, float16 as the index stores them, made VLAD-like
from the real VLAD vectors of ``--features`` (its ``.retrieval`` folder; without it the vectors
are random): scenes of about 10 images around a random mix of the real vectors, so that
unrelated images score about as spread out as real VLADs do, and images of one scene higher.
``--random``: plain random unit vectors instead. The exact searches time their first
``--exact-queries`` queries and the approximate one its first ``--queries`` (drawn at random),
each scaled to all n (the time of a search is linear in its queries; the approximate index's
build, timed apart, is not scaled); faiss's flat index only up to ``--flat-up-to`` vectors (it
holds them in float32: 16 GB at 10^6). Peak memory: the process's ``VmHWM``, the memory-mapped
vectors it touched included. Every search is self-excluded (each image its own query, as
``pairs retrieval``). The exact searches are checked equal (where two float32 scores are within
1e-5 the order may differ); recall@K: the share of the exact K neighbours the approximate search
found, over the queries both searched; one query: the median time of one new image's search.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sp_extract.store import ann

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


def _timed_queries(n: int, count: int) -> np.ndarray:
    """``count`` query positions drawn from ``n`` (all of them if fewer), sorted; those of a
    smaller count are among them (the first of one fixed permutation)."""
    return np.sort(np.random.default_rng(1).permutation(n)[:count])


def worker(method: str, path: str, queries: int, k: int, device: str, out: str) -> dict:
    from sp_extract.pairs import search

    vectors = np.load(path, mmap_mode="r")
    count = len(vectors)
    timed = _timed_queries(count, queries)

    def read(rows) -> np.ndarray:
        return np.asarray(vectors[np.asarray(rows)], np.float32)

    query_set = search.VectorSet(lambda rows: read(timed[rows]), len(timed), timed)
    database = search.VectorSet(read, count, np.arange(count))
    result: dict = {}
    start = time.perf_counter()
    if method == "exact":
        found, _ = search.exact_search(query_set, database, k, device)
    elif method == "flat":
        import faiss

        flat = faiss.IndexFlatIP(vectors.shape[1])
        for first in range(0, count, 16384):
            flat.add(read(np.arange(first, min(count, first + 16384))))
        result["build"] = time.perf_counter() - start
        start = time.perf_counter()
        scores, found = flat.search(read(timed), k + 1)
        own = found == timed[:, None]
        found = np.stack([row[~mine][:k] for row, mine in zip(found, own)])
    else:  # approximate:PROJECTED:BREADTH
        ann.PROJECTED, ann.BREADTH = (int(value) for value in method.split(":")[1:])
        index = ann.train(range(count), read)
        index.add(range(count), read)
        result["build"] = time.perf_counter() - start

        def propose(rows: np.ndarray, width: int) -> np.ndarray:
            return index.neighbours(query_set.read(rows), width, None)

        start = time.perf_counter()
        found, _ = search.approximate_search(query_set, database, k, propose, device)
        seconds = time.perf_counter() - start
        singles = []
        for row in range(min(20, len(timed))):
            one = search.VectorSet(lambda rows, row=row: read(timed[[row]]), 1, timed[[row]])
            begin = time.perf_counter()
            search.approximate_search(
                one, database, k, lambda _, width, row=row: propose(np.array([row]), width)
            )
            singles.append(time.perf_counter() - begin)
        result["one"] = float(np.median(singles))
        start = time.perf_counter() - seconds
    result["seconds"] = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    result["peak_mib"] = (
        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    )
    np.save(out + ".npy", found)
    Path(out + ".json").write_text(json.dumps(result))
    return result


def run(method: str, path: Path, queries: int, k: int, device: str, folder: Path) -> dict:
    out = str(folder / f"{method.replace(':', '-')}-{queries}")
    command = [sys.executable, __file__, "--worker", method, str(path), str(queries), str(k), device, out]
    subprocess.run(command, check=True)
    result = json.loads(Path(out + ".json").read_text())
    result["found"] = np.load(out + ".npy")
    result["timed"] = _timed_queries(len(np.load(path, mmap_mode="r")), queries)
    return result


def _row(n: int, name: str, result: dict, note: str) -> str:
    timed, seconds = len(result["timed"]), result["seconds"] * n / len(result["timed"])
    scaled = " (scaled)" if timed < n else ""
    build = f"{result['build']:,.1f}" if "build" in result else "-"
    one = f"{result['one']:.3f}" if "one" in result else "-"
    peak = f"{result['peak_mib']:,.0f}"
    return f"| {n:,} | {name} | {timed:,} | {build} | {seconds:,.1f}{scaled} | {one} | {peak} | {note} |"


def _same_as_exact(vectors: np.ndarray, exact: dict, other: dict) -> str:
    """How many of the queries both searched have the same neighbours (others: within float32)."""
    rows = np.flatnonzero(np.isin(exact["timed"], other["timed"]))
    theirs = other["found"][np.searchsorted(other["timed"], exact["timed"][rows])]
    same = (exact["found"][rows] == theirs).all(1)
    for row, found in zip(rows[~same], theirs[~same]):
        query = np.asarray(vectors[exact["timed"][row]], np.float64)
        assert np.allclose(
            np.sort(np.asarray(vectors[found], np.float64) @ query),
            np.sort(np.asarray(vectors[exact["found"][row]], np.float64) @ query),
            atol=1e-5,
        ), row
    return f"{same.sum():,} / {len(rows):,} same as exact"


def _recall(exact: dict, other: dict) -> str:
    rows = np.flatnonzero(np.isin(exact["timed"], other["timed"]))
    theirs = other["found"][np.searchsorted(other["timed"], exact["timed"][rows])]
    hits = [len(set(a) & set(b)) / len(a) for a, b in zip(exact["found"][rows], theirs)]
    return f"recall@K {np.mean(hits):.3f} over {len(rows):,} queries"


def _scene_recall(result: dict) -> str:
    """The share of each timed query's SCENE - 1 scene mates (VLAD-like vectors: consecutive
    scenes of SCENE) among its K found: the neighbours that matter for SfM."""
    mates = result["timed"][:, None] // SCENE == result["found"] // SCENE
    return f"scene mates found {mates.sum(1).mean() / (SCENE - 1):.3f}"


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
    parser.add_argument("--exact-queries", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--flat-up-to", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--index",
        nargs="+",
        default=[f"{ann.PROJECTED}:{ann.BREADTH}"],
        help="approximate index settings PROJECTED:BREADTH to compare (default: the shipped ones)",
    )
    parser.add_argument(
        "--work", type=Path, help="keep the vectors here (made once) instead of a temporary folder"
    )
    args = parser.parse_args()
    bases = None
    if args.features and not args.random:
        segments = sorted(glob.glob(str(args.features) + ".retrieval/segment-*.npy"))
        bases = np.concatenate([np.load(s) for s in segments]).astype(np.float64)
        bases -= bases.mean(0)  # the shared part of the real vectors is added by the mixing
    kind = "random" if bases is None else f"VLAD-like ({len(bases)} real vectors)"
    load = os.getloadavg()[0]  # 2 or more on 2 cores: the figures are taken under load
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {kind}, "
          f"K = {args.k}; load average {load:.1f} at the start")  # fmt: skip
    print("| n | search | queries timed | build s | search s (all n) | one query s | peak MiB | result |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for n in args.sizes:
            path = (args.work or folder) / f"vectors-{n}-{'random' if bases is None else len(bases)}.npy"
            if not path.exists():
                make_vectors(path, n, bases)
            vectors = np.load(path, mmap_mode="r")
            exact = run("exact", path, args.exact_queries, args.k, args.device, folder)
            scene = "" if bases is None else f"; {_scene_recall(exact)}"
            print(_row(n, "screened + exact (baseline)", exact, "the reference" + scene), flush=True)
            if n <= args.flat_up_to:
                flat = run("flat", path, args.exact_queries, args.k, args.device, folder)
                print(
                    _row(n, "faiss IndexFlatIP (float32)", flat, _same_as_exact(vectors, exact, flat)),
                    flush=True,
                )
            for setting in args.index:
                approximate = run(f"approximate:{setting}", path, args.queries, args.k, args.device, folder)
                name = "faiss HNSW {} dims, breadth {} + exact re-scoring".format(*setting.split(":"))
                note = _recall(exact, approximate)
                note += "" if bases is None else f"; {_scene_recall(approximate)}"
                print(_row(n, name, approximate, note), flush=True)
            if args.work is None:
                path.unlink()


if __name__ == "__main__":
    main()
