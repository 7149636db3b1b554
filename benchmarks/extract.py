"""Extraction benchmark: sp-extract's pipeline against hloc's one-image-at-a-time loop, same run.

Usage: python benchmarks/extract.py [--count 24] [--repeats 3] [--json results.json]

Over a folder of real photos (default ../shared/data/sacre_coeur, repeated through symbolic
links to --count images) it measures, with the same weights and settings:

- baseline: the loop of hloc's extract_features (and transformers' examples), written out below:
  one image at a time, eager fp32 PyTorch in NCHW layout, hloc's max-pool NMS, the HDF5 file
  opened per image;
- pipeline: ``sp_extract.extraction.pipeline.extract`` as the CLI runs it (backend auto, decoding workers,
  background writer), with its stage breakdown;
- network: the pipeline's backend alone on the same decoded batches (its bare throughput);
- int8 (``--int8``, on by default): pipeline and bare network again at ``--precision int8``, in
  the same rounds, their rates as ratios to fp32 within each round; the CPU's integer
  instruction sets (lscpu) and the operators ONNX Runtime runs for the int8 graph (its profile);
- the keypoints of pipeline and baseline compared image by image;
- the effect of reduced-scale JPEG decoding on keypoint positions (--resize-max 512);
- ``sp-extract --help`` time, and peak memory for a few dozen vs a few hundred small images.

After a warm-up, pipeline, bare network and baseline (a third of the images each time) take
turns --repeats times, so that all meet the same conditions; rates are medians (the baseline's
from its median time an image). Other processes of the machine are not controlled: run it on a
quiet machine for figures to publish.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

from sp_extract.devices import resolve_device
from sp_extract.errors import SpExtractError
from sp_extract.extraction.backends import choose_backend, make_backend, network_model
from sp_extract.extraction.config import ExtractConfig, ExtractRun
from sp_extract.extraction.decode import load_image, read_gray, resize, working_size
from sp_extract.extraction.loader import make_batches
from sp_extract.extraction.pipeline import (
    cpu_cores,
    default_batch_size,
    extract,
    library_threads,
)
from sp_extract.extraction.postprocess import (
    Features,
    postprocess,
    remove_borders,
    sample_descriptors,
    select_keypoints,
    to_original_frame,
)
from sp_extract.extraction.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONV_SCALE = {"1": 1, "2": 2, "3": 4, "4": 8, "P": 8, "D": 8}  # conv{block}: input stride


def network_flops(net: torch.nn.Module, height: int, width: int) -> int:
    """Floating-point operations (2 per multiply-add) of the network's convolutions on one image."""
    total = 0
    for name, conv in net.named_modules():
        if isinstance(conv, torch.nn.Conv2d):
            scale = CONV_SCALE[name[len("conv")]]
            cells = (height // scale) * (width // scale)
            total += (
                2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] * cells
            )
    return total


def repeated_folder(source: Path, count: int, destination: Path) -> list[str]:
    """``count`` symbolic links to the photos of ``source``, cycling through them."""
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    names = []
    for index in range(count):
        name = f"{index:04d}_{photos[index % len(photos)].name}"
        (destination / name).symlink_to(photos[index % len(photos)].resolve())
        names.append(name)
    return names


