"""``sp-extract evaluate poses``: a COLMAP model's camera poses against reference poses.

The reference is a COLMAP model or a ``transforms.json`` (instant-ngp / nerfstudio: camera-to-world
in OpenGL camera axes, turned into COLMAP's by flipping the camera's y and z axes). Images are
matched by file name (basename); with ``--images`` only the reference images among the photos the
model was built from count. Scores: the share of reference images registered; the
relative-pose AUC at 1, 2, 5 and 10 degrees over all pairs of reference images (a pair's error is
the larger of its relative rotation error and the angle between its relative translation
directions; a pair with an unregistered image fails), as SuperGlue, LightGlue and hloc compute
it; the median pair errors; and, after a similarity (Umeyama) alignment of the registered camera
centres onto the reference ones, the median centre error as a share of the scene size (the
median distance of the reference centres to their centroid).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..extraction.discover import discover_images
from ..report import Report, counted, listed
from ..sfm.handoff import MODEL_FILES, read_model

AUC_THRESHOLDS = (1.0, 2.0, 5.0, 10.0)  # degrees
OPENCV_FROM_OPENGL = np.diag([1.0, -1.0, -1.0])  # camera axes: y up, z back -> y down, z forward


@dataclass
class Poses:
    """World-to-camera rotations (N, 3, 3) and translations (N, 3) of named images."""

    names: list[str]
    rotations: np.ndarray
    translations: np.ndarray

    def centres(self) -> np.ndarray:
        return -np.einsum("nji,nj->ni", self.rotations, self.translations)


@dataclass
class ImageResult:
    """One reference image: registered in the model, and its errors after the alignment."""

    name: str
    registered: bool
    centre_error: float | None = None  # share of the scene size
    rotation_error_deg: float | None = None


@dataclass
class PoseEvaluation(Report):
    """The scores of ``evaluate_poses``; ``lines`` prints them (``per_image``: also a line per
    reference image), ``to_dict`` is the JSON report."""

    command: str = field(default="evaluate poses", kw_only=True)
    model: str
    reference: str
    reference_images: int
    registered: int
    pairs: int
    auc: dict[str, float]  # threshold (degrees) -> AUC in percent
    median_rotation_error_deg: float | None
    median_translation_error_deg: float | None
    median_centre_error: float | None  # share of the scene size
    scene_size: float
    images: list[ImageResult] = field(default_factory=list)
    note: str = ""  # which model of a folder of models was taken
    per_image: bool = False  # printed with a line per image (not in the JSON report)

    @property
    def registered_share(self) -> float:
        return self.registered / self.reference_images

    def to_dict(self) -> dict[str, Any]:
        data = {**super().to_dict(), "registered_share": self.registered_share}
        del data["per_image"]
        return data

    def body(self) -> list[str]:
        registered_pairs = self.registered * (self.registered - 1) // 2
        lines = [
            f"evaluate poses: {self.model} against {self.reference}",
            f"registered  {self.registered} of {self.reference_images} reference images "
            f"({100 * self.registered_share:.1f}%)",
            "pose AUC    "
            + "  ".join(f"@{key} {value:.1f}" for key, value in self.auc.items())
            + f"  ({counted(self.pairs, 'pair')} of reference images)",
        ]
        if self.median_rotation_error_deg is not None:
            lines.append(
                f"median      rotation {self.median_rotation_error_deg:.2f} deg, translation direction "
                f"{self.median_translation_error_deg:.2f} deg ({counted(registered_pairs, 'pair')} "
                "of registered images)"
            )
        if self.median_centre_error is not None:
            lines.append(
                f"centres     median error {100 * self.median_centre_error:.2f}% of the scene size "
                f"({self.scene_size:.3g} reference units) after a similarity alignment"
            )
        if self.per_image:
            lines.append(f"{'image':<32} registered  centre error  rotation error")
            for image in self.images:
                centre = "" if image.centre_error is None else f"{100 * image.centre_error:.2f}%"
                rotation = "" if image.rotation_error_deg is None else f"{image.rotation_error_deg:.2f} deg"
                yes = "yes" if image.registered else "no"
                lines.append(f"{image.name:<32} {yes:<11} {centre:>12}  {rotation:>14}")
        return lines


# -- reading ---------------------------------------------------------------------------------
def _by_basename(names: list[str], source: Path) -> dict[str, int]:
    """Index of each name's basename; a ``ConfigError`` when two names share one."""
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        base = Path(name).name
        if base in index:
            raise ConfigError(
                f"{source}: two images named {base} ('{names[index[base]]}' and '{name}'); "
                "images are matched by file name, which must be unique"
            )
        index[base] = i
    return index


