"""``sp-extract export-model``: a COLMAP model handed to dense and neural methods.

Three formats, each a folder:

- ``gaussian-splatting``: pycolmap's undistortion (COLMAP's undistorted workspace: ``images/``,
  PINHOLE cameras in ``sparse/``, ``stereo/``), with the model also in ``sparse/0``, where
  graphdeco-inria's 3DGS trainer reads it; OpenMVS's ``InterfaceCOLMAP`` reads ``sparse/``.
- ``nerfstudio``: ``transforms.json`` as nerfstudio and instant-ngp read it (camera-to-world
  matrices in OpenGL axes, the camera model's distortion, per-frame intrinsics where cameras
  differ), the images linked into ``images/``, the points in ``sparse_pc.ply`` (splat
  initialisation). The world is centred on the points' median and scaled so the cameras lie
  about 4 units away (instant-ngp's ``colmap2nerf`` framing); ``applied_transform`` and
  ``applied_scale`` say how, as nerfstudio's own files do.
- ``ply``: ``points.ply`` (coloured points) and ``cameras.ply`` (camera centres).

The folder is built beside OUT and swapped in by two renames (``store.atomic.swap_in``), so a grown
model's export replaces the previous one atomically; ``export.json`` in it records what it came
from, and a folder without it is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..report import Report
from ..store.atomic import building_folder, recover_folder, swap_in
from .child import run_in_child
from .colmap import check_images_present
from .config import MODEL_FORMATS as FORMATS
from .environment import colmap_logging, failures_reported, import_pycolmap
from .grow import model_record

NEEDS_IMAGES = ("gaussian-splatting", "nerfstudio")
EXPORT_RECORD = "export.json"
MODEL_FILES = ("cameras", "images", "points3D")  # .bin or .txt: what makes a folder a model
CAMERA_DISTANCE = 4.0  # nerfstudio: mean camera distance from the centre (instant-ngp's colmap2nerf)
AABB_SCALE = 16  # instant-ngp: the scene box, in unit cubes (colmap2nerf's default)
# COLMAP camera models nerfstudio reads: its camera model and the distortion parameters it takes
NERFSTUDIO_CAMERAS = {
    "SIMPLE_PINHOLE": "OPENCV",
    "PINHOLE": "OPENCV",
    "SIMPLE_RADIAL": "OPENCV",
    "RADIAL": "OPENCV",
    "OPENCV": "OPENCV",
    "SIMPLE_RADIAL_FISHEYE": "OPENCV_FISHEYE",
    "RADIAL_FISHEYE": "OPENCV_FISHEYE",
    "OPENCV_FISHEYE": "OPENCV_FISHEYE",
}
DISTORTION = {"OPENCV": ("k1", "k2", "p1", "p2"), "OPENCV_FISHEYE": ("k1", "k2", "k3", "k4")}
PLY_VERTEX = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
)
OPENGL_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])  # camera axes: y down, z forward -> y up, z back


@dataclass
class ExportSummary(Report):
    """What ``export_model`` wrote."""

    command: str = field(default="export-model", kw_only=True)
    out: str
    format: str
    images: int
    points3D: int

    def body(self) -> list[str]:
        return [f"export-model: {self.out} ({self.format}): {self.images} images, {self.points3D} 3D points"]


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: unknown export format (known: {', '.join(FORMATS)})")
    return fmt


def read_model(model_dir: Path) -> Any:
    """The pycolmap ``Reconstruction`` in ``model_dir``, or a ``ConfigError`` saying why not."""
    pycolmap = import_pycolmap()
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such model folder")
    missing = [n for n in MODEL_FILES if not any((model_dir / f"{n}{e}").is_file() for e in (".bin", ".txt"))]
    if missing:
        raise ConfigError(
            f"{model_dir}: not a COLMAP model (no {', '.join(n + '.bin' for n in missing)} or .txt); "
            "give a model folder such as WORK/sparse/0"
        )
    model = pycolmap.Reconstruction()
    try:
        model.read(model_dir)
    except (ValueError, RuntimeError, OSError) as error:
        raise ConfigError(f"{model_dir}: unreadable COLMAP model ({error})") from error
    if model.num_reg_images() == 0:
        raise ConfigError(f"{model_dir}: the model has no registered image")
    return model


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an export (``export.json``) and not empty."""
    foreign = out.exists() and not (out / EXPORT_RECORD).is_file()
    if foreign and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out}: exists and is not an export of sp-extract (no {EXPORT_RECORD}); "
            "give a new folder, or remove it"
        )


