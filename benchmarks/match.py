"""Benchmark: exhaustive matching of the shared photos, sp-extract vs hloc's one-pair-at-a-time loop.

For each keypoint budget the 10 photos of ../shared/data/sacre_coeur are extracted once (native
size, low threshold so that images reach the budget), stored ``--copies`` times under different
names (a larger collection of realistic descriptors), and the exhaustive pairs are matched
twice in the same run, with each matcher:

- baseline: hloc's ``match_features`` loop written plainly: per pair, open the feature file and
  read both images, match on the device (NN-mutual, or the learned matcher on the one pair),
  write the pair to the match file (opened per pair);
- sp-extract: ``match_pairs`` (features read once per image, pairs batched on the device).

SuperGlue and LightGlue run with the same random weights (seed 0, full-size networks; no trained
weights needed: the cost is the same) in both, LightGlue's adaptive depth and width off (random
weights would make them arbitrary) and SuperGlue with 100 Sinkhorn iterations; both columns load
the weights file and build the network in their timing. Prints pairs/s for both and how many
stored matches agree. Usage:

    python benchmarks/match.py [--copies 3] [--max-pairs 400] [--learned-pairs 12] [--device auto]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from sp_extract import ExtractConfig, ExtractRun, extract
from sp_extract.devices import resolve_device
from sp_extract.matching.config import MatchConfig, MatchRun
from sp_extract.matching.learned import PaddedFeatures
from sp_extract.matching.lightglue import LightGlue
from sp_extract.matching.run import match_pairs
from sp_extract.matching.superglue import SuperGlue
from sp_extract.matching.weights import build_matcher, load_matcher_weights
from sp_extract.names import pair_key
from sp_extract.pairs.core import exhaustive_pairs, write_pairs
from sp_extract.store.catalog import read_store_info
from sp_extract.store.writer import StoreWriter

SHARED = Path(__file__).resolve().parents[2] / "shared"


def replicate(source: Path, target: Path, copies: int) -> list[str]:
    """Store the features of ``source`` ``copies`` times, as ``copyNN/name``; returns the names."""
    settings, names = read_store_info(source, "features")
    replicated = []
    with h5py.File(source, "r") as h5, StoreWriter(target, "features", settings, overwrite=True) as writer:
        for copy in range(copies):
            for name in names:
                datasets = {
                    key: h5[name][key][()] for key in ("keypoints", "scores", "descriptors", "image_size")
                }
                writer.add(f"copy{copy:02d}/{name}", datasets)
                replicated.append(f"copy{copy:02d}/{name}")
    return replicated


def hloc_loop(features: Path, pairs: list[tuple[str, str]], out: Path, device: torch.device) -> None:
    """The baseline: hloc's per-pair read, NN-mutual match and write, one pair at a time."""
    for name0, name1 in pairs:
        data = {}
        with h5py.File(features, "r") as h5:  # hloc's FeaturePairsDataset re-reads both images
            for suffix, name in (("0", name0), ("1", name1)):
                for key in ("keypoints", "scores", "descriptors", "image_size"):
                    data[key + suffix] = torch.from_numpy(h5[name][key].__array__()).float()
        d0 = data["descriptors0"].to(device)[None]
        d1 = data["descriptors1"].to(device)[None]
        similarity = torch.einsum("bdn,bdm->bnm", d0, d1)
        best0, index0 = similarity.max(-1)
        _, index1 = similarity.max(-2)
        mutual = index1.gather(-1, index0) == torch.arange(index0.shape[-1], device=device)
        matches = torch.where(mutual, index0, torch.full_like(index0, -1))[0].cpu().numpy()
        scores = torch.where(mutual, (best0 + 1) / 2, torch.zeros_like(best0))[0].cpu().half().numpy()
        with h5py.File(out, "a") as h5:  # hloc's writer opens the match file for every pair
            group = h5.require_group(pair_key(name0, name1))
            group.create_dataset("matches0", data=matches.astype(np.int32))
            group.create_dataset("matching_scores0", data=scores)


def hloc_learned_loop(
    features: Path, pairs: list[tuple[str, str]], out: Path, model: torch.nn.Module, device: torch.device
) -> None:
    """The baseline for a learned matcher: hloc's per-pair read, the matcher on that one pair,
    and the per-pair write."""
    for name0, name1 in pairs:
        images = []
        with h5py.File(features, "r") as h5:
            for name in (name0, name1):
                data = {
                    k: torch.from_numpy(h5[name][k].__array__()).float().to(device) for k in LEARNED_INPUTS
                }
                inputs = [data["keypoints"]], [data["scores"]], [data["descriptors"].T], [data["image_size"]]
                images.append(PaddedFeatures.pad(*inputs))
        with torch.inference_mode():
            matches, scores = model(*images)
        with h5py.File(out, "a") as h5:
            group = h5.require_group(pair_key(name0, name1))
            group.create_dataset("matches0", data=matches[0].cpu().numpy().astype(np.int32))
            group.create_dataset("matching_scores0", data=scores[0].cpu().numpy().astype(np.float16))


