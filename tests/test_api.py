"""The Python API: README.md's example, run as a user script in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
from conftest import ROOT


def readme_python_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def run_script(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_readme_example_runs(small_images: Path, random_weights: Path) -> None:
    example = readme_python_example()
    assert "from sp_extract import" in example and "extract(" in example and "SuperPoint(" in example
    # run as written beside small_images ("images/"), with the test's weights and one of its photos
    code = example.replace("../shared/weights/superpoint_v1.pth", str(random_weights))
    code = code.replace("images/photo.jpg", "images/b.jpg")

    result = run_script(code, cwd=small_images.parent)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "3 []"  # summary.done, summary.failed
    match = re.fullmatch(r"torch\.Size\(\[(\d+), 2\]\) torch\.Size\(\[(\d+), 256\]\)", lines[1])
    assert match and match.group(1) == match.group(2) and int(match.group(1)) > 0
    assert result.stderr == ""  # the API is quiet by default
    with h5py.File(small_images.parent / "feats.h5", "r") as h5:
        assert sorted(h5) == ["a.png", "b.jpg", "sub"]


def test_public_names_are_the_documented_objects_and_import_is_light(tmp_path: Path) -> None:
    code = (
        "import sys, inspect\n"
        "import sp_extract\n"
        "light = 'torch' not in sys.modules\n"
        "from sp_extract import ExtractConfig, ExtractRun, SuperPoint, extract\n"
        "import sp_extract as package\n"
        "print(light, inspect.isfunction(extract), inspect.isfunction(package.extract),\n"
        "      inspect.isclass(SuperPoint), inspect.isclass(ExtractConfig), inspect.isclass(ExtractRun))\n"
    )
    result = run_script(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * 6


def test_api_raises_the_documented_errors(tmp_path: Path, random_weights: Path) -> None:
    code = (
        "from sp_extract import ExtractRun, extract\n"
        "from sp_extract.errors import ConfigError\n"
        "try:\n"
        f"    extract({str(tmp_path)!r}, 'feats.h5', run=ExtractRun(weights={str(random_weights)!r}))\n"
        "except ConfigError as error:\n"
        "    print('ConfigError', error)\n"
    )
    result = run_script(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ConfigError {tmp_path}: no images found")
