"""Batching benchmark: how same-size batches form on folders of mixed image sizes (issue 17).

Usage: python benchmarks/batching.py [--images 48] [--batch-size 8] [--decode-ms 20] [--repeats 3]

A GPU run is modelled on the CPU: decoded images arrive as workers decoding ahead would deliver
them (one every --decode-ms, earlier ones at once if the network fell behind), and a stand-in
network runs each batch: two small 3 x 3 convolutions, real work whose cost grows with the
batch, faster than decoding, as SuperPoint is on a GPU.
For three folders (every image its own size, like the shared photos; portrait and landscape
photos in alternation; one size) and three policies it prints the batches formed, the mean
batch size, the most images held (decoded but not yet run, counted when a batch is released,
that batch and the image that released it included), the time to the first result and the
total time (medians over --repeats):

- baseline: the policy before issue 17 (kept below): a batch waits until it is full, or until
  more than 4 x batch images wait, then the fullest is released;
- window 2 x batch (the default now) and window 1 x batch: an image waits for at most that
  many later images (``loader.make_batches``).

cuDNN's benchmark mode (tuned only for shapes that repeat) cannot be measured on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from sp_extract.extraction.decode import DecodedImage
from sp_extract.extraction.loader import Batch, make_batches

Policy = Callable[[Iterable[DecodedImage], int], Iterator[Batch]]


def baseline_batches(items: Iterable[DecodedImage], batch_size: int) -> Iterator[Batch]:
    """The batching of sp-extract before issue 17: same-size batches released when full, or,
    once more than 4 x batch_size images wait, the fullest partial batch."""
    waiting: dict[tuple[int, ...], list[DecodedImage]] = {}
    count = 0
    for item in items:
        bucket = waiting.setdefault(item.image.shape, [])
        bucket.append(item)
        count += 1
        if len(bucket) >= batch_size:
            count -= len(bucket)
            yield Batch(images=waiting.pop(item.image.shape))
        elif count > 4 * batch_size:
            shape = max(waiting, key=lambda s: len(waiting[s]))
            count -= len(waiting[shape])
            yield Batch(images=waiting.pop(shape))
    for bucket in waiting.values():
        yield Batch(images=bucket)


def folder_shapes(kind: str, count: int) -> list[tuple[int, int]]:
    """Working sizes (height, width) of a folder of ``count`` images."""
    if kind == "every image its own size":
        return [(192 + 2 * (i % 16), 256 + 2 * (i // 16)) for i in range(count)]
    if kind == "portrait and landscape":
        return [(256, 192) if i % 3 == 0 else (192, 256) for i in range(count)]
    return [(192, 256)] * count


def arrivals(shapes: list[tuple[int, int]], interval: float, started: float) -> Iterator[DecodedImage]:
    """Decoded images as decoding workers deliver them: image i is ready ``(i + 1) * interval``
    after ``started`` (handed over at once if the consumer comes later)."""
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(shapes):
        delay = started + (index + 1) * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        image = rng.random((height, width), dtype=np.float32)
        yield DecodedImage(f"{index}.png", image, (width, height))


def stand_in_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1)
    ).eval()


def run(policy: Policy, shapes: list[tuple[int, int]], batch_size: int, interval: float, net) -> dict:
    """One pass: batches formed, most images waiting, time to the first result, total time."""
    started = time.perf_counter()
    sizes, waiting_most, first = [], 0, None
    delivered = [0]

    def counted() -> Iterator[DecodedImage]:
        for item in arrivals(shapes, interval, started):
            delivered[0] += 1
            yield item

    with torch.inference_mode():
        for batch in policy(counted(), batch_size):
            waiting_most = max(waiting_most, delivered[0] - sum(sizes))
            net(batch.tensor())
            sizes.append(len(batch.images))
            first = first or time.perf_counter() - started
    return {
        "batches": len(sizes),
        "mean batch": sum(sizes) / len(sizes),
        "most waiting": waiting_most,
        "first result s": first,
        "total s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batch = args.batch_size
    policies: dict[str, Policy] = {
        "baseline (full, or > 4 x batch waiting)": baseline_batches,
        f"window 2 x batch = {2 * batch} (default)": make_batches,
        f"window 1 x batch = {batch}": lambda items, size: make_batches(items, size, window=size),
    }
    torch.set_num_threads(1)  # steadier on a shared machine; the network is not what is measured
    net = stand_in_network()
    with torch.inference_mode():
        net(torch.rand(batch, 1, 192, 256))  # warm-up
        single = statistics.median(_timed(lambda: net(torch.rand(1, 1, 192, 256))) for _ in range(5))
        eight = statistics.median(_timed(lambda: net(torch.rand(batch, 1, 192, 256))) for _ in range(5))
    print(
        f"stand-in network: {1000 * single:.1f} ms for 1 image, {1000 * eight / batch:.1f} ms an image "
        f"in a batch of {batch}; decoding: one image every {args.decode_ms:.0f} ms; "
        "1 thread"
    )
    print()
    print("| folder | policy | batches | mean batch | most images held | first result s | total s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in ("every image its own size", "portrait and landscape", "one size"):
        shapes = folder_shapes(kind, args.images)
        rounds = {name: [] for name in policies}
        for _ in range(args.repeats):  # policies take turns, so that all meet the same load
            for name, policy in policies.items():
                rounds[name].append(run(policy, shapes, batch, args.decode_ms / 1000, net))
        for name, results in rounds.items():
            row = {key: statistics.median(r[key] for r in results) for key in results[0]}
            print(
                f"| {kind} | {name} | {row['batches']:.0f} | {row['mean batch']:.1f} | "
                f"{row['most waiting']:.0f} | {row['first result s']:.2f} | {row['total s']:.2f} |"
            )


def _timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
