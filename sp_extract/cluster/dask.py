"""Runs on a Dask cluster (``--scheduler``): one task a shard, then one merge.

The driver (the ``sp-extract`` process) lists the work, splits it by ``shards.Shard`` into
per-shard work files in ``OUT.shards/`` (which every worker must see), submits one task a
shard and merges the shard stores into ``OUT`` (``store.merge``). A task is an ordinary
extract or match-pairs run into its shard's store, so a task re-run after its worker died
resumes that store: nothing is computed or stored twice. Work ``OUT`` already holds is left
out. Needs ``distributed`` (``pip install 'sp-extract[dask]'``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SpExtractError, StoreError
from ..report import ExtractSummary, Progress, Summary, recording, warn
from ..shards import SHARD_NAME, Shard, image_shard, pair_shard, shard_folder
from ..store.catalog import remove_store
from ..store.index import NameIndex

SHARD_IMAGES = 2000  # a shard's images when --shards is not given (docs/cluster.md)
SHARD_PAIRS = 50000  # a shard's pairs when --shards is not given
RETRIES = 2  # re-runs of a task that raised (a task whose worker died is re-run by Dask itself)
WORKER_WAIT_S = 600  # how long to wait for a first worker on a remote scheduler


def import_distributed() -> Any:
    """Dask's ``distributed``, or the one-line hint naming the extra."""
    try:
        import distributed
    except ImportError:
        raise ConfigError(
            "--scheduler needs Dask: pip install 'sp-extract[dask]' (or pip install distributed)"
        ) from None
    return distributed


def connect(scheduler: str) -> tuple[Any, Callable[[], None]]:
    """A Dask client for ``local[:WORKERS]`` (a cluster of worker processes on this machine,
    one per GPU, else WORKERS or 1), a scheduler file (``.json``) or a scheduler ADDRESS, and
    the function closing what was started."""
    distributed = import_distributed()
    if scheduler == "local" or scheduler.startswith("local:"):
        import dask
        import torch

        gpus = torch.cuda.device_count()
        count = scheduler.partition(":")[2]
        if count and (not count.isdigit() or int(count) < 1):
            raise ConfigError(f"--scheduler {scheduler}: expected local or local:WORKERS (a number >= 1)")
        # worker processes started afresh, never forked from this one (processes.py says why)
        dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})
        cluster = distributed.LocalCluster(
            n_workers=int(count) if count else max(gpus, 1),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            resources={"GPU": 1} if gpus else None,
        )
        client = distributed.Client(cluster)

        def close() -> None:
            client.close()
            cluster.close()

        return client, close
    try:
        if scheduler.endswith(".json"):
            client = distributed.Client(scheduler_file=scheduler, timeout=30)
        else:
            client = distributed.Client(scheduler, timeout=30)
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except (OSError, TimeoutError, ValueError) as error:
        raise ConfigError(f"--scheduler {scheduler}: cannot use this Dask scheduler ({error})") from error
    return client, client.close


def workers(client: Any) -> dict[str, dict[str, Any]]:
    """The scheduler's description of every worker (``n_workers=-1``: all, not the first few;
    older ``distributed`` versions list all without it)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:
        return client.scheduler_info()["workers"]


def worker_device(device: str) -> str:
    """``device`` for this worker: ``auto`` on a machine of several GPUs (a local cluster)
    becomes the GPU of the worker's number; a worker of its own GPU (``CUDA_VISIBLE_DEVICES``
    set per worker) keeps ``auto``."""
    import torch

    gpus = torch.cuda.device_count()
    if device != "auto" or gpus < 2:
        return device
    from distributed import get_worker

    name = get_worker().name
    return f"cuda:{name % gpus}" if isinstance(name, int) else device


def run_shard(kind: str, work: Path, store: Path, task: dict[str, Any]) -> Summary:
    """One task: the shard's extract (``work``: its image list) or match-pairs (``work``: its
    pairs file) into its ``store``, resuming what a killed attempt saved. ``task``: the other
    arguments of ``extract`` or ``match_pairs``, its ``run`` options those of the whole run."""
    run = replace(task["run"], device=worker_device(task["run"].device), quiet=True)
    with recording(live=False):  # its warnings go back in its summary: the driver shows them
        if kind == "features":
            from ..extraction.pipeline import extract

            return extract(out=store, **{**task, "run": replace(run, image_list=work)})
        from ..matching.run import match_pairs

        return match_pairs(pairs_file=work, out=store, **{**task, "run": run})


@dataclass
class ShardWork:
    """A shard's task: its work file (image list or pairs file), store and item count."""

    shard: Shard
    work: Path
    store: Path
    items: int


def shard_count(folder: Path, items: int, per_shard: int, workers: int, shards: int | None) -> int:
    """``shards``, else the count of the shard stores already in ``folder`` (a resumed run keeps
    its split), else enough for ``per_shard`` items each and at least one a worker."""
    if shards is not None:
        if shards < 1:
            raise ConfigError(f"--shards must be >= 1, got {shards}")
        return shards
    found = {int(m[2]) for p in folder.glob("*-of-*.h5") if (m := SHARD_NAME.fullmatch(p.name))}
    if len(found) == 1:
        return found.pop()
    return max(1, workers, math.ceil(items / per_shard))


