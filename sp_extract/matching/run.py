"""The match-pairs run: reads the pairs, feeds stored features through the bounded feature
cache to the matcher (nearest neighbours, SuperGlue or LightGlue) in batches, verifies
(optional) and writes the match store.

The match store's content is hloc's layout: one group per pair at ``pair_key(name0, name1)``
holding ``matches0``, int32, an index into image 1 or -1 for each keypoint of image 0, and
``matching_scores0``, float16.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..devices import HostCopy, copy_to_host, device_scope, resolve_device
from ..errors import ConfigError, StoreError
from ..names import pair_key
from ..pairs import core as pairs_core
from ..pairs.core import FilePosition, Pair, PairChunk, read_pair_chunks, stored_pairs
from ..report import Summary
from ..runs import StoreRun
from ..store.catalog import current_store_id, read_settings, read_store
from ..store.reader import open_store
from ..store.writer import StoreWriter
from .config import MatchConfig, MatchRun
from .learned import match_batch
from .nn import CPU_WORK_ELEMENTS, MAX_BATCH_ELEMENTS, nearest_neighbours
from .resume import load_resume_point, save_resume_point
from .verify import verify_matches

# a learned matcher's batch on a GPU: padded N0 x N1 entries of all its pairs together (each
# pair's attention and assignment matrices take about ten such float32 matrices)
LEARNED_BATCH_ELEMENTS = 1 << 26


@dataclass
class ImageFeatures:
    """What matching needs of one image: descriptors (N, D) on the device, keypoints (N, 2)
    (for verification); for a learned matcher also ``learned``: keypoints (N, 2), scores (N,),
    descriptors (N, D) and the image size (width, height), on the device."""

    descriptors: torch.Tensor
    keypoints: np.ndarray | None
    learned: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


Matcher = Callable[[list[tuple[ImageFeatures, ImageFeatures]]], tuple[torch.Tensor, torch.Tensor]]


class FeatureCache:
    """Features read from the store once per image and kept, least recently used first out.

    Descriptors stay in their stored type on the matching device; the cache holds at most
    ``budget_bytes`` of them (plus the images of the batch in hand). Unreadable entries are
    remembered in ``failed`` with their reason and not read again.
    """

    def __init__(
        self, h5: h5py.File, device: torch.device, budget_bytes: int, keypoints: bool, learned: bool = False
    ) -> None:
        self.h5 = h5
        self.device = device
        self.budget_bytes = budget_bytes
        self.keypoints = keypoints
        self.learned = learned
        self.entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.failed: dict[str, str] = {}
        self.bytes = 0
        self.reads = 0
        self.dimension: int | None = None

    def _read(self, name: str) -> ImageFeatures:
        group = self.h5[name]
        descriptors = np.asarray(group["descriptors"])
        if descriptors.ndim != 2:
            raise ValueError(f"descriptors of shape {descriptors.shape}, expected D x N")
        if self.dimension is None:
            self.dimension = descriptors.shape[0]
        if descriptors.shape[0] != self.dimension:
            raise ValueError(f"{descriptors.shape[0]}-d descriptors, other images have {self.dimension}")
        keypoints = None
        if self.keypoints:
            keypoints = np.asarray(group["keypoints"], dtype=np.float64)
            if keypoints.shape != (descriptors.shape[1], 2):
                raise ValueError(
                    f"keypoints of shape {keypoints.shape} for {descriptors.shape[1]} descriptors"
                )
        self.reads += 1
        on_device = torch.from_numpy(descriptors).to(self.device).T
        learned = None
        if self.learned:
            learned = _learned_inputs(group, on_device)
        return ImageFeatures(on_device, keypoints, learned)

    def get(self, name: str) -> ImageFeatures | None:
        """The image's features, or None if they cannot be read (reason in ``failed``)."""
        if name in self.failed:
            return None
        if name in self.entries:
            self.entries.move_to_end(name)
            return self.entries[name]
        try:
            features = self._read(name)
        except (OSError, KeyError, ValueError, TypeError) as error:
            damaged = isinstance(error, OSError)  # a failed checksum, a damaged header
            hint = f"; check the store: sp-extract repair --check {self.h5.filename}" if damaged else ""
            self.failed[name] = f"unreadable features ({error}){hint}"
            return None
        self.entries[name] = features
        self.bytes += features.descriptors.nbytes
        while self.bytes > self.budget_bytes and len(self.entries) > 1:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.descriptors.nbytes
        return features


