"""The CLI's options, each declared once: those of a setting come from its config dataclass field
(default, choices and help from the field's metadata); groups shared by several commands are one
decorator each. Light to import (no torch, OpenCV or h5py), so ``--help`` stays fast."""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigError
from ..extraction.config import BACKENDS, PRECISIONS, ExtractConfig
from ..matching.config import MatchConfig
from ..sfm.config import (
    CAMERA_MODE_HELP,
    CAMERA_MODEL_HELP,
    CAMERA_MODES,
    DEFAULT_CAMERA_MODE,
    DEFAULT_CAMERA_MODEL,
    MAPPERS,
    ColmapRun,
    MapperOptions,
)

if TYPE_CHECKING:
    from ..shards import Shard

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
FILE = click.Path(dir_okay=False, path_type=Path)
FOLDER = click.Path(file_okay=False, path_type=Path)


@functools.cache
def _fields(config: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """A config dataclass's fields by name, with their types (``None`` taken out of ``X | None``)."""
    hints = typing.get_type_hints(config)
    found = {}
    for item in dataclasses.fields(config):
        kind = hints[item.name]
        if isinstance(kind, types.UnionType):
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        found[item.name] = (item, kind)
    return found


def option_from(config: type, name: str, *decls: str, **overrides: Any) -> Decorator:
    """The click option of the setting ``config.name``: its default, type, choices (``click.Choice``),
    metavar and help from the dataclass field; ``decls`` default to ``--name-with-dashes``; a bool
    is a flag (``--name/--no-name`` where it defaults to True); ``overrides`` go to click as given."""
    item, kind = _fields(config)[name]
    flag = "--" + name.replace("_", "-")
    settings: dict[str, Any] = {"help": item.metadata["help"]}
    if kind is bool and item.default:
        decls = decls or (f"{flag}/--no-{flag[2:]}",)
        settings.update(default=True, show_default=True)
    elif kind is bool:
        settings["is_flag"] = True
    else:
        settings.update(default=item.default, show_default=item.default is not None)
        if "choices" in item.metadata:
            settings["type"] = click.Choice(item.metadata["choices"])
        elif kind is not str:
            settings["type"] = kind
        if "metavar" in item.metadata:
            settings["metavar"] = item.metadata["metavar"]
    settings.update(overrides)
    return click.option(*(decls or (flag,)), name, **settings)


def config_from(config: type, options: dict[str, Any]) -> Any:
    """``config`` made of the options a command was given for its fields, which are taken out of
    ``options`` (the rest stays for the command)."""
    return config(**{name: options.pop(name) for name in _fields(config) if name in options})


def stacked(*options: Decorator) -> Decorator:
    """One decorator applying click options as if stacked in the order listed."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def extract_options(*names: str, **overrides: dict[str, Any]) -> Decorator:
    """The options of these ExtractConfig fields, in this order; ``overrides[name]``: click settings."""
    return stacked(*(option_from(ExtractConfig, name, **overrides.get(name, {})) for name in names))


def match_options(*names: str) -> Decorator:
    """The options of these MatchConfig fields, in this order."""
    return stacked(*(option_from(MatchConfig, name) for name in names))


def masks_path(_ctx: click.Context, _param: click.Parameter, path: Path | None) -> str:
    """``--masks``'s callback: the folder as ExtractConfig records it ("" for none)."""
    return str(path) if path else ""


masks_option = option_from(
    ExtractConfig,
    "masks",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    show_default=False,
    callback=masks_path,
)
DETECTOR = ("max_keypoints", "threshold", "nms_radius", "border", "resize_max")  # extract's first


def file_option(name: str, default: str, help: str) -> Decorator:
    """A ``NAME FILE`` option defaulting to the path ``default`` (shown in --help)."""
    return click.option(name, type=FILE, default=Path(default), show_default=True, help=help)


def images_option(help: str, required: bool = True) -> Decorator:
    """The ``--images DIR`` option (an image folder) with its help text."""
    return click.option("--images", required=required, type=FOLDER, help=help)


def out_option(default: str | None, help: str, kind: click.Path = FILE, required: bool = False) -> Decorator:
    """``--out/-o``: the file (or folder) a command writes; ``default`` shown in --help."""
    settings: dict[str, Any] = {"default": Path(default), "show_default": True} if default else {}
    return click.option("--out", "-o", type=kind, required=required, help=help, **settings)


def device_option(use: str = "") -> Decorator:
    """``--device`` (``use``: what it runs, where a command says so)."""
    return click.option(
        "--device", default="auto", show_default=True, help=f"{use}auto, cpu, cuda, cuda:N or mps."
    )


def precision_option(choices: tuple[str, ...] = PRECISIONS, **overrides: Any) -> Decorator:
    """``--precision``: ExtractConfig's, limited to ``choices`` where a command runs fewer."""
    return option_from(ExtractConfig, "precision", type=click.Choice(choices), **overrides)


backend_option = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=BACKENDS[0],
    show_default=True,
    help="What runs the network. auto: onnxruntime on the CPU at fp32 or int8, else torch; "
    "openvino needs the [openvino] extra.",
)
weights_option = click.option(
    "--weights",
    default=None,
    help="superpoint-v1 (default, non-commercial), superpoint-v6-mit, or a file "
    "(.pth, Hugging Face .safetensors/.bin). Env: SP_EXTRACT_WEIGHTS.",
)
tile_option = click.option(
    "--tile",
    default="auto",
    metavar="auto|0|SIZE",
    show_default=True,
    help="Run the network tile by tile (bounded memory for huge images at --resize-max 0; same "
    "features): auto tiles images above about 2.7 Mpx, 0 never, SIZE in tiles of SIZE px (multiple of 8).",
)
quiet_option = click.option(
    "--quiet", "-q", is_flag=True, help="No progress output; errors and the summary only."
)
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Start the store afresh instead of resuming."
)


