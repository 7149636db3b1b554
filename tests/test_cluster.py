"""Many machines (issue 12): shards, merge, runs on a Dask cluster.

Every result is compared, entry for entry (datasets, types, values, attributes), with a
single-process run of the same photos, read back with plain h5py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_image

from sp_extract.cli import cli
from sp_extract.errors import ConfigError, StoreError
from sp_extract.extraction.config import ExtractConfig, ExtractRun
from sp_extract.extraction.pipeline import extract
from sp_extract.matching.config import MatchConfig, MatchRun
from sp_extract.matching.run import match_pairs
from sp_extract.names import pair_key
from sp_extract.pairs.core import exhaustive_pairs, write_pairs
from sp_extract.shards import Shard, parse_shard
from sp_extract.store.catalog import read_store
from sp_extract.store.merge import merge_stores, read_entry
from sp_extract.store.writer import StoreWriter

CONFIG = ExtractConfig(resize_max=160)  # small: the runs compared are many


def entries(path: Path) -> dict[str, dict[str, tuple]]:
    """Every entry of a store: {group: {dataset: (dtype, array, attributes)}}, read with h5py."""
    found: dict[str, dict[str, tuple]] = {}

    def visit(name: str, item: h5py.HLObject) -> None:
        if isinstance(item, h5py.Dataset):
            group, _, key = name.rpartition("/")
            found.setdefault(group, {})[key] = (item.dtype, item[()], dict(item.attrs))

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
    return found


def assert_same_entries(path: Path, reference: Path) -> None:
    got, expected = entries(path), entries(reference)
    assert sorted(got) == sorted(expected)
    for name, datasets in expected.items():
        assert sorted(got[name]) == sorted(datasets), name
        for key, (dtype, array, attrs) in datasets.items():
            got_dtype, got_array, got_attrs = got[name][key]
            assert got_dtype == dtype and np.array_equal(got_array, array), f"{name}/{key}"
            assert got_attrs == attrs, f"{name}/{key}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, sacre_coeur: Path, real_weights: Path) -> dict:
    """A single-process run on the photos: features, exhaustive pairs, matches."""
    folder = tmp_path_factory.mktemp("single")
    features, pairs, matches = folder / "feats.h5", folder / "pairs.txt", folder / "matches.h5"
    extract(sacre_coeur, features, CONFIG, ExtractRun(weights=str(real_weights)))
    names = sorted(entries(features))
    write_pairs(exhaustive_pairs(names), pairs)
    match_pairs(pairs, features, matches, MatchConfig())
    return {"features": features, "pairs": pairs, "matches": matches, "names": names}


# -- shards ---------------------------------------------------------------------------------
def test_shard_split_is_a_stable_hash_of_the_name() -> None:
    names = [f"sub/img_{i:04d}.jpg" for i in range(300)]
    for count in (1, 3, 7):
        owners = [[k for k in range(1, count + 1) if Shard(k, count).holds_image(n)] for n in names]
        assert all(len(owner) == 1 for owner in owners)  # each image in exactly one shard
        for name, (owner,) in zip(names, owners):  # an independent BLAKE2b-64, big-endian, mod N
            digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
            assert owner == int.from_bytes(digest, "big") % count + 1
    assert len({k for n in names for k in range(1, 8) if Shard(k, 7).holds_image(n)}) == 7
    # a pair and its reverse, and the same pair as hloc flattens its names, share their shard
    for k in range(1, 8):
        shard = Shard(k, 7)
        assert shard.holds_pair("a/x.jpg", "b.jpg") == shard.holds_pair("b.jpg", "a/x.jpg")
        assert shard.holds_pair("a/x.jpg", "b.jpg") == shard.holds_pair("a-x.jpg", "b.jpg")
    assert Shard(3, 16).store(Path("out/feats.h5")) == Path("out/feats.h5.shards/03-of-16.h5")


def test_shard_auto_from_slurm_and_kubernetes() -> None:
    def slurm(task: int, first: int, count: int, step: int = 1) -> dict[str, str]:
        names = ("ID", "MIN", "COUNT", "STEP")
        return {f"SLURM_ARRAY_TASK_{n}": str(v) for n, v in zip(names, (task, first, count, step))}

    # --array=0-15 and --array=1-16 both number the shards 1 .. 16; --array=2-8:2 is 4 tasks
    assert parse_shard("auto", env=slurm(0, 0, 16)) == Shard(1, 16)
    assert parse_shard("auto", env=slurm(16, 1, 16)) == Shard(16, 16)
    assert parse_shard("auto", env=slurm(6, 2, 4, step=2)) == Shard(3, 4)
    assert parse_shard("auto", 8, env={"JOB_COMPLETION_INDEX": "0"}) == Shard(1, 8)
    assert parse_shard("auto", 8, env={"JOB_COMPLETION_INDEX": "7"}) == Shard(8, 8)
    assert parse_shard(" 2/5 ") == Shard(2, 5)
    refused = {
        ("0/4", None, ()): "1 <= K <= N",
        ("5/4", None, ()): "1 <= K <= N",
        ("2-4", None, ()): "expected K/N",
        ("2/4", 5, ()): "disagree",
        ("auto", None, ()): "neither SLURM_ARRAY_TASK_ID",
        ("auto", None, (("JOB_COMPLETION_INDEX", "3"),)): "needs --shards N",
        ("auto", 3, (("JOB_COMPLETION_INDEX", "3"),)): "not below --shards 3",
        ("auto", 8, (("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "4"))): "has 4 tasks",
        ("auto", None, (("SLURM_ARRAY_TASK_ID", "x"),)): "not a number",
    }
    for (spec, shards, env), message in refused.items():
        with pytest.raises(ConfigError, match=message):
            parse_shard(spec, shards, env=dict(env))


def test_shards_then_merge_equal_a_single_run(
    reference: dict, sacre_coeur: Path, real_weights: Path, tmp_path: Path
) -> None:
    """extract shards -> merge features -> match shards against the merged store -> merge
    matches -> COLMAP database: entry for entry what one process writes."""
    merged = {}
    for count in (1, 3, 7):
        out = tmp_path / f"feats{count}.h5"
        for index in range(1, count + 1):
            shard = Shard(index, count)
            store = shard.store(out)
            store.parent.mkdir(exist_ok=True)
            summary = extract(sacre_coeur, store, CONFIG, ExtractRun(weights=str(real_weights), shard=shard))
            assert summary.exit_code == 0
        assert sum(len(entries(p)) for p in out.with_name(out.name + ".shards").glob("*.h5")) == 10
        summary = merge_stores(out, [out.with_name(out.name + ".shards")])
        assert summary.exit_code == 0 and summary.done == 10 and not summary.failed
        assert_same_entries(out, reference["features"])
        merged[count] = out
    # matching in 3 shards against the merged features; the merged matches equal one run's
    features, matches = merged[3], tmp_path / "matches.h5"
    for index in range(1, 4):
        store = Shard(index, 3).store(matches)
        store.parent.mkdir(exist_ok=True)
        match_pairs(reference["pairs"], features, store, MatchConfig(), MatchRun(shard=Shard(index, 3)))
    summary = merge_stores(matches, [Shard(k, 3).store(matches) for k in range(1, 4)], reference["pairs"])
    assert summary.exit_code == 0 and summary.done == 45
    assert_same_entries(matches, reference["matches"])
    # the merged match store names the merged feature store: COLMAP takes the two together
    from sp_extract.sfm.colmap import write_database
    from sp_extract.sfm.config import ColmapRun

    database = write_database(
        sacre_coeur, features, matches, tmp_path / "database.db", run=ColmapRun(num_threads=1)
    )
    assert database.exit_code == 0


# -- merge refusals and reports ---------------------------------------------------------------
@pytest.fixture
def shard_stores(tmp_path: Path, random_weights: Path) -> tuple[Path, Path, list[Path]]:
    """Six small images extracted in 3 shards (random weights): folder, --out, shard stores."""
    images = tmp_path / "images"
    for seed in range(6):
        write_image(images / f"im{seed}.png", seed=seed)
    out = tmp_path / "feats.h5"
    stores = []
    for index in range(1, 4):
        store = Shard(index, 3).store(out)
        store.parent.mkdir(exist_ok=True)
        extract(images, store, run=ExtractRun(weights=str(random_weights), shard=Shard(index, 3)))
        stores.append(store)
    return images, out, stores


def test_merge_refuses_other_settings_and_differing_copies(
    shard_stores: tuple[Path, Path, list[Path]], random_weights: Path, tmp_path: Path
) -> None:
    images, out, stores = shard_stores
    other = tmp_path / "other.h5"
    extract(images, other, ExtractConfig(nms_radius=3), ExtractRun(weights=str(random_weights)))
    with pytest.raises(StoreError, match=r"other settings .*nms_radius: 4 \(1-of-3.h5\) vs 3 \(other.h5\)"):
        merge_stores(out, [*stores, other])
    # the same image, other values, same settings: refused, naming the entry
    name = sorted(entries(stores[0]))[0]
    changed = tmp_path / "changed.h5"
    extract(images, changed, run=ExtractRun(weights=str(random_weights)))
    with h5py.File(changed, "r+") as h5:
        h5[name]["scores"][0] += 1
    with pytest.raises(StoreError, match=f"entry '{name}' differs .*scores: different values"):
        merge_stores(out, [*stores, changed])
    assert not out.exists()  # refused before anything was written
    # match stores of different feature stores: the difference named, with the way out
    (tmp_path / "p.txt").write_text("im0.png im1.png\n")
    merge_stores(tmp_path / "merged.h5", stores)
    match_pairs(tmp_path / "p.txt", tmp_path / "merged.h5", tmp_path / "m1.h5")
    match_pairs(tmp_path / "p.txt", changed, tmp_path / "m2.h5")
    with pytest.raises(StoreError, match="features_id.*merge the feature shards first"):
        merge_stores(tmp_path / "m.h5", [tmp_path / "m1.h5", tmp_path / "m2.h5"])
    # a shard whose run was killed (results in STORE.parts/, not folded) is refused, named
    settings = read_store(stores[1], "features").settings
    with h5py.File(stores[0], "r") as h5:
        entry = read_entry(h5[name])
    with pytest.raises(RuntimeError), StoreWriter(stores[1], "features", settings) as writer:
        writer.add("late.png", *entry)
        writer.flush()
        raise RuntimeError("killed")
    with pytest.raises(StoreError, match=f"{stores[1]}: holds unfinished results"):
        merge_stores(out, stores)


def test_merge_reports_a_missing_shard_and_unlisted_names(
    shard_stores: tuple[Path, Path, list[Path]], tmp_path: Path
) -> None:
    _, out, stores = shard_stores
    listed = tmp_path / "list.txt"
    held = sorted(name for store in stores for name in entries(store))
    listed.write_text("\n".join([*held, "never.png"]) + "\n")
    result = CliRunner().invoke(
        cli, ["merge", str(out), str(stores[0]), str(stores[2]), "--image-list", str(listed)]
    )
    assert result.exit_code == 1, result.output
    assert "failed: shard 2-of-3: not among the stores merged" in result.output
    assert "failed: never.png: listed but in no store merged" in result.output
    missing = {n for n in held if n not in entries(stores[0]) and n not in entries(stores[2])}
    assert missing and all(f"failed: {n}:" in result.output for n in missing)
    # the missing shard arrives: merging again adds it to the same store, all present
    result = CliRunner().invoke(cli, ["merge", str(out), str(stores[0]), str(stores[0].parent)])
    assert result.exit_code == 0, result.output
    assert sorted(entries(out)) == held


def synthetic_shards(folder: Path, shards: int, per_shard: int, keypoints: int = 64) -> list[Path]:
    """``shards`` feature stores of ``per_shard`` small random entries each (disjoint names)."""
    rng = np.random.default_rng(0)
    settings = {"synthetic": True}
    stores = []
    for shard in range(shards):
        store = folder / f"{shard + 1}-of-{shards}.h5"
        with StoreWriter(store, "features", settings, flush_entries=10**6) as writer:
            for index in range(per_shard):
                writer.add(
                    f"d{shard}/im{index:05d}.jpg",
                    {
                        "keypoints": rng.random((keypoints, 2), dtype=np.float32) * 100,
                        "scores": rng.random(keypoints, dtype=np.float32),
                        "descriptors": rng.random((256, keypoints)).astype(np.float16),
                        "image_size": np.array([640, 480]),
                    },
                    {"keypoints": {"uncertainty": 1.5 + shard}},
                )
        stores.append(store)
    return stores


def test_merge_copies_entries_as_stored_and_verifies_checksums(tmp_path: Path) -> None:
    """``merge`` copies each entry as HDF5 objects (no decode/encode): the chunks it writes are
    byte for byte those of the input, checksums included, with the dtypes, chunking, filters and
    attributes ``StoreWriter.add`` gives an entry; a corrupted chunk in an input is refused."""
    (folder := tmp_path / "shards").mkdir()
    stores = synthetic_shards(folder, 2, 3)
    out = tmp_path / "merged.h5"
    assert merge_stores(out, stores).exit_code == 0
    added = tmp_path / "added.h5"  # the same entries through the decoding path, for comparison
    with StoreWriter(added, "features", {"synthetic": True}) as writer:
        for store in stores:
            with h5py.File(store, "r") as h5:
                for name in sorted(entries(store)):
                    writer.add(name, *read_entry(h5[name]))
    with h5py.File(out, "r") as merged, h5py.File(added, "r") as plain:
        names = sorted(entries(added))
        assert sorted(entries(out)) == names
        for name in names:
            for key, dataset in plain[name].items():
                got = merged[name][key]
                assert (got.dtype, got.shape, got.chunks) == (dataset.dtype, dataset.shape, dataset.chunks)
                assert got.fletcher32 == dataset.fletcher32 == (dataset.ndim > 0)
                assert (
                    got.id.get_create_plist().get_nfilters() == dataset.id.get_create_plist().get_nfilters()
                )
                assert dict(got.attrs) == dict(dataset.attrs)
                chunks = got.id.get_num_chunks() if got.chunks else 0
                assert chunks == (dataset.id.get_num_chunks() if dataset.chunks else 0)
                for index in range(chunks):  # raw bytes as stored: the checksum travels with them
                    offset = got.id.get_chunk_info(index).chunk_offset
                    assert got.id.read_direct_chunk(offset) == dataset.id.read_direct_chunk(offset)
    # flip a byte of an input's descriptors chunk: the merge refuses it, naming store and entry
    name = sorted(entries(stores[1]))[0]
    with h5py.File(stores[1], "r") as h5:
        where = h5[name]["descriptors"].id.get_chunk_info(0).byte_offset
    with open(stores[1], "r+b") as handle:
        handle.seek(where + 7)
        byte = handle.read(1)
        handle.seek(where + 7)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match=f"{stores[1]}: damaged store.*entry '{name}'"):
        merge_stores(tmp_path / "again.h5", stores)


def test_merge_survives_sigkill_and_resumes(tmp_path: Path) -> None:
    """A real ``sp-extract merge`` process SIGKILLed while it folds and at random moments: after
    each kill OUT holds only correct entries and what was reported saved is durable; the same
    command run again finishes it, equal to an uninterrupted merge."""
    from support.reliability import Run, assert_entries_equal, durable_names, lock_held_by, read_entries

    (folder := tmp_path / "shards").mkdir()
    synthetic_shards(folder, 3, 150)
    clean, out = tmp_path / "clean.h5", tmp_path / "out.h5"
    started = time.monotonic()
    assert merge_stores(clean, [folder]).exit_code == 0
    duration = time.monotonic() - started
    expected = read_entries(clean)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    moments = {
        "in the fold": lambda pid: out.with_name(f".{out.name}.{pid}.tmp").exists(),
        **{
            f"{delay:.2f} s after the lock": lambda pid, delay=delay, seen={}: (
                lock_held_by(out, pid)
                and time.monotonic() - seen.setdefault("locked", time.monotonic()) >= delay
            )
            for delay in rng.uniform(0.05, 0.6, 2) * duration
        },
    }
    for label, moment in moments.items():
        before = durable_names(out)
        run = Run("merge", str(out), str(folder))
        pid = run.process.pid
        fired = run.wait_until(functools.partial(moment, pid))
        code = run.kill()
        context = f"kill {label}: exit {code}\n{run.text[-2000:]}"
        assert fired or code == 0, context
        durable = durable_names(out)
        assert before <= durable and len(durable - before) >= run.reported_saved(), context
        if out.exists():
            assert_entries_equal(read_entries(out), expected)
    final = Run("merge", str(out), str(folder))
    assert final.finish() == 0, final.text
    assert_same_entries(out, clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "clean.h5",
        "clean.h5.index",
        "out.h5",
        "out.h5.index",
        "shards",
    ]


def test_cli_shard_auto_writes_the_array_task_store(
    shard_stores: tuple[Path, Path, list[Path]], random_weights: Path, tmp_path: Path, monkeypatch
) -> None:
    images, out, stores = shard_stores
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    again = tmp_path / "again.h5"
    args = [str(images), "--out", str(again), "--weights", str(random_weights), "--shard", "auto", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert_same_entries(again.with_name("again.h5.shards") / "3-of-3.h5", stores[2])
    result = CliRunner().invoke(cli, [*args, "--scheduler", "local"])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_scheduler_without_dask_names_the_extra(monkeypatch, tmp_path: Path) -> None:
    from sp_extract.cluster.dask import connect

    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ConfigError, match=r"pip install 'sp-extract\[dask\]' \(or pip install distributed\)"):
        connect("local:2")
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="expected local or local:WORKERS"):
        connect("local:0")


# -- Dask ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dask_cluster() -> str:
    """A LocalCluster of 2 worker processes (one thread each); its scheduler's address."""
    import distributed

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def test_dask_extract_and_match_equal_a_single_run(
    dask_cluster: str, reference: dict, sacre_coeur: Path, real_weights: Path, tmp_path: Path
) -> None:
    features, matches = tmp_path / "feats.h5", tmp_path / "matches.h5"
    common = ["--scheduler", dask_cluster, "--quiet"]
    args = [str(sacre_coeur), "--out", str(features), "--weights", str(real_weights), "--resize-max", "160"]
    result = CliRunner().invoke(cli, [*args, *common])
    assert result.exit_code == 0, result.output
    assert_same_entries(features, reference["features"])
    assert not features.with_name("feats.h5.shards").exists()  # merged, then cleared
    result = CliRunner().invoke(cli, [*args, *common])  # run again: nothing left to do
    assert result.exit_code == 0 and "0 images saved, 10 already in" in result.output, result.output
    other = [*args[:-1], "128", *common]  # other settings: refused before the cluster works
    result = CliRunner().invoke(cli, other)
    assert result.exit_code == 2 and "resize_max: 160 (store) vs 128 (now)" in result.output, result.output
    args = ["match-pairs", str(reference["pairs"]), "--features", str(features), "--out", str(matches)]
    result = CliRunner().invoke(cli, [*args, *common, "--shards", "3"])
    assert result.exit_code == 0, result.output
    assert_same_entries(matches, reference["matches"])  # entries: the store ids differ, of course
    # resume: a store holding 10 of the 45 pairs, reversed; the cluster run leaves them out
    lines = [line.split() for line in reference["pairs"].read_text().splitlines()]
    some, resumed = tmp_path / "some.txt", tmp_path / "resumed.h5"
    some.write_text("".join(f"{b} {a}\n" for a, b in lines[:10]))
    match_pairs(some, features, resumed, MatchConfig())
    args[args.index(str(matches))] = str(resumed)
    result = CliRunner().invoke(cli, [*args, *common, "--shards", "3"])
    assert result.exit_code == 0 and "35 pairs saved, 10 already in" in result.output, result.output
    expected = {pair_key(b, a) for a, b in lines[:10]} | {pair_key(a, b) for a, b in lines[10:]}
    assert set(entries(resumed)) == expected


