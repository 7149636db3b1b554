"""The int8 graph variants (``quantize.VARIANTS``) against the reference network, on whatever CPU runs
this (issue 22): e.g. natively, and under QEMU user mode emulating a CPU without VNNI.

Usage:
  python benchmarks/int8_variants.py build WORK [--images 4] [--resize-max 320]   # native, torch
  qemu-x86_64 -cpu Haswell PYTHON benchmarks/int8_variants.py run WORK TAG        # onnxruntime + numpy
  python benchmarks/int8_variants.py run WORK native
  python benchmarks/int8_variants.py compare WORK                                  # native, torch

``build`` writes the fp32 export and each variant's graph (built-in calibration set, as shipped),
a few photos of the shared sets (tests/test_int8.py's, then ScanNet frames) and the reference network's
dense outputs on them; ``run`` runs every graph on every photo with ONNX Runtime (2 threads) and
keeps the outputs under TAG (it imports no torch, so that it starts quickly under emulation);
``compare`` prints, for each TAG and graph, the figures tests/test_int8.py asserts: dense
descriptor cosine with the reference (median, 1st percentile) and the share of the reference's
keypoints found again within 1 px, and the median time an image (meaningless under emulation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
INPUT, OUTPUTS = "image", ("scores", "descriptors")


def build(work: Path, count: int, resize_max: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from support.superpoint_reference import dense_v1

    from sp_extract.extraction.config import ExtractConfig
    from sp_extract.extraction.decode import load_image
    from sp_extract.extraction.onnx_export import onnx_model
    from sp_extract.extraction.quantize import FLOAT_NODES, VARIANTS, builtin_calibration, quantize
    from sp_extract.extraction.weights import load_weights

    weights = SHARED / "weights" / "superpoint_v1.pth"
    loaded = load_weights(str(weights))
    fp32 = onnx_model(loaded.build(), loaded.sha1)
    (work / "graphs").mkdir(parents=True, exist_ok=True)
    (work / "graphs" / "fp32.onnx").write_bytes(fp32)
    for variant in VARIANTS:
        started = time.perf_counter()
        model = quantize(fp32, builtin_calibration(), FLOAT_NODES, work / "ranges.json", variant)
        (work / "graphs" / f"{variant}.onnx").write_bytes(model)
        print(f"{variant}: quantized in {time.perf_counter() - started:.0f} s", flush=True)
    config = ExtractConfig(resize_max=resize_max)
    sacre_coeur, scannet = SHARED / "data" / "sacre_coeur", SHARED / "data" / "scannet_sample"
    photos = [(sacre_coeur, sorted(p.name for p in sacre_coeur.glob("*.jpg"))[2])]  # the test's
    photos += [(scannet, name) for name in sorted(p.name for p in scannet.glob("*.jpg"))[5 : 4 + count]]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    arrays = {}
    for index, (folder, name) in enumerate(photos):
        image = load_image(folder, name, config).image[None, None]
        with torch.no_grad():
            scores, descriptors = dense_v1(state, torch.from_numpy(image))
        arrays.update(
            {
                f"image{index}": image,
                f"scores{index}": scores.numpy(),
                f"descriptors{index}": descriptors.numpy(),
            }
        )
        print(f"photo {index}: {folder.name}/{name} {image.shape[2:]}")
    np.savez(work / "reference.npz", **arrays)


def run(work: Path, tag: str) -> None:
    import onnxruntime

    reference = np.load(work / "reference.npz")
    images = [reference[key] for key in sorted(k for k in reference.files if k.startswith("image"))]
    out = work / "runs" / tag
    out.mkdir(parents=True, exist_ok=True)
    for graph in sorted((work / "graphs").glob("*.onnx")):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2
        session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        arrays, times = {}, []
        for index, image in enumerate(images):
            started = time.perf_counter()
            scores, descriptors = session.run(list(OUTPUTS), {INPUT: image})
            times.append(time.perf_counter() - started)
            arrays.update({f"scores{index}": scores, f"descriptors{index}": descriptors})
        np.savez(out / f"{graph.stem}.npz", times=np.asarray(times), **arrays)
        print(f"{tag} {graph.stem}: {np.median(times):.3f} s an image", flush=True)


def compare(work: Path) -> None:
    import torch

    from sp_extract.extraction.postprocess import postprocess

    reference = np.load(work / "reference.npz")
    count = sum(k.startswith("image") for k in reference.files)
    print(
        "| run | graph | descriptor cosine, median | 1st percentile, each photo | within 1 px "
        "| keypoints / reference's | time an image |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for run_dir in sorted((work / "runs").iterdir()):
        for result in sorted(run_dir.glob("*.npz")):
            out = np.load(result)
            medians, p1s, close, total, counts = [], [], 0, 0, 0
            for index in range(count):
                ref_d, d = (torch.from_numpy(a[f"descriptors{index}"]) for a in (reference, out))
                cosine = (ref_d * d).sum(1).flatten()
                medians.append(cosine.median().item())
                p1s.append(torch.quantile(cosine, 0.01).item())
                (ref,) = postprocess(torch.from_numpy(reference[f"scores{index}"]), ref_d, 0.005, 4, 4, -1)
                (features,) = postprocess(torch.from_numpy(out[f"scores{index}"]), d, 0.005, 4, 4, -1)
                nearest = torch.cdist(ref.keypoints, features.keypoints).min(1).values
                close += int((nearest <= 1.0).sum())
                total += len(ref.keypoints)
                counts += len(features.keypoints)
            p1 = " / ".join(f"{v:.3f}" for v in p1s)
            print(
                f"| {run_dir.name} | {result.stem} | {np.median(medians):.4f} | {p1} | {close / total:.1%} "
                f"| {counts / total:.2f} | {np.median(out['times']):.3f} s |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["build", "run", "compare"])
    parser.add_argument("work", type=Path)
    parser.add_argument("tag", nargs="?", default="native")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--resize-max", type=int, default=320)
    args = parser.parse_args()
    if args.step == "build":
        build(args.work, args.images, args.resize_max)
    elif args.step == "run":
        run(args.work, args.tag)
    else:
        compare(args.work)


if __name__ == "__main__":
    main()
