"""Shared fixtures: the real weights and photos in ../shared, and small synthetic inputs; the
test tiers (``MODULE_MARKERS``).

A missing ../shared file fails the test (never skips it): CI must run every test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Each module's markers (declared in pyproject.toml). slow: real-photo pipelines, kills and
# interruptions, README's commands: about 490 of the suite's 700 s on 2 cores (two pytest-xdist
# workers), so that `python -m pytest -q -m "not slow"` (the development tier) takes under 5 minutes.
MODULE_MARKERS = {
    "test_adjust": ("colmap",),
    "test_cluster": ("dask",),
    "test_colmap": ("colmap", "slow"),
    "test_diskfull": ("slow",),
    "test_global": ("colmap", "slow"),
    "test_examples": ("colmap", "dask"),
    "test_handoff": ("colmap", "browser", "slow"),
    "test_interrupt": ("slow",),
    "test_kill": ("slow",),
    "test_messages": ("colmap",),
    "test_photo_collections": ("colmap", "slow"),
    "test_poses": ("colmap", "slow"),
    "test_processes": ("colmap", "slow"),
    "test_readme": ("colmap", "dask", "slow"),
    "test_retrieval": ("colmap", "slow"),
    "test_sfm": ("colmap", "slow"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    stale = [name for name in MODULE_MARKERS if not (ROOT / "tests" / f"{name}.py").exists()]
    if stale:  # a renamed module would leave the fast tier silently
        raise pytest.UsageError(f"tests/conftest.py MODULE_MARKERS names missing modules: {stale}")
    for item in items:
        for marker in MODULE_MARKERS.get(item.module.__name__, ()):
            item.add_marker(marker)


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.fail(f"{path} is missing: tests need ../shared beside the repository (see README)")
    return path


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the tests' weights and exported-model cache out of the user's ~/.cache."""
    path = tmp_path_factory.mktemp("sp-extract-cache")
    os.environ["SP_EXTRACT_CACHE"] = str(path)
    return path


# Python's own: Ctrl-C raises KeyboardInterrupt (also when a shell started pytest in the
# background, where SIGINT is ignored from the start)
SESSION_SIGINT = signal.default_int_handler


@pytest.fixture(autouse=True)
def sigint_handler_restored() -> Iterator[None]:
    """Commands run in-process (click's CliRunner) ignore SIGINT once they are over, as the CLI
    does while it exits: every test starts and ends with the session's handler."""
    signal.signal(signal.SIGINT, SESSION_SIGINT)  # also after a fixture ran a command in-process
    yield
    signal.signal(signal.SIGINT, SESSION_SIGINT)


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """Magic Leap's SuperPoint v1 weights (../shared/weights/superpoint_v1.pth)."""
    return shared_file("weights/superpoint_v1.pth")


