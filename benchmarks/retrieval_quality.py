"""Retrieval quality benchmark: today's VLAD against ASMK* and a tf-idf bag of words, side by side
in one run, all made from the feature store's own SuperPoint descriptors (issue 27, items 1 and 3).

Usage: python benchmarks/retrieval_quality.py [--work DIR] [--ks 3 5 10] [--words 1024 4096]
       [--seeds 0 1 2] [--asmk-package] [--no-sfm] [--json FILE]

Collections: ``mixed``, all the shared photos in one store (Sacre Coeur 10, ScanNet 30 from 15
rooms, fox 50; the scene of a photo is its collection, for ScanNet its room, the ``sceneNNNN_NN``
prefix), and ``sacre``, the 10 Sacre Coeur photos alone. Both are extracted once with the CLI at
default settings (``sp-extract DIR --out STORE``) and kept in ``--work`` for the next run.

Methods, each an (n, n) image similarity, codebooks trained on the collection itself:

- ``vlad``: ``pairs retrieval``'s own vectors (``GlobalIndex`` with ``Vlad``, default config);
- ``asmk-W``: ASMK* (Tolias, Avrithis, Jégou 2013) with a W-word codebook (k-means, the
  product's ``train_model`` with all 256 dimensions kept, i.e. a rotation): per word of an image
  the sum of its descriptors' residuals, normalised and binarised (signs); two images' similarity
  is the sum over their shared words c of idf(c)^2 sigma(u_c), u_c = <b_X, b_Y> / D, sigma(u) =
  sign(u) |u|^3 for u > 0 and 0 otherwise, divided by sqrt(sum_X idf^2 * sum_Y idf^2) (each
  image's self-similarity); idf(c) = log(n / images holding c);
- ``bow-W``: a flat inverted file with tf-idf (COLMAP's vocabulary tree without the tree, which
  only speeds up the word assignment): the cosine of the images' tf-idf histograms of words.
- ``asmk-pkg-W-maM`` (``--asmk-package``): ASMK* by the ``asmk`` package 0.1.1 (Tolias's own
  code, the same kernel and idf; faiss k-means on the raw descriptors), each image queried with
  its descriptors' M nearest words (multiple assignment), the database with one. Not a
  dependency of the project: install it (and faiss-cpu) where the benchmark runs, e.g.
  ``pip install --target DIR faiss-cpu asmk==0.1.1`` and DIR on PYTHONPATH.

``--seeds``: the quality measures for each codebook seed (k-means initialisation and sample;
VLAD's ``RetrievalConfig.seed``), the table showing the first and the spread; SfM uses the first.

Measures: on ``mixed``, precision@1 (an image's most similar other image is of its scene; all
images, then per collection) and recall within K (the share of an image's same-scene images
among its K most similar, out of min(K, same-scene images), averaged over images); on ``sacre``,
SfM from each method's pairs at each K against exhaustive pairs: pairs as ``pairs retrieval``
makes them (each image with its K most similar, once per pair, plus the most similar pairs that
join the components of the pair graph; for ``vlad`` the CLI's own ``pairs retrieval -k K``, checked
equal to this rule), then the CLI's ``match-pairs``, ``colmap`` and ``reconstruct`` (defaults; one
thread); the images registered in the largest model.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycolmap
import torch

from sp_extract.pairs.retrieval import (
    RetrievalConfig,
    Vlad,
    nearest_centroid,
    sample_descriptors,
    train_model,
)
from sp_extract.store.catalog import read_store_info
from sp_extract.store.reader import open_store
from sp_extract.store.vectors import GlobalIndex, read_descriptors

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WEIGHTS = ROOT.parent / "shared" / "weights" / "superpoint_v1.pth"
MIXED = ("sacre_coeur", "scannet_sample", "fox")
SAMPLE = 200_000  # descriptors sampled for a codebook (the mixed store holds fewer: all of them)


def cli(*args: str) -> None:
    """Run ``python -m sp_extract ARGS`` on the CPU; a failure stops the benchmark with its stderr."""
    result = subprocess.run([sys.executable, "-m", "sp_extract", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"sp-extract {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
        )


def store_of(work: Path, name: str, folders: tuple[str, ...]) -> tuple[Path, Path]:
    """The collection's image folder (symbolic links to ../shared/data) and its feature store,
    extracted with the CLI's defaults unless ``work`` already holds it."""
    images, store = work / name, work / f"{name}.h5"
    if not store.exists():
        images.mkdir(parents=True, exist_ok=True)
        for folder in folders:
            link = images / folder if len(folders) > 1 else images
            if len(folders) > 1:
                link.symlink_to(DATA / folder)
            else:
                for path in sorted((DATA / folder).glob("*.jpg")):
                    (images / path.name).symlink_to(path)
        cli(str(images), "--out", str(store), "--weights", str(WEIGHTS), "--device", "cpu", "-q")
    return images, store


