"""Messages a new user meets (issue 17): mistyped commands, wrong inputs, summaries, the Python
API's input checks, interruption of the one-step commands. In-process where the CLI's
behaviour does not depend on a fresh interpreter, to keep these tests fast."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli, write_image

from sp_extract import cli
from sp_extract.extraction import backends
from sp_extract.interrupt import Interrupted, signals_raise
from sp_extract.pairs.core import write_pairs
from sp_extract.report import Summary
from sp_extract.sfm.child import run_in_child
from sp_extract.store.writer import StoreWriter


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, str, str]:
    """``sp-extract ARGS`` in this process: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["sp-extract", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


def one_error(code: int, err: str) -> str:
    assert code == 2 and err.startswith("sp-extract: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("args", "meant"),
    [
        (["match_pairs", "pairs.txt"], "match-pairs"),
        (["match-pair", "pairs.txt"], "match-pairs"),
        (["reconstrcut", "--images", "photos"], "reconstruct"),
        (["colmpa"], "colmap"),
    ],
)
def test_mistyped_command_names_the_command_meant(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    args: list[str],
    meant: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    err = one_error(*run_main(monkeypatch, capsys, *args)[::2])
    assert f"no command or folder '{args[0]}' (did you mean '{meant}'?)" in err
    assert "--out" not in err


def test_existing_folder_named_like_a_command_is_still_extracted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "match_pairs").mkdir()  # empty: extraction's own error proves extraction ran
    err = one_error(*run_main(monkeypatch, capsys, "match_pairs", "--out", "f.h5")[::2])
    assert "match_pairs: no images found" in err


def test_help_and_version(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(monkeypatch, capsys, "help")
    assert code == 0 and "Commands:" in out and "match-pairs" in out
    code, out, _ = run_main(monkeypatch, capsys, "help", "reconstruct")
    assert code == 0 and "reconstruct [OPTIONS]" in out and "--images" in out
    for flag in ("-V", "--version"):
        code, out, _ = run_main(monkeypatch, capsys, flag)
        assert code == 0 and out.strip() == "sp-extract, version 0.1.0"


def test_an_input_that_is_no_store_names_its_option_and_is_never_to_be_removed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    photo = write_image(tmp_path / "photo.jpg")
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as h5:
        h5["x"] = np.zeros(3)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\n")
    for store, cause in ((photo, "not an HDF5 file"), (foreign, "not written by sp-extract")):
        for args in (
            ["pairs", "exhaustive", "--features", str(store), "--out", str(tmp_path / "p.txt")],
            ["match-pairs", str(pairs), "--features", str(store), "--out", str(tmp_path / "m.h5")],
        ):
            err = one_error(*run_main(monkeypatch, capsys, *args)[::2])
            assert f"{store}: " in err and cause in err
            assert "--features must name a feature store written by sp-extract" in err
            assert "--out" not in err and "remove" not in err and "--overwrite" not in err
    assert photo.stat().st_size > 0 and not (tmp_path / "p.txt").exists() and not (tmp_path / "m.h5").exists()


def test_json_report_is_checked_before_the_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    report = tmp_path / "missing" / "report.json"
    for args in (
        ["match-pairs", "pairs.txt", "--json-report", str(report)],
        ["reconstruct", "--images", str(tmp_path), "--json-report", str(report)],
        ["repair", "feats.h5", "--json-report", str(report)],
    ):
        err = one_error(*run_main(monkeypatch, capsys, *args)[::2])
        assert "--json-report" in err and f"the folder {report.parent} does not exist" in err
        assert "pairs.txt" not in err and "database" not in err  # refused before looking at inputs


def test_export_format_comes_from_the_extension(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    class Loaded:  # stands in for real weights: the format choice happens before the network
        sha1 = "0" * 40

        def build(self) -> torch.nn.Module:
            return torch.nn.Identity()

    def openvino_chosen() -> None:
        raise backends.ConfigError("openvino was chosen")

    monkeypatch.setattr(backends, "load_weights", lambda weights: Loaded())
    monkeypatch.setattr(backends, "onnx_model", lambda net, sha1: b"onnx bytes")
    monkeypatch.setattr(backends, "import_openvino", openvino_chosen)
    code, _, err = run_main(monkeypatch, capsys, "export", str(tmp_path / "net.onnx"))
    assert code == 0 and (tmp_path / "net.onnx").read_bytes() == b"onnx bytes", err
    assert "openvino was chosen" in one_error(
        *run_main(monkeypatch, capsys, "export", str(tmp_path / "n.xml"))[::2]
    )
    err = one_error(*run_main(monkeypatch, capsys, "export", str(tmp_path / "net.model"))[::2])
    assert "end OUT in .onnx (ONNX) or .xml (OpenVINO IR), or pass --format" in err
    err = one_error(
        *run_main(monkeypatch, capsys, "export", "--format", "onnx", str(tmp_path / "n.xml"))[::2]
    )
    assert ".xml is OpenVINO's extension" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_summary_lines() -> None:
    empty = Summary(command="extract", output="f.h5", total=3, skipped=3, device="cpu", backend="torch")
    lines = empty.finish(0, time.monotonic()).lines()
    assert lines[0] == "extract: 0 images saved, 3 already in f.h5, 0 failed"
    assert lines[1].startswith("no images saved in this run; wall time ")
    assert lines[2] == "device cpu, backend torch"
    assert not any("min" in line or "/s" in line for line in lines)
    assert empty.to_dict()["keypoints_per_image"] == {"min": None, "mean": None, "median": None, "max": None}

    one = Summary(command="match-pairs", output="m.h5", total=2, unit="pairs", counts=[5])
    one.failed.append({"name": "a b", "reason": "unreadable"})
    one.warnings.append("something to know")
    lines = one.finish(1, time.monotonic() - 1).lines()
    assert lines[0] == "match-pairs: 1 pair saved, 0 already in m.h5, 1 failed"
    assert lines[-2:] == ["failed: a b: unreadable", "warning: something to know"]
    one.failures_shown = True  # printed as they happened: the summary does not repeat them
    lines = one.lines()
    assert lines[0].endswith("1 failed (listed above)") and not any(
        line.startswith("failed:") for line in lines
    )
    assert "failures_shown" not in one.to_dict() and one.to_dict()["warnings"] == ["something to know"]


def test_extraction_warns_of_no_keypoints_and_of_unpairable_names(
    random_weights: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    write_image(images / "my photo.png", seed=1)
    write_image(images / "b.png", seed=2)
    write_image(images / "c.png", seed=3)
    feats = tmp_path / "feats.h5"
    result = run_cli(str(images), "--out", str(feats), "--weights", str(random_weights), "--resize-max", "4")
    assert result.returncode == 0, result.stderr
    assert "warning: 1 image name with white space can never be paired" in result.stderr
    assert "'my photo.png'" in result.stderr
    assert "warning: no keypoints in any of the 3 images saved: check --resize-max 4" in result.stderr
    assert "device cpu, backend onnxruntime" in result.stderr  # the default on the CPU

    pairs = tmp_path / "pairs.txt"
    result = run_cli("pairs", "exhaustive", "--features", str(feats), "--out", str(pairs))
    assert result.returncode == 0, result.stderr
    assert (
        "warning: 1 image left out, white space in the name" in result.stderr
        and "'my photo.png'" in result.stderr
    )
    assert pairs.read_text() == "b.png c.png\n"


def test_superpoint_accepts_arrays_and_8_bit_images_and_refuses_the_rest(random_weights: Path) -> None:
    from sp_extract import SuperPoint

    model = SuperPoint(str(random_weights))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96), dtype=np.uint8)
    reference = model(torch.from_numpy(image).float()[None, None] / 255)[0]
    assert len(reference.keypoints) > 0
    for given in (image, torch.from_numpy(image)[None, None], image.astype(np.float32) / 255):
        found = model(given)[0]
        torch.testing.assert_close(found.keypoints, reference.keypoints)
        torch.testing.assert_close(found.descriptors, reference.descriptors)
    sixteen = (image.astype(np.uint16) * 257)[None, None]  # the same pixels, 16-bit
    torch.testing.assert_close(model(sixteen)[0].keypoints, reference.keypoints)
    refused = [
        (image.astype(np.float32), ValueError, "range from"),
        (np.stack([image] * 3, axis=-1), ValueError, "convert to grayscale"),
        (torch.from_numpy(image)[None], ValueError, "(B, 1, H, W)"),
        (torch.from_numpy(image.astype(np.int32)), TypeError, "torch.int32"),
        (image.tolist(), TypeError, "not list"),
    ]
    for given, error, message in refused:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            model(given)


def test_signals_raise_turns_sigterm_into_an_interruption_with_its_exit_code() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, signals_raise():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert caught.value.exit_code == 143 and isinstance(caught.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupted_pairs_file_leaves_no_temporary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = tmp_path / "pairs.txt"
    out.write_text("old\n")

    def interrupted(*_: object) -> None:
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(Interrupted):
        write_pairs([("a", "b")], out)
    assert out.read_text() == "old\n" and sorted(tmp_path.iterdir()) == [out]


def test_child_is_killed_when_the_wait_is_interrupted() -> None:
    """What ``colmap`` and ``reconstruct`` rely on: a Ctrl-C here stops pycolmap's work there."""
    assert run_in_child(divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        run_in_child(divmod, 1, 0)
    with pytest.raises(RuntimeError, match=r"died \(exit code 3\)"):
        run_in_child(os._exit, 3)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # a thread: the child is spawned
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_in_child(time.sleep, 60)
    assert time.monotonic() - started < 30
    assert multiprocessing.active_children() == []


def test_output_closed_by_its_reader_stops_quietly(tmp_path: Path) -> None:
    """``sp-extract info --names STORE | head``: the reader goes away; exit 141, no error line."""
    store = tmp_path / "feats.h5"
    with StoreWriter(store, "features", {"test": True}) as writer:
        for index in range(3):
            writer.add(
                f"{index}.jpg",
                {
                    "keypoints": np.zeros((1, 2), np.float32),
                    "scores": np.ones(1, np.float32),
                    "descriptors": np.zeros((256, 1), np.float16),
                    "image_size": np.array([8, 8], np.int64),
                },
            )
    process = subprocess.Popen(
        [sys.executable, "-m", "sp_extract", "info", "--names", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before the command writes anything
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""