LEARNED_INPUTS = ("keypoints", "scores", "descriptors", "image_size")
LEARNED_OPTIONS = {
    "superglue": {"sinkhorn_iterations": 100, "match_threshold": 0.2},
    "lightglue": {"depth_confidence": -1, "width_confidence": -1, "filter_threshold": 0.1},
}


def save_random_matcher(matcher: str, path: Path) -> None:
    """Save a full-size matcher's random weights (seed 0) to ``path``."""
    torch.manual_seed(0)
    torch.save((SuperGlue if matcher == "superglue" else LightGlue)().state_dict(), path)


def agreement(ours: Path, baseline: Path, pairs: list[tuple[str, str]]) -> float:
    """Fraction of keypoints (over all pairs) whose stored match is the same in both stores."""
    same = total = 0
    with h5py.File(ours, "r") as a, h5py.File(baseline, "r") as b:
        for pair in pairs:
            key = pair_key(*pair)
            m0, m1 = a[key]["matches0"][()], b[key]["matches0"][()]
            same += int((m0 == m1).sum())
            total += len(m0)
    return same / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keypoints", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--learned-keypoints", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--matchers", nargs="+", default=["nn", "superglue", "lightglue"])
    parser.add_argument("--learned-pairs", type=int, default=12, help="pairs per learned-matcher row")
    parser.add_argument("--copies", type=int, default=3, help="store each photo this many times")
    parser.add_argument("--max-pairs", type=int, default=400, help="match the first N exhaustive pairs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    weights = SHARED / "weights" / "superpoint_v1.pth"
    photos = SHARED / "data" / "sacre_coeur"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({machine}), torch {torch.__version__}")
    print(
        "| matcher | max keypoints | mean keypoints | pairs | hloc loop pairs/s | sp-extract pairs/s "
        "| speed-up | same matches |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        budgets = {
            b for m in args.matchers for b in (args.keypoints if m == "nn" else args.learned_keypoints)
        }
        for budget in sorted(budgets):
            config = ExtractConfig(max_keypoints=budget, threshold=0.0001, resize_max=0)
            source = work / f"source-{budget}.h5"
            extract(photos, source, config, ExtractRun(weights=str(weights), device=str(device)))
            features = work / f"feats-{budget}.h5"
            names = replicate(source, features, args.copies)
            with h5py.File(features, "r") as h5:
                mean_keypoints = np.mean([h5[n]["keypoints"].shape[0] for n in names])
            for matcher in args.matchers:
                if budget not in (args.keypoints if matcher == "nn" else args.learned_keypoints):
                    continue
                count = args.max_pairs if matcher == "nn" else args.learned_pairs
                pairs = exhaustive_pairs(names)[:count]
                pairs_file = work / "pairs.txt"
                write_pairs(pairs, pairs_file)

                baseline_out = work / f"baseline-{matcher}-{budget}.h5"
                match_config = MatchConfig()
                started = time.perf_counter()
                if matcher == "nn":
                    hloc_loop(features, pairs, baseline_out, device)
                else:  # both columns load the weights file and build the network
                    model_path = work / f"{matcher}.pth"
                    save_random_matcher(matcher, model_path)
                    match_config = MatchConfig(
                        matcher=matcher, matcher_weights=str(model_path), **LEARNED_OPTIONS[matcher]
                    )
                    started = time.perf_counter()
                    loaded = load_matcher_weights(matcher, str(model_path))
                    model = build_matcher(loaded, LEARNED_OPTIONS[matcher]).to(device)
                    hloc_learned_loop(features, pairs, baseline_out, model, device)
                baseline_s = time.perf_counter() - started

                ours_out = work / f"ours-{matcher}-{budget}.h5"
                started = time.perf_counter()
                summary = match_pairs(
                    pairs_file, features, ours_out, match_config, MatchRun(device=str(device), overwrite=True)
                )
                ours_s = time.perf_counter() - started
                assert summary.done == len(pairs) and not summary.failed
                same = agreement(ours_out, baseline_out, pairs)
                baseline_rate, ours_rate = len(pairs) / baseline_s, len(pairs) / ours_s
                print(
                    f"| {matcher} | {budget} | {mean_keypoints:.0f} | {len(pairs)} | {baseline_rate:.3g} | "
                    f"{ours_rate:.3g} | {ours_rate / baseline_rate:.2f}x | {100 * same:.2f} % |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
