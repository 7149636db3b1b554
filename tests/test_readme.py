"""README.md's command blocks, run as written (issue 22): an edit to README changes what is run.

Every fenced ``bash``/``sh``/``shell``/``console`` block of README.md is parsed; each command line
(its ``&&`` segments) either runs, through bash, in a work folder set up so that README's paths
resolve, or is listed in ``NOT_RUN`` with the reason. The blocks of one README section run in
that section's work folder (``CHAINS``), in README's order, so that blocks which chain (extract ->
pairs -> match-pairs -> show) share the one extraction as README does. A block under a section
that ``CHAINS`` does not name, a block in another language not in ``OTHER_BLOCKS``, and a
``NOT_RUN`` entry that README no longer holds all fail ``test_every_block_is_run_or_listed``.

Each command runs with its defaults (threads, ``--resize-max``) on the 10 shared photos and must
exit 0; what it wrote is read back with h5py, sqlite3, pycolmap, onnxruntime, OpenVINO and OpenCV
(``check_outputs``), and the files a line's comment promises after ``->`` must exist.

Set-up of each work folder (``work_folder``): ``../shared`` resolves (the quick start runs "from
the repository root, with ../shared beside it"); ``images/`` (with ``photos/`` a link to it) holds
the shared photos as links, the first four under README's placeholder names ``a.jpg``, ``b.jpg``,
``c.jpg``, ``photo.jpg``; ``new.txt`` and ``mapped.txt`` split them for the retrieval line that
names those lists. ``SP_EXTRACT_WEIGHTS`` names the shared weights, as README's Weights section
says to replace the default ``superpoint-v1`` download (no network here; the quick start passes
``--weights`` itself). ``sp-extract`` on PATH is a shim running ``python -m sp_extract`` with
this interpreter and this checkout on PYTHONPATH, as ``conftest.run_cli`` does: the installed
entry point may belong to another checkout (an editable install points where it was made); where
the package is installed from this checkout, as in CI, both run the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import pycolmap
import pytest
from conftest import ROOT, shared_file

README = ROOT / "README.md"
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")

# README section (heading text) -> the work folder its blocks run in, in README's order
CHAINS = {
    "Quick start (fresh machine)": "quickstart",
    "Extraction": "main",
    "Matching": "main",
    "Retrieval pairs": "main",
    "Stores that grow by what is added": "main",
    "`sp-extract info STORE`": "main",
    "`sp-extract show`": "main",
    "Running on a cluster": "cluster",
    "COLMAP reconstruction": "colmap",
    "One command": "sfm",
    "Next: dense models": "sfm",
    "Export": "export",
    "int8 (`--precision int8`)": "export",
    "`sp-extract evaluate poses`": "poses",
}

# command segments (a line's text before its comment, split at `&&`) not run here, and why
NOT_RUN = {
    "pip install torch==2.13.0": "installs: no network here, and the suite runs in that environment",
    "pip install -e .": "installs: the suite runs in the installed checkout",
    "pip install -e '.[test,colmap]'": "installs: the suite runs with these extras installed",
    "pip install pycolmap": "installs: pycolmap is in the [colmap] extra the suite runs with",
    "pip install 'sp-extract[colmap]'": "installs: the suite runs with the [colmap] extra",
    "python -m pytest -q": "the whole suite, this test among it",
    "sp-extract images/ --out feats.h5 --shard auto": "needs a SLURM array task's environment",
    "sp-extract merge feats.h5 feats.h5.shards/": "needs all 16 shards (16 processes), over this test's "
    "time budget; tests/test_cluster.py merges shards",
    "sp-extract match-pairs pairs.txt --features feats.h5 --shard auto": "needs a SLURM array task",
    "sp-extract merge matches.h5 matches.h5.shards/ --pairs pairs.txt": "merges the shards of the line "
    "above, which needs a SLURM array",
    "sp-extract images/ --out feats.h5 --scheduler local:8": "8 worker processes each importing torch on "
    "a 2-core machine: over this test's time budget; tests/test_cluster.py runs --scheduler local",
    "sp-extract images/ --out feats.h5 --scheduler tcp://head:8786": "the address of a running Dask cluster",
    "python train.py -s splat/": "gaussian-splatting's trainer (graphdeco-inria, CUDA): not sp-extract's",
    "ns-train splatfacto --data nerf/": "nerfstudio's trainer: not part of sp-extract, not installed",
}

# fenced blocks in other languages: (section, language) -> why they are not run here
OTHER_BLOCKS = {
    ("Python API", "python"): "run as a user script by tests/test_api.py::test_readme_example_runs",
}

PLACEHOLDER_PHOTOS = ("a.jpg", "b.jpg", "c.jpg", "photo.jpg")  # README's names for some photo of yours
FOX_STEP = 6  # README's fox/: every 6th frame of ../shared/data/fox, with its transforms.json


@dataclass(frozen=True)
class Block:
    """A fenced block of README: the section it is in, its language, its first line number, and
    its command lines (continuations joined, a comment line appended to the command above it,
    console output dropped)."""

    section: str
    language: str
    line: int
    commands: tuple[str, ...]


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, each with the heading above it."""
    blocks, section, fence = [], "", None
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence, language, start, body = line, line[3:].strip(), number, []
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
        elif line.startswith("```"):
            blocks.append(Block(section, language, start, tuple(command_lines(body, language))))
            fence = None
        else:
            body.append(line)
    assert fence is None, "README ends inside a fenced block"
    return blocks