@pytest.fixture(scope="session")
def sacre_coeur() -> Path:
    """Folder of 10 real photos (../shared/data/sacre_coeur)."""
    return shared_file("data/sacre_coeur")


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised v1-layout state dict, for fast tests that need no trained network."""
    from sp_extract.extraction.model import SuperPoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random_v1.pth"
    torch.save(SuperPoint().state_dict(), path)
    return path


@dataclass(frozen=True)
class CliExtraction:
    """One ``sp-extract`` run of a folder: the store it wrote, its JSON report, the process."""

    images: Path
    store: Path
    report: dict
    result: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def sacre_coeur_features(
    tmp_path_factory: pytest.TempPathFactory, sacre_coeur: Path, real_weights: Path
) -> CliExtraction:
    """The 10 real photos extracted once per session by the CLI with its default options (the
    real weights, ``--json-report``), for every test that reads that store (test_e2e, test_colmap,
    ``sacre_coeur_database``). Read only: a test that writes beside or into it copies it first."""
    out_dir = tmp_path_factory.mktemp("sacre-coeur-features")
    store, report = out_dir / "feats.h5", out_dir / "report.json"
    result = run_cli(
        str(sacre_coeur), "--out", str(store), "--weights", str(real_weights), "--json-report", str(report)
    )
    report_data = json.loads(report.read_text()) if report.exists() else {}
    return CliExtraction(sacre_coeur, store, report_data, result)


@pytest.fixture(scope="session")
def sacre_coeur_database(
    tmp_path_factory: pytest.TempPathFactory, sacre_coeur_features: CliExtraction
) -> Path:
    """The COLMAP database of the session's Sacre Coeur store (README's pairs exhaustive,
    match-pairs, colmap; one thread), for test_colmap and test_global. Read only."""
    assert sacre_coeur_features.result.returncode == 0, sacre_coeur_features.result.stderr
    root, features = tmp_path_factory.mktemp("sacre-coeur-database"), sacre_coeur_features.store
    pairs = root / "pairs.txt"
    result = run_cli("pairs", "exhaustive", "--features", str(features), "--out", str(pairs), timeout=600)
    assert result.returncode == 0, ("pairs", result.stderr)
    return match_into_database(root, sacre_coeur_features.images, features, pairs)


def write_image(path: Path, width: int = 96, height: int = 64, seed: int = 0) -> Path:
    """A textured 8-bit grayscale image with corners (blocks), written with OpenCV."""
    rng = np.random.default_rng(seed)
    image = np.kron(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1)), np.ones((8, 8)))
    image = image[:height, :width].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def small_images(tmp_path: Path) -> Path:
    """A folder of a few small synthetic images, one in a subfolder."""
    root = tmp_path / "images"
    write_image(root / "a.png", seed=1)
    write_image(root / "b.jpg", seed=2)
    write_image(root / "sub" / "c.png", 80, 120, seed=3)
    return root


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``sp-extract`` as a real subprocess (``python -m sp_extract``)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sp_extract", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``sp-extract`` in this process (click's CliRunner), as :func:`run_cli` reports it: for
    tests of what a command does rather than of its process (signals, locks, exit), without
    starting Python and importing torch once more. An uncaught exception is in ``stderr``. The
    SIGINT and SIGTERM handlers are restored after it (the CLI ignores SIGINT while it exits), also
    when it runs in a fixture, before ``sigint_handler_restored`` records a test's handler."""
    from click.testing import CliRunner

    from sp_extract.cli import cli

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = CliRunner().invoke(cli, list(args))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["sp-extract", *args], result.exit_code, result.stdout, stderr)


def match_into_database(root: Path, images: Path, features: Path, pairs: Path) -> Path:
    """README's match-pairs and colmap (one thread) into ``root``: ``matches.h5``, ``db.db``."""
    matches, database = root / "matches.h5", root / "db.db"
    for step in (
        ("match-pairs", str(pairs), "--features", str(features), "--out", str(matches), "-q"),
        ("colmap", "--images", str(images), "--features", str(features), "--matches", str(matches),
         "--database", str(database), "--num-threads", "1"),
    ):  # fmt: skip
        result = run_cli(*step, timeout=600)
        assert result.returncode == 0, (step[0], result.stderr)
    return database


def reconstruct_report(root: Path, images: Path, database: Path) -> dict:
    """README's reconstruct (one thread) of ``database`` into ``root/sparse``; its JSON report."""
    report = root / "report.json"
    args = ("--database", str(database), "--images", str(images), "--out", str(root / "sparse"))
    result = run_cli("reconstruct", *args, "--num-threads", "1", "--json-report", str(report), timeout=600)
    assert result.returncode == 0, ("reconstruct", result.stderr)
    return json.loads(report.read_text())


def match_and_map(root: Path, images: Path, features: Path, pairs: Path) -> dict:
    """The last three of README's five commands (match-pairs, colmap, reconstruct; one thread)
    into ``root``: ``matches.h5``, ``db.db``, ``sparse/``; returns the reconstruct report."""
    return reconstruct_report(root, images, match_into_database(root, images, features, pairs))
