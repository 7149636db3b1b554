"""examples/: argument handling and error paths (the full pipeline is tests/test_colmap.py's).

``sfm_colmap.sh`` runs with a stand-in ``sp-extract`` first on PATH that records its arguments,
so the test checks what the script asks for without running the five commands. The nightly
job's cron entry and systemd units (``examples/nightly/``) are parsed, their ``sp-extract sfm``
command lines by the CLI's own parser.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCRIPT = ROOT / "examples" / "sfm_colmap.sh"


def run_shell_example(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """The shell example in ``tmp_path``; its result and the argument lists it gave sp-extract."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "sp-extract"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\t" "$@" >> "{log}"\necho >> "{log}"\n')
    recorder.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    calls = [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls


def test_shell_example_options_without_work_dir(tmp_path: Path) -> None:
    result, calls = run_shell_example(tmp_path, "photos", "--subpixel", "--max-keypoints", "2048")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sfm").is_dir() and not (tmp_path / "--subpixel").exists()
    assert calls[0] == ["photos", "--out", "sfm/feats.h5", "--subpixel", "--max-keypoints", "2048"]
    assert [call[0] for call in calls] == ["photos", "pairs", "match-pairs", "colmap", "reconstruct"]

    result, calls = run_shell_example(tmp_path, "photos", "work", "--subpixel")
    assert result.returncode == 0, result.stderr
    assert calls[0] == ["photos", "--out", "work/feats.h5", "--subpixel"] and (tmp_path / "work").is_dir()
    assert calls[-1][calls[-1].index("--out") + 1] == "work/sparse"


def test_shell_example_usage(tmp_path: Path) -> None:
    for args, code in (((), 2), (("--subpixel",), 2), (("-h",), 0), (("--help",), 0)):
        result, calls = run_shell_example(tmp_path, *args)
        assert result.returncode == code and calls == []
        assert "usage:" in (result.stdout if code == 0 else result.stderr)


def test_python_example_errors_are_one_line(small_images: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(ROOT / "examples" / "sfm_colmap.py"),
        str(small_images),
        str(tmp_path / "w"),
    ]
    result = subprocess.run(
        [*command, "--weights", str(tmp_path / "missing.pth")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sfm_colmap.py: error: ") and result.stderr.count("\n") == 1
    assert "missing.pth" in result.stderr


# -- examples/cluster/ (issue 12): each parses, and its sp-extract commands take their options --
CLUSTER = ROOT / "examples" / "cluster"
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "$(", "`"}


def shell_commands(tokens: list[str]) -> list[list[str]]:
    """The argument lists of the ``sp-extract`` commands in shell tokens, also those quoted in
    a token (``sbatch --wrap="..."``, ``bash -c "..."``)."""
    import itertools
    import shlex

    found = []
    for index, token in enumerate(tokens):
        if token == "sp-extract":
            found.append(list(itertools.takewhile(lambda t: t not in SEPARATORS, tokens[index + 1 :])))
        elif "sp-extract " in token:
            quoted = token.partition("=")[2] if token.startswith("--") else token
            found += shell_commands(list(shlex.shlex(quoted, posix=True, punctuation_chars=True)))
    return found


def example_commands(path: Path) -> list[list[str]]:
    """Every ``sp-extract`` command of an example: shell lines, YAML container commands,
    Python list literals starting with "sp-extract" (their non-literal items as a placeholder)."""
    import ast
    import shlex

    import yaml

    text = path.read_text()
    if path.suffix == ".sh":
        lines = [line for line in text.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("#")]
        return [
            c
            for line in lines
            for c in shell_commands(list(shlex.shlex(line, posix=True, punctuation_chars=True)))
        ]
    if path.suffix == ".yaml":
        containers = [
            c for doc in yaml.safe_load_all(text) for c in doc["spec"]["template"]["spec"]["containers"]
        ]
        return [c["command"][1:] for c in containers if c["command"][0] == "sp-extract"]
    lists = [node for node in ast.walk(ast.parse(text)) if isinstance(node, ast.List) and node.elts]
    return [
        [e.value if isinstance(e, ast.Constant) else "PLACEHOLDER" for e in node.elts[1:]]
        for node in lists
        if isinstance(node.elts[0], ast.Constant) and node.elts[0].value == "sp-extract"
    ]


def test_cluster_examples_parse_and_their_commands_exist() -> None:
    import yaml
    from click.testing import CliRunner

    from sp_extract.cli import cli

    scripts = sorted(CLUSTER.iterdir())
    assert [p.name for p in scripts] == [
        "dask_jobqueue_slurm.py",
        "kubernetes_indexed_job.yaml",
        "one_node_gpus.sh",
        "slurm_array.sh",
    ]
    for path in scripts:
        if path.suffix == ".sh":
            result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
        elif path.suffix == ".py":
            compile(path.read_text(), str(path), "exec")
    commands = {path.name: example_commands(path) for path in scripts}
    words = {name: [" ".join(c[:2]) for c in found] for name, found in commands.items()}
    assert words["slurm_array.sh"] == [
        "extract $images",
        "merge $work/feats.h5",
        "pairs retrieval",
        "match-pairs $work/pairs.txt",
        "merge $work/matches.h5",
        "colmap --images",
    ]
    assert [w.split()[0] for w in words["one_node_gpus.sh"]] == ["extract", "pairs", "match-pairs"]
    assert [w.split()[0] for w in words["dask_jobqueue_slurm.py"]] == ["extract", "pairs", "match-pairs"]
    assert [w.split()[0] for w in words["kubernetes_indexed_job.yaml"]] == ["extract", "merge"]
    for name, found in commands.items():
        for command in found:  # unknown options fail; --help, handled first, ends the rest
            result = CliRunner().invoke(cli, [*command, "--help"])
            assert result.exit_code == 0 and "Usage:" in result.output, (name, command, result.output)
    # the array tasks take their shard from the scheduler; the Kubernetes shards match completions
    assert all(
        "--shard" in c and "auto" in c
        for c in commands["slurm_array.sh"]
        if c[0] in ("extract", "match-pairs")
    )
    job = next(iter(yaml.safe_load_all((CLUSTER / "kubernetes_indexed_job.yaml").read_text())))
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert command[command.index("--shards") + 1] == str(job["spec"]["completions"])
    assert "--dependency=afterok" in (CLUSTER / "slurm_array.sh").read_text()


# -- the nightly job: a cron entry, a systemd service and timer -----------------------------------
NIGHTLY = ROOT / "examples" / "nightly"


def parsed_sfm_command(command: str, tmp_path: Path) -> dict:
    """The parameters click gives ``sfm`` for a command line, its /srv/sfm paths moved into
    ``tmp_path`` (``--json-report``'s folder must exist); an unknown option fails here."""
    from sp_extract.cli.sfm import sfm

    (tmp_path / "sfm").mkdir(exist_ok=True)
    words = shlex.split(command.replace("/srv/sfm", str(tmp_path / "sfm")))
    start = words.index("sfm") + 1
    end = words.index(">>") if ">>" in words else len(words)
    assert Path(words[start - 2]).name == "sp-extract"
    with sfm.make_context("sfm", words[start:end]) as context:
        return context.params


def test_cron_entry_runs_sfm_with_valid_options(tmp_path: Path) -> None:
    lines = [line for line in (NIGHTLY / "sfm-nightly.cron").read_text().splitlines() if line.strip()]
    entries = [line for line in lines if not line.startswith("#") and "=" not in line.split()[0]]
    assert len(entries) == 1
    fields = entries[0].split(maxsplit=5)
    for value, (low, high) in zip(fields[:5], ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))):
        assert value == "*" or low <= int(value) <= high, value
    command = fields[5]
    assert command.startswith("flock -n ")  # a night still running is not started twice
    params = parsed_sfm_command(command, tmp_path)
    assert params["quiet"] and params["json_report"] is not None
    assert (params["images_dir"], params["work_dir"]) == (Path("/srv/photos"), tmp_path / "sfm" / "work")


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((NIGHTLY / name).read_text())
    return unit


def test_systemd_timer_starts_the_service_with_valid_options(tmp_path: Path) -> None:
    timer, service = read_unit("sp-extract-sfm.timer"), read_unit("sp-extract-sfm.service")
    assert timer["Timer"]["Unit"] == "sp-extract-sfm.service" and timer["Timer"]["Persistent"] == "true"
    assert re.fullmatch(r"\*-\*-\* \d\d:\d\d:\d\d", timer["Timer"]["OnCalendar"])
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert service["Service"]["Type"] == "oneshot" and service["Service"]["KillMode"] == "mixed"
    params = parsed_sfm_command(service["Service"]["ExecStart"], tmp_path)
    assert params["quiet"] and params["work_dir"] == tmp_path / "sfm" / "work"