def export_record(out: Path) -> dict[str, Any] | None:
    """What ``out/export.json`` records (format, model, the model's ``sfm.json``), None if none."""
    try:
        return json.loads((out / EXPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def record_of(model_dir: Path, fmt: str) -> dict[str, Any]:
    """The record an export of ``model_dir`` in ``fmt`` carries: ``sfm`` compares it to skip
    exporting an unchanged model again."""
    return {"format": fmt, "model": str(model_dir), "model_record": model_record(model_dir.parent)}


def export_model(
    model_dir: Path | str,
    out: Path | str,
    fmt: str,
    images: Path | str | None = None,
    num_threads: int = -1,
    verbose: bool = False,
) -> ExportSummary:
    """Write the model of ``model_dir`` as ``fmt`` into the folder ``out`` (module doc);
    ``images``: the photos' folder, needed by the formats of ``NEEDS_IMAGES``."""
    started = time.monotonic()
    model_dir, out = Path(model_dir), Path(out)
    check_format(fmt)
    if fmt in NEEDS_IMAGES and images is None:
        raise ConfigError(f"--format {fmt} needs the photos: give --images DIR")
    model = read_model(model_dir)
    names = [model.images[i].name for i in model.reg_image_ids()]
    if images is not None:
        images = Path(images)
        if not images.is_dir():
            raise ConfigError(f"{images}: no such image folder")
        check_images_present(images, names, model_dir, "registers it", "map the model again without it")
    recover_folder(out)
    _check_out(out)
    building = building_folder(out)
    try:
        with failures_reported(out, f"write the {fmt} export"):
            building.mkdir(parents=True)
            if fmt == "gaussian-splatting":
                run_in_child(_undistort, model_dir, images, building, num_threads, verbose)
            elif fmt == "nerfstudio":
                _nerfstudio(model, images, building)
            else:
                _ply(model, building)
            record = json.dumps(record_of(model_dir, fmt), indent=2)
            (building / EXPORT_RECORD).write_text(record + "\n", encoding="utf-8")
            swap_in(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return ExportSummary(
        str(out), fmt, len(names), model.num_points3D(), wall_time_s=time.monotonic() - started
    )


def export_after_run(
    model_dir: Path, images: Path, folder: Path, formats: tuple[str, ...], num_threads: int, verbose: bool
) -> list[str]:
    """``sfm --export``: each format into ``folder/FORMAT``, unless it holds this model's export."""
    for fmt in formats:
        out = folder / fmt
        if export_record(out) != record_of(model_dir, fmt):
            export_model(model_dir, out, fmt, images, num_threads, verbose)
    return [str(folder / fmt) for fmt in formats]


# -- gaussian-splatting (and OpenMVS) ------------------------------------------------------------
def _undistort(model_dir: Path, images: Path, out: Path, num_threads: int, verbose: bool) -> None:
    """pycolmap's undistortion into ``out`` (COLMAP's workspace), the model copied to ``sparse/0``."""
    pycolmap = import_pycolmap()
    with colmap_logging(verbose):
        pycolmap.undistort_images(out, model_dir, images, output_type="COLMAP", num_threads=num_threads)
    sparse = out / "sparse"
    (sparse / "0").mkdir()
    for path in sparse.iterdir():
        if path.is_file():
            shutil.copy2(path, sparse / "0" / path.name)


# -- nerfstudio and instant-ngp ------------------------------------------------------------------
def nerfstudio_camera(camera: Any) -> dict[str, Any]:
    """A pycolmap camera as nerfstudio's intrinsics (``fl_x`` ... ``camera_model``, distortion)."""
    kind = NERFSTUDIO_CAMERAS.get(camera.model.name)
    if kind is None:
        raise ConfigError(
            f"camera {camera.camera_id}: nerfstudio has no {camera.model.name} camera model; "
            "export --format gaussian-splatting (undistorted) instead"
        )
    params = dict(zip(camera.params_info.replace(" ", "").split(","), map(float, camera.params)))
    if "k" in params:  # the single radial coefficient of the SIMPLE_RADIAL models
        params["k1"] = params.pop("k")
    intrinsics = {
        "fl_x": float(camera.focal_length_x),
        "fl_y": float(camera.focal_length_y),
        "cx": float(camera.principal_point_x),
        "cy": float(camera.principal_point_y),
        "w": int(camera.width),
        "h": int(camera.height),
        "camera_model": kind,
    }
    return intrinsics | {name: params.get(name, 0.0) for name in DISTORTION[kind]}


def _framing(model: Any) -> tuple[np.ndarray, float]:
    """The world's new centre (the points' median) and scale (cameras ``CAMERA_DISTANCE`` away)."""
    centres = np.array([model.images[i].projection_center() for i in model.reg_image_ids()])
    points = np.array([p.xyz for p in model.points3D.values()]).reshape(-1, 3)
    centre = np.median(points, axis=0) if len(points) else centres.mean(axis=0)
    distance = float(np.linalg.norm(centres - centre, axis=1).mean())
    return centre, CAMERA_DISTANCE / distance if distance > 0 else 1.0


def _nerfstudio(model: Any, images: Path, out: Path) -> None:
    centre, scale = _framing(model)
    world = np.eye(4)  # original world -> the export's: p' = scale * (p - centre)
    world[:3, :3] *= scale
    world[:3, 3] = -scale * centre
    cameras = {camera_id: nerfstudio_camera(c) for camera_id, c in model.cameras.items()}
    reg = sorted(model.reg_image_ids(), key=lambda i: model.images[i].name)
    shared = len({json.dumps(cameras[model.images[i].camera_id], sort_keys=True) for i in reg}) == 1
    kinds = sorted({cameras[model.images[i].camera_id]["camera_model"] for i in reg})
    if len(kinds) > 1:  # nerfstudio reads camera_model once, for every frame
        raise ConfigError(
            f"the model mixes {' and '.join(kinds)} cameras; nerfstudio takes one camera model: "
            "export --format gaussian-splatting (undistorted) instead"
        )
    frames = []
    for image_id in reg:
        image = model.images[image_id]
        world_from_cam = np.vstack([image.cam_from_world().inverse().matrix(), [0.0, 0.0, 0.0, 1.0]])
        transform = world @ world_from_cam @ OPENGL_FROM_OPENCV
        transform[:3, :3] /= scale  # a rotation again: the scale went into the position
        target = out / "images" / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(images / image.name, target)
        frame = {"file_path": f"images/{image.name}", "transform_matrix": transform.tolist()}
        frames.append(frame | {"colmap_im_id": image_id} | ({} if shared else cameras[image.camera_id]))
    points, colours = _points(model)
    write_ply(out / "sparse_pc.ply", points * scale - scale * centre, colours)
    transforms = (cameras[model.images[reg[0]].camera_id] if shared else {"camera_model": kinds[0]}) | {
        "aabb_scale": AABB_SCALE,
        "frames": frames,
        "applied_transform": np.hstack([np.eye(3), -centre[:, None]]).tolist(),
        "applied_scale": scale,
        "ply_file_path": "sparse_pc.ply",
    }
    (out / "transforms.json").write_text(json.dumps(transforms, indent=2) + "\n", encoding="utf-8")


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the photo), a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# -- ply -----------------------------------------------------------------------------------------
def _points(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """The 3D points (n x 3, float64) and their colours (n x 3, uint8)."""
    points = list(model.points3D.values())
    xyz = np.array([p.xyz for p in points], dtype=np.float64).reshape(-1, 3)
    return xyz, np.array([p.color for p in points], dtype=np.uint8).reshape(-1, 3)


def _ply(model: Any, out: Path) -> None:
    write_ply(out / "points.ply", *_points(model))
    centres = np.array([model.images[i].projection_center() for i in sorted(model.reg_image_ids())])
    write_ply(out / "cameras.ply", centres, np.tile(np.array([255, 0, 0], np.uint8), (len(centres), 1)))


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Binary little-endian PLY of coloured vertices (float x, y, z; uchar red, green, blue)."""
    data = np.empty(len(xyz), PLY_VERTEX)
    for column, name in enumerate(PLY_VERTEX.names):
        data[name] = (xyz if column < 3 else rgb)[:, column % 3]
    types = {"<f4": "float", "|u1": "uchar"}
    properties = "".join(f"property {types[PLY_VERTEX[n].str]} {n}\n" for n in PLY_VERTEX.names)
    header = f"ply\nformat binary_little_endian 1.0\nelement vertex {len(data)}\n{properties}end_header\n"
    with open(path, "wb") as handle:
        handle.write(header.encode("ascii"))
        handle.write(data.tobytes())