def write_work(
    out: Path, items: Iterable[tuple[str, ...]], count: int, shard_of: Callable[..., int]
) -> list[ShardWork]:
    """Split ``items`` (image names, or pairs) into ``count`` shards by ``shard_of(*item, count)``:
    one work file each, ``OUT.shards/K-of-N.txt`` (one item a line); shards without items are
    left out."""
    folder = shard_folder(out)
    shards = [Shard(index, count) for index in range(1, count + 1)]
    handles, counts = {}, dict.fromkeys(range(1, count + 1), 0)
    try:
        for item in items:
            index = shard_of(*item, count)
            if index not in handles:
                handles[index] = open(shards[index - 1].store(out).with_suffix(".txt"), "w", encoding="utf-8")  # noqa: SIM115
            handles[index].write(" ".join(item) + "\n")
            counts[index] += 1
    except OSError as error:
        raise ConfigError(f"{folder}: cannot write the shards' work files ({error})") from error
    finally:
        for handle in handles.values():
            handle.close()
    return [
        ShardWork(shard, shard.store(out).with_suffix(".txt"), shard.store(out), counts[shard.index])
        for shard in shards
        if counts[shard.index]
    ]


def run_tasks(
    client: Any, kind: str, jobs: list[ShardWork], task: dict[str, Any]
) -> tuple[list[ShardWork], list[Summary], list[tuple[ShardWork, BaseException]]]:
    """Submit one task a shard (with the ``GPU`` resource when workers declare it) and collect
    them as they finish: the shards done with their summaries, and those that failed."""
    distributed = import_distributed()
    declared = [worker.get("resources", {}) for worker in workers(client).values()]
    resources = {"GPU": 1} if any(found.get("GPU") for found in declared) else None
    futures = {
        client.submit(
            run_shard,
            kind,
            job.work,
            job.store,
            task,
            key=f"sp-extract-{kind}-{job.shard.index}-of-{job.shard.count}-{time.time_ns()}",
            retries=RETRIES,
            resources=resources,
            pure=False,
        ): job
        for job in jobs
    }
    progress = Progress(
        sum(job.items for job in jobs), "images" if kind == "features" else "pairs", quiet=task["run"].quiet
    )
    done: list[ShardWork] = []
    summaries: list[Summary] = []
    failed: list[tuple[ShardWork, BaseException]] = []
    try:
        for future in distributed.as_completed(futures):
            job = futures[future]
            try:
                summary = future.result()
            except Exception as error:  # the task's own error, or KilledWorker after repeated deaths
                failed.append((job, error))
                progress.message(f"shard {job.shard} failed: {error}")
                continue
            done.append(job)
            summaries.append(summary)
            progress.advance(summary.done + summary.skipped + len(summary.failed))
    finally:
        progress.close()
        for future in futures:
            future.cancel()
    return done, summaries, failed


@dataclass(frozen=True)
class ShardedRun:
    """A run as shards on a Dask cluster (``run_sharded``)."""

    scheduler: str  # local[:WORKERS], a scheduler file (.json) or a scheduler ADDRESS (``connect``)
    shards: int | None  # how many (``shard_count``)
    kind: str  # "features" (extract) or "matches" (match-pairs)
    out: Path  # the merged store
    items: Callable[[NameIndex], tuple[int, Iterable[tuple[str, ...]]]]  # the work (``run_sharded``)
    task: dict[str, Any]  # each shard's arguments to ``run_shard``, ``run``: ExtractRun or MatchRun
    info: dict[str, str]  # the merged store's attributes for people (the input named by the user)


def run_sharded(sharded: ShardedRun) -> tuple[Summary, list[Summary], int]:
    """The driver: ``sharded.items(held)`` gives the work (its size and its items, less those whose
    entries ``held``, the index of what ``sharded.out`` holds, names); run it as shards on the
    cluster, merge into ``sharded.out``. Returns the merge's summary, the shards' summaries and
    how many entries ``sharded.out`` held already."""
    from ..store.catalog import stored_names
    from ..store.merge import merge_stores, merge_summary

    kind, out, overwrite = sharded.kind, Path(sharded.out), sharded.task["run"].overwrite
    if not out.parent.is_dir():
        raise StoreError(f"{out}: the output folder {out.parent} does not exist")
    held, held_count = (NameIndex(), 0) if overwrite or not out.exists() else stored_names(out, kind)
    folder = shard_folder(out)
    folder.mkdir(exist_ok=True)
    client, close = connect(sharded.scheduler)
    try:
        total, work = sharded.items(held)
        per_shard = SHARD_IMAGES if kind == "features" else SHARD_PAIRS
        count = shard_count(folder, total, per_shard, len(workers(client)), sharded.shards)
        jobs = write_work(out, work, count, image_shard if kind == "features" else pair_shard)
        if jobs:
            done, summaries, failed = run_tasks(client, kind, jobs, sharded.task)
    finally:
        close()
    if not jobs:  # OUT holds everything already
        with contextlib.suppress(OSError):
            folder.rmdir()
        return merge_summary(kind, out).finish(0, time.monotonic()), [], held_count
    if failed and not done:
        error = failed[0][1]
        raise (
            error if isinstance(error, SpExtractError) else StoreError(f"shard {failed[0][0].shard}: {error}")
        )
    merged = merge_stores(
        out,
        [job.store for job in done],
        overwrite=overwrite and not held_count,
        all_shards=False,
        info=sharded.info,
    )  # shards without work have no store
    merged.failed += [{"name": f"shard {job.shard}", "reason": str(error)} for job, error in failed]
    if not failed and not merged.interrupted:  # everything is in OUT: the shards have served
        for job in jobs:
            remove_store(job.store)
            job.work.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept if it holds anything else
            folder.rmdir()
    return merged, summaries, held_count