def check_report(path: Path, created: Path | None = None) -> None:
    """``--json-report``'s check, before any work: its folder exists, or is ``created`` (the folder
    the command makes with its parents before it writes the report: sfm's WORK_DIR), and the file
    can be written (where the folder is still to be made: its nearest existing parent)."""
    folder, hint = path.parent, "'--json-report'"
    if not folder.is_dir() and not (created is not None and folder.absolute() == created.absolute()):
        raise click.BadParameter(f"{path}: the folder {folder} does not exist", param_hint=hint)
    existing = path if path.exists() else folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise click.BadParameter(f"{path}: cannot be written (permission denied)", param_hint=hint)


def writable_report(_ctx: click.Context, _param: click.Parameter, path: Path | None) -> Path | None:
    """``--json-report``'s callback: :func:`check_report` on the path given."""
    if path is not None:
        check_report(path)
    return path


def report_option(
    checked: bool = True, help: str = "Write the run's summary as JSON to this file."
) -> Decorator:
    """``--json-report FILE``; ``checked=False`` leaves its check to the command (sfm: the folder
    may be the WORK_DIR it creates, an argument the option's callback cannot rely on seeing)."""
    return click.option("--json-report", type=FILE, callback=writable_report if checked else None, help=help)


json_report_option = report_option()
run_options = stacked(overwrite_option, quiet_option, json_report_option)  # every store-writing command

cluster_options = stacked(  # extract and match-pairs on many machines (issue 12)
    click.option(
        "--shard",
        metavar="K/N|auto",
        help="Only shard K of N (1 <= K <= N; a stable hash of each image name, or pair) into "
        "OUT.shards/K-of-N.h5; 'sp-extract merge' joins the shards. auto: the task of a SLURM job "
        'array or Kubernetes Indexed Job (README "Running on a cluster").',
    ),
    click.option(
        "--shards",
        type=int,
        help="Number of shards: for --shard auto (required in a Kubernetes Indexed Job) or "
        "--scheduler [default there: one per worker, more for large runs].",
    ),
    click.option(
        "--scheduler",
        metavar="local[:WORKERS]|ADDRESS",
        help="Run as shards on a Dask cluster and merge them into --out: local (worker processes on "
        "this machine, one per GPU, or WORKERS), or a scheduler address or scheduler file (.json); "
        "shards go to OUT.shards/, which every worker must see. Needs the [dask] extra.",
    ),
)