def _learned_inputs(
    group: h5py.Group, descriptors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An image's keypoints, scores, descriptors and (width, height) for a learned matcher."""
    count = len(descriptors)
    keypoints = np.asarray(group["keypoints"], dtype=np.float32)
    scores = np.asarray(group["scores"], dtype=np.float32)
    size = np.asarray(group["image_size"], dtype=np.float32)
    if keypoints.shape != (count, 2) or scores.shape != (count,) or size.shape != (2,) or (size <= 0).any():
        raise ValueError(
            f"keypoints {keypoints.shape}, scores {scores.shape} and image_size {size.tolist()} "
            f"do not fit {count} descriptors"
        )
    device = descriptors.device
    as_tensor = [torch.from_numpy(array).to(device) for array in (keypoints, scores, size)]
    return as_tensor[0], as_tensor[1], descriptors, as_tensor[2]


def descriptor_counts(h5: h5py.File, names: Sequence[str]) -> tuple[dict[str, int], int]:
    """Descriptors per image and the largest bytes per descriptor, from dataset shapes (no data
    read); an unreadable entry counts 0 (the cache reports it when the pair comes up)."""
    counts: dict[str, int] = {}
    row_bytes = 1
    for name in names:
        try:
            dataset = h5[name]["descriptors"]
            counts[name] = int(dataset.shape[-1])
            row_bytes = max(row_bytes, dataset.dtype.itemsize * int(dataset.shape[0]))
        except (OSError, KeyError, TypeError, IndexError):
            counts[name] = 0
    return counts, row_bytes


def tile_order(pairs: list[Pair], counts: dict[str, int], block_descriptors: int) -> list[Pair]:
    """Pairs reordered so the cache reads each image O(total / budget) times, not once per pair.

    Images are cut, in order of first use, into blocks of at most ``block_descriptors``; pairs
    are sorted (stably) by the two blocks they join, so matching walks the block-pair tiles one
    at a time and a tile's two blocks fit the cache together. When everything fits, the order
    is unchanged.
    """
    block: dict[str, int] = {}
    current = used = 0
    for name in dict.fromkeys(name for pair in pairs for name in pair):
        if used and used + counts[name] > block_descriptors:
            current, used = current + 1, 0
        block[name] = current
        used += counts[name]
    return sorted(pairs, key=lambda p: sorted((block[p[0]], block[p[1]])))


def plan_batches(
    pairs: list[Pair], counts: dict[str, int], batch_size: int, max_elements: int = MAX_BATCH_ELEMENTS
) -> Iterator[list[Pair]]:
    """Consecutive pairs in batches of at most ``batch_size`` whose padded distance matrices fit
    ``max_elements`` entries (a single pair always forms a batch)."""
    batch: list[Pair] = []
    rows = columns = 0
    for pair in pairs:
        grown_rows, grown_columns = max(rows, counts[pair[0]]), max(columns, counts[pair[1]])
        if batch and (
            len(batch) == batch_size or (len(batch) + 1) * grown_rows * grown_columns > max_elements
        ):
            yield batch
            batch, grown_rows, grown_columns = [], counts[pair[0]], counts[pair[1]]
        batch.append(pair)
        rows, columns = grown_rows, grown_columns
    if batch:
        yield batch


def _features_identity(features: Path) -> tuple[dict[str, Any], list[str]]:
    """What a match store records of its feature store, and the store's image names: its
    extraction settings (weights checksum included) and its store id, which a copy or a move
    keeps, growth keeps, and a replacement (--overwrite) changes; not its path."""
    if not features.is_file():
        raise ConfigError(f"{features}: no such feature store (extract features first, or pass --features)")
    store = read_store(features, "features", "--features")
    return {"features_settings": store.settings, "features_id": store.store_id}, store.names


def _legacy_identity(out: Path, features: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The identity to resume ``out`` with. A match store written before feature stores had an id
    recorded its feature store by absolute path: it is resumed as before (by that path) when
    ``features`` is that very file, and refused otherwise (its matches may be of other features)."""
    recorded = (read_settings(out, "matches") or {}).get("features")
    if recorded is None:
        return identity
    try:
        same = os.path.samefile(recorded, features)
    except OSError:
        same = False
    if not same:
        raise StoreError(
            f"{out}: an older match store that names its feature store by path ({recorded}), not "
            f"{features}; match again with --overwrite (or pass --features {recorded})"
        )
    return {"features": recorded, "features_settings": identity["features_settings"]}


def _estimated_pairs(pairs_file: Path, first_chunk: list[Pair], start: FilePosition) -> int:
    """The file's pairs from ``start`` on, estimated from its size and the first chunk's line
    length (progress)."""
    if len(first_chunk) < min(pairs_core.FIRST_CHUNK, pairs_core.PAIRS_CHUNK):
        return len(first_chunk)
    line = sum(len(a) + len(b) + 2 for a, b in first_chunk) / len(first_chunk)
    return max(len(first_chunk), round((pairs_file.stat().st_size - start.offset) / line))


def _resume_point(out: Path, pairs_file: Path, run: MatchRun) -> tuple[FilePosition, int]:
    """Where earlier runs left every pair of the file stored (and how many pairs lie before it):
    the file's start with ``run.overwrite``."""
    if run.overwrite:
        return FilePosition(), 0
    return load_resume_point(out, pairs_file, _shard_label(run), current_store_id(out, "matches"))


def _shard_label(run: MatchRun) -> str | None:
    return str(run.shard) if run.shard else None


def _learned_model(
    config: MatchConfig, settings: dict[str, Any], target: torch.device
) -> torch.nn.Module | None:
    """The learned matcher on ``target`` (None for nearest neighbours); its weights' identity is
    added to ``settings``."""
    if config.matcher == "nn":
        return None
    from .weights import build_matcher, load_matcher_weights

    weights = load_matcher_weights(config.matcher, config.matcher_weights)
    settings.update(matcher_weights=weights.label, matcher_weights_sha1=weights.sha1)
    return build_matcher(weights, config.learned_options()).to(target)


def match_pairs(
    pairs_file: Path | str,
    features: Path | str,
    out: Path | str,
    config: MatchConfig | None = None,
    run: MatchRun | None = None,
) -> Summary:
    """Match every pair of ``pairs_file`` with the features of ``features`` into the store ``out``.

    ``config``: the matcher's settings (``MatchConfig``), recorded in the store; ``run``: how the
    run goes (``MatchRun``: device, batch size, cache, overwrite, quiet, shard). The pairs file
    is streamed in chunks (``read_pair_chunks``), each checked before it is matched: memory and
    start-up time do not grow with the file; a bad line raises ``ConfigError`` naming it, the
    pairs matched before it stay saved. Pairs already in ``out``, in either order (or met earlier
    in the file), are skipped (resume); a store made with other settings or from another feature
    store is refused unless ``run.overwrite``. Pairs whose features cannot be read are recorded
    as failed in the returned ``Summary`` and the run goes on. ``run.shard``: match only the
    pairs of this shard (see ``sp_extract.shards``).
    """
    config, run = config or MatchConfig(), run or MatchRun()
    pairs_file, features, out = Path(pairs_file), Path(features), Path(out)
    identity, names = _features_identity(features)
    if not run.overwrite and out.is_file():
        identity = _legacy_identity(out, features, identity)
    start, before = _resume_point(out, pairs_file, run)
    chunks = read_pair_chunks(pairs_file, set(names), start=start)
    # a bad first chunk is refused before the store is touched; none: resumed at the file's end
    first_chunk = next(chunks, PairChunk(end=start))
    summary = Summary(
        command="match-pairs", output=str(out), total=0, unit="pairs", count_label="matches per pair"
    )
    store_run = StoreRun(summary, run.quiet)
    target = resolve_device(run.device)
    summary.device = str(target)
    settings = {**config.settings(), **identity}
    model = _learned_model(config, settings, target)
    info = {"pairs": str(pairs_file), "features_path": str(features.resolve())}  # for people only
    with store_run.writing(out, "matches", settings, run.overwrite, info) as writer:
        estimated = _estimated_pairs(pairs_file, first_chunk, start) // (run.shard.count if run.shard else 1)
        with (
            open_store(features) as h5,
            ThreadPoolExecutor(os.cpu_count()) as pool,  # OpenCV releases the GIL
            store_run.running(estimated),
            device_scope(target),
        ):
            cache = FeatureCache(
                h5, target, run.cache_mb << 20, keypoints=config.verify is not None, learned=model is not None
            )
            matching = _Matching(
                h5, cache, *_matcher(config, target, model), config, run, writer, pool, store_run
            )
            summary.total = summary.skipped = before
            for read in itertools.chain([first_chunk], chunks):
                for pairs_in_batch in matching.batches(read):
                    matching.start(pairs_in_batch)
                    if store_run.stopped():
                        break
                if store_run.stopped():
                    break
                matching.save()
                store_run.progress.advance(len(writer.flush()))
                if not summary.failed:  # every pair up to here is in the store
                    save_resume_point(
                        out, pairs_file, _shard_label(run), writer.store_id, read.end, summary.total
                    )
            matching.save()
            store_run.progress.advance(len(writer.flush()))
    return store_run.finish()


def _matcher(config: MatchConfig, target: torch.device, model: torch.nn.Module | None) -> tuple[Matcher, int]:
    """The function matching a batch of loaded pairs (nearest neighbours, or ``model``) and the
    largest work of a batch, in padded N0 x N1 entries of all its pairs together."""
    # CPU: small batches, matrices in cache-sized blocks; GPU: large batches, one block
    work = CPU_WORK_ELEMENTS if target.type == "cpu" else MAX_BATCH_ELEMENTS
    if model is None:
        return lambda loaded: nearest_neighbours(
            [f.descriptors for f, _ in loaded], [s.descriptors for _, s in loaded], config, work
        ), work
    # CPU: a pair at a time (padding only costs); GPU: padded batches
    learned_work = 1 if target.type == "cpu" else LEARNED_BATCH_ELEMENTS
    return lambda loaded: match_batch(
        model, [f.learned for f, _ in loaded], [s.learned for _, s in loaded]
    ), learned_work


@dataclass
class _Matching:
    """A run's matching, chunk by chunk of the pairs file: the pairs still to match in batches
    that fit the device, through the feature cache; each batch is saved while the device
    matches the next (on CUDA)."""

    h5: h5py.File
    cache: FeatureCache
    matcher: Matcher
    work: int  # a batch's largest work, padded N0 x N1 entries of its pairs together
    config: MatchConfig
    run: MatchRun
    writer: StoreWriter
    pool: Executor
    store_run: StoreRun
    counts: dict[str, int] = field(default_factory=dict)  # descriptors of each image met
    row_bytes: int = 1  # the largest bytes per descriptor met
    pending: _Batch | None = None  # matched, not saved yet

    def batches(self, chunk: list[Pair]) -> Iterator[list[Pair]]:
        """The pairs of ``chunk`` still to match (of the run's shard, not in the store, in either
        order, also those repeated from an earlier chunk, which is flushed before), in batches;
        the summary counts them."""
        summary = self.store_run.summary
        if self.run.shard is not None:
            chunk = [p for p in chunk if self.run.shard.holds_pair(*p)]
        todo = [p for p, skip in zip(chunk, stored_pairs(self.writer.done, chunk)) if not skip]
        summary.total += len(chunk)
        summary.skipped += len(chunk) - len(todo)
        unseen = [n for n in dict.fromkeys(n for p in todo for n in p) if n not in self.counts]
        new_counts, new_row_bytes = descriptor_counts(self.h5, unseen)
        self.counts.update(new_counts)
        self.row_bytes = max(self.row_bytes, new_row_bytes)
        todo = tile_order(todo, self.counts, max(1, self.cache.budget_bytes // (2 * self.row_bytes)))
        return plan_batches(todo, self.counts, self.run.batch_size, self.work)

    def start(self, pairs: list[Pair]) -> None:
        """Start matching ``pairs`` on the device, then save the batch before it."""
        batch = _Batch.start(pairs, self.cache, self.matcher, self.store_run)
        self.save()  # on CUDA, saved while the device matches ``batch``
        self.pending = batch

    def save(self) -> None:
        """Hand the pending batch's results to the writer."""
        if self.pending is not None:
            self.pending.save(self.config, self.writer, self.store_run, self.pool)
            self.pending = None


@dataclass
class _Batch:
    """One batch of pairs whose matches are computed, or being computed, on the device."""

    pairs: list[Pair]
    loaded: list[tuple[ImageFeatures, ImageFeatures]]
    results: HostCopy  # matches (int32) and scores

    @classmethod
    def start(
        cls,
        pairs: list[Pair],
        cache: FeatureCache,
        matcher: Matcher,
        run: StoreRun,
    ) -> _Batch | None:
        """Fetch the features, queue the matching and the copy of its results to the host
        (asynchronous on CUDA). Pairs whose features cannot be read are recorded as failed."""
        ready, loaded = [], []
        for a, b in pairs:
            first, second = cache.get(a), cache.get(b)
            if first is None or second is None:
                bad = a if first is None else b
                run.fail(f"{a} {b}", f"{bad}: {cache.failed[bad]}")
                continue
            ready.append((a, b))
            loaded.append((first, second))
        if not ready:
            return None
        matches, scores = matcher(loaded)
        return cls(ready, loaded, copy_to_host([matches.to(torch.int32), scores]))

    def save(self, config: MatchConfig, writer: StoreWriter, run: StoreRun, pool: Executor) -> None:
        """Wait for the results, verify them if asked (pairs in parallel on ``pool``), and hand
        them to the writer."""
        matches, scores = (tensor.numpy() for tensor in self.results.wait())
        rows = [matches[row, : len(first.descriptors)].copy() for row, (first, _) in enumerate(self.loaded)]
        inliers: list[int | None] = [None] * len(rows)
        if config.verify is not None:

            def verify(row: int) -> tuple[np.ndarray, int]:
                first, second = self.loaded[row]
                return verify_matches(
                    first.keypoints, second.keypoints, rows[row], config.verify, config.verify_threshold
                )

            results = list(pool.map(verify, range(len(rows))))
            rows, inliers = [kept for kept, _ in results], [count for _, count in results]
        for row, (a, b) in enumerate(self.pairs):
            matches0 = rows[row]
            scores0 = np.where(matches0 >= 0, scores[row, : len(matches0)], 0.0).astype(np.float16)
            attrs = {} if inliers[row] is None else {"matches0": {"num_inliers": inliers[row]}}
            run.summary.counts.append(int((matches0 >= 0).sum()))
            run.progress.advance(
                len(writer.add(pair_key(a, b), {"matches0": matches0, "matching_scores0": scores0}, attrs))
            )
