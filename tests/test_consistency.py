"""A model's agreement with its verified pairs (``sp_extract/sfm/consistency.py``) and the mapping
done again when it contradicts them (``mappers.map_ranked``): the real photos' right model agrees,
the same model with a wrong focal length or disturbed poses does not, and an inconsistent mapping
is replaced by the next seed's."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
import pytest
from conftest import reconstruct_report

from sp_extract.sfm import mappers
from sp_extract.sfm.config import MAPPING_ATTEMPTS, REMAP_BELOW, WRONG_BELOW, ColmapRun, MapperOptions
from sp_extract.sfm.consistency import pair_agreements
from sp_extract.sfm.environment import VERIFY_MAX_ERROR
from sp_extract.sfm.mapping import ModelStats, inconsistent_warning, judged_wrong


@dataclass
class Scene:
    database: Path  # the real photos' (conftest: README's commands, one thread)
    images: Path
    model: Path  # README's reconstruct of it (one thread): a right model

    def right(self) -> Any:
        return pycolmap.Reconstruction(self.model)

    def agreement(self, model: Any) -> float | None:
        return pair_agreements([model], self.database, VERIFY_MAX_ERROR)[0]

    def mapped(self, out: Path, run: ColmapRun, previous: str = "") -> list[mappers.RankedModel]:
        return mappers.map_ranked(
            self.database, self.images, out, "incremental", MapperOptions(), run, previous
        )


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, sacre_coeur_database: Path, sacre_coeur: Path) -> Scene:
    root = tmp_path_factory.mktemp("consistency")
    report = reconstruct_report(root, sacre_coeur, sacre_coeur_database)
    assert report["models"][0]["registered_images"] == 10
    return Scene(sacre_coeur_database, sacre_coeur, root / "sparse" / "0")


def wrong_focal(model: Any) -> Any:
    """``model`` with every camera's focal length at 40 % (the wrong fox models had 40 % of the
    right one)."""
    for camera in model.cameras.values():
        camera.params[0] *= 0.4
    return model


def disturbed_poses(model: Any) -> Any:
    """``model`` with every registered image turned by 3 degrees about a random axis."""
    rng = np.random.default_rng(0)
    for image_id in model.reg_image_ids():
        image = model.images[image_id]
        axis = rng.normal(size=3)
        turn = pycolmap.Rotation3d(axis / np.linalg.norm(axis) * np.radians(3))
        pose = image.cam_from_world()
        model.frames[image.frame_id].rig_from_world = pycolmap.Rigid3d(turn * pose.rotation, pose.translation)
    return model


def test_the_right_model_agrees_with_its_pairs(scene: Scene) -> None:
    agreement = scene.agreement(scene.right())
    assert agreement is not None and agreement >= REMAP_BELOW, agreement  # measured 0.88


@pytest.mark.parametrize("spoil", [wrong_focal, disturbed_poses])
def test_a_spoiled_model_contradicts_its_pairs(scene: Scene, spoil: Any) -> None:
    agreement = scene.agreement(spoil(scene.right()))
    assert agreement is not None and agreement < WRONG_BELOW, agreement


def test_an_inconsistent_mapping_is_done_again_with_the_next_seed(
    tmp_path: Path, scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds = []

    def mapper(database: Path, images: Path, output: Path, *args: Any) -> dict[int, Any]:
        seeds.append(args[-2].seed)  # the ColmapRun
        return {0: wrong_focal(scene.right()) if len(seeds) == 1 else scene.right()}

    monkeypatch.setattr(mappers, "run_mapper", mapper)
    found = scene.mapped(tmp_path, ColmapRun(seed=5))
    assert seeds == [5, 6]
    assert found[0].seed == 6 and found[0].consistent
    assert pycolmap.Reconstruction(tmp_path / "0").num_points3D() == found[0].model.num_points3D()


def test_a_mapping_inconsistent_with_every_seed_keeps_the_most_consistent(
    tmp_path: Path, scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds = []

    def mapper(database: Path, images: Path, output: Path, *args: Any) -> dict[int, Any]:
        seeds.append(args[-2].seed)
        return {0: disturbed_poses(scene.right()) if len(seeds) == 2 else wrong_focal(scene.right())}

    monkeypatch.setattr(mappers, "run_mapper", mapper)
    found = scene.mapped(tmp_path, ColmapRun())
    assert seeds == list(range(MAPPING_ATTEMPTS))
    assert not found[0].consistent
    focal, poses = (scene.agreement(spoil(scene.right())) for spoil in (wrong_focal, disturbed_poses))
    assert found[0].agreement == max(focal, poses)
    assert found[0].seed == (1 if poses > focal else 0)


@pytest.mark.parametrize("case", ["continued", "large"])
def test_a_continued_or_large_model_is_mapped_once(
    tmp_path: Path, scene: Scene, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    calls = []

    def mapper(*args: Any) -> dict[int, Any]:
        calls.append(args)
        return {0: wrong_focal(scene.right())}

    monkeypatch.setattr(mappers, "run_mapper", mapper)
    if case == "large":
        monkeypatch.setattr(mappers, "REMAP_UP_TO", 9)  # the model has 10 images
    found = scene.mapped(tmp_path, ColmapRun(), previous=str(scene.model) if case == "continued" else "")
    assert len(calls) == 1 and not found[0].consistent  # reported (exit 1), not mapped again


@pytest.mark.parametrize(
    ("agreement", "seed", "wrong", "noted"),
    [
        (0.88, 0, False, False),
        (0.62, 0, False, False),
        (0.88, 1, False, True),
        (0.45, 2, True, True),
        (None, None, False, False),
    ],
)
def test_the_largest_model_is_judged_by_its_agreement(
    agreement: float | None, seed: int | None, wrong: bool, noted: bool
) -> None:
    """What reconstruct and sfm report of their largest model: likely wrong (warned, exit 1) under
    WRONG_BELOW only; a note when another seed than the run's made it."""
    model = ModelStats("sparse/0", 10, 500, 2000, 4.0, 0.9, pair_agreement=agreement, seed=seed)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert judged_wrong(model, 0, notes) is wrong
    assert [str(w.message) for w in caught] == ([inconsistent_warning(model)] if wrong else [])
    assert bool(notes) is noted and all(f"mapped with seed {seed}" in note for note in notes)
