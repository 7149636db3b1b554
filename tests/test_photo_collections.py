"""A phone-like collection end to end: the shared photos, three stored sideways with an EXIF
orientation tag (as phones write portrait shots), through the five commands of the README."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
from test_colmap import reconstruct_photos
from test_orientation import VIEW, jpeg_bytes

# stored pixels for a tag: the upright photo turned the other way, so that viewers show it upright
SIDEWAYS = {"02928139_3448003521.jpg": 6, "17295357_9106075285.jpg": 8, "60584745_2207571072.jpg": 6}


def test_mixed_orientation_collection_registers_every_photo(
    tmp_path: Path, sacre_coeur: Path, real_weights: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(sacre_coeur.glob("*.jpg")):
        orientation = SIDEWAYS.get(source.name)
        if orientation is None:
            (photos / source.name).symlink_to(source)
            continue
        upright = cv2.imread(str(source))
        stored = VIEW[{6: 8, 8: 6}[orientation]](upright)  # the inverse turn
        (photos / source.name).write_bytes(jpeg_bytes(stored, orientation))

    data = reconstruct_photos(tmp_path / "run", photos, real_weights)

    best = max(data["models"], key=lambda m: m["registered_images"])
    assert best["registered_images"] == 10
    assert best["points3D"] >= 800
    with h5py.File(tmp_path / "run" / "feats.h5") as h5:  # sizes in the stored frame, as COLMAP reads it
        for name in SIDEWAYS:
            height, width = cv2.imread(str(photos / name), cv2.IMREAD_IGNORE_ORIENTATION).shape[:2]
            assert tuple(h5[name]["image_size"][()]) == (width, height)