def command_lines(body: list[str], language: str) -> list[str]:
    if language not in SHELL_LANGUAGES:
        return []
    if language == "console":  # prompts mark commands; the rest is their output
        body = [line[2:] for line in body if line.startswith("$ ")]
    commands: list[str] = []
    for line in "\n".join(body).replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):  # a comment line belongs to the command above it
            if commands:
                commands[-1] += f"  {line.strip()}"
        elif line.strip():
            commands.append(line.strip())
    return commands


def segments(command: str) -> list[str]:
    """A command line's ``&&`` segments, each without the line's trailing comment."""
    return [part.strip() for part in re.split(r"\s+#", command, maxsplit=1)[0].split("&&")]


def comment(command: str) -> str:
    parts = re.split(r"\s+#\s*", command, maxsplit=1)
    return parts[1] if len(parts) > 1 else ""


def uncovered(blocks: list[Block]) -> list[str]:
    """Why blocks are neither run nor listed (empty when each one is), and stale list entries."""
    problems = []
    for block in blocks:
        if block.language in SHELL_LANGUAGES:
            if block.section not in CHAINS and any(
                seg not in NOT_RUN for command in block.commands for seg in segments(command)
            ):
                problems.append(f"README line {block.line} ({block.section}): no work folder in CHAINS")
        elif (block.section, block.language) not in OTHER_BLOCKS:
            problems.append(f"README line {block.line} ({block.section}, {block.language!r}): not listed")
    written = {seg for block in blocks for command in block.commands for seg in segments(command)}
    problems += [f"NOT_RUN entry not in README: {seg}" for seg in NOT_RUN if seg not in written]
    sections = {block.section for block in blocks}
    problems += [f"CHAINS section without a block: {name}" for name in CHAINS if name not in sections]
    problems += [f"OTHER_BLOCKS entry not in README: {key}" for key in OTHER_BLOCKS
                 if key not in {(b.section, b.language) for b in blocks}]  # fmt: skip
    return problems


def readme_blocks() -> list[Block]:
    return parse_blocks(README.read_text(encoding="utf-8"))


def test_every_block_is_run_or_listed() -> None:
    blocks = readme_blocks()
    assert uncovered(blocks) == []
    run = [seg for b in blocks if b.section in CHAINS for c in b.commands for seg in segments(c)]
    assert len([seg for seg in run if seg not in NOT_RUN]) >= 20  # the parser found README's commands


