"""Scale benchmark: pairs generation, retrieval, match-pairs start-up and memory, and the cost of
adding images to a store, on synthetic stores made by copying real entries under new names.

Usage: python benchmarks/scale.py [--sizes 1000 10000] [--pairs 10000 1000000 10000000]
       [--match-store 2000] [--add 10] [--baseline-max 1000000] [--json results.json]
       [--max-keypoints 256] [--no-retrieval] [--resume-pairs 100000] [--big-gb 10 --kills 5]
       [--resume-real 5000000 --resume-total 10000000 --build-minutes 40 --steady 60 --no-check]
       [--work DIR]

- stores: a real store of the shared photos (extracted once, 640 px) copied entry by entry
  under new names to each of --sizes entries;
- pairs: time and peak memory of ``pairs exhaustive`` (up to 2,000 images), ``sequential`` and
  ``retrieval`` (k = 10; first run describing every image, then a run that adds nothing);
- match-pairs: over a store of --match-store entries (more if the largest pairs file needs
  them: n images have n (n - 1) / 2 pairs, 4,473 for 10^7), pairs files of 10 and --pairs
  lines; the time from process start until the first pair is durable (a part file appears)
  and the peak memory (VmHWM) then, the 10-line file being the baseline of start-up alone;
  the first checked chunk of each file, against reading and checking the whole file first
  (what match-pairs did before it streamed);
- incremental add: time and extra disk to add --add images to each store.
- with --resume-pairs N...: the start of a resumed match-pairs on a match store of N pairs
  (opening it and learning what is done, ``StoreWriter``), without a name index (the walk
  every resume did before) and with one, its peak memory and lookups per second;
- with --big-gb G: a store of about G GB (real entries copied under new names), and an empty
  one: time, extra disk at the end and peak extra disk during the run to add --add entries,
  with segments (this version) against the baseline of the same run, a fold that copies the
  whole store (what every run did before segments: SP_EXTRACT_FOLD_BELOW above the store's
  size); the first open of the store written without a name index (walked once, then
  indexed); then --kills runs adding to the big store SIGKILLed at random moments, and a
  killed ``compact``, each followed by a check that the store opens with every entry, and at
  the end ``repair --check`` and the resumed runs.
- with --resume-real N: a real match store (hloc layout, the writer's format, name index)
  holding the first N pairs of a --resume-total pairs file (fewer if --build-minutes runs out),
  as a killed match-pairs leaves it; ``repair --check`` (unless --no-check) and ``open_store``
  read it; then ``match-pairs`` on the whole file resumes it: seconds until its first new pair
  is durable, peak memory then, memory after --steady seconds of matching, pairs skipped and
  saved; against the same command on a new store and on a 10-line file, twice.

Each measurement runs in a fresh subprocess (peak memory is per process). Other processes of the
machine are not controlled: figures from a loaded machine say so in README.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PEAK = (  # VmHWM: the peak resident memory of this process image (ru_maxrss survives exec)
    "def peak_kib(): return next(int(line.split()[1]) for line in open('/proc/self/status') "
    "if line.startswith('VmHWM'))\n"
)


def run(*args: str, timeout: float = 3600) -> tuple[float, float]:
    """Wall time (s) and peak memory (MiB) of ``sp-extract ARGS`` in a subprocess."""
    code = PEAK + (
        "import sys, runpy; sys.argv = ['sp-extract'] + sys.argv[1:];"
        "\ntry: runpy.run_module('sp_extract', run_name='__main__')"
        "\nfinally: print('PEAK', peak_kib(), file=sys.stderr)"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 1):
        raise RuntimeError(f"sp-extract {' '.join(args)}: {result.stderr.strip()[-500:]}")
    peak = next(int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("PEAK"))
    return elapsed, peak / 1024


def real_store(work: Path, max_keypoints: int | None = None) -> Path:
    store = work / "real.h5"
    weights = SHARED / "weights" / "superpoint_v1.pth"
    photos = SHARED / "data" / "sacre_coeur"
    options = ["--max-keypoints", str(max_keypoints)] if max_keypoints else []
    run(
        "extract",
        str(photos),
        "--out",
        str(store),
        "--weights",
        str(weights),
        "--resize-max",
        "640",
        "-q",
        *options,
    )
    return store


def synthetic_store(real: Path, path: Path, count: int, start: int = 0) -> Path:
    """Entries ``start`` to ``count`` of a synthetic features store: the real entries copied
    round-robin under new names."""
    from sp_extract.store.catalog import read_store_info
    from sp_extract.store.writer import StoreWriter

    settings, names = read_store_info(real, "features")
    with h5py.File(real, "r") as source:
        entries = [{key: source[name][key][()] for key in source[name]} for name in names]
    with StoreWriter(path, "features", settings, flush_entries=4096) as writer:
        for i in range(start, count):
            writer.add(f"img{i:07d}.jpg", entries[i % len(entries)])
    return path


ADD = (
    "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
    "from scale import synthetic_store;"
    "synthetic_store(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[5]), int(sys.argv[4]))"
)


def files_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (0 for files that vanish meanwhile)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size if path.is_file() else 0
    return total


def timed_add(real: Path, store: Path, start: int, count: int, env: dict[str, str]) -> dict[str, float]:
    """Add entries ``start`` to ``start + count`` in a writer process: seconds, extra disk at the
    end and at its peak during the run (MiB; the folder of ``store`` sampled every 10 ms)."""
    before = files_bytes(store.parent)
    peak = before
    started = time.perf_counter()
    command = [sys.executable, "-c", ADD, str(Path(__file__).parent), str(real), str(store), str(start)]
    process = subprocess.Popen([*command, str(start + count)], env=env)
    while process.poll() is None:
        peak = max(peak, files_bytes(store.parent))
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"adding to {store} failed (exit {process.returncode})")
    after = files_bytes(store.parent)
    return {
        "seconds": seconds,
        "extra_disk_mib": (after - before) / 2**20,
        "peak_disk_mib": (peak - before) / 2**20,
    }


def big_store(real: Path, path: Path, gigabytes: float) -> int:
    """A features store of about ``gigabytes`` GB: the real entries copied round-robin under new
    names straight into one file (HDF5 object copies: no parts, no fold); returns its entries.
    Like a store of an earlier version, it has no name index yet."""
    from sp_extract.store.format import entry_names

    with h5py.File(real, "r") as source, h5py.File(path, "w") as out:
        for key, value in source.attrs.items():
            out.attrs[key] = value
        names = entry_names(source, "keypoints")
        count = int(gigabytes * 1e9 / (real.stat().st_size / len(names)))
        for i in range(count):
            source.copy(source[names[i % len(names)]], out, name=f"img{i:07d}.jpg")
    return count


def incremental(real: Path, work: Path, gigabytes: float, add: int, kills: int, seed: int) -> list[dict]:
    """The --big-gb measurements (see the module's docstring)."""
    from sp_extract.store.catalog import read_store_file
    from sp_extract.store.reader import open_store
    from sp_extract.store.repair import check_store
    from sp_extract.store.writer import StoreWriter

    rows: list[dict] = []
    (work / "big").mkdir()
    (work / "empty").mkdir()
    store = work / "big" / "feats.h5"
    count = big_store(real, store, gigabytes)
    size = f"{store.stat().st_size / 1e9:.1f} GB"
    settings = read_store_file(store, "features", scan=False).settings
    started = time.perf_counter()
    StoreWriter(store, "features", settings).close()  # walks the store once and indexes it
    rows.append({"what": f"first open, {size} store without index", "entries": count,
                 "seconds": time.perf_counter() - started})  # fmt: skip
    segments_env = {**ENV, "SP_EXTRACT_FOLD_BELOW": str(64 << 20)}
    copy_env = {**ENV, "SP_EXTRACT_FOLD_BELOW": str(1 << 50)}  # always fold: the whole store copied
    next_name = count
    for repeat in range(2):
        for what, folder, env in [
            ("empty store", work / "empty" / f"f{repeat}.h5", segments_env),
            (f"{size} store, baseline: fold copies the store", store, copy_env),
            (f"{size} store, segments", store, segments_env),
        ]:
            measured = timed_add(real, folder, next_name, add, env)
            next_name += add
            rows.append({"what": f"add {add}: {what}", "entries": count, **measured})
    compacted = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sp_extract", "compact", str(store)], env=ENV, check=True)
    rows.append(
        {"what": f"compact {size} store", "entries": count, "seconds": time.perf_counter() - compacted}
    )
    rng = random.Random(seed)
    hits = []
    for kill in range(kills + 1):
        compact = kill == kills
        command = [sys.executable, "-m", "sp_extract", "compact", str(store)]
        if not compact:
            add_args = [
                str(Path(__file__).parent),
                str(real),
                str(store),
                str(next_name),
                str(next_name + add),
            ]
            command = [sys.executable, "-c", ADD, *add_args]
        if compact:  # a segment to fold: one uninterrupted add first
            timed_add(real, store, next_name, add, segments_env)
            next_name += add
        process = subprocess.Popen(command, env=segments_env)
        delay = rng.uniform(0.2, 1.6) if not compact else rng.uniform(1.0, 20.0)
        time.sleep(delay)
        killed = process.poll() is None
        process.kill()
        process.wait()
        with open_store(store) as reader:
            assert len(reader.names()) >= count
        finish = subprocess.run(command, env=segments_env)
        assert finish.returncode == 0
        if not compact:
            next_name += add
        hits.append(f"{'compact' if compact else 'add'} {'killed' if killed else 'done'} at {delay:.2f} s")
    started = time.perf_counter()
    report = check_store(store)
    assert not report.damaged, report.damaged
    with open_store(store) as reader:
        entries = len(reader.names())
    rows.append({"what": f"kills: {'; '.join(hits)}; repair --check clean", "entries": entries,
                 "seconds": time.perf_counter() - started})  # fmt: skip
    return rows


RESUME = PEAK + (
    "import json, sys, time; from pathlib import Path;"
    "from sp_extract.store.writer import StoreWriter;"
    "t = time.perf_counter(); writer = StoreWriter(Path(sys.argv[1]), 'matches', {'matcher': 'nn'});"
    "opened = time.perf_counter() - t; keys = sys.argv[2:];"
    "t = time.perf_counter(); found = int(writer.done.contains(keys).sum()); asked = time.perf_counter() - t;"
    "writer.lock.release();"
    "print(json.dumps([opened, len(keys) / asked, found, peak_kib()]))"
)


def match_store(path: Path, count: int, images: int) -> list[str]:
    """A match store of ``count`` pairs (i, i + step) of ``images`` images, tiny entries written
    straight with h5py (as a store of an earlier version: no name index); returns 1,000 keys."""
    from sp_extract.store.format import KIND_ATTR, SETTINGS_ATTR

    matches, scores = np.full(8, -1, np.int32), np.zeros(8, np.float16)
    keys = []
    with h5py.File(path, "w") as h5:
        h5.attrs[KIND_ATTR] = "matches"
        h5.attrs[SETTINGS_ATTR] = json.dumps({"matcher": "nn"})
        for step in range(1, images):
            for i in range(images - step):
                if len(keys) < count:
                    group = h5.create_group(f"img{i:07d}.jpg/img{i + step:07d}.jpg")
                    group.create_dataset("matches0", data=matches, fletcher32=True)
                    group.create_dataset("matching_scores0", data=scores, fletcher32=True)
                    keys.append(group.name[1:])
    return keys[:: max(1, len(keys) // 1000)][:1000]


def resume_start(work: Path, counts: list[int], images: int = 2000) -> list[dict]:
    """Opening a match store of n pairs to resume it (``StoreWriter``: what is done) and asking
    it about pairs: first without a name index (the walk every resume did before), then with
    the index that walk left."""
    rows = [index_load(work, 10**7)] if counts else []
    for count in counts:
        store = work / f"resume{count}.h5"
        keys = match_store(store, count, images)
        keys += [f"other{i}.jpg/img{i}.jpg" for i in range(len(keys))]
        for what in ("resume open, no index (walk)", "resume open, name index"):
            command = [sys.executable, "-c", RESUME, str(store), *keys]
            result = subprocess.run(command, capture_output=True, text=True, env=ENV, check=True)
            opened, rate, found, peak = json.loads(result.stdout)
            assert found == len(keys) // 2, found
            rows.append({"what": f"{what}; {rate / 1e6:.2f} M lookups/s", "pairs": count, "seconds": opened,
                         "peak_mib": peak / 1024})  # fmt: skip
        store.unlink()
        for index in work.glob(f"resume{count}.h5*"):
            index.unlink()
    return rows


INDEX_LOAD = PEAK + (
    "import json, sys, time; from pathlib import Path;"
    "from sp_extract.store.index import NameIndex, load_index;"
    "t = time.perf_counter(); index = NameIndex(); index.add_hashes(load_index(Path(sys.argv[1])));"
    "loaded = time.perf_counter() - t; keys = [f'img{i}.jpg/img{i + 1}.jpg' for i in range(65536)];"
    "t = time.perf_counter(); index.contains(keys); asked = time.perf_counter() - t;"
    "print(json.dumps([loaded, asked, peak_kib()]))"
)


def index_load(work: Path, count: int) -> dict:
    """Loading the name index of a store of ``count`` entries (random hashes standing for the
    names; the file it describes is a stand-in) and asking it about one chunk of 65,536 pairs."""
    from sp_extract.store.index import write_index

    stand_in = work / "index-stand-in.h5"
    stand_in.write_bytes(b"")
    write_index(stand_in, np.random.default_rng(0).integers(0, 2**63, count, dtype=np.uint64))
    result = subprocess.run(
        [sys.executable, "-c", INDEX_LOAD, str(stand_in)], capture_output=True, text=True, env=ENV
    )
    loaded, asked, peak = json.loads(result.stdout)
    what = f"name index loaded; a chunk of 65,536 asked in {asked:.2f} s"
    return {"what": what, "pairs": count, "seconds": loaded, "peak_mib": peak / 1024}


def images_for(count: int) -> int:
    """The fewest images that have ``count`` distinct pairs (n (n - 1) / 2 >= count)."""
    return next(
        n for n in range(int((2 * count) ** 0.5), int((2 * count) ** 0.5) + 3) if n * (n - 1) // 2 >= count
    )


def pairs_file(path: Path, count: int, names: int) -> Path:
    """``count`` distinct pairs over ``names`` images (i, i + 1 + j), written once; refuses a
    count that ``names`` images do not have (2,000 images have 1,999,000 pairs)."""
    if count > names * (names - 1) // 2:
        raise ValueError(f"{names} images have {names * (names - 1) // 2:,} pairs, not {count:,}")
    with open(path, "w") as handle:
        written = 0
        for step in range(1, names):
            lines = [f"img{i:07d}.jpg img{i + step:07d}.jpg\n" for i in range(names - step)]
            lines = lines[: count - written]
            handle.writelines(lines)
            written += len(lines)
            if written >= count:
                break
    return path


def status_kib(pid: int, field: str) -> int | None:
    """A memory figure (VmHWM, VmRSS) of a running process, None once it has ended."""
    with contextlib.suppress(OSError, StopIteration):
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))
    return None


def first_match(
    pairs: Path, store: Path, out: Path, limit: float = 600, steady: float = 0.0, finish: bool = False
) -> dict[str, float | int | None]:
    """``match-pairs PAIRS --features STORE -o OUT`` in a fresh process: seconds from its start
    until a new pair is durable (a part file appears; a new store that finished first counts
    when its file appears), peak memory (VmHWM, MiB) then; with ``steady``, resident and peak
    memory ``steady`` seconds later. It is then interrupted (SIGINT, as Ctrl-C), or with
    ``finish`` left to finish; the summary line gives the pairs saved and skipped (already in
    the store)."""
    existed = out.exists()
    parts = out.with_name(out.name + ".parts")
    command = [sys.executable, "-m", "sp_extract", "match-pairs", str(pairs), "--features", str(store)]
    process = subprocess.Popen(
        [*command, "-o", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started = time.perf_counter()
    found: dict[str, float | int | None] = {"seconds": None, "peak_mib": None}
    try:
        while time.perf_counter() - started < limit and process.poll() is None:
            if any(parts.glob("part-*.h5")) or (not existed and out.exists()):
                found["seconds"] = time.perf_counter() - started
                break
            time.sleep(0.01)
        if found["seconds"] is None and process.poll() is not None and out.exists():  # done between polls
            found["seconds"] = time.perf_counter() - started
        peak = status_kib(process.pid, "VmHWM")
        found["peak_mib"] = None if peak is None else peak / 1024
        if steady and process.poll() is None:
            time.sleep(steady)
            rss, peak = status_kib(process.pid, "VmRSS"), status_kib(process.pid, "VmHWM")
            found.update(steady_rss_mib=rss and rss / 1024, steady_peak_mib=peak and peak / 1024)
    finally:
        if not finish:
            process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=3600)
    summary = re.search(r"match-pairs: ([\d,]+) pairs? saved, (\d+) already", output)
    if summary is None:
        raise RuntimeError(f"match-pairs {pairs}: no summary (exit {process.returncode}): {output[-500:]}")
    found.update(saved=int(summary[1].replace(",", "")), skipped=int(summary[2]))
    return found


def bulk_matches(
    store: Path, features: Path, pairs: Path, count: int, budget: float = float("inf")
) -> dict[str, float]:
    """Extend the match store ``store`` (made by match-pairs from the first lines of ``pairs``,
    one main file) to the first ``count`` pairs of ``pairs``, as the writer's fold writes a main
    file: a copy of it written through ``hdf5_writing``, the entries, its name index
    (``write_index``), a rename, under the store's lock. Entries are created here, with the
    dataset creation properties (chunks, Fletcher-32) of the writer's own, where a fold would
    copy them from part files (``H5Ocopy``: too slow for millions). Their content is
    synthetic: ``matches0`` int32, about a third matched, ``matching_scores0`` float16.
    After ``budget`` seconds it stops adding (still the first pairs of the file) and finishes
    the store. Returns seconds, entries added and the store's bytes; progress every 50,000 on
    stderr."""
    from sp_extract.store.atomic import fsync_path
    from sp_extract.store.h5file import hdf5_writing
    from sp_extract.store.index import load_index, name_hashes, write_index
    from sp_extract.store.lock import StoreLock
    from sp_extract.store.reader import open_store

    started = time.perf_counter()
    with open_store(features) as h5:
        keypoints = {name: h5[name]["descriptors"].shape[-1] for name in h5.names()}
    lock = StoreLock(store)
    lock.acquire()
    try:
        stored = load_index(store)
        assert stored is not None, f"{store}: no name index"
        temporary = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        shutil.copyfile(store, temporary)
        rng = np.random.default_rng(0)
        contents: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        hashes, batch = [stored], []
        with hdf5_writing(temporary, create=False) as out, open(pairs) as lines:
            template = out[next(iter(out))]  # an entry the writer wrote: name0 / name1 / datasets
            template = template[next(iter(template))]
            made = {key: template[key].id for key in ("matches0", "matching_scores0")}
            link = h5py.h5p.create(h5py.h5p.LINK_CREATE)
            link.set_create_intermediate_group(True)
            link.set_char_encoding(h5py.h5t.CSET_UTF8)
            parents: dict[str, h5py.h5g.GroupID] = {}
            for number, line in enumerate(itertools.islice(lines, count)):
                if number < len(stored):  # stored by match-pairs itself
                    continue
                if time.perf_counter() - started > budget:
                    break
                name0, name1 = line.split()
                if name0 not in parents:
                    parents[name0] = out.require_group(name0).id
                group = h5py.h5g.create(parents[name0], name1.encode(), lcpl=link)
                shape = (keypoints[name0], keypoints[name1])
                if shape not in contents:
                    matched = [rng.random(shape[0]) < 1 / 3 for _ in range(16)]
                    contents[shape] = [
                        (np.where(m, rng.integers(0, shape[1], shape[0]), -1).astype(np.int32),
                         np.where(m, rng.random(shape[0]), 0).astype(np.float16))
                        for m in matched
                    ]  # fmt: skip
                for key, data in zip(made, contents[shape][number % 16]):
                    space = h5py.h5s.create_simple(data.shape)
                    creation = made[key].get_create_plist().copy()  # the writer's, one chunk a dataset
                    creation.set_chunk(data.shape)
                    dataset = h5py.h5d.create(
                        group, key.encode(), made[key].get_type(), space, dcpl=creation, lcpl=link
                    )
                    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
                batch.append(f"{name0}/{name1}")
                if len(batch) == 50_000:
                    hashes.append(name_hashes(batch))
                    batch.clear()
                    added = sum(map(len, hashes)) - len(stored)
                    seconds = time.perf_counter() - started
                    size = temporary.stat().st_size / 1e9
                    print(
                        f"{added:,} entries added, {seconds:.0f} s, {size:.2f} GB",
                        file=sys.stderr,
                        flush=True,
                    )
            hashes.append(name_hashes(batch))
        write_index(store, np.concatenate(hashes), described=temporary)
        os.replace(temporary, store)
        fsync_path(store.parent, directory=True)
    finally:
        lock.release()
    entries = sum(map(len, hashes))
    return {"seconds": time.perf_counter() - started, "added": entries - len(stored), "entries": entries,
            "bytes": store.stat().st_size}  # fmt: skip


def resume_store(
    work: Path, real: Path, stored: int, total: int, check: bool, budget: float = float("inf")
) -> tuple[list[dict], Path]:
    """A match store holding the first ``stored`` pairs of ``work/pTOTAL.txt`` (over the feature
    store ``work/matchIMAGES.h5``), as a killed run leaves it: match-pairs wrote the first
    chunk, ``bulk_matches`` the rest (``budget`` seconds at most); ``repair --check`` (with
    ``check``: it reads every dataset, hours at 10^6 entries here) accepts it, and
    ``open_store`` reads 1,000 of its pairs.
    Returns the rows and the store."""
    images = images_for(total)
    features = work / f"match{images}.h5"
    if not features.exists():
        synthetic_store(real, features, images)
    pairs = work / f"p{total}.txt"
    if not pairs.exists():
        pairs_file(pairs, total, images)
    head = work / "head.txt"
    with open(pairs) as lines:
        head.write_text("".join(itertools.islice(lines, 1024)))
    out = work / "resumed.h5"
    run("match-pairs", str(head), "--features", str(features), "-o", str(out), "-q")
    built = bulk_matches(out, features, pairs, stored, budget)
    stored = built["entries"]
    gigabytes = built["bytes"] / 1e9
    rows = [{"what": f"match store built: {built['added']:,} entries added, {gigabytes:.1f} GB",
             "pairs": stored, "seconds": built["seconds"]}]  # fmt: skip
    if check:
        started = time.perf_counter()
        command = [sys.executable, "-m", "sp_extract", "repair", "--check", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, env=ENV)
        assert result.returncode == 0, result.stdout + result.stderr
        line = next(
            line for line in (result.stdout + result.stderr).splitlines() if line.startswith("check:")
        )
        rows.append({"what": line, "pairs": stored, "seconds": time.perf_counter() - started})
    rows.append(
        {"what": "open_store: 1,000 stored pairs read", "pairs": stored, "seconds": read_back(out, pairs)}
    )
    return rows, out


def read_back(store: Path, pairs: Path) -> float:
    """Seconds to read 1,000 pairs spread over the stored ones (the first of the pairs file)
    through ``open_store``, checksums verified; they must all be there."""
    from sp_extract.store.reader import open_store

    stored = stored_pairs(store)
    started = time.perf_counter()
    with open_store(store) as reader, open(pairs) as lines:
        for line in itertools.islice(lines, 0, stored, max(1, stored // 1000)):
            assert len(reader["/".join(line.split())]["matches0"][()]) > 0
    return time.perf_counter() - started


def stored_pairs(store: Path) -> int:
    """The entries of a store's main file and segments, from their name indexes (no walk: at
    10^6 entries a walk of the file takes minutes here)."""
    from sp_extract.store.catalog import part_files, segment_files
    from sp_extract.store.index import load_index

    assert not part_files(store)
    return sum(len(load_index(file)) for file in [store, *segment_files(store)])


def resume_runs(work: Path, out: Path, total: int, steady: float, repeats: int = 2) -> list[dict]:
    """``match-pairs`` on the whole pairs file resuming ``out`` (``resume_store``): time until its
    first new pair is durable, its peak memory then and its memory ``steady`` seconds later,
    the pairs it skipped (all those stored) and saved; against, in the same run, the same
    command on a new store and on a pairs file of 10 lines (start-up), ``repeats`` times."""
    from sp_extract.matching.resume import load_resume_point
    from sp_extract.store.catalog import current_store_id, remove_store

    images = images_for(total)
    features, pairs = work / f"match{images}.h5", work / f"p{total}.txt"
    tiny = pairs_file(work / "tiny.txt", 10, images)
    stored = done = stored_pairs(out)
    rows = []
    for repeat in range(repeats):
        for what, pairs_in, target in [
            ("10 pairs, new store", tiny, work / f"tiny{repeat}.h5"),
            (f"{total:,} pairs, new store", pairs, work / f"empty{repeat}.h5"),
            (f"{total:,} pairs, resume of {done:,} stored", pairs, out),
        ]:
            steady_s = steady if pairs_in == pairs else 0
            if target == out:  # a killed run of this version leaves OUT.resume; the built store has none
                point = load_resume_point(out, pairs, None, current_store_id(out, "matches"))
                what += ", from OUT.resume" if point[1] else ", every done line read"
            measured = first_match(pairs_in, features, target, steady=steady_s, finish=pairs_in == tiny)
            if target == out:  # every stored pair skipped (those of an earlier repeat as far as reached)
                assert stored <= measured["skipped"] <= done and (repeat or measured["skipped"] == stored)
                done += measured["saved"]
            else:
                assert measured["skipped"] == 0, measured
                remove_store(target)
            rows.append({"what": f"match-pairs, {what}: first new pair durable",
                         "pairs": 10 if pairs_in == tiny else total, **measured})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a long run: each row as it comes
    assert stored_pairs(out) == done  # the stored pairs and those the resumed runs saved
    return rows


def read_first(pairs: Path, store: Path, whole: bool) -> tuple[float, float]:
    """Seconds until the pairs to match first are known, and the peak memory then: the first
    checked chunk (``read_pair_chunks``, match-pairs now) or, the baseline, the whole file
    read and checked (``read_pairs``, what match-pairs did before it streamed)."""
    code = PEAK + (
        "import sys, time; from pathlib import Path;"
        "from sp_extract.pairs.core import read_pair_chunks, read_pairs;"
        "from sp_extract.store.catalog import read_store_info;"
        "names = set(read_store_info(Path(sys.argv[2]), 'features')[1]); t = time.perf_counter();"
        "whole = sys.argv[3] == '1';"
        "read_pairs(sys.argv[1], names) if whole else next(read_pair_chunks(sys.argv[1], names));"
        "print(time.perf_counter() - t, peak_kib())"
    )
    command = [sys.executable, "-c", code, str(pairs), str(store), str(int(whole))]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, check=True)
    elapsed, peak = result.stdout.split()
    return float(elapsed), int(peak) / 1024


EXTRA = ("steady_rss_mib", "steady_peak_mib", "saved", "skipped")  # of first_match, when measured


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--pairs", type=int, nargs="*", default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--match-store", type=int, default=2000)
    parser.add_argument("--add", type=int, default=10)
    parser.add_argument(
        "--baseline-max",
        type=int,
        default=1_000_000,
        help="Largest pairs file for the baseline (GBs beyond).",
    )
    parser.add_argument("--big-gb", type=float, default=0.0, help="Incremental add to a store of G GB.")
    parser.add_argument("--kills", type=int, default=5, help="With --big-gb: SIGKILLed adds.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-keypoints", type=int, help="Of the real entries (smaller stores).")
    parser.add_argument("--no-retrieval", action="store_true", help="Skip pairs retrieval.")
    parser.add_argument("--resume-pairs", type=int, nargs="*", default=[], help="Match stores of N pairs.")
    parser.add_argument(
        "--resume-real",
        type=int,
        default=0,
        help="A match store of the first N pairs of a --resume-total pairs file, resumed.",
    )
    parser.add_argument("--resume-total", type=int, default=10_000_000)
    parser.add_argument("--no-check", action="store_true", help="With --resume-real: no repair --check.")
    parser.add_argument(
        "--build-minutes",
        type=float,
        default=float("inf"),
        help="With --resume-real: stop adding pairs to the store after this long (fewer than N).",
    )
    parser.add_argument("--steady", type=float, default=60.0, help="With --resume-real: seconds matched.")
    parser.add_argument("--work", type=Path, help="Folder for the stores (default: a temporary one).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sp-scale-", dir=args.work) as folder:
        work = Path(folder)
        real = real_store(work, args.max_keypoints)
        rows += resume_start(work, args.resume_pairs)
        if args.big_gb:
            rows += incremental(real, work, args.big_gb, args.add, args.kills, args.seed)
        for size in args.sizes:
            store = synthetic_store(real, work / f"s{size}.h5", size)
            out = work / "pairs.txt"
            for name, options in [
                ("pairs exhaustive", ["pairs", "exhaustive"]),
                ("pairs sequential -k 10", ["pairs", "sequential", "-k", "10"]),
                ("pairs retrieval -k 10 (describe all)", ["pairs", "retrieval", "-k", "10", "--no-connect"]),
                ("pairs retrieval -k 10 (nothing new)", ["pairs", "retrieval", "-k", "10", "--no-connect"]),
            ]:
                if name.startswith("pairs exhaustive") and size > 2000:
                    continue
                if name.startswith("pairs retrieval") and args.no_retrieval:
                    continue
                seconds, peak = run(*options, "--features", str(store), "-o", str(out))
                rows.append({"what": name, "entries": size, "seconds": seconds, "peak_mib": peak})
            # a writer process adding the entries; the peak extra disk (a fold's copy) as peak MiB
            measured = timed_add(real, store, size, args.add, ENV)
            rows.append({"what": f"add {args.add} entries", "entries": size, **measured})
        if args.resume_real:
            budget = args.build_minutes * 60
            built, out = resume_store(
                work, real, args.resume_real, args.resume_total, not args.no_check, budget
            )
            rows += built + resume_runs(work, out, args.resume_total, args.steady)
        images = max([args.match_store, *map(images_for, args.pairs)]) if args.pairs else 0
        store = synthetic_store(real, work / f"match{images}.h5", images) if args.pairs else None
        for count in [10, *args.pairs] if args.pairs else []:  # 10: start-up alone, the baseline
            pairs = pairs_file(work / f"p{count}.txt", count, images)
            started = first_match(pairs, store, work / f"m{count}.h5", finish=count == 10)
            measured = [
                ("match-pairs: first pair durable", (started["seconds"], started["peak_mib"])),
                ("first chunk read and checked", read_first(pairs, store, whole=False)),
            ]
            if count <= args.baseline_max:
                measured.append(
                    ("baseline: whole file read and checked", read_first(pairs, store, whole=True))
                )
            for what, (seconds, peak) in measured:
                rows.append({"what": what, "pairs": count, "seconds": seconds, "peak_mib": peak})
    print(f"{'measurement':52} {'n':>10} {'seconds':>9} {'peak MiB':>9} {'disk MiB':>9}")
    for row in rows:
        n = row.get("entries", row.get("pairs"))
        peak, disk = row.get("peak_mib", row.get("peak_disk_mib")), row.get("extra_disk_mib")
        figures = [row["seconds"], peak, disk]
        seconds, peak, disk = (f"{x:9.2f}" if x is not None else "" for x in figures)
        more = ", ".join(f"{key} {row[key]:.0f}" for key in EXTRA if row.get(key) is not None)
        print(f"{row['what']:52} {n:>10} {seconds:>9} {peak:>9} {disk:>9} {more}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