def is_model(folder: Path) -> bool:
    """Whether ``folder`` holds a COLMAP model (cameras, images, points3D as .bin or .txt)."""
    return all(any((folder / f"{n}{e}").is_file() for e in (".bin", ".txt")) for n in MODEL_FILES)


def read_model_poses(path: Path) -> tuple[Poses, str]:
    """The registered images' poses of the COLMAP model in ``path``; a folder of models (``sparse/``
    holding ``0``, ``1``, ...) gives its largest, and the note saying so."""
    note = ""
    if path.is_dir() and not is_model(path):
        folders = [p for p in sorted(path.iterdir()) if p.is_dir() and is_model(p)]
        if folders:
            models = [(read_model(folder), folder) for folder in folders]
            model, folder = max(models, key=lambda item: item[0].num_reg_images())
            if len(folders) > 1:
                note = f"{path}: {len(folders)} models; evaluating the largest, {folder}"
            return _poses_of(model), note
    return _poses_of(read_model(path)), note


def _poses_of(model: Any) -> Poses:
    images = [model.images[i] for i in sorted(model.reg_image_ids())]
    poses = [image.cam_from_world() for image in images]
    return Poses(
        [image.name for image in images],
        np.array([pose.rotation.matrix() for pose in poses]).reshape(-1, 3, 3),
        np.array([pose.translation for pose in poses]).reshape(-1, 3),
    )


def read_transforms(path: Path) -> Poses:
    """The frames of an instant-ngp / nerfstudio ``transforms.json``, in COLMAP's camera axes."""
    try:
        frames = json.loads(path.read_text(encoding="utf-8"))["frames"]
        names = [str(frame["file_path"]) for frame in frames]
        camera_to_world = np.array([frame["transform_matrix"] for frame in frames], dtype=np.float64)
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from error
    except (ValueError, KeyError, TypeError) as error:
        cause = f"no {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise ConfigError(
            f"{path}: not a transforms.json (frames with file_path and transform_matrix): {cause}"
        ) from error
    if not names or camera_to_world.shape[1:] not in ((4, 4), (3, 4)):
        raise ConfigError(f"{path}: no frames, or a transform_matrix that is not 4 x 4")
    rotations = camera_to_world[:, :3, :3] @ OPENCV_FROM_OPENGL  # camera axes to COLMAP's
    world_to_camera = np.transpose(rotations, (0, 2, 1))
    return Poses(names, world_to_camera, -np.einsum("nij,nj->ni", world_to_camera, camera_to_world[:, :3, 3]))


def read_reference(path: Path) -> Poses:
    """Reference poses: a ``transforms.json`` file, or a COLMAP model folder."""
    if path.is_file() or path.suffix == ".json":
        return read_transforms(path)
    return read_model_poses(path)[0]


# -- scores ----------------------------------------------------------------------------------
def rotation_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles (degrees) of the rotations between matrices ``a`` and ``b`` (..., 3, 3)."""
    trace = np.einsum("...ij,...ij->...", a, b)  # trace(a^T b)
    return np.degrees(np.arccos(np.clip((trace - 1) / 2, -1.0, 1.0)))


def vector_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles (degrees) between vectors ``a`` and ``b`` (..., 3); 0 where one has no length."""
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), np.einsum("...i,...i", a, b)))