def test_a_new_block_is_neither_run_nor_listed_until_added() -> None:
    text = README.read_text(encoding="utf-8")
    added = "\n## Nightly\n\n```bash\nsp-extract sfm photos/ work/ --pairs sequential\n```\n"
    listed = "\n## Export\n\n```bash\npip install torch==2.13.0\n```\n"
    other = "\n## Notes\n\n```text\nanything\n```\n"
    fence = text.count("\n") + 4  # the added block's first line
    problem = f"README line {fence} (Nightly): no work folder in CHAINS"
    assert uncovered(parse_blocks(text + added)) == [problem]
    assert uncovered(parse_blocks(text + listed)) == []
    assert len(uncovered(parse_blocks(text + other))) == 1
    assert "NOT_RUN entry not in README: python -m pytest -q" in uncovered(
        parse_blocks(text.replace("python -m pytest -q", "python -m pytest"))
    )


# -- running the blocks ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def readme_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A root whose ``shared`` is ../shared, a PATH with the ``sp-extract`` shim (module doc)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").symlink_to(shared_file("data").parent, target_is_directory=True)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "sp-extract"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m sp_extract "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        "SP_EXTRACT_WEIGHTS": str(shared_file("weights/superpoint_v1.pth")),
    }
    return root, env


def work_folder(root: Path, name: str) -> Path:
    """``root/name`` with README's ``images/``, ``photos/``, ``new.txt``, ``mapped.txt`` and ``fox/``."""
    work, images = root / name, root / name / "images"
    images.mkdir(parents=True)
    photos = sorted(shared_file("data/sacre_coeur").glob("*.jpg"))
    names = [*PLACEHOLDER_PHOTOS, *(p.name for p in photos[len(PLACEHOLDER_PHOTOS) :])]
    for name_, photo in zip(names, photos, strict=True):
        (images / name_).symlink_to(photo)
    (work / "photos").symlink_to("images", target_is_directory=True)
    (work / "new.txt").write_text("\n".join(names[:2]) + "\n")
    (work / "mapped.txt").write_text("\n".join(names[2:]) + "\n")
    fox = work / "fox"
    fox.mkdir()
    for frame in sorted(shared_file("data/fox").glob("*.jpg"))[::FOX_STEP]:
        (fox / frame.name).symlink_to(frame)
    (fox / "transforms.json").symlink_to(shared_file("data/fox/transforms.json"))
    return work


def parsed(words: list[str]) -> tuple[str, dict]:
    """The command's name and the parameters click gives it (``pairs exhaustive`` for a group),
    by the CLI's own parser without running anything."""
    import click

    from sp_extract.cli import cli

    command, name = cli, ""
    words = words if words[0] in cli.commands else [cli.default_command, *words]
    while isinstance(command, click.Group):
        name, words, command = f"{name} {words[0]}".strip(), words[1:], command.commands[words[0]]
    with command.make_context(name, list(words), resilient_parsing=True) as context:
        return name, dict(context.params)


def feature_names(store: Path) -> list[str]:
    with h5py.File(store, "r") as h5:
        return sorted(name for name in h5 if "keypoints" in h5[name])


def in_shard(name: str, shard: str) -> bool:
    """README's rule: image NAME is in shard K of N when BLAKE2b-64(NAME) mod N = K - 1."""
    k, n = map(int, shard.split("/"))
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") % n == k - 1


def check_features(store: Path, images: Path, max_keypoints: int, shard: str | None) -> None:
    expected = sorted(path.name for path in images.iterdir() if shard is None or in_shard(path.name, shard))
    names = feature_names(store)
    assert names == expected and names, (store, names)
    with h5py.File(store, "r") as h5:
        for name in names:
            keypoints, descriptors = h5[name]["keypoints"][()], h5[name]["descriptors"][()]
            scores, (width, height) = h5[name]["scores"][()], h5[name]["image_size"][()]
            assert keypoints.shape == (len(scores), 2) and descriptors.shape == (256, len(scores))
            assert 0 < len(scores) <= (max_keypoints if max_keypoints > 0 else len(scores)), name
            assert keypoints.min() >= 0 and (keypoints < [width, height]).all(), name


