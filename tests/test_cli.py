"""The ``sp-extract`` command through a real subprocess: forms, help, errors, reports, output."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import ROOT, run_cli, write_image
from support.hloc_reader import snapshot

from sp_extract.report import Progress

SUMMARY_START = "extract: "


def extract_cli(images: Path, out: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(str(images), "--out", str(out), "--weights", str(weights), "--num-workers", "0", *extra)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2 and one line on stderr, ``sp-extract: error: ...``, naming every fragment."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("sp-extract: error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_default_command_and_extract_spelled_out_agree(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    bare = extract_cli(small_images, tmp_path / "bare.h5", random_weights)
    spelled = run_cli(
        "extract",
        str(small_images),
        "--out",
        str(tmp_path / "spelled.h5"),
        "--weights",
        str(random_weights),
        "--num-workers",
        "1",
    )  # decoding in a worker process, the other in the main process: same store
    assert bare.returncode == 0, bare.stderr
    assert spelled.returncode == 0, spelled.stderr
    assert bare.stdout == spelled.stdout == ""  # everything for the user goes to stderr
    bare_store, spelled_store = snapshot(tmp_path / "bare.h5"), snapshot(tmp_path / "spelled.h5")
    assert len(bare_store) == 12 and bare_store == spelled_store


def test_folder_named_like_a_command_with_extract_spelled_out(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    small_images.rename(tmp_path / "pairs")
    options = ["--out", "f.h5", "--weights", str(random_weights), "--num-workers", "0"]
    result = run_cli("extract", "pairs", *options, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{SUMMARY_START}3 images saved" in result.stderr


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "import sp_extract.cli as cli\n"
        "runner = CliRunner()\n"
        "codes = [runner.invoke(cli.cli, args).exit_code for args in (['--help'], ['extract', '--help'])]\n"
        "print(codes, sorted(m for m in ('torch', 'cv2', 'h5py') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[0, 0] []"


def test_help_and_readme_list_the_same_options() -> None:
    result = run_cli("extract", "--help")
    assert result.returncode == 0
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Extraction")
    section = readme[start : readme.index("\n### ", start)]  # the options table, before the first subsection
    options = re.findall(r"^\| `(--[a-z0-9-]+)", section, flags=re.MULTILINE)
    assert len(options) >= 16
    for option in options:
        assert option in result.stdout, option
    # and the other way round: every option of the command is documented somewhere in the README
    for option in set(re.findall(r"^\s+(?:-[a-z], )?(--[a-z0-9-]+)", result.stdout, re.MULTILINE)):
        assert option == "--help" or f"`{option}" in readme, f"{option} is not in README.md"
    top = run_cli("--help")
    assert top.returncode == 0 and "extract" in top.stdout and "Exit codes" in top.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--max-keypoints", "0"], ["--max-keypoints", "got 0"]),
        (["--max-keypoints", "many"], ["--max-keypoints", "many"]),
        (["--threshold", "1.5"], ["--threshold"]),
        (["--resize-max", "-1"], ["--resize-max"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--num-workers", "-1"], ["--num-workers", "got -1"]),
        (["--device", "toaster"], ["--device toaster"]),
        (["--device", "cuda:7"], ["--device cuda:7", "not available"]),
        (["--no-such-option"], ["--no-such-option"]),
        (["--weights", "missing.pth"], ["missing.pth"]),
    ],
)
def test_bad_options_exit_2_with_one_line(
    small_images: Path, random_weights: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "feats.h5"
    weights = [] if "--weights" in args else ["--weights", str(random_weights)]
    result = run_cli(str(small_images), "--out", str(out), *weights, *args)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_missing_out_is_a_usage_error(small_images: Path) -> None:
    assert_one_line_error(run_cli(str(small_images)), "--out")


def test_unusable_output_is_a_config_error(small_images: Path, random_weights: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("not a store\n")
    assert_one_line_error(extract_cli(small_images, text, random_weights), str(text), "not an HDF5 file")
    assert text.read_text() == "not a store\n"
    nowhere = tmp_path / "no" / "such" / "dir" / "feats.h5"
    assert_one_line_error(extract_cli(small_images, nowhere, random_weights), "no/such/dir")


def test_unwritable_json_report_is_refused_before_the_run(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    report = tmp_path / "no" / "report.json"
    result = extract_cli(small_images, tmp_path / "feats.h5", random_weights, "--json-report", str(report))
    assert_one_line_error(result, "--json-report", f"the folder {report.parent} does not exist")
    assert not (tmp_path / "feats.h5").exists()  # checked before any work


@pytest.mark.parametrize("content", [None, "notes.txt", "missing"])
def test_no_images_found_exits_2(random_weights: Path, tmp_path: Path, content: str | None) -> None:
    images = tmp_path / "images"
    if content != "missing":
        images.mkdir()
        if content:
            (images / content).write_text("no images here\n")
    result = extract_cli(images, tmp_path / "feats.h5", random_weights)
    assert_one_line_error(result, str(images))
    assert ("no images found" if content != "missing" else "not a directory") in result.stderr


def test_image_list_selects_and_reports_missing_entries(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("# two of three\nsub/c.png\n\na.png\n")
    out = tmp_path / "feats.h5"
    result = extract_cli(small_images, out, random_weights, "--image-list", str(listing))
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as h5:
        assert sorted(h5) == ["a.png", "sub"] and list(h5["sub"]) == ["c.png"]

    listing.write_text("a.png\nnope.png\n")
    result = extract_cli(small_images, out, random_weights, "--image-list", str(listing))
    assert_one_line_error(result, f"{listing}:2", "nope.png")


@pytest.fixture
def images_with_bad_files(small_images: Path) -> Path:
    """small_images plus a zero-byte file, a truncated JPEG, a text file named .jpg, a good image
    whose file name is not UTF-8, and a thumbnail smaller than one 8 x 8 cell (not a failure: it
    is stored with no keypoints)."""
    (small_images / "empty.jpg").write_bytes(b"")
    full = write_image(small_images / "whole.jpg", 200, 160, seed=4).read_bytes()
    (small_images / "sub" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (small_images / "whole.jpg").unlink()
    (small_images / "text.jpg").write_text("this is not a JPEG\n")
    assert cv2.imwrite(str(small_images / "tiny.png"), np.full((4, 5), 200, np.uint8))
    write_image(small_images / "latin1.png").rename(small_images / os.fsdecode(b"\xe9t\xe9.png"))
    return small_images


BAD_REASONS = {
    "empty.jpg": "empty file",
    "sub/truncated.jpg": "truncated",
    "text.jpg": "format",
    "\\xe9t\\xe9.png": "not valid UTF-8",
}


def test_bad_inputs_are_reported_and_the_run_goes_on(
    images_with_bad_files: Path, random_weights: Path, tmp_path: Path
) -> None:
    out, report_path = tmp_path / "feats.h5", tmp_path / "report.json"
    result = run_cli(
        str(images_with_bad_files),
        "--out",
        str(out),
        "--weights",
        str(random_weights),
        "--num-workers",
        "2",
        "--batch-size",
        "2",
        "--json-report",
        str(report_path),
    )

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for name, reason in BAD_REASONS.items():
        assert re.search(rf"^failed: {re.escape(name)}: .*{reason}", result.stderr, re.MULTILINE), name
    with h5py.File(out, "r") as h5:
        assert sorted(h5) == ["a.png", "b.jpg", "sub", "tiny.png"] and list(h5["sub"]) == ["c.png"]
        assert h5["tiny.png/keypoints"].shape == (0, 2)
    report = json.loads(report_path.read_text())
    assert report["exit_code"] == 1
    assert (report["total"], report["done"], report["skipped"], report["failed_count"]) == (8, 4, 0, 4)
    reasons = {entry["name"]: entry["reason"] for entry in report["failed"]}
    assert set(reasons) == set(BAD_REASONS)
    for name, reason in BAD_REASONS.items():
        assert reason in reasons[name]

    # the failed images are tried again on the next run, the good ones are not
    again = extract_cli(images_with_bad_files, out, random_weights, "--json-report", str(report_path))
    assert again.returncode == 1
    report = json.loads(report_path.read_text())
    assert (report["done"], report["skipped"], report["failed_count"]) == (0, 4, 4)


def test_json_report_content(small_images: Path, random_weights: Path, tmp_path: Path) -> None:
    out, report_path = tmp_path / "feats.h5", tmp_path / "report.json"
    result = extract_cli(small_images, out, random_weights, "--json-report", str(report_path))
    assert result.returncode == 0, result.stderr

    report = json.loads(report_path.read_text())
    with h5py.File(out, "r") as h5:
        counts = sorted(len(h5[name]["scores"]) for name in ("a.png", "b.jpg", "sub/c.png"))
    assert report["command"] == "extract" and report["output"] == str(out)
    assert (report["total"], report["done"], report["skipped"], report["failed"]) == (3, 3, 0, [])
    assert report["exit_code"] == 0 and report["interrupted"] is False
    stats = report["keypoints_per_image"]
    assert (stats["min"], stats["median"], stats["max"]) == (counts[0], counts[1], counts[2])
    assert stats["mean"] == pytest.approx(sum(counts) / 3, abs=0.05)
    assert report["wall_time_s"] > 0
    assert report["throughput_per_s"] == pytest.approx(3 / report["wall_time_s"], rel=1e-2)
    # the printed summary says the same
    assert f"{SUMMARY_START}3 images saved, 0 already in {out}, 0 failed" in result.stderr
    assert f"keypoints per image: min {counts[0]}," in result.stderr and f"max {counts[2]}" in result.stderr


def test_output_is_plain_text_when_not_a_terminal_and_quiet_keeps_only_the_summary(
    images_with_bad_files: Path, random_weights: Path, tmp_path: Path
) -> None:
    loud = extract_cli(images_with_bad_files, tmp_path / "loud.h5", random_weights)
    quiet = extract_cli(images_with_bad_files, tmp_path / "quiet.h5", random_weights, "--quiet")
    assert loud.returncode == quiet.returncode == 1
    assert "\x1b[" not in loud.stderr  # no terminal control sequences in a log file
    # each failure is printed once: as it happens, or in the summary when quiet
    assert loud.stderr.count("failed: text.jpg:") == 1
    assert f"{len(BAD_REASONS)} failed (listed above)" in loud.stderr.splitlines()[len(BAD_REASONS)]
    assert quiet.stderr.count("failed: text.jpg:") == 1
    quiet_lines = quiet.stderr.splitlines()
    assert quiet_lines[0].startswith(SUMMARY_START) and quiet_lines[0].endswith(f"{len(BAD_REASONS)} failed")
    assert quiet_lines[1].startswith("keypoints per image:") and quiet_lines[2].startswith("wall time")
    assert quiet_lines[3].startswith("device cpu, backend ")
    assert all(line.startswith("failed: ") for line in quiet_lines[4:])
    assert len(quiet_lines) == 4 + len(BAD_REASONS)


def test_progress_bar_on_a_terminal(small_images: Path, random_weights: Path, tmp_path: Path) -> None:
    main, follower = pty.openpty()
    command = [sys.executable, "-m", "sp_extract", str(small_images), "--out", str(tmp_path / "f.h5")]
    command += ["--weights", str(random_weights), "--num-workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "100"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert process.wait(timeout=300) == 0
    text = output.decode(errors="replace")
    assert "\x1b[" in text  # drawn with terminal control sequences
    assert "extracting" in text and "3/3" in text and "images/s" in text
    assert f"{SUMMARY_START}3 images saved" in text


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(4, "images", stream=stream, interval=0.0)
    progress.advance(1)
    progress.advance(0)  # nothing new: no line
    progress.advance(3)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"1/4 images saved, [0-9.]+ images/s, ETA [0-9]+ s", lines[0])
    assert lines[1].startswith("4/4 images saved,") and lines[1].endswith("ETA 0 s")


def test_progress_is_silent_when_quiet_and_a_bar_on_a_terminal() -> None:
    quiet = io.StringIO()
    progress = Progress(2, "images", quiet=True, stream=quiet, interval=0.0)
    progress.advance(2)
    progress.message("failed: x.jpg: empty file")
    progress.close()
    assert quiet.getvalue() == ""

    terminal = FakeTerminal()
    progress = Progress(2, "images", stream=terminal, interval=0.0)
    progress.advance(2)
    progress.message("failed: x.jpg: empty file")
    progress.close()
    output = terminal.getvalue()
    assert "extracting" in output and "2/2" in output and "images/s" in output
    assert "failed: x.jpg: empty file" in output
