"""Scale benchmark: pairs generation, retrieval, match-pairs start-up and memory, and the cost of
adding images to a store, on synthetic stores made by copying real entries under new names.

Usage: python benchmarks/scale.py [--sizes 1000 10000] [--pairs 10000 1000000 10000000]
       [--match-store 2000] [--add 10] [--baseline-max 1000000] [--json results.json]
       [--max-keypoints 256] [--no-retrieval] [--resume-pairs 100000] [--big-gb 10 --kills 5]

- stores: a real store of the shared photos (extracted once, 640 px) copied entry by entry
  under new names to each of --sizes entries;
- pairs: time and peak memory of ``pairs exhaustive`` (up to 2,000 images), ``sequential`` and
  ``retrieval`` (k = 10; first run describing every image, then a run that adds nothing);
- match-pairs: over a store of --match-store entries, pairs files of --pairs lines; the time
  until the first pair is matched (a part file appears) and the peak memory (VmHWM) at that
  moment, against the baseline of the same run: reading and checking the whole file first,
  what match-pairs did before it streamed;
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

Each measurement runs in a fresh subprocess (peak memory is per process). Other processes of the
machine are not controlled: figures from a loaded machine say so in README.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
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
    from sp_extract.store.writer import StoreWriter, read_store_info

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
    from sp_extract.store.writer import entry_names

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
    from sp_extract.store.reader import open_store
    from sp_extract.store.repair import check_store
    from sp_extract.store.writer import StoreWriter, read_store_file

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
    from sp_extract.store.writer import KIND_ATTR, SETTINGS_ATTR

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


def pairs_file(path: Path, count: int, names: int) -> Path:
    """``count`` distinct pairs over ``names`` images (i, i + 1 + j), written once."""
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


def first_match(pairs: Path, store: Path, out: Path, limit: float = 600) -> tuple[float, float]:
    """Seconds until match-pairs has a pair durable (a part file) and its peak memory then."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sp_extract",
            "match-pairs",
            str(pairs),
            "--features",
            str(store),
            "-o",
            str(out),
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.perf_counter()
    parts = out.with_name(out.name + ".parts")
    try:
        while time.perf_counter() - started < limit and process.poll() is None:
            if parts.is_dir() and any(parts.glob("part-*.h5")):
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    finally:
        process.terminate()
        process.wait()
    return elapsed, peak / 1024


def read_first(pairs: Path, store: Path, whole: bool) -> tuple[float, float]:
    """Seconds until the pairs to match first are known, and the peak memory then: the first
    checked chunk (``read_pair_chunks``, match-pairs now) or, the baseline, the whole file
    read and checked (``read_pairs``, what match-pairs did before it streamed)."""
    code = PEAK + (
        "import sys, time; from pathlib import Path;"
        "from sp_extract.pairs.core import read_pair_chunks, read_pairs;"
        "from sp_extract.store.writer import read_store_info;"
        "names = set(read_store_info(Path(sys.argv[2]), 'features')[1]); t = time.perf_counter();"
        "whole = sys.argv[3] == '1';"
        "read_pairs(sys.argv[1], names) if whole else next(read_pair_chunks(sys.argv[1], names));"
        "print(time.perf_counter() - t, peak_kib())"
    )
    command = [sys.executable, "-c", code, str(pairs), str(store), str(int(whole))]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, check=True)
    elapsed, peak = result.stdout.split()
    return float(elapsed), int(peak) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sp-scale-") as folder:
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
        store = synthetic_store(real, work / "match.h5", args.match_store)
        for count in args.pairs:
            pairs = pairs_file(work / f"p{count}.txt", count, args.match_store)
            measured = [
                ("match-pairs: first pair saved", first_match(pairs, store, work / f"m{count}.h5")),
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
        print(
            f"{row['what']:52} {n:>10} {row['seconds']:>9.2f} {'' if peak is None else f'{peak:9.0f}':>9} "
            f"{'' if disk is None else f'{disk:9.2f}':>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
