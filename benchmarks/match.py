"""Benchmark: exhaustive matching of the shared photos, sp-extract vs hloc's one-pair-at-a-time loop.

For each keypoint budget the 10 photos of ../shared/data/sacre_coeur are extracted once (native
size, low threshold so that images reach the budget), stored ``--copies`` times under different
names (a larger collection of realistic descriptors), and the exhaustive pairs are matched
(NN-mutual) twice in the same run:

- baseline: hloc's ``match_features`` loop written plainly: per pair, open the feature file and
  read both images, match on the device, write the pair to the match file (opened per pair);
- sp-extract: ``match_pairs`` (features read once per image, pairs batched on the device).

Prints pairs/s for both and how many stored matches agree. Usage:

    python benchmarks/match.py [--copies 3] [--max-pairs 400] [--device auto]
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

from sp_extract import ExtractConfig, extract
from sp_extract.extraction.pipeline import resolve_device
from sp_extract.matching.config import MatchConfig
from sp_extract.matching.run import match_pairs
from sp_extract.pairs.core import exhaustive_pairs, pair_key, write_pairs
from sp_extract.store.writer import StoreWriter, read_store_info

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
    parser.add_argument("--copies", type=int, default=3, help="store each photo this many times")
    parser.add_argument("--max-pairs", type=int, default=400, help="match the first N exhaustive pairs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    weights = SHARED / "weights" / "superpoint_v1.pth"
    photos = SHARED / "data" / "sacre_coeur"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for budget in args.keypoints:
            config = ExtractConfig(max_keypoints=budget, threshold=0.0001, resize_max=0)
            source = work / f"source-{budget}.h5"
            extract(photos, source, config, weights=str(weights), device=str(device))
            features = work / f"feats-{budget}.h5"
            names = replicate(source, features, args.copies)
            with h5py.File(features, "r") as h5:
                mean_keypoints = np.mean([h5[n]["keypoints"].shape[0] for n in names])
            pairs = exhaustive_pairs(names)[: args.max_pairs]
            pairs_file = work / "pairs.txt"
            write_pairs(pairs, pairs_file)

            baseline_out = work / f"baseline-{budget}.h5"
            started = time.perf_counter()
            hloc_loop(features, pairs, baseline_out, device)
            baseline_s = time.perf_counter() - started

            ours_out = work / f"ours-{budget}.h5"
            started = time.perf_counter()
            summary = match_pairs(
                pairs_file, features, ours_out, MatchConfig(), device=str(device), overwrite=True
            )
            ours_s = time.perf_counter() - started
            assert summary.done == len(pairs) and not summary.failed
            same = agreement(ours_out, baseline_out, pairs)
            rows.append(
                (budget, mean_keypoints, len(pairs), len(pairs) / baseline_s, len(pairs) / ours_s, same)
            )

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({machine}), torch {torch.__version__}")
    print(
        "| max keypoints | mean keypoints | pairs | hloc loop pairs/s | sp-extract pairs/s | speed-up "
        "| same matches |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for budget, mean_keypoints, count, baseline_rate, ours_rate, same in rows:
        print(
            f"| {budget} | {mean_keypoints:.0f} | {count} | {baseline_rate:.1f} | {ours_rate:.1f} | "
            f"{ours_rate / baseline_rate:.1f}x | {100 * same:.2f} % |"
        )


if __name__ == "__main__":
    main()
