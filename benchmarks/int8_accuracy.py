"""int8 against fp32 on real photos: keypoints, descriptors, matches and SfM (issue 16).

Usage: python benchmarks/int8_accuracy.py [--sets sacre_coeur,scannet_sample] [--sfm sacre_coeur]
       [--layers 6] [--json results.json]

Each photo set is extracted twice by the pipeline (``extract``, backend onnxruntime, default
settings), at fp32 and at ``--precision int8`` (built-in generated calibration set: none of the
photos was calibrated on), and the int8 features are compared with the fp32 ones:

- keypoints: the share of fp32 keypoints with an int8 keypoint on the same pixel / within 1 px
  (pixels of the resized image the network saw), and the int8 keypoint count relative to fp32;
- descriptors: cosine between the descriptors of fp32 keypoints and their int8 keypoint within 1 px;
- matches: the share of the fp32 NN-mutual matches of every image pair (exhaustive) that int8
  also finds (both keypoints within 1 px of the fp32 ones, matched to each other);
- ``--sfm``: the five commands of README "COLMAP reconstruction" on that set (pycolmap, one
  thread, seed 0) with each store: registered images, 3D points, mean reprojection error;
- ``--layers N``: which operators matter, measured on N photos of each set (fp32 vs graphs
  quantized with one more operator kept float32), on the bare network outputs.

``sp-extract evaluate homography`` (issue 14) did not exist when this was written; these
figures stand in for it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

from sp_extract.extraction.backends import OnnxRuntimeBackend
from sp_extract.extraction.config import ExtractConfig, ExtractRun
from sp_extract.extraction.decode import load_image, working_size
from sp_extract.extraction.onnx_export import onnx_model
from sp_extract.extraction.pipeline import extract
from sp_extract.extraction.postprocess import postprocess
from sp_extract.extraction.quantize import FLOAT_NODES, builtin_calibration, quantize
from sp_extract.extraction.weights import load_weights
from sp_extract.matching.config import MatchConfig
from sp_extract.matching.nn import nearest_neighbours

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LAYER_CANDIDATES = [
    "/conv1a/Conv",
    "/conv1b/Conv",
    "/conv2a/Conv",
    "/convPa/Conv",
    "/convDa/Conv",
    "/convDb/Conv",
]

Features = dict[str, tuple[np.ndarray, np.ndarray]]  # name: keypoints (N, 2), descriptors (N, 256)


def read_features(store: Path, resize_max: int) -> Features:
    """The store's keypoints back in the working image's pixels (where the network found them:
    a 1 px step there is 1 px), and descriptors."""
    features = {}
    with h5py.File(store, "r") as h5:
        for name in h5:  # the shared sets are flat folders: one group an image
            original = tuple(int(v) for v in h5[name]["image_size"][()])
            scale = np.asarray(original) / np.asarray(working_size(*original, resize_max, False))
            keypoints = np.round((h5[name]["keypoints"][()] + 0.5) / scale - 0.5)  # integer pixels
            features[name] = (keypoints, h5[name]["descriptors"][()].T.astype(np.float32))
    return features


def nearest(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each reference keypoint: the distance to the nearest ``other`` keypoint and its index."""
    if not len(other):
        return np.full(len(reference), np.inf), np.zeros(len(reference), int)
    distances = torch.cdist(torch.from_numpy(reference).double(), torch.from_numpy(other).double())
    values, indices = distances.min(1)
    return values.numpy(), indices.numpy()


def keypoint_agreement(fp32: Features, int8: Features) -> dict:
    distances, cosines, counts = [], [], [0, 0]
    for name, (keypoints, descriptors) in fp32.items():
        other_keypoints, other_descriptors = int8[name]
        distance, index = nearest(keypoints, other_keypoints)
        close = distance <= 1.0
        distances.append(distance)
        cosines.append((descriptors[close] * other_descriptors[index[close]]).sum(1))
        counts[0] += len(keypoints)
        counts[1] += len(other_keypoints)
    distance, cosine = np.concatenate(distances), np.concatenate(cosines)
    return {
        "keypoints_fp32": counts[0],
        "keypoints_int8": counts[1],
        "same_pixel": float(np.mean(distance == 0)),
        "within_1px": float(np.mean(distance <= 1.0)),
        "cosine_median": float(np.median(cosine)),
        "cosine_p1": float(np.percentile(cosine, 1)),
    }


