"""One report, one warning channel: a warning is shown live once, listed in the summary and in
the JSON report (also of a Dask driver), and every command's JSON report has the shared entries."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import invoke_cli, write_image

from sp_extract import ExtractRun, extract
from sp_extract.cluster.dask import combined, run_shard
from sp_extract.errors import SpExtractWarning
from sp_extract.matching import run as matching_run
from sp_extract.report import Progress, Summary, recording, warn

SHARED = {"command", "exit_code", "wall_time_s", "warnings", "notes"}
SPACED = "1 image name with white space can never be paired"
FP16 = "--precision fp16 on the CPU"


def shown(stderr: str, start: str) -> int:
    """How many times a warning was shown live."""
    return sum(line.startswith(f"sp-extract: warning: {start}") for line in stderr.splitlines())


def listed(stderr: str, start: str) -> int:
    """How many times the printed summary lists it."""
    return sum(line.startswith(f"warning: {start}") for line in stderr.splitlines())


def report_of(result_stderr: str, path: Path, returncode: int, expected_code: int = 0) -> dict:
    assert returncode == expected_code, result_stderr
    data = json.loads(path.read_text())
    assert data.keys() >= SHARED, sorted(data)
    assert data["exit_code"] == expected_code and data["wall_time_s"] > 0
    return data


@pytest.fixture
def feats(photos: Path, random_weights: Path, tmp_path: Path) -> Path:
    """The photos' feature store, made by the Python API."""
    with pytest.warns(SpExtractWarning, match=SPACED):
        extract(photos, tmp_path / "f.h5", run=ExtractRun(weights=str(random_weights), quiet=True))
    return tmp_path / "f.h5"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_image(root / "my photo.png", seed=1)
    write_image(root / "b.png", seed=2)
    write_image(root / "c.png", seed=3)
    return root


def test_extract_warnings_are_shown_once_and_in_the_summary_and_json_report(
    photos: Path, random_weights: Path, tmp_path: Path
) -> None:
    report = tmp_path / "extract.json"
    result = invoke_cli(str(photos), "--out", str(tmp_path / "f.h5"), "--weights", str(random_weights),
                        "--precision", "fp16", "--backend", "torch", "--device", "cpu",
                        "--json-report", str(report))  # fmt: skip
    data = report_of(result.stderr, report, result.returncode)
    for start in (SPACED, FP16):
        assert shown(result.stderr, start) == 1 and listed(result.stderr, start) == 1, result.stderr
        assert sum(warning.startswith(start) for warning in data["warnings"]) == 1, data["warnings"]
    assert data["command"] == "extract" and len(data["warnings"]) == 2


def test_python_api_gets_warnings_as_python_warnings(
    photos: Path, random_weights: Path, tmp_path: Path
) -> None:
    with pytest.warns(SpExtractWarning, match=SPACED) as caught:
        summary = extract(photos, tmp_path / "f.h5", run=ExtractRun(weights=str(random_weights)))
    assert len(caught) == 1 and summary.warnings == [] and summary.done == 3


def test_match_pairs_warning_in_its_json_report(
    feats: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warning raised inside match_pairs (here by the device choice) reaches its report."""
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("b.png c.png\n")
    resolve = matching_run.resolve_device
    monkeypatch.setattr(
        matching_run, "resolve_device", lambda device: warn("the test's warning") or resolve(device)
    )
    report = tmp_path / "match.json"
    result = invoke_cli("match-pairs", str(pairs), "--features", str(feats), "--out", str(tmp_path / "m.h5"),
                        "--json-report", str(report))  # fmt: skip
    data = report_of(result.stderr, report, result.returncode)
    assert shown(result.stderr, "the test's warning") == 1 and data["warnings"] == ["the test's warning"]
    assert data["command"] == "match-pairs" and data["done"] == 1


def test_every_store_command_json_report_has_the_shared_entries(
    feats: Path, photos: Path, random_weights: Path, tmp_path: Path
) -> None:
    runs = {
        "merge": ("merge", str(tmp_path / "merged.h5"), str(feats)),
        "repair": ("repair", str(feats)),
        "check": ("repair", "--check", str(feats)),
    }
    for command, args in runs.items():
        report = tmp_path / f"{command}.json"
        result = invoke_cli(*args, "--json-report", str(report))
        assert report_of(result.stderr, report, result.returncode)["command"] == command
    result = invoke_cli("info", "--json", str(feats))
    assert result.returncode == 0 and json.loads(result.stdout).keys() >= SHARED
    report = tmp_path / "evaluate.json"
    result = invoke_cli("evaluate", "homography", str(photos), "--weights", str(random_weights),
                        "--pairs-per-image", "1", "-q", "--json-report", str(report))  # fmt: skip
    assert report_of(result.stderr, report, result.returncode)["command"] == "evaluate homography"


def test_dask_worker_records_its_warnings_and_the_driver_shows_them_once(
    photos: Path, random_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A shard's warnings travel back in its summary (the worker shows nothing); the driver
    shows each once, however many shards raised it, and its summary lists it."""
    work = tmp_path / "1-of-1.txt"
    work.write_text("my photo.png\nb.png\n")
    task = {"images": photos, "run": ExtractRun(weights=str(random_weights), device="cpu")}
    shard = run_shard("features", work, tmp_path / "1-of-1.h5", task)
    assert len(shard.warnings) == 1 and shard.warnings[0].startswith(SPACED)
    assert capsys.readouterr().err == ""
    merged = Summary(command="merge", output=str(tmp_path / "f.h5"), total=2)
    with recording():
        summary = combined("features", merged.finish(2, 0.0), [shard, shard], 0, 0.0)
    assert capsys.readouterr().err == f"sp-extract: warning: {shard.warnings[0]}\n"
    assert summary.to_dict()["warnings"] == shard.warnings


def test_warning_goes_above_the_progress_bar(capsys: pytest.CaptureFixture) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    with recording() as recorded:
        progress = Progress(3, "images", stream=terminal)
        warn("watch out")
        progress.close()
        warn("watch out")  # once only
    assert "sp-extract: warning: watch out" in terminal.getvalue() and capsys.readouterr().err == ""
    assert recorded == ["watch out"]