verbose_option = click.option("--verbose", "-v", is_flag=True, help="Show COLMAP's own log.")
colmap_options = stacked(  # --seed, --num-threads and --verbose of colmap, reconstruct and sfm
    click.option("--seed", default=0, show_default=True, help="Seed of COLMAP's random choices."),
    click.option(
        "--num-threads", default=-1, show_default=True, help="Threads for COLMAP; -1 all, 1 repeatable."
    ),
    verbose_option,
)

verify_options = stacked(  # colmap and sfm: how their verification runs
    click.option(
        "--min-inliers",
        default=ColmapRun.min_inliers,
        show_default=True,
        help="Inliers a pair needs to pass COLMAP's verification (COLMAP's 15). 40 keeps chance matches "
        "of unrelated photos out (mixed collections; docs/sfm.md 'Which mapper').",
    ),
    click.option(
        "--guide-distance",
        default=ColmapRun.guide_distance,
        show_default=True,
        type=click.FloatRange(0, 2),
        help="Verification estimates each pair's geometry from its matches whose descriptors are within "
        "this distance, then counts its inliers among all its matches; a pair that fails so is verified "
        "on all its matches. 0: every pair on all its matches, as COLMAP does (slower; "
        "docs/accuracy.md 'Guided verification').",
    ),
)

camera_options = stacked(  # the cameras of colmap and sfm
    click.option("--camera-model", default=DEFAULT_CAMERA_MODEL, show_default=True, help=CAMERA_MODEL_HELP),
    click.option(
        "--camera-mode",
        type=click.Choice(CAMERA_MODES),
        default=DEFAULT_CAMERA_MODE,
        show_default=True,
        help=CAMERA_MODE_HELP,
    ),
    click.option("--single-camera", is_flag=True, help="The same as --camera-mode single."),
)


def camera_mode_of(camera_mode: str, single_camera: bool) -> str:
    """``--camera-mode``, or ``single`` for ``--single-camera`` (which contradicts no other mode)."""
    if single_camera and camera_mode not in ("single", DEFAULT_CAMERA_MODE):
        raise click.UsageError(f"--single-camera contradicts --camera-mode {camera_mode}")
    return "single" if single_camera else camera_mode


def cluster_target(
    out: Path, shard: str | None, shards: int | None, scheduler: str | None
) -> tuple[Path, Shard | None]:
    """The store a command writes and the shard it keeps (``--shard``), checking the options."""
    if shard is not None and scheduler is not None:
        raise ConfigError("--shard and --scheduler exclude each other (--scheduler makes the shards itself)")
    if shard is None:
        if shards is not None and scheduler is None:
            raise ConfigError("--shards goes with --shard auto or --scheduler")
        return out, None
    from ..shards import parse_shard, shard_output

    chosen = parse_shard(shard, shards)
    return shard_output(out, chosen), chosen


GLOBAL_SETTINGS = (
    "global_min_inliers",
    "view_graph_calibration",
    "rotation_iterations",
    "ba_rounds",
    "ba_iterations",
)


def mapper_options(auto: bool) -> Decorator:
    """``--mapper`` and the global mapper's settings (``MapperOptions``); without ``auto``
    (reconstruct) the mapper is incremental or global, incremental by default."""
    if auto:
        choice = option_from(MapperOptions, "mapper")
    else:
        choice = option_from(
            MapperOptions,
            "mapper",
            type=click.Choice(MAPPERS),
            default=MAPPERS[0],
            help="incremental: COLMAP's incremental mapper; global: GLOMAP (COLMAP 4), rotation "
            "averaging then global positioning (docs/sfm.md 'Which mapper').",
        )
    return stacked(choice, *(option_from(MapperOptions, name) for name in GLOBAL_SETTINGS))