def scene_of(name: str) -> str:
    """The scene of a photo of the mixed collection: its collection, for ScanNet its room."""
    folder, _, file = name.partition("/")
    return file[: len("scene0000_00")] if folder == "scannet_sample" else folder


# -- methods: each (store, names) -> (n, n) similarity ---------------------------------------------
def vlad_similarity(store: Path, names: list[str], seed: int) -> np.ndarray:
    index = GlobalIndex(store, Vlad(RetrievalConfig(seed=seed)))
    index.update()
    vectors = index.vectors(names)
    return vectors @ vectors.T


@functools.cache
def word_assignments(
    store: Path, names: tuple[str, ...], words: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each image's residuals to its word's centroid (N, D) in the codebook's rotated space and
    their words (N,); one codebook per store and size, shared by ASMK and the bag of words."""
    config = RetrievalConfig(clusters=words, dims=256, sample=SAMPLE, seed=seed)
    with open_store(store) as h5:
        model = train_model(sample_descriptors(h5, names, SAMPLE, seed), config)
        locals_ = [(read_descriptors(h5, n) - model.mean) @ model.projection for n in names]
    centroids = torch.from_numpy(model.centroids)
    assigned = [nearest_centroid(torch.from_numpy(local), centroids).numpy() for local in locals_]
    return [local - model.centroids[a] for local, a in zip(locals_, assigned)], assigned


def idf(assigned: list[np.ndarray], words: int) -> np.ndarray:
    held = np.zeros(words)
    for a in assigned:
        held[np.unique(a)] += 1
    return np.log(len(assigned) / np.maximum(held, 1))


def asmk_similarity(store: Path, names: list[str], words: int, seed: int) -> np.ndarray:
    residuals, assigned = word_assignments(store, tuple(names), words, seed)
    weight = idf(assigned, words) ** 2
    inverted: dict[int, list[tuple[int, np.ndarray]]] = {}
    for image, (residual, a) in enumerate(zip(residuals, assigned)):
        for word in np.unique(a):
            summed = residual[a == word].sum(0)
            inverted.setdefault(int(word), []).append((image, np.where(summed >= 0, 1.0, -1.0)))
    similarity = np.zeros((len(names), len(names)))
    for word, entries in inverted.items():
        images = np.array([image for image, _ in entries])
        binary = np.stack([b for _, b in entries])
        u = binary @ binary.T / binary.shape[1]
        similarity[np.ix_(images, images)] += weight[word] * np.where(u > 0, np.abs(u) ** 3, 0.0)
    norm = np.sqrt(np.diag(similarity))
    return similarity / np.maximum(np.outer(norm, norm), 1e-12)


def bow_similarity(store: Path, names: list[str], words: int, seed: int) -> np.ndarray:
    _, assigned = word_assignments(store, tuple(names), words, seed)
    histograms = np.stack([np.bincount(a, minlength=words) for a in assigned]) * idf(assigned, words)
    histograms /= np.maximum(np.linalg.norm(histograms, axis=1, keepdims=True), 1e-12)
    return histograms @ histograms.T


def asmk_package_similarity(
    store: Path, names: list[str], words: int, assignments: int, seed: int
) -> np.ndarray:
    """ASMK* by the ``asmk`` package (0.1.1; faiss k-means, 10 iterations, on the raw descriptors):
    the database with one word per descriptor, each image queried with ``assignments`` words."""
    from asmk import asmk_method

    with open_store(store) as h5:
        descriptors = [read_descriptors(h5, n) for n in names]
    vectors = np.concatenate(descriptors)
    ids = np.repeat(np.arange(len(names)), [len(d) for d in descriptors])
    params = {
        "index": {"gpu_id": None},
        "train_codebook": {"codebook": {"size": words}},
        "build_ivf": {
            "kernel": {"binary": True},
            "ivf": {"use_idf": True},
            "quantize": {"multiple_assignment": 1},
            "aggregate": {},
        },
        "query_ivf": {
            "quantize": {"multiple_assignment": assignments},
            "aggregate": {},
            "search": {"topk": None},
            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0},
        },
    }
    method = asmk_method.ASMKMethod.initialize_untrained(params)
    method = method.train_codebook(vectors[np.random.default_rng(seed).permutation(len(vectors))[:SAMPLE]])
    method = method.build_ivf(vectors, ids.copy())
    _, images, ranks, scores = method.query_ivf(vectors, ids.copy())
    similarity = np.zeros((len(names), len(names)))
    similarity[images[:, None], ranks] = scores
    return similarity


Similarity = Callable[..., np.ndarray]  # (store, names, seed=...) -> (n, n) similarity


def methods(words: list[int], package: bool) -> dict[str, Similarity]:
    chosen: dict[str, Similarity] = {"vlad": vlad_similarity}
    for w in words:
        chosen[f"asmk-{w}"] = functools.partial(asmk_similarity, words=w)
        chosen[f"bow-{w}"] = functools.partial(bow_similarity, words=w)
        if package:
            for ma in (1, 5):
                chosen[f"asmk-pkg-{w}-ma{ma}"] = functools.partial(
                    asmk_package_similarity, words=w, assignments=ma
                )
    return chosen


# -- measures ----------------------------------------------------------------------------------------
def ranking(similarity: np.ndarray) -> np.ndarray:
    """Each image's other images, most similar first (ties to the lower index)."""
    scores = similarity.astype(np.float64).copy()
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :-1]  # the image itself (-inf) last