def test_dask_worker_killed_mid_run(
    dask_cluster: str, reference: dict, sacre_coeur: Path, real_weights: Path, tmp_path: Path
) -> None:
    """SIGKILL the worker writing a shard: Dask replaces it, the shard re-runs and resumes its
    store, and the result is still the single run's."""
    from distributed import Client

    from sp_extract.cluster.dask import extract_on_cluster

    out = tmp_path / "feats.h5"
    folder = out.with_name("feats.h5.shards")
    with Client(dask_cluster) as client:
        pids = set(client.run(os.getpid).values())
        outcome: dict = {}

        def drive() -> None:
            try:
                outcome["summary"] = extract_on_cluster(
                    dask_cluster, 4, sacre_coeur, out, CONFIG, ExtractRun(weights=str(real_weights))
                )
            except BaseException as error:  # handed to the test's thread
                outcome["error"] = error

        driver = threading.Thread(target=drive)
        driver.start()
        killed = None
        while driver.is_alive() and killed is None:
            for lock in folder.glob("*.h5.lock") if folder.is_dir() else []:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    continue
                if pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
            time.sleep(0.005)
        driver.join(timeout=300)
        assert killed is not None, "no shard was seen being written"
        assert "error" not in outcome, outcome.get("error")
        summary = outcome["summary"]
        assert summary.exit_code == 0 and summary.done == 10, summary.lines()
        assert_same_entries(out, reference["features"])
        client.wait_for_workers(2, timeout=60)  # the nanny replaced the killed worker
        assert killed not in set(client.run(os.getpid).values())


def test_cli_local_scheduler_in_a_real_process(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    """``--scheduler local:1`` from the command line: a worker process started by sp-extract
    itself (spawned, so ``python -m sp_extract`` must not run again in it), 2 shards; equal to one run."""
    from conftest import run_cli

    single, sharded = tmp_path / "single.h5", tmp_path / "dask.h5"
    extract(small_images, single, run=ExtractRun(weights=str(random_weights)))
    options = ["--weights", str(random_weights), "--scheduler", "local:1", "--shards", "2"]
    result = run_cli(str(small_images), "--out", str(sharded), *options)
    assert result.returncode == 0, result.stderr
    assert "3 images saved" in result.stderr and "device Dask workers" in result.stderr
    assert_same_entries(sharded, single)