def mutual_matches(features: Features, pairs: list[tuple[str, str]]) -> list[np.ndarray]:
    """NN-mutual matches of each pair, as (M, 2) keypoint indices."""
    result = []
    for first, second in pairs:
        d0, d1 = (torch.from_numpy(features[name][1]) for name in (first, second))
        matches0, _ = nearest_neighbours([d0], [d1], MatchConfig(mutual=True))
        matches0 = matches0[0, : len(d0)].numpy()
        valid = np.flatnonzero(matches0 >= 0)
        result.append(np.stack([valid, matches0[valid]], 1))
    return result


def matches_kept(fp32: Features, int8: Features) -> dict:
    """Share of fp32 NN-mutual matches that int8 finds between the same keypoints (within 1 px)."""
    pairs = list(itertools.combinations(sorted(fp32), 2))
    kept, total, int8_total = 0, 0, 0
    for (first, second), ref, other in zip(pairs, mutual_matches(fp32, pairs), mutual_matches(int8, pairs)):
        maps = []
        for name in (first, second):
            distance, index = nearest(fp32[name][0], int8[name][0])
            maps.append(np.where(distance <= 1.0, index, -1))
        found = {(int(a), int(b)) for a, b in other}
        kept += sum((maps[0][a], maps[1][b]) in found for a, b in ref if maps[0][a] >= 0 and maps[1][b] >= 0)
        total += len(ref)
        int8_total += len(other)
    return {"pairs": len(pairs), "matches_fp32": total, "matches_int8": int8_total, "kept": kept / total}


def five_commands(images: Path, feats: Path, work: Path) -> dict:
    """pairs, match-pairs, colmap and reconstruct on an extracted store; the best model."""
    pairs, matches, database, sparse, report = (
        work / n for n in ("pairs.txt", "m.h5", "db.db", "sparse", "r.json")
    )
    steps = [
        ("pairs", "exhaustive", "--features", feats, "--out", pairs),
        ("match-pairs", pairs, "--features", feats, "--out", matches, "-q"),
        ("colmap", "--images", images, "--features", feats, "--matches", matches, "--database", database,
         "--num-threads", "1"),
        ("reconstruct", "--database", database, "--images", images, "--out", sparse, "--num-threads", "1",
         "--json-report", report),
    ]  # fmt: skip
    for step in steps:
        subprocess.run([sys.executable, "-m", "sp_extract", *map(str, step)], check=True, capture_output=True)
    models = json.loads(report.read_text())["models"]
    best = max(models, key=lambda model: model["registered_images"])
    keys = ("registered_images", "points3D", "mean_track_length", "mean_reprojection_error_px")
    return {key: best[key] for key in keys}


