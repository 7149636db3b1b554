"""``sp-extract show``: pictures of what a store holds (drawn by ``pictures``) written as PNGs.

One entry gives one PNG; with several entries the output is a folder of PNGs and an
``index.html`` contact sheet.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

import cv2
import h5py
import numpy as np

from ..errors import ConfigError, StoreError
from ..names import flat_name
from ..pictures import FeatureSource, draw_keypoints, draw_matches
from ..store.catalog import read_store_info
from ..store.reader import open_store


def write_png(picture: np.ndarray, path: Path) -> None:
    if not cv2.imwrite(str(path), picture, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise ConfigError(f"{path}: cannot write the PNG (does the folder exist and is it writable?)")


def write_index(folder: Path, entries: list[tuple[str, str]]) -> Path:
    """``index.html``: every picture with its caption, a contact sheet for a browser."""
    figures = "\n".join(
        f'<figure><a href="{html.escape(file)}"><img src="{html.escape(file)}" loading="lazy"></a>'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for file, caption in entries
    )
    page = (
        "<!doctype html>\n<meta charset='utf-8'><title>sp-extract show</title>\n<style>"
        "body{font-family:sans-serif;display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;width:480px}img{width:100%}figcaption{font-size:12px}</style>\n"
        f"{figures}\n"
    )
    index = folder / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def show(
    store: Path, names: list[str], images: Path, out: Path, features: Path | None = None, max_size: int = 1600
) -> list[Path]:
    """Draw the keypoints of ``names`` (a feature store) or the matches of the pairs ``names``
    taken two by two (a match store, with its ``features``) into ``out``: one PNG, or, for
    several entries or an ``out`` that is not a .png file, a folder of PNGs with an index.html.
    Returns the files written."""
    store, images, out = Path(store), Path(images), Path(out)
    if not store.is_file():
        raise ConfigError(f"{store}: no such store")
    if not images.is_dir():
        raise ConfigError(f"{images}: no such image folder")
    if not names:
        raise ConfigError("name at least one image (or two for a pair); 'sp-extract info --names' lists them")
    if max_size < 0:
        raise ConfigError(f"--max-size must be >= 0 (0 = full size), got {max_size}")
    kind, jobs = _jobs(store, names)
    single = _prepare_out(out, len(jobs))
    if kind == "features":
        written = _draw_keypoints(store, images, jobs, out, single, max_size)
    else:
        written = _draw_matches(store, features, images, jobs, out, single, max_size)
    files = [path for path, _ in written]
    if not single:
        files.append(write_index(out, [(path.name, caption) for path, caption in written]))
    return files


def _jobs(store: Path, names: list[str]) -> tuple[str, list[tuple[str, ...]]]:
    """The store's kind (features or matches) and its pictures: one image each, or one pair."""
    with h5py.File(store, "r", locking=False) as h5:
        kind = h5.attrs.get("sp_extract_kind")
    if kind == "matches":
        if len(names) % 2:
            raise ConfigError("a match store needs image names two by two: NAME0 NAME1 [NAME0 NAME1 ...]")
        return kind, [tuple(names[i : i + 2]) for i in range(0, len(names), 2)]
    if kind == "features":
        return kind, [(name,) for name in names]
    raise StoreError(f"{store}: not an sp-extract feature or match store")


def _prepare_out(out: Path, pictures: int) -> bool:
    """Whether ``out`` is the one PNG file written (else a folder, made here), checked."""
    single = pictures == 1 and out.suffix.lower() == ".png"
    if not single and out.suffix.lower() == ".png":
        raise ConfigError(f"--out {out}: several pictures need a folder, not a .png file")
    if single and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    return single


def _draw_keypoints(
    store: Path, images: Path, jobs: list[tuple[str, ...]], out: Path, single: bool, max_size: int
) -> list[tuple[Path, str]]:
    """The keypoints of each image of ``jobs`` (a feature store), saved."""
    source = FeatureSource(store)
    try:
        return _save((draw_keypoints(source, images, job[0], max_size) for job in jobs), jobs, out, single)
    finally:
        source.close()


def _draw_matches(
    store: Path,
    features: Path | None,
    images: Path,
    jobs: list[tuple[str, ...]],
    out: Path,
    single: bool,
    max_size: int,
) -> list[tuple[Path, str]]:
    """The matches of each pair of ``jobs`` (a match store) on the keypoints of ``features``, saved."""
    if features is None:
        raise ConfigError(f"{store}: a match store; pass --features, the feature store of its matches")
    if not Path(features).is_file():
        raise ConfigError(f"--features {features}: no such feature store")
    verify = read_store_info(store, "matches")[0].get("verify")
    source = FeatureSource(Path(features))
    try:
        with open_store(store, locking=False) as h5:
            pictures = (draw_matches(source, h5, store, verify, images, job, max_size) for job in jobs)
            return _save(pictures, jobs, out, single)
    finally:
        source.close()


def _save(
    pictures: Iterable[tuple[np.ndarray, str]], jobs: list[tuple[str, ...]], out: Path, single: bool
) -> list[tuple[Path, str]]:
    written = []
    for job, (picture, caption) in zip(jobs, pictures):
        path = out if single else out / ("__".join(flat_name(n) for n in job) + ".png")
        write_png(picture, path)
        written.append((path, caption))
    return written