def quality(similarity: np.ndarray, names: list[str], ks: list[int]) -> dict[str, float]:
    order = ranking(similarity)
    label = np.array([scene_of(n) for n in names])
    same = label[order] == label[:, None]
    row = {"p@1": float(same[:, 0].mean())}
    for folder in MIXED:
        rows = np.array([n.startswith(folder + "/") for n in names])
        row[f"p@1 {folder}"] = float(same[rows, 0].mean())
    positives = same.sum(1)
    for k in ks:
        row[f"recall@{k}"] = float((same[:, :k].sum(1) / np.minimum(k, positives)).mean())
    return row


def retrieval_rule(similarity: np.ndarray, k: int) -> set[tuple[int, int]]:
    """``pairs retrieval``'s pairs as index pairs (i < j): K nearest, then the most similar pairs
    joining components (Kruskal over all pairs, most similar first)."""
    order = ranking(similarity)
    pairs = {(min(i, int(j)), max(i, int(j))) for i in range(len(order)) for j in order[i, :k]}
    parent = list(range(len(order)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    symmetric = similarity + similarity.T  # ASMK with multiple assignment is not symmetric
    candidates = sorted((-symmetric[i, j], i, j) for i in range(len(order)) for j in range(i + 1, len(order)))
    for _, i, j in candidates:
        if root(i) != root(j):
            parent[root(i)] = root(j)
            pairs.add((i, j))
    return pairs


def registered(images: Path, store: Path, pairs: list[tuple[str, str]], work: Path) -> int:
    """Images registered in the largest model of the CLI's match-pairs, colmap, reconstruct."""
    work.mkdir(parents=True)
    pairs_file = work / "pairs.txt"
    pairs_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    matches, database, sparse = work / "matches.h5", work / "database.db", work / "sparse"
    cli(
        "match-pairs",
        str(pairs_file),
        "--features",
        str(store),
        "--out",
        str(matches),
        "--device",
        "cpu",
        "-q",
    )
    cli("colmap", "--images", str(images), "--features", str(store), "--matches", str(matches),
        "--database", str(database), "--num-threads", "1")  # fmt: skip
    cli("reconstruct", "--database", str(database), "--images", str(images), "--out", str(sparse),
        "--num-threads", "1")  # fmt: skip
    models = sorted(sparse.iterdir()) if sparse.is_dir() else []
    return max((pycolmap.Reconstruction(m).num_reg_images() for m in models), default=0)


def sfm_rows(
    images: Path, store: Path, chosen: dict, ks: list[int], work: Path
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Registered images per method and K (and exhaustive), each distinct pair set run once."""
    names = sorted(p.name for p in images.glob("*.jpg"))
    done: dict[str, int] = {}
    notes: list[str] = []

    def run(pairs: list[tuple[str, str]]) -> int:
        key = hashlib.sha1(repr(sorted(pairs)).encode()).hexdigest()[:12]
        if key not in done:
            done[key] = registered(images, store, pairs, work / key)
        return done[key]

    every = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    rows = {"exhaustive": {"all": run(every), "pairs": len(every)}}
    for method, similarity_of in chosen.items():
        similarity = similarity_of(store, names, seed=0)
        rows[method] = {}
        for k in ks:
            pairs = sorted((names[i], names[j]) for i, j in retrieval_rule(similarity, k))
            if method == "vlad":
                out = work / f"vlad-{k}.txt"
                cli(
                    "pairs",
                    "retrieval",
                    "-k",
                    str(k),
                    "--features",
                    str(store),
                    "--out",
                    str(out),
                    "--device",
                    "cpu",
                )
                by_cli = sorted(tuple(sorted(line.split())) for line in out.read_text().splitlines())
                if by_cli != pairs:
                    notes.append(f"vlad -k {k}: the CLI's pairs differ from the rule's; the CLI's are used")
                    pairs = by_cli
            rows[method][f"K={k}"] = run(pairs)
            rows[method][f"pairs K={k}"] = len(pairs)
    return rows, notes


def table(quality_rows: dict, sfm: dict, ks: list[int]) -> str:
    """The markdown table: quality at the first seed, its spread over the seeds, SfM."""
    columns = ["method", "p@1", *[f"p@1 {f}" for f in MIXED], *[f"recall@{k}" for k in ks]]
    measured = columns[1:]
    columns += ["p@1, ScanNet p@1 over the seeds: min-max", *[f"SfM K={k}" for k in ks]]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for method, row in quality_rows.items():
        cells = [method, *[f"{row[c]:.3f}" for c in measured]]
        spread = [[r[c] for r in row["by seed"]] for c in ("p@1", "p@1 scannet_sample")]
        cells.append(", ".join(f"{min(v):.3f}-{max(v):.3f}" for v in spread))
        cells += [
            f"{sfm[method][f'K={k}']}/10 ({sfm[method][f'pairs K={k}']} pairs)" if sfm else "-" for k in ks
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if sfm:
        lines.append(f"\nexhaustive: {sfm['exhaustive']['all']}/10 ({sfm['exhaustive']['pairs']} pairs)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sp_retrieval_quality")
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--words", type=int, nargs="+", default=[1024, 4096], help="Codebook sizes.")
    parser.add_argument("--asmk-package", action="store_true", help="Also the asmk package's ASMK*.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Codebook seeds (SfM: the first).")
    parser.add_argument("--no-sfm", action="store_true", help="Only the retrieval measures.")
    parser.add_argument("--json", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    if args.asmk_package and importlib.util.find_spec("asmk") is None:
        parser.error("--asmk-package: no asmk package here (pip install --target DIR faiss-cpu asmk==0.1.1)")
    args.work.mkdir(parents=True, exist_ok=True)
    chosen = methods(args.words, args.asmk_package)
    images, store = store_of(args.work, "mixed", MIXED)
    _, names = read_store_info(store, "features")
    quality_rows = {}
    for method, similarity_of in chosen.items():
        by_seed = [quality(similarity_of(store, names, seed=seed), names, args.ks) for seed in args.seeds]
        quality_rows[method] = {**by_seed[0], "seeds": args.seeds, "by seed": by_seed}
    sfm, notes = ({}, [])
    if not args.no_sfm:
        sacre_images, sacre_store = store_of(args.work, "sacre", ("sacre_coeur",))
        sfm, notes = sfm_rows(sacre_images, sacre_store, chosen, args.ks, args.work / "sfm")
    print(table(quality_rows, sfm, args.ks))
    print("\n".join(notes))
    if args.json:
        args.json.write_text(json.dumps({"quality": quality_rows, "sfm": sfm, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