def layer_sensitivity(
    folders: list[Path], count: int, weights: str, resize_max: int, work: Path
) -> list[dict]:
    """Keypoints within 1 px and descriptor cosine of graphs keeping more operators float32."""
    loaded = load_weights(weights)
    fp32 = onnx_model(loaded.build(), loaded.sha1)
    config = ExtractConfig(resize_max=resize_max)
    images = [
        torch.from_numpy(load_image(folder, name, config).image)[None, None]
        for folder in folders
        for name in sorted(p.name for p in folder.glob("*.jpg"))[:count]
    ]
    reference = OnnxRuntimeBackend(fp32, 2)
    reference_features = [postprocess(*reference(image), 0.005, 4, 4, -1)[0] for image in images]
    calibration = builtin_calibration()
    variants = {"everything int8": (), "default (FLOAT_NODES float)": FLOAT_NODES}
    variants.update({f"default + {node} float": FLOAT_NODES + (node,) for node in LAYER_CANDIDATES})
    rows = []
    for label, float_nodes in variants.items():
        model = quantize(fp32, calibration, float_nodes, work / "ranges.json")
        backend = OnnxRuntimeBackend(model, 2, "int8")
        fp32_features: Features = {}
        int8_features: Features = {}
        for index, (image, ref) in enumerate(zip(images, reference_features)):
            (features,) = postprocess(*backend(image), 0.005, 4, 4, -1)
            fp32_features[str(index)] = (ref.keypoints.numpy(), ref.descriptors.numpy())
            int8_features[str(index)] = (features.keypoints.numpy(), features.descriptors.numpy())
        rows.append({"variant": label, **keypoint_agreement(fp32_features, int8_features)})
        print(f"{label}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument(
        "--sets", default="sacre_coeur,scannet_sample", help="folders of --data to compare on"
    )
    parser.add_argument("--sfm", default="sacre_coeur", help="sets to reconstruct ('' for none)")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "superpoint_v1.pth"))
    parser.add_argument("--resize-max", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=0, help="photos a set for the operator study (0: skip)")
    parser.add_argument(
        "--stores", action=argparse.BooleanOptionalAction, default=True, help="extract and compare the sets"
    )
    parser.add_argument(
        "--work", type=Path, help="keep the stores here (a rerun resumes them) [default: temporary]"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    sets = [name for name in args.sets.split(",") if name]
    results: dict = {"sets": {}, "sfm": {}}
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(exist_ok=True)
        for name in sets if args.stores else []:
            stores = {}
            for precision in ("fp32", "int8"):
                stores[precision] = work / f"{name}-{precision}.h5"
                config = ExtractConfig(resize_max=args.resize_max, precision=precision)
                summary = extract(
                    args.data / name, stores[precision], config, ExtractRun(weights=args.weights)
                )
                assert summary.exit_code == 0, summary.lines()
            fp32, int8 = (read_features(stores[p], args.resize_max) for p in ("fp32", "int8"))
            results["sets"][name] = {
                "images": len(fp32),
                **keypoint_agreement(fp32, int8),
                **matches_kept(fp32, int8),
            }
            print(name, results["sets"][name], flush=True)
            if name in args.sfm.split(","):
                for precision, store in stores.items():
                    (work / f"{name}-{precision}").mkdir()
                    results["sfm"][f"{name} {precision}"] = five_commands(
                        args.data / name, store, work / f"{name}-{precision}"
                    )
                    print(name, precision, results["sfm"][f"{name} {precision}"], flush=True)
        if args.layers:
            folders = [args.data / n for n in sets]
            results["layers"] = layer_sensitivity(folders, args.layers, args.weights, 640, work)
    print("| set | images | fp32 keypoints | int8/fp32 count | same pixel | within 1 px | descriptor cosine "
          "median (1st pct) | NN-mutual matches kept |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results["sets"].items():
        count = r["keypoints_int8"] / r["keypoints_fp32"]
        print(
            f"| {name} | {r['images']} | {r['keypoints_fp32']} | {count:.3f} | {r['same_pixel']:.1%} "
            f"| {r['within_1px']:.1%} | {r['cosine_median']:.4f} ({r['cosine_p1']:.3f}) "
            f"| {r['kept']:.1%} of {r['matches_fp32']} |"
        )
    for label, r in results["sfm"].items():
        print(
            f"SfM {label}: {r['registered_images']} registered, {r['points3D']} points, track "
            f"{r['mean_track_length']:.2f}, reprojection {r['mean_reprojection_error_px']:.3f} px"
        )
    for r in results.get("layers", []):
        print(
            f"| {r['variant']} | {r['within_1px']:.1%} | {r['same_pixel']:.1%} | {r['cosine_median']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