def hloc_simple_nms(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """hloc's / SuperGlue's ``simple_nms``: PyTorch max-pools and ``torch.where``."""

    def max_pool(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.max_pool2d(x, kernel_size=radius * 2 + 1, stride=1, padding=radius)

    zeros = torch.zeros_like(scores)
    max_mask = scores == max_pool(scores)
    for _ in range(2):
        supp_mask = max_pool(max_mask.float()) > 0
        supp_scores = torch.where(supp_mask, zeros, scores)
        new_max_mask = supp_scores == max_pool(supp_scores)
        max_mask = max_mask | (new_max_mask & (~supp_mask))
    return torch.where(max_mask, scores, zeros)


def hloc_postprocess(scores: torch.Tensor, descriptors: torch.Tensor, config: ExtractConfig) -> Features:
    """One image's keypoints the way hloc's SuperPoint wrapper finds them (same math as ours)."""
    scores = remove_borders(hloc_simple_nms(scores, config.nms_radius), config.border)
    ((keypoints, kept),) = select_keypoints(scores, config.threshold, config.max_keypoints)
    (sampled,) = sample_descriptors([keypoints], descriptors)
    return Features(keypoints, kept, sampled)


def baseline_loop(
    folder: Path, names: list[str], out: Path, weights: str, config: ExtractConfig, times: dict
) -> None:
    """hloc's loop: decode, eager fp32 NCHW network, post-process, open the HDF5 file, write.

    Appends each image's seconds to ``times["total"]`` and ``times[stage]``."""
    net = load_weights(weights).build()
    with library_threads(cpu_cores()), torch.no_grad():
        for name in names:
            started = time.perf_counter()
            image = load_image(folder, name, config)
            decoded = time.perf_counter()
            scores, descriptors = net(torch.from_numpy(image.image)[None, None])
            networked = time.perf_counter()
            features = hloc_postprocess(scores, descriptors, config)
            height, width = image.image.shape
            keypoints = to_original_frame(features.keypoints.numpy(), (width, height), image.original_size)
            processed = time.perf_counter()
            with h5py.File(out, "a") as h5:
                group = h5.require_group(name)
                group.create_dataset("keypoints", data=keypoints)
                group.create_dataset("scores", data=features.scores.numpy())
                group.create_dataset("descriptors", data=features.descriptors.numpy().T.astype(np.float16))
                group.create_dataset("image_size", data=np.asarray(image.original_size))
            written = time.perf_counter()
            seconds = (decoded - started, networked - decoded, processed - networked, written - processed)
            for stage, value in zip(("decode", "network", "postprocess", "write"), seconds):
                times.setdefault(stage, []).append(value)
            times.setdefault("total", []).append(written - started)


def baseline_summary(times: dict, count: int) -> dict:
    """Images/s from the median time an image; stage seconds for ``count`` images."""
    return {
        "images_per_s": 1 / statistics.median(times["total"]),
        "stages_s": {k: statistics.median(v) * count for k, v in times.items() if k != "total"},
        "network_s_per_image": statistics.median(times["network"]),
    }


def pipeline_run(
    folder: Path, out: Path, weights: str, config: ExtractConfig, backend: str, batch_size: int | None
) -> dict:
    """One ``extract`` over the folder (the store rewritten): images/s and stage times."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    summary = extract(
        folder,
        out,
        config,
        ExtractRun(weights=weights, backend=backend, batch_size=batch_size, overwrite=True),
        timings=timings,
    )
    wall = time.perf_counter() - started
    assert summary.exit_code == 0, summary.lines()
    main_thread = ("decode", "network")  # post-processing and writing run on another thread
    timings["start-up and fold"] = wall - sum(timings[stage] for stage in main_thread)
    with h5py.File(out, "r") as h5:
        backend_name = h5.attrs["backend"]
    return {"images_per_s": summary.done / wall, "wall_s": wall, "stages_s": timings, "backend": backend_name}


def median_run(runs: list[dict]) -> dict:
    """The run of median images/s, with every run's rate."""
    median = sorted(runs, key=lambda run: run["images_per_s"])[len(runs) // 2]
    return {**median, "all_images_per_s": [run["images_per_s"] for run in runs]}


def bare_network(
    folder: Path,
    names: list[str],
    weights: str,
    config: ExtractConfig,
    backend: str,
    batch_size: int | None,
    repeats: int,
) -> dict:
    """The pipeline's backend alone on the same decoded batches: images/s and GFLOP/s."""
    loaded = load_weights(weights)
    device = resolve_device("auto")
    name = choose_backend(backend, device, config.precision)
    images = [load_image(folder, n, config) for n in names]
    batches = list(make_batches(images, batch_size or default_batch_size(device)))
    flops = sum(network_flops(loaded.build(), *image.image.shape) for image in images)
    with library_threads(cpu_cores() if name == "torch" else 1), torch.inference_mode():
        runner = make_backend(name, loaded.build(), device, config.precision, cpu_cores(), loaded.sha1)
        runner(batches[0].tensor())  # warm-up
        walls = []
        for _ in range(repeats):
            started = time.perf_counter()
            for batch in batches:
                runner(batch.tensor())
            walls.append(time.perf_counter() - started)
    wall = statistics.median(walls)
    return {
        "images_per_s": len(images) / wall,
        "gflop_per_s": flops / wall / 1e9,
        "gflop_per_image": flops / len(images) / 1e9,
        "backend": runner.name,
    }


def compare_stores(fast: Path, baseline: Path, names: list[str]) -> dict:
    """Per image: same keypoint set? and the largest score and descriptor differences."""
    same, score_diff, descriptor_diff = 0, 0.0, 0.0
    with h5py.File(fast, "r") as a, h5py.File(baseline, "r") as b:
        for name in names:
            ka, kb = a[name]["keypoints"][()], b[name]["keypoints"][()]
            order_a, order_b = np.lexsort(ka.T), np.lexsort(kb.T)
            if ka.shape == kb.shape and np.array_equal(ka[order_a], kb[order_b]):
                same += 1
                score_diff = max(
                    score_diff,
                    float(np.abs(a[name]["scores"][()][order_a] - b[name]["scores"][()][order_b]).max()),
                )
                da = a[name]["descriptors"][()].astype(np.float32)[:, order_a]
                db = b[name]["descriptors"][()].astype(np.float32)[:, order_b]
                descriptor_diff = max(descriptor_diff, float(np.abs(da - db).max()))
    return {
        "images": len(names),
        "same_keypoints": same,
        "max_score_diff": score_diff,
        "max_descriptor_diff": descriptor_diff,
    }


def reduced_decode_effect(source: Path, weights: str, backend: str, resize_max: int = 512) -> dict:
    """Keypoints from reduced-scale JPEG decoding (``--reduced-decode``) vs full decoding."""
    config = ExtractConfig(resize_max=resize_max, reduced_decode=True)
    loaded = load_weights(weights)
    name = choose_backend(backend, torch.device("cpu"), "fp32")
    runner = make_backend(name, loaded.build(), torch.device("cpu"), "fp32", cpu_cores(), loaded.sha1)
    distances, counts, decode_s = [], [], {"reduced": 0.0, "full": 0.0}
    for photo in sorted(source.glob("*.jpg")):
        started = time.perf_counter()
        reduced = load_image(source, photo.name, config)
        decode_s["reduced"] += time.perf_counter() - started
        started = time.perf_counter()
        gray = read_gray(photo)
        size = working_size(gray.shape[1], gray.shape[0], resize_max, False)
        full = resize(gray, size) / np.float32(255.0)
        decode_s["full"] += time.perf_counter() - started
        keypoints = []  # in working-size pixels
        for image in (reduced.image, full):
            (features,) = postprocess(*runner(torch.from_numpy(image)[None, None]), 0.005, 4, 4, -1)
            keypoints.append(features.keypoints.numpy())
        counts.append((len(keypoints[0]), len(keypoints[1])))
        nearest = np.sqrt(((keypoints[0][:, None] - keypoints[1][None]) ** 2).sum(-1)).min(1)
        distances.extend(nearest.tolist())
    distances = np.asarray(distances)
    return {
        "resize_max": resize_max,
        "keypoints_reduced": int(sum(c[0] for c in counts)),
        "keypoints_full": int(sum(c[1] for c in counts)),
        "same_position": float(np.mean(distances == 0)),
        "within_1px": float(np.mean(distances <= 1.0)),
        "within_2px": float(np.mean(distances <= 2.0)),
        "median_nearest_px": float(np.median(distances)),
        "decode_ms_per_image": {k: 1000 * v / len(counts) for k, v in decode_s.items()},
    }


def help_seconds(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sp_extract", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_memory_mb(count: int, weights: str, work: Path) -> float:
    """Peak RSS (MiB) of the largest process of an ``sp-extract`` run over ``count`` small images."""
    folder = work / f"small-{count}"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        cv2.imwrite(str(folder / f"{index:05d}.jpg"), rng.integers(0, 256, (240, 320), dtype=np.uint8))
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [
        sys.executable,
        "-m",
        "sp_extract",
        str(folder),
        "--out",
        str(work / f"small-{count}.h5"),
        "--weights",
        weights,
        "--quiet",
    ]
    output = subprocess.run(
        [sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True
    )
    return int(output.stdout.strip()) / 1024


def int8_instructions() -> str:
    """The CPU's integer dot-product instruction sets that lscpu reports."""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split()
    except OSError:
        return "unknown (no lscpu)"
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)


def onnxruntime_operators(weights: str, work: Path) -> str:
    """Operators (with counts) ONNX Runtime runs for the int8 graph, from one profiled run."""
    import onnxruntime

    loaded = load_weights(weights)
    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "ort-profile")
    model = network_model(loaded.build(), loaded.sha1, "int8")
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    session.run(None, {"image": np.random.default_rng(0).random((1, 1, 240, 320), dtype=np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    counts = collections.Counter(
        event["args"]["op_name"]
        for event in events
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
    )
    return ", ".join(f"{op} x{count}" for op, count in counts.most_common())


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {cpu_cores()} cores, torch {torch.__version__}"


def rates(result: dict) -> str:
    return ", ".join(f"{rate:.3f}" for rate in result["all_images_per_s"])


def ratios(values: list[float]) -> str:
    rounds = ", ".join(f"{value:.2f}x" for value in values)
    return f"{statistics.median(values):.2f}x (median of rounds; rounds: {rounds})"


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"| {label.ljust(width)} | {value} |" for label, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "sacre_coeur")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "superpoint_v1.pth"))
    parser.add_argument("--count", type=int, default=24, help="images in the benchmark folder")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the pipeline and network (median)")
    parser.add_argument("--resize-max", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--compare", default="torch,onnxruntime,openvino", help="backends whose bare network to compare"
    )
    parser.add_argument("--compare-count", type=int, default=8, help="images for --compare")
    parser.add_argument("--memory-counts", default="40,400", help="small-image counts for peak memory")
    parser.add_argument(
        "--int8", action=argparse.BooleanOptionalAction, default=True, help="int8 rows, same rounds"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    config = ExtractConfig(resize_max=args.resize_max)
    int8_config = ExtractConfig(resize_max=args.resize_max, precision="int8")
    results: dict = {"machine": machine(), "count": args.count, "resize_max": args.resize_max}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        folder = work / "images"
        folder.mkdir()
        names = repeated_folder(args.images, args.count, folder)
        results["help_s"] = help_seconds()
        warmup = work / "warmup"
        warmup.mkdir()
        repeated_folder(args.images, 2, warmup)
        extract(warmup, work / "warmup.h5", config, ExtractRun(weights=args.weights, backend=args.backend))
        if args.int8:  # also makes the int8 graph (cached), outside the timed runs
            extract(
                warmup, work / "warmup8.h5", int8_config, ExtractRun(weights=args.weights, overwrite=True)
            )
        runs: dict[str, list] = {"pipeline": [], "network": [], "baseline": [], "int8": [], "network8": []}
        baseline_times: dict[str, list[float]] = {}
        for index in range(args.repeats):  # interleaved, so that all three meet the same conditions
            runs["pipeline"].append(
                pipeline_run(folder, work / "fast.h5", args.weights, config, args.backend, args.batch_size)
            )
            runs["network"].append(
                bare_network(folder, names, args.weights, config, args.backend, args.batch_size, 1)
            )
            if args.int8:
                runs["int8"].append(
                    pipeline_run(folder, work / "int8.h5", args.weights, int8_config, "auto", args.batch_size)
                )
                runs["network8"].append(
                    bare_network(folder, names, args.weights, int8_config, "auto", args.batch_size, 1)
                )
            subset = names[index :: args.repeats]
            baseline_loop(folder, subset, work / "baseline.h5", args.weights, config, baseline_times)
            runs["baseline"].append(1 / statistics.median(baseline_times["total"][-len(subset) :]))
        results["pipeline"], results["network"] = median_run(runs["pipeline"]), median_run(runs["network"])
        results["rounds"] = [  # ratios within a round, whose runs met the same conditions
            {"vs_baseline": p["images_per_s"] / b, "vs_network": p["images_per_s"] / n["images_per_s"]}
            for p, n, b in zip(runs["pipeline"], runs["network"], runs["baseline"])
        ]
        results["baseline"] = baseline_summary(baseline_times, len(names))
        if args.int8:
            results["int8"] = {
                "pipeline": median_run(runs["int8"]),
                "network": median_run(runs["network8"]),
                "vs_fp32_pipeline": [
                    a["images_per_s"] / b["images_per_s"] for a, b in zip(runs["int8"], runs["pipeline"])
                ],
                "vs_fp32_network": [
                    a["images_per_s"] / b["images_per_s"] for a, b in zip(runs["network8"], runs["network"])
                ],
                "instructions": int8_instructions(),
                "operators": onnxruntime_operators(args.weights, work),
            }
        results["backends"] = {}
        for backend in args.compare.split(",") if args.compare else []:
            try:
                results["backends"][backend] = bare_network(
                    folder, names[: args.compare_count], args.weights, config, backend, args.batch_size, 1
                )
            except SpExtractError as error:
                results["backends"][backend] = {"error": str(error)}
        results["agreement"] = compare_stores(work / "fast.h5", work / "baseline.h5", names)
        results["reduced_decode"] = reduced_decode_effect(args.images, args.weights, args.backend)
        results["peak_memory_mb"] = {
            int(n): peak_memory_mb(int(n), args.weights, work) for n in args.memory_counts.split(",")
        }
    gflop = results["network"]["gflop_per_image"]
    base, fast, net = results["baseline"], results["pipeline"], results["network"]
    base["gflop_per_s"] = gflop / base["network_s_per_image"]
    agreement, reduced = results["agreement"], results["reduced_decode"]
    stages = " / ".join(f"{k} {v:.1f} s" for k, v in fast["stages_s"].items())
    base_stages = " / ".join(f"{k} {v:.1f} s" for k, v in base["stages_s"].items())
    rows = [
        ("machine", results["machine"]),
        ("images", f"{args.count} photos, --resize-max {args.resize_max}, {gflop:.0f} GFLOP a frame"),
        (
            "baseline (hloc loop, eager fp32 NCHW)",
            f"{base['images_per_s']:.3f} images/s, network {base['gflop_per_s']:.0f} GFLOP/s",
        ),
        ("baseline stages (per run)", base_stages),
        (f"sp-extract ({fast['backend']})", f"{fast['images_per_s']:.3f} images/s (runs: {rates(fast)})"),
        (
            "speed-up over baseline",
            f"{fast['images_per_s'] / base['images_per_s']:.2f}x (median of rounds "
            f"{statistics.median(r['vs_baseline'] for r in results['rounds']):.2f}x; rounds: "
            + ", ".join(f"{r['vs_baseline']:.2f}x" for r in results["rounds"])
            + ")",
        ),
        ("pipeline stages (main thread wall; postprocess, write: CPU on their thread)", stages),
        (
            f"bare network ({net['backend']})",
            f"{net['images_per_s']:.3f} images/s, {net['gflop_per_s']:.0f} GFLOP/s (runs: {rates(net)})",
        ),
        (
            "end-to-end / bare network",
            f"{fast['images_per_s'] / net['images_per_s']:.1%} (median of rounds "
            f"{statistics.median(r['vs_network'] for r in results['rounds']):.1%}; rounds: "
            + ", ".join(f"{r['vs_network']:.1%}" for r in results["rounds"])
            + ")",
        ),
        (
            "same keypoints as baseline",
            f"{agreement['same_keypoints']}/{agreement['images']} images, "
            f"scores within {agreement['max_score_diff']:.1e}, descriptors (fp16) within "
            f"{agreement['max_descriptor_diff']:.1e}",
        ),
        (
            f"reduced JPEG decode at {reduced['resize_max']} px",
            "{same_position:.1%} of keypoints on the same pixel, {within_1px:.1%} within 1 px, "
            "{within_2px:.1%} within 2 px (working size); {keypoints_reduced} vs {keypoints_full} keypoints; "
            "decode {reduced_ms:.1f} vs {full_ms:.1f} ms an image".format(
                **reduced,
                reduced_ms=reduced["decode_ms_per_image"]["reduced"],
                full_ms=reduced["decode_ms_per_image"]["full"],
            ),
        ),
        ("sp-extract --help", f"{results['help_s']:.2f} s"),
        (
            "peak memory (largest process)",
            ", ".join(f"{n} images: {mb:.0f} MiB" for n, mb in results["peak_memory_mb"].items()),
        ),
    ]
    if args.int8:
        int8 = results["int8"]
        rows += [
            (
                f"sp-extract --precision int8 ({int8['pipeline']['backend']})",
                f"{int8['pipeline']['images_per_s']:.3f} images/s (runs: {rates(int8['pipeline'])})",
            ),
            (
                f"bare network int8 ({int8['network']['backend']})",
                f"{int8['network']['images_per_s']:.3f} images/s, {int8['network']['gflop_per_s']:.0f} GOP/s "
                f"(runs: {rates(int8['network'])})",
            ),
            ("int8 / fp32 end-to-end", ratios(int8["vs_fp32_pipeline"])),
            ("int8 / fp32 bare network", ratios(int8["vs_fp32_network"])),
            ("CPU instruction sets", int8["instructions"]),
            ("ONNX Runtime int8 operators", int8["operators"]),
        ]
    for backend, result in results["backends"].items():
        rows.append(
            (
                f"bare network, --backend {backend} ({args.compare_count} images)",
                result.get("error")
                or f"{result['images_per_s']:.3f} images/s, {result['gflop_per_s']:.0f} GFLOP/s",
            )
        )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