def check_pairs(work: Path, pairs: Path, features: Path, name: str, params: dict) -> None:
    names = feature_names(features)
    lines = [tuple(line.split()) for line in pairs.read_text().splitlines()]
    assert lines and all(len(p) == 2 and p[0] != p[1] and set(p) <= set(names) for p in lines), lines
    assert len({frozenset(p) for p in lines}) == len(lines)  # each unordered pair once
    if name == "pairs exhaustive":
        assert len(lines) == len(names) * (len(names) - 1) // 2
    elif name == "pairs retrieval":
        queries = (work / params["query_list"]).read_text().split() if params["query_list"] else names
        database = (work / params["db_list"]).read_text().split() if params["db_list"] else names
        assert all({a, b} & set(queries) and {a, b} & set(database) for a, b in lines)
        assert len(lines) <= len(queries) * params["num_matched"]


def check_matches(store: Path, pairs: Path, features: Path) -> None:
    with h5py.File(features, "r") as h5:
        counts = {name: len(h5[name]["scores"]) for name in h5}
    with h5py.File(store, "r") as h5:
        for a, b in (line.split() for line in pairs.read_text().splitlines()):
            key, first, second = (f"{a}/{b}", a, b) if f"{a}/{b}" in h5 else (f"{b}/{a}", b, a)
            matches = h5[key]["matches0"][()]
            assert len(matches) == counts[first] and matches.max() < counts[second], key
            assert (matches >= 0).sum() > 0, key


def registered_names(model: Path) -> set[str]:
    reconstruction = pycolmap.Reconstruction(model)
    return {reconstruction.images[i].name for i in reconstruction.reg_image_ids()}


def check_database(database: Path, features: Path) -> None:
    """A COLMAP database of the store's images, with verified pairs."""
    with sqlite3.connect(database) as db:
        images = {row[0] for row in db.execute("SELECT name FROM images")}
        verified = db.execute("SELECT count(*) FROM two_view_geometries WHERE rows > 0").fetchone()[0]
    assert images == set(feature_names(features)) and verified > 0


def check_model(model: Path, photos: Path) -> None:
    """A model that registers every photo (README says all of them)."""
    assert registered_names(model) == {p.name for p in photos.glob("*.jpg")}


def check_models(out: Path, photos: Path) -> None:
    """README's reconstruct, default threads: models of the photos, ``OUT/0`` the largest. (That it
    registers every photo is checked where a run is repeatable, with one thread: test_colmap's
    test_sacre_coeur_reconstruction. With COLMAP's threads the mapper's result varies, and on a
    loaded machine it has built a 3-photo model of these 10: issue 25's note.)"""
    sizes = [len(registered_names(model)) for model in sorted(out.iterdir()) if model.name.isdigit()]
    assert sizes and sizes[0] == max(sizes) >= 2, sizes
    assert registered_names(out / "0") <= {p.name for p in photos.glob("*.jpg")}


def check_extract(at: Callable[[str], Path], params: dict[str, Any]) -> None:
    out = at("out")
    if params["shard"]:
        out = next((out.parent / f"{out.name}.shards").glob("*.h5"))
    check_features(out, at("images_dir"), params["max_keypoints"], params["shard"])


def check_store(at: Callable[[str], Path], params: dict[str, Any]) -> None:
    with h5py.File(at("store"), "r") as h5:
        assert len(h5) > 0


def check_show(at: Callable[[str], Path], params: dict[str, Any]) -> None:
    out = at("out")
    pictures = [out] if out.suffix == ".png" else [out / "index.html", *out.glob("*.png")]
    assert len(pictures) >= (1 if out.suffix == ".png" else 1 + len(params["names"]))
    assert all(cv2.imread(str(p)) is not None for p in pictures if p.suffix == ".png")