def combined(kind: str, merged: Summary, shards: list[Summary], held: int, started: float) -> Summary:
    """The run's summary: the shards' counts, failures and warnings, the merge's output."""
    summary = (ExtractSummary if kind == "features" else Summary)(
        command="extract" if kind == "features" else "match-pairs",
        output=merged.output,
        unit=merged.unit,
        count_label=merged.count_label,
    )
    summary.total = held + merged.total
    summary.skipped = held + merged.skipped
    for shard in shards:
        summary.failed += shard.failed
        summary.counts += shard.counts
        for warning in shard.warnings:  # once each, as a run on one machine shows it
            warn(warning)
        summary.device = summary.device or f"Dask workers ({shard.device})"
    summary.failed += merged.failed
    summary.notes += merged.notes
    summary.interrupted, summary.exit_code = merged.interrupted, merged.exit_code
    return summary.finish(merged.total - merged.skipped, started)


def extract_on_cluster(
    scheduler: str, shards: int | None, images: Path | str, out: Path | str, config: Any, run: Any
) -> Summary:
    """``extraction.pipeline.extract`` (its ``config``, ExtractConfig, and ``run``, ExtractRun) run
    as ``shards`` on the Dask cluster of ``scheduler``, merged into ``out``."""
    from ..extraction.discover import find_images

    started = time.monotonic()
    root = Path(images).absolute()
    names = find_images(root, Path(run.image_list) if run.image_list else None).names
    if not names:
        raise ConfigError(f"{root}: no images found")

    def items(held: NameIndex) -> tuple[int, list[tuple[str, ...]]]:
        todo = [(name,) for name, done in zip(names, held.contains(names)) if not done]
        return len(todo), todo

    out = Path(out).absolute()
    if out.is_file() and not run.overwrite:  # refused now, not after the cluster's work
        from ..extraction.pipeline import store_settings
        from ..extraction.weights import load_weights
        from ..store.catalog import read_store, settings_difference

        stored = read_store(out, "features").settings
        wanted = store_settings(config, load_weights(run.weights).sha1)
        if stored != wanted:
            raise StoreError(
                f"{out}: made with other settings ({settings_difference(stored, wanted)}); "
                "use the same options, another --out, or --overwrite"
            )
    task = {"images": root, "config": config, "run": run}
    sharded = ShardedRun(scheduler, shards, "features", out, items, task, {"images": str(root)})
    merged, summaries, held = run_sharded(sharded)
    return combined("features", merged, summaries, held, started)


def match_on_cluster(
    scheduler: str,
    shards: int | None,
    pairs_file: Path | str,
    features: Path | str,
    out: Path | str,
    config: Any,
    run: Any,
) -> Summary:
    """``matching.run.match_pairs`` (its ``config``, MatchConfig, and ``run``, MatchRun) run as
    ``shards`` on the Dask cluster of ``scheduler``, merged into ``out``. The pairs file is
    checked and split as it is read; pairs ``out`` holds (in either order) are left out."""
    from ..pairs.core import read_pair_chunks, stored_pairs
    from ..store.catalog import read_store

    started = time.monotonic()
    pairs_file, features = Path(pairs_file).absolute(), Path(features).absolute()
    if not features.is_file():
        raise ConfigError(f"{features}: no such feature store (extract features first, or pass --features)")
    names = set(read_store(features, "features", "--features").names)
    try:
        with open(pairs_file, "rb") as handle:
            lines = sum(1 for _ in handle)
    except OSError as error:
        raise ConfigError(f"{pairs_file}: cannot read pairs file ({error.strerror or error})") from error

    def items(held: NameIndex) -> tuple[int, Iterable[tuple[str, ...]]]:
        def todo() -> Iterator[tuple[str, ...]]:
            for chunk in read_pair_chunks(pairs_file, names):
                yield from (pair for pair, skip in zip(chunk, stored_pairs(held, chunk)) if not skip)

        return lines, todo()

    task = {"features": features, "config": config, "run": run}
    out = Path(out).absolute()
    sharded = ShardedRun(scheduler, shards, "matches", out, items, task, {"pairs": str(pairs_file)})
    merged, summaries, held = run_sharded(sharded)
    return combined("matches", merged, summaries, held, started)