def relative_poses(poses: Poses, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotations and translations of camera j from camera i, for each pair (i, j)."""
    r_i, r_j = poses.rotations[pairs[:, 0]], poses.rotations[pairs[:, 1]]
    relative = r_j @ np.transpose(r_i, (0, 2, 1))
    translation = poses.translations[pairs[:, 1]] - np.einsum(
        "nij,nj->ni", relative, poses.translations[pairs[:, 0]]
    )
    return relative, translation


def pose_auc(errors: np.ndarray, thresholds: tuple[float, ...] = AUC_THRESHOLDS) -> list[float]:
    """Area under the recall-against-error curve up to each threshold, over the threshold
    (SuperGlue's ``pose_auc``: recall linear between the sorted errors; infinite errors fail)."""
    errors = np.concatenate([[0.0], np.sort(errors)])
    recall = np.arange(len(errors)) / max(len(errors) - 1, 1)
    aucs = []
    for threshold in thresholds:
        last = int(np.searchsorted(errors, threshold))
        curve = np.concatenate([recall[:last], [recall[last - 1]]])
        x = np.concatenate([errors[:last], [threshold]])
        aucs.append(float(np.sum((x[1:] - x[:-1]) * (curve[1:] + curve[:-1]) / 2) / threshold))
    return aucs


def umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale, rotation and translation of the similarity best taking points ``source`` (N, 3)
    onto ``target`` in least squares (Umeyama 1991)."""
    mean_s, mean_t = source.mean(0), target.mean(0)
    s, t = source - mean_s, target - mean_t
    u, singular, vt = np.linalg.svd(t.T @ s / len(source))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(singular) @ sign) / (s**2).sum(1).mean())
    return scale, rotation, mean_t - scale * rotation @ mean_s


def _among_photos(reference: Poses, reference_path: Path, images: Path) -> Poses:
    """The reference poses of the images in the folder ``images`` (by file name)."""
    photos = {Path(name).name for name in discover_images(images)}
    keep = [i for i, name in enumerate(reference.names) if Path(name).name in photos]
    if not keep:
        raise ConfigError(f"{images}: none of its photos is in {reference_path} (by file name)")
    return Poses([reference.names[i] for i in keep], reference.rotations[keep], reference.translations[keep])


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def evaluate_poses(model_path: Path, reference_path: Path, images: Path | None = None) -> PoseEvaluation:
    """Score the model in ``model_path`` against the poses in ``reference_path`` (module doc); with
    ``images`` (the photos the model was built from) only the reference images among them count."""
    started = time.monotonic()
    reference = read_reference(reference_path)
    if images is not None:
        reference = _among_photos(reference, reference_path, images)
    model, note = read_model_poses(model_path)
    reference_index = _by_basename(reference.names, reference_path)
    model_index = _by_basename(model.names, model_path)
    common = [base for base in reference_index if base in model_index]
    if not common:
        raise ConfigError(
            f"{model_path}: no image of the model is in {reference_path} (by file name; the model has "
            f"{listed(sorted(model_index), 3)}, the reference {listed(sorted(reference_index), 3)})"
        )
    n = len(reference.names)
    if n < 2:
        raise ConfigError(f"{reference_path}: {counted(n, 'reference image')}; pairs need at least 2")
    in_model = np.array([model_index.get(Path(name).name, -1) for name in reference.names])
    registered = in_model >= 0
    pairs = np.array(list(itertools.combinations(range(n), 2)), dtype=np.int64).reshape(-1, 2)
    both = registered[pairs].all(1)
    reference_r, reference_t = relative_poses(reference, pairs[both])
    model_r, model_t = relative_poses(model, in_model[pairs[both]])
    rotation_errors = rotation_angles(model_r, reference_r)
    translation_errors = vector_angles(model_t, reference_t)
    errors = np.full(len(pairs), np.inf)
    errors[both] = np.maximum(rotation_errors, translation_errors)

    reference_centres = reference.centres()
    scene_size = float(np.median(np.linalg.norm(reference_centres - reference_centres.mean(0), axis=1)))
    images = [ImageResult(Path(name).name, bool(ok)) for name, ok in zip(reference.names, registered)]
    centre_errors = np.empty(0)
    if registered.sum() >= 3 and scene_size > 0:
        scale, rotation, shift = umeyama(model.centres()[in_model[registered]], reference_centres[registered])
        aligned = scale * model.centres()[in_model[registered]] @ rotation.T + shift
        centre_errors = np.linalg.norm(aligned - reference_centres[registered], axis=1) / scene_size
        # camera-to-world rotations: the model's, turned by the alignment, against the reference's
        orientation = rotation_angles(
            rotation @ np.transpose(model.rotations[in_model[registered]], (0, 2, 1)),
            np.transpose(reference.rotations[registered], (0, 2, 1)),
        )
        for image, centre, angle in zip(
            itertools.compress(images, registered), centre_errors, orientation, strict=True
        ):
            image.centre_error, image.rotation_error_deg = float(centre), float(angle)
    return PoseEvaluation(
        model=str(model_path),
        reference=str(reference_path),
        reference_images=n,
        registered=int(registered.sum()),
        pairs=len(pairs),
        auc={f"{t:g}": 100 * auc for t, auc in zip(AUC_THRESHOLDS, pose_auc(errors), strict=True)},
        median_rotation_error_deg=_median(rotation_errors),
        median_translation_error_deg=_median(translation_errors),
        median_centre_error=_median(centre_errors),
        scene_size=scene_size,
        images=images,
        note=note,
        wall_time_s=time.monotonic() - started,
    )