CHECKS: dict[str, Callable[[Callable[[str], Path], dict[str, Any]], None]] = {  # by command
    "extract": check_extract,
    "match-pairs": lambda at, params: check_matches(at("out"), at("pairs_file"), at("features")),
    "colmap": lambda at, params: check_database(at("database"), at("features")),
    "reconstruct": lambda at, params: check_models(at("out"), at("images")),
    "sfm": lambda at, params: check_model(at("work_dir") / "sparse" / "0", at("images_dir")),
    "export": lambda at, params: check_network(at("out")),
    "export-model": lambda at, params: check_export(
        at("out"), params["fmt"], registered_names(at("model_dir"))
    ),
    "compact": check_store,
    "info": check_store,
    "show": check_show,
}


def check_outputs(work: Path, segment: str) -> None:
    """What a README command wrote, read back (module doc)."""
    words = shlex.split(segment)
    words = words[: next((i for i, w in enumerate(words) if w in ("|", ">", ">>", ";")), len(words))]
    if words[0] != "sp-extract":
        return
    name, params = parsed(words[1:])
    at = lambda key: work / params[key]  # noqa: E731
    if name.startswith("pairs "):
        check_pairs(work, at("out"), at("features"), name, params)
    elif name in CHECKS:
        CHECKS[name](at, params)
    if params.get("json_report"):
        assert json.loads(at("json_report").read_text())


def check_promised(work: Path, command: str) -> None:
    """The files a README line's comment names after ``->`` (``# -> work/feats.h5 ...``)."""
    for promised in re.findall(r"\S+", comment(command).partition("->")[2]):
        if ("/" in promised or "." in promised) and not promised.startswith("("):
            assert (work / promised.rstrip(",)")).exists(), (command, promised)


def check_network(out: Path) -> None:
    """The exported graph loads and names README's input and outputs."""
    if out.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    else:
        import openvino

        model = openvino.Core().read_model(str(out))  # reads OUT.bin beside it
        names = ([i.any_name for i in model.inputs], [o.any_name for o in model.outputs])
    assert names == (["image"], ["scores", "descriptors"]), names


def check_export(out: Path, fmt: str, registered: set[str]) -> None:
    if fmt == "gaussian-splatting":
        assert registered_names(out / "sparse" / "0") == registered
        assert {p.name for p in (out / "images").iterdir()} == registered
    elif fmt == "nerfstudio":
        frames = json.loads((out / "transforms.json").read_text())["frames"]
        assert {Path(frame["file_path"]).name for frame in frames} == registered
    else:
        assert (out / "points.ply").stat().st_size > 0 and (out / "cameras.ply").stat().st_size > 0


@pytest.mark.parametrize("chain", sorted(set(CHAINS.values()), key=list(CHAINS.values()).index))
def test_readme_commands_run_as_written(chain: str, readme_env: tuple[Path, dict[str, str]]) -> None:
    """The chain's blocks, in README's order, in its own work folder: each command exits 0 and its
    outputs read back."""
    root, env = readme_env
    work = work_folder(root, chain)
    ran, times = 0, []
    for block in readme_blocks():
        if CHAINS.get(block.section) != chain:
            continue
        for command in block.commands:
            runnable = [seg for seg in segments(command) if seg not in NOT_RUN]
            if not runnable:
                continue
            line = " && ".join(runnable)
            started = time.monotonic()
            result = subprocess.run(
                ["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600
            )
            times.append(f"{time.monotonic() - started:6.1f} s  {line}")
            assert result.returncode == 0, (f"README line {block.line}: {line}", result.stderr[-3000:])
            for segment in runnable:
                check_outputs(work, segment)
            check_promised(work, command)
            ran += 1
    print("\n".join(times))
    assert ran > 0
