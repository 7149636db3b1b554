"""Crash safety: real sp-extract / match-pairs processes SIGKILLed at many moments.

Each run resumes what the previous, killed, one left. Kill points: random, increasing delays
after the run took the store's lock, and moments caught by watching the files (a part being
written, a part just renamed, the fold's copy being written, the store just replaced while its
parts still exist). After every kill the store must open with every entry it had before, the
durable entries (store and parts) must include every one the progress bar had reported saved,
and every entry must equal the uninterrupted run's. A last run completes the job; its store
must equal the uninterrupted run's, dataset by dataset.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli
from support.reliability import (
    Run,
    assert_entries_equal,
    durable_names,
    lock_held_by,
    make_workspace,
    part_paths,
    read_entries,
)


@dataclass
class Before:
    """The store's files when a run starts: triggers look for what the run itself creates."""

    files: set[str]
    inode: int | None


Trigger = Callable[[Path, int, Before], bool]  # (store, pid of the run, state before it)


def files(store: Path) -> set[str]:
    """Names of the store's files: the folder's, and the parts folder's as 'parts/NAME'."""
    found = {p.name for p in store.parent.iterdir()}
    parts = store.with_name(store.name + ".parts")
    with contextlib.suppress(FileNotFoundError):
        found |= {f"parts/{name}" for name in os.listdir(parts)}
    return found


def new_part(suffix: str) -> Trigger:
    def trigger(store: Path, pid: int, before: Before) -> bool:
        return any(n.startswith("parts/") and n.endswith(suffix) for n in files(store) - before.files)

    return trigger


def fold_copy(store: Path, pid: int) -> Path:
    return store.with_name(f".{store.name}.{pid}.tmp")


def fold_copy_written(store: Path, pid: int, before: Before) -> bool:
    return fold_copy(store, pid).exists()


def replaced_before_parts_deleted(store: Path, pid: int, before: Before) -> bool:
    try:
        replaced = store.stat().st_ino != before.inode
    except FileNotFoundError:
        return False
    return replaced and any(name.startswith("parts/part-") for name in files(store))


def after(delay: float) -> tuple[str, Trigger]:
    """Kill ``delay`` seconds after the run took the lock."""
    state: dict[str, float] = {}

    def trigger(store: Path, pid: int, before: Before) -> bool:
        if "locked" not in state:
            if not lock_held_by(store, pid):
                return False
            state["locked"] = time.monotonic()
        return time.monotonic() - state["locked"] >= delay

    return f"{delay:.2f} s after the lock", trigger


EVENTS: dict[str, Trigger] = {
    "a part being written": new_part(".h5.tmp"),
    "the fold's copy being written": fold_copy_written,
    "a part just renamed": new_part(".h5"),
    "store replaced, parts not yet deleted": replaced_before_parts_deleted,
}


def either(first: Trigger, second: Trigger) -> Trigger:
    return lambda store, pid, before: first(store, pid, before) or second(store, pid, before)


def kill_campaign(command: list[str], store: Path, reference: Path, seed: int) -> list[str]:
    """Runs ``command`` killed at a series of moments, then once to the end; returns what was hit.

    Kills right after the lock, while a part is written and right after one is renamed; then at
    random, increasing delays (or in the fold, whichever comes first) until a run is killed in
    the fold or completes; then after the store's rename, and in the fold of a run that only
    folds.
    """
    rng = random.Random(seed)
    expected = read_entries(reference)
    initial = files(store)
    hits: list[str] = []

    def run_and_kill(label: str, trigger: Trigger) -> str:
        stored_before = set(read_entries(store)) if store.exists() else set()
        durable_before = durable_names(store)
        before = Before(files(store), store.stat().st_ino if store.exists() else None)
        run = Run(*command)
        pid = run.process.pid
        fired = run.wait_until(lambda: trigger(store, pid, before))
        code = run.kill()
        context = f"seed {seed}, kill at {label}: exit {code}\n{run.text[-2000:]}"
        assert fired or code == 0, context
        in_fold = fold_copy(store, pid).exists()  # the kill landed before the fold's rename
        outcome = "killed in the fold" if in_fold else "killed" if code == -9 else "done"
        hits.append(f"{label}: {outcome}")
        if store.exists():
            stored = read_entries(store)
            assert stored_before <= set(stored), context
            assert_entries_equal(stored, expected)
        durable = durable_names(store)
        assert durable_before <= durable, context
        assert len(durable - durable_before) >= run.reported_saved(), context
        for part in part_paths(store):
            assert_entries_equal(read_entries(part), expected)
        return outcome

    written, fold, renamed, replaced = EVENTS.items()
    for label, trigger in [after(0.0), written, renamed]:
        run_and_kill(label, trigger)
    delay = 0.0
    for _ in range(12):
        delay += rng.uniform(0.2, 0.8)
        label, trigger = after(delay)
        if run_and_kill(f"{label} or in the fold", either(trigger, fold[1])) != "killed":
            break
    for label, trigger in [replaced, fold]:
        run_and_kill(label, trigger)
    final = Run(*command)
    assert final.finish() == 0, final.text
    assert read_entries(store).keys() == expected.keys()
    assert_entries_equal(read_entries(store), expected)
    kept = {store.name, f"{store.name}.index"}
    if "match-pairs" in command:
        kept.add(f"{store.name}.resume")
    assert files(store) == initial | kept  # no part, temporary or lock file
    return hits


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, random_weights: Path) -> dict:
    """48 images, their features from one uninterrupted run, and pairs of them."""
    space = make_workspace(tmp_path_factory.mktemp("kill"), random_weights)
    pairs = space["root"] / "pairs.txt"
    features = str(space["reference"])
    result = run_cli("pairs", "sequential", "--window", "8", "--features", features, "--out", str(pairs))
    assert result.returncode == 0, result.stderr
    return space


def test_extraction_survives_sigkill_at_any_moment(workspace: dict, tmp_path: Path) -> None:
    store = tmp_path / "feats.h5"
    command = [str(workspace["images"]), "--out", str(store), *workspace["options"]]
    seed = int.from_bytes(os.urandom(4), "little")
    hits = kill_campaign(command, store, workspace["reference"], seed)
    assert any(hit.endswith("killed in the fold") for hit in hits), hits


def test_matching_survives_sigkill_at_any_moment(workspace: dict, tmp_path: Path) -> None:
    features = tmp_path / "feats.h5"
    shutil.copyfile(workspace["reference"], features)
    reference = tmp_path / "reference-matches.h5"
    pairs = workspace["root"] / "pairs.txt"
    result = run_cli("match-pairs", str(pairs), "--features", str(features), "--out", str(reference))
    assert result.returncode == 0, result.stderr
    store = tmp_path / "matches.h5"
    command = [
        "match-pairs",
        str(pairs),
        "--features",
        str(features),
        "--out",
        str(store),
        "--batch-size",
        "4",
    ]
    seed = int.from_bytes(os.urandom(4), "little")
    hits = kill_campaign(command, store, reference, seed)
    assert any(hit.endswith("killed in the fold") for hit in hits), hits
