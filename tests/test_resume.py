"""Resume and incremental runs through the CLI; stores made with other settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
from conftest import run_cli, write_image
from support.hloc_reader import snapshot

from sp_extract.extraction.config import ExtractConfig, ExtractRun
from sp_extract.extraction.model import SuperPoint
from sp_extract.extraction.pipeline import extract


def first_run(images: Path, out: Path, weights: Path) -> None:
    """The run to resume from, in-process (the CLI's defaults, fewer subprocesses)."""
    summary = extract(images, out, ExtractConfig(), ExtractRun(str(weights), "cpu", num_workers=0))
    assert summary.exit_code == 0 and summary.done > 0


def extract_cli(images: Path, out: Path, weights: Path, *extra: str):
    return run_cli(str(images), "--out", str(out), "--weights", str(weights), "--num-workers", "0", *extra)


def test_second_run_skips_everything(small_images: Path, random_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    first_run(small_images, out, random_weights)
    before = out.read_bytes()

    second = extract_cli(small_images, out, random_weights, "--json-report", str(tmp_path / "r.json"))

    assert second.returncode == 0, second.stderr
    assert f"0 images saved, 3 already in {out}, 0 failed" in second.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["done"], report["skipped"], report["failed"]) == (0, 3, [])
    assert out.read_bytes() == before  # nothing rewritten


def test_new_image_alone_is_extracted_and_old_entries_are_kept(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats.h5"
    first_run(small_images, out, random_weights)
    before = snapshot(out)
    # change an image already in the store: a run that recomputed it would change its entry
    write_image(small_images / "a.png", seed=99)
    write_image(small_images / "sub" / "new.png", 72, 56, seed=7)

    result = extract_cli(small_images, out, random_weights, "--json-report", str(tmp_path / "r.json"))

    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["done"], report["skipped"], report["total"]) == (1, 3, 4)
    after = snapshot(out)
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {
        f"sub/new.png/{key}" for key in ("keypoints", "scores", "descriptors", "image_size")
    }
    assert after["sub/new.png/image_size"][2] == np.array([72, 56], np.int64).tobytes()


def test_other_settings_are_refused_with_the_difference_named(
    small_images: Path, random_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats.h5"
    first_run(small_images, out, random_weights)
    before = out.read_bytes()

    result = extract_cli(small_images, out, random_weights, "--nms-radius", "3")

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"sp-extract: error: {out}: ")
    assert "nms_radius: 4 (store) vs 3 (now)" in result.stderr
    assert "--overwrite" in result.stderr
    assert out.read_bytes() == before


def test_other_weights_are_refused(small_images: Path, random_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    first_run(small_images, out, random_weights)
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(SuperPoint().state_dict(), other)

    result = extract_cli(small_images, out, other)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "weights" in result.stderr and "(store) vs" in result.stderr
    assert "nms_radius" not in result.stderr  # only what differs is named


def test_overwrite_starts_afresh(small_images: Path, random_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    first_run(small_images, out, random_weights)
    (small_images / "b.jpg").unlink()  # an entry that must not survive a fresh start

    result = extract_cli(small_images, out, random_weights, "--nms-radius", "3", "--overwrite")

    assert result.returncode == 0, result.stderr
    assert f"2 images saved, 0 already in {out}" in result.stderr
    with h5py.File(out, "r") as h5:
        assert sorted(h5) == ["a.png", "sub"]
        assert json.loads(h5.attrs["sp_extract_settings"])["nms_radius"] == 3
